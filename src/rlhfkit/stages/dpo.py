"""``rlhfkit dpo``: direct preference optimisation (Rafailov et al. 2023) on the comparisons train-rm
reads: the policy learns the preferences itself, with no reward model and no sampling.

Objective (`losses.dpo_loss`)
    For a pair (y_w preferred to y_l) of prompt x, h = log π_θ(y_w|x)/π_ref(y_w|x) − log
    π_θ(y_l|x)/π_ref(y_l|x) with sequence log-probabilities (sums over the completion's tokens,
    the very ids ppo samples and scores); ``--loss sigmoid`` minimises −log σ(β·h), the Bradley–Terry
    loss of the implicit reward β·log(π_θ/π_ref); ``--loss ipo`` (Azar et al. 2023) minimises
    (h − 1/(2β))², which stops at a finite gap instead of pushing it on forever.

The reference
    is the starting policy. Its log-probabilities are computed once, before the first step, while
    the policy still *is* the reference (with ``--lora``: the same backbone with the adapter switched
    off), so no second model is held in memory. They are cached in
    ``OUT/checkpoints/reference_logps.safetensors`` (with a digest of the token ids they belong to);
    a resumed run reads them back instead of recomputing them.

Data (`rlhfkit.stages.preference_data`)
    The comparisons, ranking groups and validation split of train-rm: ``--val-data``, or
    ``--val-fraction`` of the prompts of ``--data`` (the same prompts train-rm holds out with the same
    seed). Comparisons that share ``group`` (one ranking) form one batch element whose distinct
    completions each go through the model once; ``--batch-size`` counts elements. Ties (margin 0)
    order nothing and are dropped; pairs longer than ``--max-length`` are dropped (and counted).

The loop (as train-rm's), one optimizer step at a time:

1. the step's elements, from the epoch's order (a function of seed and epoch; under torchrun each
   rank takes its share and DDP averages the gradients);
2. per micro-batch: the sequence log-probability of every distinct completion (`SequenceLogps`),
   pairs gathered, the DPO loss over the micro-batch's pairs, divided by ``--grad-accum``;
3. gradient clipping, AdamW, learning-rate schedule;
4. every ``--log-every`` steps a ``metrics.jsonl`` line with TRL's names: ``loss/train``,
   ``rewards/chosen``, ``rewards/rejected`` (mean β·log π_θ/π_ref), ``rewards/accuracies``,
   ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; held-out ``loss/eval``,
   ``eval/accuracy``, ``eval/margin`` before the first step, every ``--eval-every`` steps and at
   the end; checkpoints every
   ``--save-every`` steps and at the end (``--resume`` continues exactly);
5. the final policy (merged with ``--lora``) as a plain model directory.

The policy runs with dropout off (eval mode, as in ppo), so its log-probabilities are a function
of its weights and the first step's h is 0 (loss log 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from rlhfkit import models, training
from rlhfkit.config import DPOConfig
from rlhfkit.errors import DataError
from rlhfkit.losses import dpo_loss, masked_sum
from rlhfkit.provenance import RunInfo
from rlhfkit.stages import preference_data
from rlhfkit.stages.preference_data import Group

STAGE = "dpo"
REFERENCE_FILE = "reference_logps.safetensors"  # in OUT/checkpoints/


class SequenceLogps(torch.nn.Module):
    """log π(completion | prompt) of a batch, summed over the completion's tokens: (N,). One module,
    so that DDP wraps the forward that the backward follows."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        from rlhfkit.generation import policy_logprobs

        logprobs = policy_logprobs(self.model, query, query_mask, response, response_mask)[0]  # (N, T), 0 after the end
        return masked_sum(logprobs.float(), response_mask)


