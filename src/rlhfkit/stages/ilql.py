"""``rlhfkit ilql``: implicit language Q-learning (Snell et al. 2022), offline RL from scored samples or
comparisons: no reward model queried during training, no sampling.

Data (`rlhfkit.stages.preference_data`)
    Either samples whose completions carry a ``score`` or ``reward`` (eval's ``samples.jsonl``, or
    collect's output scored by any means), or comparisons (the files train-rm reads). A comparison
    file becomes rewarded sequences by each distinct completion's mean outcome in its group: +1 per
    pair it wins, −1 per pair it loses, so a plain pair gives chosen +1 and rejected −1, and a
    ranking of K evenly spaced rewards from +1 to −1 (ties, margin 0, are dropped). The reward sits
    on the completion's last token; every other token's reward is 0. The held-out set is
    ``--val-data``, or ``--val-fraction`` of the prompts (train-rm's split).

Model (`rlhfkit.ilql_heads`)
    On the policy's last hidden state at each response position t (state s_t = prompt + y_<t):
    Q(s_t, ·), one value per token; V(s_t); and a target Q̂, a Polyak average of Q
    (Q̂ ← (1 − α)·Q̂ + α·Q after every optimizer step, α = ``--polyak``), outside the trained
    module and never differentiated. The LM itself is trained by behaviour cloning, π_β.

Loss (`losses.ilql_loss`), token by token over the responses
    (Q(s_t, a_t) − r_t − γ·V(s_{t+1}))² + expectile_τ(Q̂(s_t, a_t) − V(s_t))
    + α_CQL·[logsumexp Q(s_t, ·) − Q(s_t, a_t)] + bc·(−log π_β(a_t|s_t)).

Policy (Snell et al., eq. 4)
    π(a|s) ∝ π_β(a|s)·exp(β·(Q̂(s, a) − V(s))), β = ``--beta``. The saved directory is a plain causal
    LM (π_β) plus ``ilql_heads.safetensors`` (Q̂ and V, with β), and ``rlhfkit.json`` says so;
    ``collect`` and ``eval`` find the heads and sample from the shifted logits, so an ILQL model is
    evaluated like every other policy.

The loop is train-rm's and dpo's: epochs of micro-batches in an order that is a function of (seed,
epoch), sharded by rank under torchrun (DDP over the LM and its Q and V heads), gradient clipping,
AdamW, the schedule, then the Polyak step; ``metrics.jsonl`` (``loss/train``, ``loss/q``,
``loss/v``, ``loss/cql``, ``loss/bc``, ``ilql/q``, ``ilql/v``, ``ilql/advantage``; held-out
``loss/eval``, ``eval/advantage``), checkpoints (the trained weights and the target Q̂) and exact
resume. The LM runs with dropout off (eval mode).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from rlhfkit import models, training
from rlhfkit.config import ILQLConfig
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.ilql_heads import HEADS_FILE, Head, make_heads, save_heads
from rlhfkit.losses import ilql_loss
from rlhfkit.provenance import RunInfo
from rlhfkit.stages import preference_data

STAGE = "ilql"
Rewarded = tuple[tuple[int, ...], tuple[int, ...], float]  # (prompt ids, completion ids, reward)


@dataclasses.dataclass
class DataStats:
    sequences: int = 0
    source: str = "comparisons"  # or "samples"
    dropped_too_long: int = 0
    dropped_ties: int = 0
    reward_mean: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rewarded_sequences(
    items: Sequence[Any], encode: preference_data.Encoder, max_length: int, kind: str
) -> tuple[list[Rewarded], DataStats]:
    """Comparisons or scored samples → (prompt ids, completion ids, reward) (see the module docstring)."""
    stats = DataStats(source=kind)
    out: list[Rewarded] = []
    if kind == "comparisons":
        groups, group_stats = preference_data.build_groups(items, encode, max_length)
        stats.dropped_too_long, stats.dropped_ties = group_stats.dropped_too_long, group_stats.dropped_ties
        for g in groups:
            out.extend((g.prompt, c, r) for c, r in zip(g.completions, g.outcomes()))
    else:
        for sample in items:
            prompt = encode.prompt(sample.prompt)
            for text, stopped, reward in sample.completions:
                completion = encode.completion(text, stopped)
                if len(prompt) + len(completion) > max_length:
                    stats.dropped_too_long += 1
                    continue
                out.append((prompt, completion, reward))
    stats.sequences = len(out)
    stats.reward_mean = sum(r for *_, r in out) / max(1, len(out))
    return out, stats


class ILQLModel(torch.nn.Module):
    """The LM and its Q and V heads, trained together (what the optimizer steps and DDP wraps)."""

    def __init__(self, lm: torch.nn.Module, q: Head, v: Head):
        super().__init__()
        self.lm, self.q, self.v = lm, q, v

    def forward(
        self, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor, response_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """logprobs (B, T) of π_β, q_values (B, T, V), values (B, T) at the positions that predict
        the response tokens, and the hidden states there (B, T, H), detached, for the target Q̂."""
        from rlhfkit.generation import policy_logprobs

        logprobs, _, hidden = policy_logprobs(self.lm, query, query_mask, response, response_mask, with_hidden=True)
        return {"logprobs": logprobs, "q_values": self.q(hidden), "values": self.v(hidden), "hidden": hidden.detach()}


def batch_loss(model: Any, target_q: Head, batch: preference_data.Batch, rewards: torch.Tensor, config: ILQLConfig,
               autocast: Callable[[], AbstractContextManager]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The ILQL loss of one batch; ``rewards`` (B, T), the sequence's reward on its last token."""
    with autocast():
        out = model(*batch.args())
    with torch.no_grad():
        target = target_q(out["hidden"]).gather(-1, batch.response.unsqueeze(-1)).squeeze(-1)  # (B, T) Q̂(s_t, a_t)
    return ilql_loss(
        out["q_values"].float(), target, out["values"].float(), batch.response, rewards, batch.response_mask,
        gamma=config.gamma, tau=config.tau, cql_coef=config.cql_coef, logprobs=out["logprobs"].float(), bc_coef=config.bc_coef,
    )  # fmt: skip


