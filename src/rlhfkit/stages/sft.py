"""``rlhfkit sft``: supervised fine-tuning (step 1 of the recipe) and continued pretraining.

Reads demonstrations (``text``, ``prompt``/``response`` or ``messages``; which tokens each shape
trains is documented in `rlhfkit.demonstrations`), trains the causal LM (all weights, or
LoRA adapters), and writes ``--out`` as a plain model directory with ``rlhfkit.json``,
``metrics.jsonl`` and ``checkpoints/``.

The loop, one optimizer step at a time:

1. take the step's rows from the epoch's order (a function of seed and epoch only, so a resumed run
   sees the same batches); under torchrun each rank takes its share, ``rows[rank::world]``;
2. count the labelled tokens of the *whole* step (every micro-batch, every rank: one all-reduce);
3. forward/backward each micro-batch with loss = Σ token NLL / that count (× world size, which
   DDP's gradient averaging divides out). The gradient is then the token mean over the optimizer
   step, whatever the split: batch 4 × accumulation 1, batch 2 × accumulation 2 and 2 ranks ×
   batch 2 give the same update (up to float rounding). The per-micro-batch mean that a plain
   ``loss / grad_accum`` gives would weight a short example's tokens more than a long one's.
   The output layer runs only where a token is trained (`TokenNLL`);
4. clip the gradient norm, AdamW step, learning-rate schedule step;
5. every ``--log-every`` steps a ``metrics.jsonl`` line (``loss/train`` = token mean over the
   window, ``train/lr``, ``train/grad_norm``, ``perf/tokens_per_s``); every ``--eval-every`` steps,
   and before and after training, ``loss/eval`` and ``eval/perplexity`` = exp(token-mean NLL) on
   the held-out rows; every ``--save-every`` steps, and at the end, a checkpoint.

Throughput counts real (non-pad) input tokens, of all ranks, per second of training time (eval
and checkpoint time excluded).

Precision: ``--dtype auto`` keeps the weights (and the optimizer) in float32 and turns on bfloat16
autocast where `rlhfkit.models.auto_dtype` says bf16 pays (a CUDA GPU that supports it, a CPU with
AMX or AVX512-BF16); ``--bf16``/``--no-bf16`` forces autocast on or off on any device (on a CPU
without native bf16 dot products bf16 autocast is slower than float32). ``--dtype bfloat16`` instead
trains bfloat16 weights directly (half the memory, lossy AdamW updates).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any

import torch
import torch.distributed as tdist

from rlhfkit import training
from rlhfkit.config import SFTConfig
from rlhfkit.console import progress_bar
from rlhfkit.data import records
from rlhfkit.demonstrations import Batch, DataStats, Example, collate, encode_dataset, pack
from rlhfkit.errors import ConfigError
from rlhfkit.losses import lm_loss, nll_sum
from rlhfkit.models import (
    DTYPES,
    apply_lora,
    auto_dtype,
    base_model,
    final_model,
    load_model,
    load_tokenizer,
    model_context,
    resolve_device,
    save_model_dir,
)
from rlhfkit.provenance import RunInfo, to_jsonable


def run(config: SFTConfig) -> dict[str, Any] | None:
    """Train; return the result (rank 0; None on the other ranks of a torchrun job)."""
    config.check()
    device = resolve_device(config.device)
    with training.distributed_run(device) as dist:  # the shared teardown: failures end every rank, leave no half run
        result = _train(config, device, dist)
    return result if dist.is_main else None


# --- data -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    train: list[Example]
    val: list[Example]
    train_stats: DataStats
    val_stats: DataStats | None


def load_data(config: SFTConfig, tokenizer: Any) -> Data:
    """Parse, split off the held-out set, encode (truncation counted), pack the training rows."""
    demos = records.load_kind(config.data, "demonstrations", skip_invalid=config.skip_invalid)
    train_idx, val_idx = list(range(len(demos))), []
    if config.val_fraction > 0:
        n_val = max(1, round(len(demos) * config.val_fraction))
        if n_val >= len(demos):
            raise ConfigError(f"--val-fraction {config.val_fraction}: leaves no training example out of {len(demos)}")
        perm = torch.randperm(len(demos), generator=torch.Generator().manual_seed(config.seed)).tolist()
        val_idx, train_idx = sorted(perm[:n_val]), sorted(perm[n_val:])

    def encode(source: str, items: Any, lines: list[int], skipped: int) -> tuple[list[Example], DataStats]:
        return encode_dataset(
            tokenizer,
            items,
            lines,
            source=source,
            max_length=config.max_length,
            skip_invalid=config.skip_invalid,
            skipped=skipped,
            chat_template=config.chat_template,
        )

    train, train_stats = encode(config.data, [demos[i] for i in train_idx], [demos.lines[i] for i in train_idx], demos.skipped)
    val, val_stats = [], None
    if config.val_data:
        val_demos = records.load_kind(config.val_data, "demonstrations", skip_invalid=config.skip_invalid)
        val, val_stats = encode(config.val_data, val_demos, val_demos.lines, val_demos.skipped)
    elif val_idx:
        val, val_stats = encode(config.data, [demos[i] for i in val_idx], [demos.lines[i] for i in val_idx], 0)
    if config.packing:
        train = pack(train, config.max_length)
        train_stats.rows = len(train)
    return Data(train, val, train_stats, val_stats)


def check_context(examples: list[Example], model: str, max_length: int, trust_remote_code: bool = False) -> None:
    """Refuse rows longer than the model's context (positions it was never trained for, or has no
    embedding of), naming ``--max-length``: sft, and ``rlhfkit validate --kind demonstrations --model``."""
    context = model_context(model, trust_remote_code=trust_remote_code)
    longest = max((len(e) for e in examples), default=0)
    if context is not None and longest > context:
        raise ConfigError(f"--max-length {max_length}: the longest example is {longest} tokens, more than the "
                          f"context of {model} ({context}); give --max-length {context} or less")  # fmt: skip


def _describe(name: str, stats: DataStats, config: SFTConfig) -> str:
    text = f"{name}: {stats.examples:,} examples, {stats.label_tokens:,} of {stats.tokens:,} tokens trained"
    if config.packing and name == "train":
        text += f", packed into {stats.rows:,} rows"
    notes = []
    if stats.truncated:
        notes.append(f"[yellow]{stats.truncated:,} truncated at --max-length {config.max_length}[/]")
    if stats.dropped_no_target:
        notes.append(f"[yellow]{stats.dropped_no_target:,} dropped (no trained token within --max-length)[/]")
    if stats.skipped_invalid:
        notes.append(f"[yellow]{stats.skipped_invalid:,} invalid skipped[/]")
    return text + (" (" + ", ".join(notes) + ")" if notes else "")


# --- the schedule of rows -------------------------------------------------------------------------


class RowSchedule:
    """Which rows each optimizer step trains on, as a pure function of (seed, epoch, step in epoch).

    Under torchrun the epoch's order is padded (wrapping around, as DistributedSampler does) to a
    multiple of the world size, so every rank gets the same number of rows and micro-batches.
    """

    def __init__(self, n_rows: int, config: SFTConfig, dist: training.Dist):
        self.n, self.seed, self.dist = n_rows, config.seed, dist
        self.batch_size = config.batch_size
        self.global_batch = config.batch_size * config.grad_accum * dist.world_size
        padded = n_rows + (-n_rows) % dist.world_size
        self.steps_per_epoch = math.ceil(padded / self.global_batch)
        self._cache: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            order = training.epoch_order(self.n, self.seed, epoch)
            order += order[: (-self.n) % self.dist.world_size]
            self._cache = (epoch, order)
        return self._cache[1]

    def micro_batches(self, epoch: int, step_in_epoch: int) -> list[list[int]]:
        """This rank's rows of one optimizer step, split into micro-batches."""
        chunk = self.order(epoch)[step_in_epoch * self.global_batch : (step_in_epoch + 1) * self.global_batch]
        mine = training.shard(chunk, self.dist)
        return [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]