@dataclasses.dataclass
class Sequences:
    """The distinct completions of a list of groups, flat: group e's completions start at ``offsets[e]``."""

    groups: list[Group]
    offsets: list[int]

    @classmethod
    def of(cls, groups: list[Group]) -> Sequences:
        offsets, n = [], 0
        for g in groups:
            offsets.append(n)
            n += len(g.completions)
        return cls(groups, offsets)

    @property
    def flat(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [(g.prompt, c) for g in self.groups for c in g.completions]

    def batch(
        self, elements: Sequence[int], pad_token_id: int
    ) -> tuple[preference_data.Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sequences of some groups as one batch, with the pairs' rows (winners, losers) in it
        and each row's index into the flat list (for the cached reference log-probs)."""
        seqs, winners, losers, flat = [], [], [], []
        for e in elements:
            g = self.groups[e]
            base = len(seqs)
            seqs.extend((g.prompt, c) for c in g.completions)
            winners.extend(base + w for w in g.winners)
            losers.extend(base + lo for lo in g.losers)
            flat.extend(range(self.offsets[e], self.offsets[e] + len(g.completions)))
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        return preference_data.collate(seqs, pad_token_id), as_long(winners), as_long(losers), as_long(flat)


def run(config: DPOConfig) -> dict[str, Any] | None:
    """Train; return the result on rank 0 (None on the other ranks of a torchrun job)."""
    config.check()
    device = models.resolve_device(config.device)
    dtype = models.resolve_dtype(config.dtype, device)
    with training.distributed_run(device) as dist:  # the shared teardown: failures end every rank, leave no half run
        return _run(config, device, dtype, dist)


def _run(config: DPOConfig, device: torch.device, dtype: torch.dtype, dist: training.Dist) -> dict[str, Any] | None:
    from rlhfkit.console import progress_bar

    say = dist.say
    out = Path(config.out)
    resume_from = training.prepare_run_dir(out, config.resume, STAGE, dataclasses.asdict(config), dist=dist)
    training.barrier(dist)  # every rank has looked at --out before rank 0 writes into it
    info = RunInfo(STAGE, config, {"policy": config.policy, "data": config.data, "val_data": config.val_data or None})
    data_sha = info.inputs["data"][0]["sha256"] if info.inputs["data"] else None

    # 1. data: parse, split by prompt, encode, group (all before the model is loaded)
    tokenizer = models.load_tokenizer(config.policy, trust_remote_code=config.trust_remote_code)
    train_cmp, val_cmp, skipped = preference_data.load_comparisons(
        config.data, config.val_data, config.val_fraction, config.seed, skip_invalid=config.skip_invalid
    )
    encode = preference_data.Encoder(tokenizer, config.chat_template)
    train_groups, train_stats = preference_data.build_groups(train_cmp, encode, config.max_length)
    val_groups, val_stats = preference_data.build_groups(val_cmp, encode, config.max_length)
    if not train_groups:
        raise DataError(config.data, None, None, f"no training pair left ({train_stats.dropped_too_long} longer than "
                        f"--max-length {config.max_length}, {train_stats.dropped_ties} ties)")  # fmt: skip
    dropped = train_stats.dropped_too_long + val_stats.dropped_too_long
    if dropped:
        say(f"[yellow]warning:[/] dropped {dropped} pair(s) longer than --max-length {config.max_length} tokens")
    if train_stats.dropped_ties + val_stats.dropped_ties:
        say(f"[yellow]note:[/] dropped {train_stats.dropped_ties + val_stats.dropped_ties} tie(s) (margin 0): DPO needs an order")
    say(f"dpo: {train_stats.pairs} training pairs in {train_stats.elements} batch elements "
        f"({train_stats.sequences} completions to score per epoch); {val_stats.pairs} held-out pairs")  # fmt: skip
    train, val = Sequences.of(train_groups), Sequences.of(val_groups)

    # 2. the policy: float32 weights, dropout off; LoRA adapters if asked
    training.seed_everything(config.seed)
    model = models.load_model(
        config.policy, "causal-lm", dtype=torch.float32, device=device, trust_remote_code=config.trust_remote_code
    )
    models.disable_dropout(model)
    if config.lora:
        model = models.apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                  target_modules=config.lora_target_modules)  # fmt: skip
    # no dropout anywhere (attention dropout too): log-probs are a function of the weights; training mode only
    # lets --gradient-checkpointing recompute (transformers applies it then)
    model.train(config.gradient_checkpointing)
    scorer = training.wrap_model(SequenceLogps(model), dist, device, config)  # --strategy (DDP, or FSDP in place)
    autocast, scaler = training.mixed_precision(dtype, device)

    # 3. the reference log-probs: computed once while the policy is the reference, cached in OUT
    with training.gathered(model):  # FSDP: ranks' shards may take different numbers of batches
        ref_train, ref_val = reference_logps(model, train, val, out, tokenizer.pad_token_id, config, device, autocast, dist, say)

    # 4. schedule, optimizer, resume
    step_batches = preference_data.StepBatches(len(train_groups), dist, config.batch_size, config.grad_accum, config.seed)
    steps_per_epoch = step_batches.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    optimizer = training.make_optimizer(model, config.lr, config.weight_decay)
    scheduler = training.make_scheduler(optimizer, config.schedule, config.warmup_steps, total_steps)
    schedulers: dict[str, Any] = {"policy": scheduler, **({"grad_scaler": scaler} if scaler else {})}
    step = 0
    if resume_from is not None:
        state = training.load_checkpoint(
            resume_from, modules={"policy": model}, optimizers={"policy": optimizer}, schedulers=schedulers
        )
        training.check_same_data(state, config.data, data_sha, resume_from)
        step = int(state["step"])
        say(f"resuming from {resume_from} (step {step} of {total_steps})")
    resumed_from = step
    metrics_log = training.MetricsLog(out, dist, resume_step=step if resume_from is not None else None, run=info)

    def checkpoint(at: int) -> None:
        training.save_checkpoint(  # rank 0 writes (DDP), or every rank its shard (FSDP)
            out, at, modules={"policy": model}, optimizers={"policy": optimizer}, schedulers=schedulers,
            state={"epoch": at // steps_per_epoch, "config": dataclasses.asdict(config), "data_sha256": data_sha},
            keep=config.keep_checkpoints, dist=dist,
        )  # fmt: skip
        training.barrier(dist)

    def held_out(at: int) -> dict[str, float]:
        if not val_groups:
            return {}
        with training.gathered(model):
            result = evaluate(model, val, ref_val, config, tokenizer.pad_token_id, device, autocast, dist)
        return {k: v for k, v in metrics_log.log(at, result).items() if k != "step"}

    # 5. train
    last = training.last_metrics(out) if resume_from is not None else {}
    window: list[dict[str, torch.Tensor]] = []
    pairs_done, tokens_done, train_seconds = 0, 0, 0.0
    with progress_bar(STAGE, total=total_steps, completed=step, enabled=dist.is_main) as bar:
        if step == 0:
            held_out(0)  # where the policy starts: h = 0 on every pair (loss log 2 for sigmoid)
        while step < total_steps:
            micro = step_batches(step)
            started = time.perf_counter()
            sums: dict[str, torch.Tensor] = {}
            for j, chunk in enumerate(micro):
                batch, winners, losers, flat = train.batch(chunk, tokenizer.pad_token_id)
                batch, winners, losers = batch.to(device), winners.to(device), losers.to(device)
                ref = ref_train[flat].to(device)  # (N,)
                with training.no_sync(scorer, skip=j < len(micro) - 1):
                    with autocast():
                        logps = scorer(*batch.args())  # (N,)
                    loss, stats = dpo_loss(logps[winners], logps[losers], ref[winners], ref[losers], config.beta, config.loss)
                    scaled = loss / len(micro)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                stats |= {
                    "loss": loss.detach(),
                    "logps_chosen": logps[winners].detach().mean(),
                    "logps_rejected": logps[losers].detach().mean(),
                }
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0) + v / len(micro)
                pairs_done += sum(train_groups[e].num_pairs for e in chunk)  # counted on the host: no device sync
                tokens_done += sum(train_groups[e].num_tokens for e in chunk)
            grad_norm, lr = training.optimizer_step(model, optimizer, scheduler, scaler, config.max_grad_norm,
                                                    step=step + 1, dist=dist, device=device, loss=sums["loss"])  # fmt: skip
            train_seconds += time.perf_counter() - started
            step += 1
            window.append({**sums, "grad_norm": grad_norm.detach()})

            if step % config.log_every == 0 or step == total_steps:
                mean = training.window_means(window, dist, device, pairs=pairs_done, tokens=tokens_done)
                last = metrics_log.log(step, {
                    "loss/train": mean["loss"],
                    "rewards/chosen": mean["rewards_chosen"],
                    "rewards/rejected": mean["rewards_rejected"],
                    "rewards/accuracies": mean["accuracy"],
                    "rewards/margins": mean["margin"],
                    "logps/chosen": mean["logps_chosen"],
                    "logps/rejected": mean["logps_rejected"],
                    **training.step_metrics(mean, lr, step, steps_per_epoch, train_seconds, dist, unit="pairs"),
                })  # fmt: skip
                window = []
                bar.update(0, info=f"loss {last['loss/train']:.4f} | acc {last['rewards/accuracies']:.2f} | "
                                   f"margin {last['rewards/margins']:.3f} | {last['perf/pairs_per_s']:.1f} pairs/s")  # fmt: skip
            bar.update(1)
            training.periodic(step, total_steps, config.eval_every, config.save_every, held_out, checkpoint)  # + the last step's

    # 6. held-out evaluation, the model directory
    evaluation = held_out(step)
    summary = {**{k: v for k, v in last.items() if k != "step"}, **evaluation, "steps": step}
    saved = training.gather_model(model, dist)  # FSDP: the full weights on rank 0 (every rank takes part)
    if dist.is_main:
        final, keep = models.final_model(saved, out, lora=config.lora, adapter=config.save_adapter)
        extra = {"dpo": {"beta": config.beta, "loss": config.loss, "reference": "the starting policy (--policy)",
                         "train": train_stats.as_dict(), "val": val_stats.as_dict()}}  # fmt: skip
        models.save_model_dir(final, tokenizer, out, info, summary, extra=extra, keep=keep)
        accuracy = f"held-out accuracy {evaluation['eval/accuracy']:.3f}" if evaluation else "no held-out set"
        say(f"dpo policy saved to {out}: {accuracy}")
    training.barrier(dist)
    if not dist.is_main:
        return None
    return {
        "out": str(out),
        "steps": step,
        "resumed_from": resumed_from,
        "train": train_stats.as_dict(),
        "val": val_stats.as_dict(),
        "skipped_invalid": skipped,
        "metrics": summary,
    }


# --- the reference ------------------------------------------------------------------------------------


def _digest(sequences: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> str:
    h = hashlib.sha256()
    for prompt, completion in sequences:
        h.update(repr((prompt, completion)).encode())
    return h.hexdigest()


@torch.no_grad()
def sequence_logps(
    model: Any,
    sequences: list[tuple[tuple[int, ...], tuple[int, ...]]],
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """log π(completion | prompt) of every sequence, (N,) float32 on the CPU, in the given order
    (batched by length, to waste little on padding)."""
    scorer = SequenceLogps(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    out = torch.empty(len(sequences), dtype=torch.float32)
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        batch = preference_data.collate([sequences[r] for r in rows], pad_token_id).to(device)
        with autocast():
            out[rows] = scorer(*batch.args()).float().cpu()
    return out


def reference_logps(
    model: Any,
    train: Sequences,
    val: Sequences,
    out: Path,
    pad_token_id: int,
    config: DPOConfig,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    dist: training.Dist,
    say: Callable[[str], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference log-probs of every training and held-out completion, (N_train,) and (N_val,).

    Read from ``OUT/checkpoints/reference_logps.safetensors`` when it holds the same sequences (a
    resumed run); else computed under the starting policy (with LoRA, the adapter switched off;
    each rank scores every world-th sequence and they are shared), and written there by rank 0.
    """
    from safetensors.torch import load_file, save_file

    sequences = train.flat + val.flat
    digest = _digest(sequences)
    path = out / training.CHECKPOINTS / REFERENCE_FILE
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            same = (f.metadata() or {}).get("sequences_sha256") == digest
        if same:
            cached = load_file(str(path))
            say(f"reference log-probs read from {path}")
            return cached["train"], cached["val"]
    context = model.disable_adapter() if config.lora else nullcontext()
    mine = training.shard(list(range(len(sequences))), dist)
    with context:
        values = sequence_logps(model, [sequences[i] for i in mine], config.eval_batch_size, pad_token_id, device, autocast)
    logps = torch.empty(len(sequences), dtype=torch.float32)
    if dist.enabled:
        gathered: list[Any] = [None] * dist.world_size
        tdist.all_gather_object(gathered, (mine, values.tolist()))
        for index, part in gathered:
            logps[torch.tensor(index, dtype=torch.long)] = torch.tensor(part, dtype=torch.float32)
    else:
        logps[mine] = values
    n = len(train.flat)
    result = {"train": logps[:n].contiguous(), "val": logps[n:].contiguous()}
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(result, str(tmp), metadata={"sequences_sha256": digest})
        tmp.replace(path)  # atomic: a run killed here leaves no half-written cache
    training.barrier(dist)
    return result["train"], result["val"]


# --- held-out evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: Any,
    val: Sequences,
    ref_val: torch.Tensor,
    config: DPOConfig,
    pad_token_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    dist: training.Dist,
) -> dict[str, torch.Tensor]:
    """``loss/eval``, ``eval/accuracy`` (the implicit reward ranks the pair right) and ``eval/margin``
    (mean implicit-reward difference) over every held-out pair; each rank scores its share."""
    scorer = SequenceLogps(model)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # pairs, loss, accuracy, margin (× pairs)
    mine = training.shard(list(range(len(val.groups))), dist)
    for i in range(0, len(mine), config.eval_batch_size):
        batch, winners, losers, flat = val.batch(mine[i : i + config.eval_batch_size], pad_token_id)
        with autocast():
            logps = scorer(*batch.to(device).args()).float()
        ref = ref_val[flat].to(device)
        winners, losers = winners.to(device), losers.to(device)
        loss, stats = dpo_loss(logps[winners], logps[losers], ref[winners], ref[losers], config.beta, config.loss)
        p = float(winners.numel())
        sums += torch.stack([torch.tensor(p, device=device), loss * p, stats["accuracy"] * p, stats["margin"] * p]).double()
    if dist.enabled:
        tdist.all_reduce(sums)
    pairs = sums[0].clamp_min(1)
    return {"loss/eval": sums[1] / pairs, "eval/accuracy": sums[2] / pairs, "eval/margin": sums[3] / pairs}