def collate(sequences: Sequence[Rewarded], pad_token_id: int) -> tuple[preference_data.Batch, torch.Tensor]:
    """The batch and its (B, T) rewards: each sequence's reward on its last response token."""
    batch = preference_data.collate([(p, c) for p, c, _ in sequences], pad_token_id)
    rewards = torch.zeros(batch.response.shape)
    for i, (_, completion, reward) in enumerate(sequences):
        if completion:
            rewards[i, len(completion) - 1] = reward
    return batch, rewards


@torch.no_grad()
def polyak_update(target: torch.nn.Module, source: torch.nn.Module, alpha: float) -> None:
    """Q̂ ← (1 − α)·Q̂ + α·Q, parameter by parameter."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.mul_(1 - alpha).add_(s.detach(), alpha=alpha)


def run(config: ILQLConfig) -> dict[str, Any] | None:
    """Train; return the result on rank 0 (None on the other ranks of a torchrun job)."""
    config.check()
    device = models.resolve_device(config.device)
    dtype = models.resolve_dtype(config.dtype, device)
    with training.distributed_run(device) as dist:  # the shared teardown: failures end every rank, leave no half run
        return _run(config, device, dtype, dist)


def load_data(config: ILQLConfig, tokenizer: Any) -> tuple[list[Rewarded], list[Rewarded], DataStats, DataStats, int]:
    """(training sequences, held-out sequences, their stats, invalid records skipped)."""
    from rlhfkit import rm_data

    encode = preference_data.Encoder(tokenizer, config.chat_template)
    kind = "samples" if preference_data.is_samples_file(config.data) else "comparisons"
    if kind == "comparisons":
        train_items, val_items, skipped = preference_data.load_comparisons(
            config.data, config.val_data, config.val_fraction, config.seed, skip_invalid=config.skip_invalid
        )
    else:
        loaded = preference_data.load_scored_samples(config.data, skip_invalid=config.skip_invalid)
        skipped = 0
        if config.val_data:
            train_items, val_items = (
                loaded,
                preference_data.load_scored_samples(config.val_data, skip_invalid=config.skip_invalid),
            )
        else:
            train_items, val_items = rm_data.split_by_prompt(loaded, config.val_fraction, config.seed)  # type: ignore[arg-type]
    train, train_stats = rewarded_sequences(train_items, encode, config.max_length, kind)
    val, val_stats = rewarded_sequences(val_items, encode, config.max_length, kind)
    if not train:
        raise DataError(config.data, None, None, f"no training sequence left ({train_stats.dropped_too_long} longer than "
                        f"--max-length {config.max_length}, {train_stats.dropped_ties} ties)")  # fmt: skip
    return train, val, train_stats, val_stats, skipped


def _run(config: ILQLConfig, device: torch.device, dtype: torch.dtype, dist: training.Dist) -> dict[str, Any] | None:
    from rlhfkit.console import progress_bar

    say = dist.say
    out = Path(config.out)
    resume_from = training.prepare_run_dir(out, config.resume, STAGE, dataclasses.asdict(config), dist=dist)
    training.barrier(dist)
    info = RunInfo(STAGE, config, {"policy": config.policy, "data": config.data, "val_data": config.val_data or None})
    data_sha = info.inputs["data"][0]["sha256"] if info.inputs["data"] else None

    # 1. data (before any model is loaded)
    tokenizer = models.load_tokenizer(config.policy, trust_remote_code=config.trust_remote_code)
    train, val, train_stats, val_stats, skipped = load_data(config, tokenizer)
    dropped = train_stats.dropped_too_long + val_stats.dropped_too_long
    if dropped:
        say(f"[yellow]warning:[/] dropped {dropped} sequence(s) longer than --max-length {config.max_length} tokens")
    say(f"ilql: {len(train)} training sequences from {train_stats.source} (mean reward {train_stats.reward_mean:+.3f}); "
        f"{len(val)} held out")  # fmt: skip

    # 2. the LM (π_β) and its heads; the target Q̂ starts as Q and lives outside the trained module
    training.seed_everything(config.seed)
    lm = models.load_model(
        config.policy, "causal-lm", dtype=torch.float32, device=device, trust_remote_code=config.trust_remote_code
    )
    models.disable_dropout(lm)
    q_head, v_head = make_heads(lm, config.seed)
    target_q = Head(q_head.net[0].in_features, q_head.net[2].out_features).to(device)
    target_q.load_state_dict(q_head.state_dict())
    if config.lora:
        lm = models.apply_lora(lm, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                               target_modules=config.lora_target_modules)  # fmt: skip
    # dropout off everywhere; training mode only lets --gradient-checkpointing recompute (transformers applies it then)
    model = ILQLModel(lm, q_head, v_head).train(config.gradient_checkpointing)
    if config.strategy == "fsdp" and dist.enabled:  # the Polyak target Q-head is updated from Q's (sharded) weights
        raise ConfigError("--strategy fsdp: not for ilql on several processes yet (use --strategy ddp)")
    ddp_model = training.wrap_model(model, dist, device, config)
    autocast, scaler = training.mixed_precision(dtype, device)

    # 3. schedule, optimizer, resume
    step_batches = preference_data.StepBatches(len(train), dist, config.batch_size, config.grad_accum, config.seed)
    steps_per_epoch = step_batches.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    optimizer = training.make_optimizer(model, config.lr, config.weight_decay)
    scheduler = training.make_scheduler(optimizer, config.schedule, config.warmup_steps, total_steps)
    schedulers: dict[str, Any] = {"ilql": scheduler, **({"grad_scaler": scaler} if scaler else {})}
    trained = {"ilql": model, "target_q": target_q}  # what a checkpoint holds
    step = 0
    if resume_from is not None:
        state = training.load_checkpoint(resume_from, modules=trained, optimizers={"ilql": optimizer}, schedulers=schedulers)
        training.check_same_data(state, config.data, data_sha, resume_from)
        step = int(state["step"])
        say(f"resuming from {resume_from} (step {step} of {total_steps})")
    resumed_from = step
    metrics_log = training.MetricsLog(out, dist, resume_step=step if resume_from is not None else None, run=info)

    def checkpoint(at: int) -> None:
        training.save_checkpoint(  # rank 0 writes
            out, at, modules=trained, optimizers={"ilql": optimizer}, schedulers=schedulers,
            state={"epoch": at // steps_per_epoch, "config": dataclasses.asdict(config), "data_sha256": data_sha},
            keep=config.keep_checkpoints, dist=dist,
        )  # fmt: skip
        training.barrier(dist)

    def held_out(at: int) -> dict[str, float]:
        if not val:
            return {}
        result = evaluate(model, target_q, val, config, tokenizer.pad_token_id, device, autocast, dist)
        return {k: v for k, v in metrics_log.log(at, result).items() if k != "step"}

    # 4. train
    last = training.last_metrics(out) if resume_from is not None else {}
    window: list[dict[str, torch.Tensor]] = []
    tokens_done, sequences_done, train_seconds = 0, 0, 0.0
    with progress_bar(STAGE, total=total_steps, completed=step, enabled=dist.is_main) as bar:
        if step == 0:
            held_out(0)
        while step < total_steps:
            micro = step_batches(step)
            started = time.perf_counter()
            sums: dict[str, torch.Tensor] = {}
            for j, chunk in enumerate(micro):
                rows = [train[i] for i in chunk]
                batch, rewards = collate(rows, tokenizer.pad_token_id)
                batch, rewards = batch.to(device), rewards.to(device)
                with training.no_sync(ddp_model, skip=j < len(micro) - 1):
                    loss, stats = batch_loss(ddp_model, target_q, batch, rewards, config, autocast)
                    scaled = loss / len(micro)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                for k, v in {"loss": loss.detach(), **stats}.items():
                    sums[k] = sums.get(k, 0) + v / len(micro)
                sequences_done += len(rows)
                tokens_done += sum(len(p) + len(c) for p, c, _ in rows)
            grad_norm, lr = training.optimizer_step(model, optimizer, scheduler, scaler, config.max_grad_norm,
                                                    step=step + 1, dist=dist, device=device, loss=sums["loss"])  # fmt: skip
            polyak_update(target_q, model.q, config.polyak)  # the same on every rank: Q is
            train_seconds += time.perf_counter() - started
            step += 1
            window.append({**sums, "grad_norm": grad_norm.detach()})

            if step % config.log_every == 0 or step == total_steps:
                mean = training.window_means(window, dist, device, sequences=sequences_done, tokens=tokens_done)
                last = metrics_log.log(step, {
                    "loss/train": mean["loss"],
                    "loss/q": mean["loss_q"],
                    "loss/v": mean["loss_v"],
                    "loss/cql": mean["loss_cql"],
                    "loss/bc": mean["loss_bc"],
                    "ilql/q": mean["q_mean"],
                    "ilql/v": mean["v_mean"],
                    "ilql/advantage": mean["advantage_mean"],
                    **training.step_metrics(mean, lr, step, steps_per_epoch, train_seconds, dist, unit="sequences"),
                })  # fmt: skip
                window = []
                bar.update(0, info=f"loss {last['loss/train']:.4f} | q {last['ilql/q']:.3f} | v {last['ilql/v']:.3f} | "
                                   f"{last['perf/sequences_per_s']:.1f} seq/s")  # fmt: skip
            bar.update(1)
            training.periodic(step, total_steps, config.eval_every, config.save_every, held_out, checkpoint)  # + the last step's

    # 5. held-out evaluation, the model directory: π_β (merged with LoRA) + the heads
    evaluation = held_out(step)
    summary = {**{k: v for k, v in last.items() if k != "step"}, **evaluation, "steps": step}
    if dist.is_main:
        final, keep = models.final_model(model.lm, out, lora=config.lora, adapter=config.save_adapter)
        extra = {"ilql": {"heads": HEADS_FILE, "beta": config.beta, "sampling": "log_softmax(logits) + beta * (target_Q - V)",
                          "train": train_stats.as_dict(), "val": val_stats.as_dict()}}  # fmt: skip
        models.save_model_dir(final, tokenizer, out, info, summary, extra=extra, keep=keep,
                              write_extra=lambda directory: save_heads(directory, target_q, v_head, config.beta))  # fmt: skip
        say(f"ilql policy saved to {out} (π_β + {HEADS_FILE}: collect and eval sample with β = {config.beta})")
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
        "beta": config.beta,
        "metrics": summary,
    }


@torch.no_grad()
def evaluate(
    model: ILQLModel, target_q: Head, val: list[Rewarded], config: ILQLConfig, pad_token_id: int, device: torch.device,
    autocast: Callable[[], AbstractContextManager], dist: training.Dist,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """``loss/eval`` (the ILQL loss, sequence-weighted) and ``eval/advantage`` (mean Q̂ − V) over the
    held-out sequences; each rank scores its share."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # sequences, loss, advantage (× sequences)
    mine = training.shard(val, dist)
    for i in range(0, len(mine), config.eval_batch_size):
        rows = mine[i : i + config.eval_batch_size]
        batch, rewards = collate(rows, pad_token_id)
        loss, stats = batch_loss(model, target_q, batch.to(device), rewards.to(device), config, autocast)
        n = float(len(rows))
        sums += torch.stack([torch.tensor(n, device=device), loss * n, stats["advantage_mean"] * n]).double()
    if dist.enabled:
        tdist.all_reduce(sums)
    n = sums[0].clamp_min(1)
    return {"loss/eval": sums[1] / n, "eval/advantage": sums[2] / n}