# --- the run --------------------------------------------------------------------------------------


def _acc_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums of many token losses (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(config: SFTConfig, device: torch.device, dist: training.Dist) -> dict[str, Any]:
    say = dist.say  # rank 0 alone talks
    resolved = to_jsonable(config)
    # --batch-size is per process: a sharded checkpoint may continue on another number of processes with the same global batch
    resume_from = training.prepare_run_dir(config.out, config.resume, "sft", resolved, dist=dist, per_process=("batch_size",))
    training.barrier(dist)  # every rank has looked at --out before rank 0 writes into it
    info = RunInfo("sft", config, {"model": config.model, "data": config.data, "val_data": config.val_data or None})
    training.seed_everything(config.seed)

    # 1. data (everything validated before the model is loaded)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    data = load_data(config, tokenizer)
    check_context([*data.train, *data.val], config.model, config.max_length, config.trust_remote_code)
    say(_describe("train", data.train_stats, config))
    if data.val_stats is not None:
        say(_describe("val", data.val_stats, config))

    # 2. model, optimizer, schedule
    weights_dtype = torch.float32 if config.dtype == "auto" else DTYPES[config.dtype]
    bf16 = (
        config.bf16
        if config.bf16 is not None
        else (config.dtype == "auto" and auto_dtype(device) == torch.bfloat16)  # a bf16 GPU, an AMX or AVX512-BF16 CPU
    )
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--bf16: this GPU does not support bfloat16")
    model = load_model(config.model, dtype=weights_dtype, device=device, trust_remote_code=config.trust_remote_code)
    if config.lora:
        model = apply_lora(
            model,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
        )
    model.train()
    nll_model = TokenNLL(model)
    probe = min(data.train[:16], key=len)  # a short row: the check costs two forward passes of it
    if nll_model.selective and not nll_model.check(collate([probe], tokenizer.pad_token_id).to(device)):
        say("[yellow]the output layer runs on every position (this model post-processes its logits)[/]")
    # --strategy (DDP, or FSDP in place), --gradient-checkpointing; the optimizer comes after (FSDP's shards)
    ddp_model = training.wrap_model(nll_model, dist, device, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule = RowSchedule(len(data.train), config, dist)
    total_steps = config.max_steps or config.epochs * schedule.steps_per_epoch
    warmup = config.warmup_steps or round(config.warmup_ratio * total_steps)
    optimizer = training.make_optimizer(model, config.lr, config.weight_decay)  # fused on CPU and CUDA
    scheduler = training.make_scheduler(optimizer, config.schedule, warmup, total_steps)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "step_in_epoch": 0, "tokens": 0, "train_seconds": 0.0}
    if resume_from is not None:
        state.update(
            training.load_checkpoint(
                resume_from, modules={"model": model}, optimizers={"model": optimizer}, schedulers={"model": scheduler}
            )
        )
        say(f"resuming from {resume_from} (step {state['step']})")
    resume_step = state["step"] if resume_from is not None else None
    metrics = training.MetricsLog(config.out, dist, resume_step=resume_step, run=info)  # run: --report-to
    last: dict[str, Any] = {}
    initial: dict[str, float] = {}
    for row in training.read_metrics(config.out) if resume_from is not None else []:
        last |= row  # a resumed run reports the metrics of the steps before the checkpoint too
        if row.get("step") == 0 and "loss/eval" in row:
            initial = {k: row[k] for k in ("loss/eval", "eval/perplexity")}
    n_params = sum(p.numel() for p in trainable)
    say(f"training {n_params:,} parameters{' (LoRA adapters)' if config.lora else ''} for {total_steps:,} steps on {device}"
        f"{' with bf16 autocast' if bf16 else ''}, {schedule.global_batch} rows per step")  # fmt: skip
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def evaluate() -> dict[str, float]:
        with training.gathered(nll_model):  # FSDP: ranks' shards of the held-out rows may take different numbers of batches
            return evaluate_rows(nll_model, data.val, config.eval_batch_size, tokenizer.pad_token_id, device, dist, autocast)

    def checkpoint() -> None:
        position = {k: v for k, v in state.items() if k != "step"}
        training.save_checkpoint(config.out, state["step"], modules={"model": model}, optimizers={"model": optimizer},
                                 schedulers={"model": scheduler}, state=position | {"config": resolved},
                                 keep=config.keep_checkpoints, dist=dist)  # fmt: skip  (rank 0, or every rank's shard)
        training.barrier(dist)

    window = {
        "nll": torch.zeros((), device=device, dtype=_acc_dtype(device)),
        "label_tokens": 0,
        "tokens": 0,
        "paused": 0.0,
        "start": time.perf_counter(),
    }
    grad_norm = torch.zeros(())
    with progress_bar("sft", total_steps, completed=state["step"], enabled=dist.is_main) as bar:
        if data.val and state["step"] == 0:
            initial = evaluate()
            metrics.log(0, initial)
            window["start"] = time.perf_counter()
        while state["step"] < total_steps:
            # 1. this step's rows; 2.-3. count their labelled tokens, forward/backward with that normaliser
            batches = [
                collate([data.train[i] for i in rows], tokenizer.pad_token_id)
                for rows in schedule.micro_batches(state["epoch"], state["step_in_epoch"])
            ]
            nll, label_tokens, tokens = accumulate_gradients(ddp_model, batches, device=device, dist=dist, autocast=autocast)
            window["nll"] += nll
            # 4. clip, step
            grad_norm = training.clip_grad_norm(trainable, config.max_grad_norm)
            training.check_finite(state["step"] + 1, dist, loss=nll, grad_norm=grad_norm)  # before the weights see it
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["step_in_epoch"] += 1
            if state["step_in_epoch"] == schedule.steps_per_epoch:
                state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0
            window["label_tokens"] += label_tokens
            window["tokens"] += tokens
            step, done = state["step"], state["step"] == total_steps
            # 5. log, evaluate, checkpoint
            row: dict[str, Any] = {}
            save_due = (config.save_every and step % config.save_every == 0) or done
            if step % config.log_every == 0 or save_due:  # a checkpoint closes the window: its counts are in the state
                nll = window["nll"]
                if dist.enabled:
                    tdist.all_reduce(nll)
                train_loss = float((nll / window["label_tokens"]).item())  # the sync point of the window
                seconds = time.perf_counter() - window["start"] - window["paused"]
                state["train_seconds"] += seconds
                state["tokens"] += window["tokens"]
                row |= {"loss/train": train_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                        "train/epoch": step / schedule.steps_per_epoch,
                        "perf/tokens_per_s": window["tokens"] / max(seconds, 1e-9)}  # fmt: skip
                window = {
                    "nll": torch.zeros_like(window["nll"]),
                    "label_tokens": 0,
                    "tokens": 0,
                    "paused": 0.0,
                    "start": time.perf_counter(),
                }
            paused = time.perf_counter()
            if data.val and ((config.eval_every and step % config.eval_every == 0) or done):
                _sync(device)
                row |= evaluate()
            if row:
                last |= metrics.log(step, row)
                if "loss/train" in row:
                    bar.update(0, info=f"loss {last['loss/train']:.4f} | lr {lr:.2e} | {last['perf/tokens_per_s']:,.0f} tok/s")
            if save_due:
                checkpoint()
            window["paused"] += time.perf_counter() - paused
            bar.update(1)

    # 6. the model directory
    summary = {k: last[k] for k in ("loss/train", "loss/eval", "eval/perplexity") if k in last}
    if initial:
        summary |= {"loss/eval_initial": initial["loss/eval"], "eval/perplexity_initial": initial["eval/perplexity"]}
    summary |= {"perf/tokens_per_s": state["tokens"] / max(state["train_seconds"], 1e-9), "train/steps": state["step"],
                "train/tokens": state["tokens"], "train/seconds": state["train_seconds"]}  # fmt: skip
    data_report = {"train": data.train_stats.as_dict(), **({"val": data.val_stats.as_dict()} if data.val_stats else {})}
    saved = training.gather_model(model, dist)  # FSDP: the full weights, gathered to rank 0 (every rank takes part)
    if dist.is_main:
        final, keep = final_model(saved, config.out, lora=config.lora, adapter=config.save_adapter)  # merged; OUT/adapter/
        extra = {"data": data_report, "precision": {"weights": str(weights_dtype).removeprefix("torch."), "bf16_autocast": bf16}}
        save_model_dir(final, tokenizer, config.out, info, summary, extra=extra, keep=keep)
        say(f"wrote {config.out}")
    training.barrier(dist)
    return {"out": str(config.out), **summary, "data": data_report}


# config fields of models whose forward transforms the output layer's logits (Gemma 2/3, Cohere, Granite, ...)
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling")


class TokenNLL(torch.nn.Module):
    """The model and its loss as one module (what DDP wraps): batch -> Σ next-token NLL over the
    trained positions.

    The output layer runs only at the positions whose next token is trained (``batch.target_index``):
    the backbone's hidden states are gathered there first, so prompt, padding and untrained chat
    tokens cost no vocabulary projection and no softmax — for prompt/response data with a large
    vocabulary that is a sizeable share of the step, and the (B, T, V) logits are never built.
    The same idea as TRL's ``chunked_nll`` loss. A model whose forward does more than
    ``output_layer(backbone(x))`` (logit scaling or soft-capping, known from its config, or any
    other difference that `check` finds on the first batch) keeps the full forward.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        inner = base_model(model)  # peft: the adapters live in the module tree
        backbone = getattr(inner, "base_model", None)
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        # a plain tuple: not registered as submodules, so DDP and state_dict see every parameter once
        self._parts = (backbone, head) if backbone is not None and backbone is not inner and head is not None else None
        config = (
            inner.config.get_text_config()
            if hasattr(getattr(inner, "config", None), "get_text_config")
            else getattr(inner, "config", None)
        )
        if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_POSTPROCESSING):
            self._parts = None
        self.selective = self._parts is not None

    def forward(self, batch: Batch) -> torch.Tensor:
        if not self.selective:
            return self.full(batch)
        backbone, head = self._parts  # type: ignore[misc]
        hidden = backbone(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        logits = head(hidden.flatten(0, 1).index_select(0, batch.target_index))  # (N, V)
        return nll_sum(logits, batch.targets)

    def full(self, batch: Batch) -> torch.Tensor:
        logits = self.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits  # (B, T, V)
        nll_sum, _ = lm_loss(logits, batch.labels, normalizer=1.0)
        return nll_sum

    @torch.no_grad()
    def check(self, batch: Batch) -> bool:
        """Use the selective output layer only if it gives the model's own numbers (dropout off, float32)."""
        if not self.selective:
            return False
        was_training = self.model.training
        self.model.eval()
        try:
            self.selective = bool(torch.allclose(self.forward(batch), self.full(batch), rtol=1e-4, atol=1e-4))
        finally:
            self.model.train(was_training)
        return self.selective


def accumulate_gradients(
    model: Any, batches: list[Batch], *, device: torch.device, dist: training.Dist, autocast: Any = contextlib.nullcontext
) -> tuple[torch.Tensor, int, int]:
    """Steps 2 and 3 of one optimizer step: forward and backward every micro-batch, with the loss
    normalised by the labelled-token count of the whole step (all micro-batches, all ranks).
    ``model`` is a `TokenNLL` (DDP-wrapped under torchrun).

    Returns (this rank's NLL sum, detached; labelled tokens and real tokens of the step, all ranks).
    """
    label_tokens, tokens = sum(b.num_label_tokens for b in batches), sum(b.num_tokens for b in batches)  # from lengths: no sync
    if dist.enabled:
        counts = torch.tensor([label_tokens, tokens], dtype=torch.long, device=device)
        tdist.all_reduce(counts)
        label_tokens, tokens = (int(x) for x in counts.tolist())
    # DDP averages gradients over ranks; the world size in the normaliser turns that into the sum
    normalizer = label_tokens / dist.world_size
    nll = torch.zeros((), device=device, dtype=_acc_dtype(device))
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        with training.no_sync(model, skip=i < len(batches) - 1), autocast():
            nll_sum = model(batch)  # Σ token NLL of this micro-batch
            (nll_sum / normalizer).backward()
        nll += nll_sum.detach()
    return nll, label_tokens, tokens


@torch.no_grad()
def evaluate_rows(
    model: Any, rows: list[Example], batch_size: int, pad_token_id: int, device: torch.device, dist: training.Dist, autocast: Any
) -> dict[str, float]:
    """``loss/eval`` (token-mean NLL over all held-out rows, all ranks) and ``eval/perplexity`` = exp of it.
    ``model`` is a `TokenNLL`."""
    was_training = model.training
    model.eval()
    mine = sorted(training.shard(rows, dist), key=len)  # similar lengths together: less padding
    totals = torch.zeros(2, dtype=_acc_dtype(device), device=device)  # (NLL sum, labelled tokens)
    for start in range(0, len(mine), batch_size):
        batch = collate(mine[start : start + batch_size], pad_token_id).to(device)
        with autocast():
            totals[0] += model(batch)
        totals[1] += batch.num_label_tokens
    if dist.enabled:
        tdist.all_reduce(totals)
    model.train(was_training)
    loss = float((totals[0] / totals[1].clamp(min=1)).item())
    return {"loss/eval": loss, "eval/perplexity": math.exp(min(loss, 700.0))}


__all__ = ["run", "load_data", "check_context", "TokenNLL", "accumulate_gradients", "evaluate_rows", "RowSchedule"]
