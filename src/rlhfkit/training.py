"""What every training stage (sft, train-rm, ppo) shares.

* distributed set-up under ``torchrun`` (gloo on CPU, NCCL on GPUs), rank-aware data, rank 0 writes;
* AdamW with warmup + cosine/linear/constant decay;
* checkpoints that resume *exactly*: weights (safetensors), optimizer and scheduler states, every RNG,
  and the stage's own position (step, epoch, batch, KL controller, ...), written atomically;
* ``metrics.jsonl`` (one JSON object per logged step, keys ``group/name``);
* a rich progress bar on stderr.

A checkpoint directory ``RUN/checkpoints/step-000120/`` holds ``<name>.safetensors`` per module,
``trainer.pt`` (optimizer/scheduler/RNG states, read back with ``torch.load(weights_only=True)``,
never unpickling arbitrary objects) and ``state.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from rlhfkit import attention
from rlhfkit.config import Schedule, choices
from rlhfkit.errors import ConfigError, NonFiniteError, RlhfkitError

T = TypeVar("T")
CHECKPOINTS = "checkpoints"


# --- distributed --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def say(self, text: str) -> None:
        """A line for people on stderr (rich markup), from rank 0 alone; soft wrap keeps long paths whole for grep."""
        if self.is_main:
            from rlhfkit.console import console

            console.print(text, highlight=False, soft_wrap=True)


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend)
    return Dist(rank=tdist.get_rank(), world_size=tdist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed(dist: Dist) -> None:
    """Synchronise, then leave the group. A rank that exits while another still talks to it can
    abort the other (gloo: "terminate called without an active exception" in the rank still
    tearing down its connections), so everyone meets at a barrier first, and once every rank has
    destroyed its group they meet again through torchrun's key-value store (plain TCP, not gloo)
    before any process exits and closes its sockets."""
    if dist.enabled and tdist.is_initialized():
        tdist.barrier()
        try:
            store = tdist.distributed_c10d._get_default_store()
        except Exception:  # no store to meet through (a group set up by hand): the barrier above must do
            store = None
        tdist.destroy_process_group()
        if store is not None:
            _store_barrier(store, dist.world_size)


_shutdowns = 0  # this process's group teardowns so far (each meets under a key of its own)


def _store_barrier(store: Any, world_size: int, timeout: float = 60.0) -> None:
    """Wait until every rank has added itself under this teardown's key (or ``timeout`` seconds)."""
    import time

    global _shutdowns
    _shutdowns += 1
    key = f"rlhfkit/left/{_shutdowns}"
    with contextlib.suppress(Exception):  # the store's host (torchrun's agent) is there for the whole job
        store.add(key, 1)
        deadline = time.monotonic() + timeout
        while store.add(key, 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.01)


def barrier(dist: Dist) -> None:
    if dist.enabled:
        tdist.barrier()


# the --out directories that `prepare_run_dir` accepted for the run under way (see `distributed_run`)
_claimed: list[tuple[Path, bool]] = []  # (OUT, whether it existed before the run)


@contextlib.contextmanager
def distributed_run(device: torch.device) -> Iterator[Dist]:
    """The one set-up and teardown of every training stage::

        with training.distributed_run(device) as dist:
            result = _train(config, device, dist)

    Joins the process group under torchrun. On success every rank meets at a barrier and leaves
    the group. On failure nothing waits: the group is torn down at once (a barrier would hang on a
    rank stuck in another collective), so the other ranks' collectives fail within seconds and
    torchrun ends them; a rank that loses its peers this way reports one line saying so, the rank
    that failed reports why. And a run that failed before its first checkpoint leaves nothing in
    ``--out`` (`discard_failed_run`), so that the corrected command just runs again. Once a rank
    is failing, the SIGTERM with which torchrun ends it is ignored until that clean-up is done.
    """
    dist = init_distributed(device)
    start = len(_claimed)
    previous = _stop_on_sigterm(dist)
    try:
        yield dist
    except BaseException as e:
        if previous is not None:  # already stopping: torchrun's SIGTERM must not cut the clean-up short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if dist.enabled and tdist.is_initialized():
            with contextlib.suppress(Exception):
                tdist.destroy_process_group()
        claimed = _claimed[start:]
        del _claimed[start:]
        if dist.is_main:
            for out, existed in claimed:
                discard_failed_run(out, existed)
        if isinstance(e, NonFiniteError) and claimed:
            kept = latest_checkpoint(claimed[-1][0])
            note = f"{kept} is kept (--resume continues from it)" if kept is not None else "nothing was saved"
            raise NonFiniteError(f"{e}; {note}") from None
        if dist.enabled and _lost_peer(e):
            raise RlhfkitError(
                f"rank {dist.rank}: another rank stopped, so this one did too (its error is above; {_first_line(e)})"
            ) from e
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    del _claimed[start:]
    shutdown_distributed(dist)


def _stop_on_sigterm(dist: Dist) -> Any:
    """Under torchrun, the SIGTERM with which torchrun ends the other ranks when one fails becomes
    an error, so that the rank cleans up (`distributed_run`) and says why it stopped. Returns the
    previous handler (None when nothing was installed)."""
    import threading

    if not dist.enabled or threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: Any) -> None:
        raise RlhfkitError(f"rank {dist.rank}: stopped by torchrun (another rank stopped; its error is above)")

    return signal.signal(signal.SIGTERM, stop)


def _lost_peer(e: BaseException) -> bool:
    """Whether an exception is a collective failing because another rank went away."""
    if isinstance(e, RlhfkitError) or not isinstance(e, RuntimeError):
        return False
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, getattr(tdist, "DistError", ())) or any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "socket")
    )


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message, without a leading ``[source.cc:123]`` (gloo's)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text[:160]


def discard_failed_run(out: Path, existed: bool) -> None:
    """After a failed run: if ``out`` holds no checkpoint and no finished model, remove what the
    run wrote there (metrics.jsonl, samples.jsonl, trackers' files, temporary files), and ``out``
    itself when the run created it. A run with a checkpoint keeps everything: ``--resume``
    continues from its last good checkpoint."""
    from rlhfkit.models import RUN_FILES

    if not out.is_dir() or latest_checkpoint(out) is not None or (out / "rlhfkit.json").is_file():
        clean_stale_temporaries(out)
        return
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
    clean_stale_temporaries(out)
    if not existed and not any(out.iterdir()):
        out.rmdir()


def clean_stale_temporaries(out: Path) -> None:
    """Remove what a killed run of ``out`` left half-written: ``checkpoints/.step-*`` directories
    (`save_checkpoint`), hidden ``.NAME.*.tmp`` files in ``out`` (`data.files.atomic_open`), and
    ``.OUT.*.tmp`` / ``.OUT.old-*`` directories beside it (`models.save_model_dir`)."""
    import re

    pattern = re.compile(rf"^\.{re.escape(out.name)}\.([a-z0-9_]{{8}}\.tmp|old-\d+)$")
    candidates = [*(out / CHECKPOINTS).glob(".step-*"), *out.glob(".*.tmp")] if out.is_dir() else []
    if out.parent.is_dir():
        candidates += [p for p in out.parent.iterdir() if pattern.match(p.name)]
    for path in candidates:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_finite(step: int, dist: Dist = Dist(), **quantities: Any) -> None:
    """Stop training at a non-finite quantity (``loss=..., grad_norm=..., reward=...``: tensors of
    any shape, or numbers), before it reaches the weights: one line naming the step and the
    quantity. One device sync, and under torchrun one all-reduce, so every rank stops at the same
    step (a rank whose rewards alone are NaN stops them all)."""
    quantities = {k: v for k, v in quantities.items() if v is not None and not (isinstance(v, torch.Tensor) and not v.numel())}
    if not quantities:
        return
    first = next((v for v in quantities.values() if isinstance(v, torch.Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
    if dist.enabled:  # the collective needs its tensor where the process group communicates
        device = torch.device("cuda", torch.cuda.current_device()) if dist_device_type() == "cuda" else torch.device("cpu")
    flags = [
        (~torch.isfinite(v.detach())).any().to(device)
        if isinstance(v, torch.Tensor)
        else torch.tensor(not math.isfinite(v), device=device)
        for v in quantities.values()
    ]
    bad = torch.stack(flags).to(torch.int32)
    if dist.enabled:
        tdist.all_reduce(bad, op=tdist.ReduceOp.MAX)
    for (name, value), flag in zip(quantities.items(), bad.tolist(), strict=True):
        if not flag:
            continue
        if isinstance(value, torch.Tensor):
            local = value.detach()[~torch.isfinite(value.detach())].flatten()
            shown = f" ({local[0].item()})" if local.numel() else " on another rank"
        else:
            shown = f" ({value})"
        raise NonFiniteError(
            f"step {step}: the {name.replace('_', ' ')} is not finite{shown}; training stopped before applying it "
            "(lower --lr, or check the data and the reward)"
        )


def dist_device_type() -> str:
    """The device type the process group communicates on (collectives need tensors there)."""
    return "cuda" if tdist.is_initialized() and tdist.get_backend() == "nccl" else "cpu"


def shard(items: Sequence[T], dist: Dist) -> list[T]:
    """This rank's share: items rank, rank + world, ... (every rank gets the same count ±1)."""
    return list(items[dist.rank :: dist.world_size])


def all_reduce_mean(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Mean of a tensor across ranks (for logging metrics that every rank computed on its shard)."""
    if not dist.enabled:
        return value
    value = value.detach().clone()
    tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
    return value / dist.world_size


def window_means(
    window: Sequence[dict[str, torch.Tensor]], dist: Dist, device: torch.device, **counts: float
) -> dict[str, torch.Tensor]:
    """The metrics of the steps since the last metrics line, for that line: each key's mean over
    ``window`` (one dict of scalar tensors a step), then the host-side ``counts`` (pairs, tokens done
    so far), all averaged over the ranks in one collective. Keys keep their order, counts last."""
    mean = {k: torch.stack([w[k] for w in window]).mean().float() for k in window[0]}
    for name, count in counts.items():
        mean[name] = torch.tensor(float(count), device=device)
    packed = all_reduce_mean(torch.stack(list(mean.values())), dist)  # one collective for all
    return dict(zip(mean, packed.unbind(0), strict=True))


def step_metrics(
    mean: dict[str, torch.Tensor], lr: float, step: int, steps_per_epoch: int, seconds: float, dist: Dist, unit: str
) -> dict[str, Any]:
    """The keys an epoch-based stage (dpo, ilql) logs beside its own (README, "Metric keys"):
    ``train/lr``, ``train/grad_norm`` (the window's mean), ``train/epoch`` (fractional),
    ``perf/<unit>_per_s`` and ``perf/tokens_per_s``. ``mean`` is `window_means`'s, with the counts
    ``unit`` and ``tokens`` that each rank has done in ``seconds`` of training; ranks step in
    lockstep, so a rank's count × world size over its own seconds is the job's rate.

    Example: step 3 of 2 an epoch, 2 ranks that have each done 12 pairs in 4 s →
    ``train/epoch`` 1.5, ``perf/pairs_per_s`` 6.0.
    """
    return {
        "train/lr": lr,
        "train/grad_norm": mean["grad_norm"],
        "train/epoch": step / steps_per_epoch,
        f"perf/{unit}_per_s": mean[unit] * dist.world_size / max(seconds, 1e-9),
        "perf/tokens_per_s": mean["tokens"] * dist.world_size / max(seconds, 1e-9),
    }


def wrap_ddp(model: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def no_sync(model: torch.nn.Module, skip: bool):
    """Inside gradient accumulation, skip DDP's all-reduce on all but the last micro-batch. (FSDP
    reduce-scatters every micro-batch: its gradients stay sharded, which is what it is for.)"""
    return model.no_sync() if skip and hasattr(model, "no_sync") else nullcontext()


def wrap_model(
    model: torch.nn.Module, dist: Dist, device: torch.device, config: Any, *, trainable: bool = True
) -> torch.nn.Module:
    """What every training stage does with a module before building its optimizer, by
    ``config.strategy`` (`config.TrainConfig`):

    * ``--gradient-checkpointing`` (trained modules, both strategies): every transformers model in
      ``model`` recomputes its decoder layers' activations in the backward pass (non-reentrant);
    * on a CPU (trained and frozen modules): `rlhfkit.attention.use_float32_short_attention` (short
      training sequences under bf16 run the attention kernel in float32, which is faster there);
    * on a CPU (trained modules): `own_memory`;
    * ``--compile`` (trained and frozen modules): `compile_layers`;
    * ``ddp``: a trained module is wrapped in DistributedDataParallel under torchrun; a frozen one
      (``trainable=False``: ppo's reference and reward model) is returned as it is;
    * ``fsdp``: FSDP2 (`rlhfkit.sharding`: a unit per decoder layer, the root last; bf16 compute on
      GPUs; ``--cpu-offload``), trained or frozen alike, in place. In one process nothing is
      sharded, but checkpoints use the sharded format, so the run may continue on N processes.

    Build the optimizer *after* this call (FSDP replaces the parameters by their shards), run the
    training forward through the returned module, and wrap loops whose number of forwards differs
    between ranks (sampling, uneven evaluation shards) in `gathered`."""
    strategy = getattr(config, "strategy", "ddp")
    if device.type == "cpu":
        attention.use_float32_short_attention(model)
        if trainable:
            own_memory(model)
    if trainable and getattr(config, "gradient_checkpointing", False):
        enable_gradient_checkpointing(model)
    if getattr(config, "compile", False):
        compile_layers(model)
    if strategy != "fsdp":
        return wrap_ddp(model, dist, device) if trainable else model
    from rlhfkit import sharding

    if not dist.enabled:
        sharding.mark(model)
        return model
    mp_policy = sharding.mixed_precision(device, getattr(config, "dtype", "auto"))
    return sharding.shard(model, device, dist.world_size, mp_policy=mp_policy, cpu_offload=getattr(config, "cpu_offload", False))


def own_memory(model: torch.nn.Module) -> int:
    """Give every trained CPU parameter of ``model`` memory of its own, in place (values, names and
    ties unchanged). Weights loaded from safetensors are copy-on-write views of the file's memory
    mapping, so the first optimizer step, the first write to them, page-faults its way through every
    page: on SmolLM2-135M (540 MB of float32) the first AdamW step took 4.3 s against 1.5 s after this
    copy, which took 0.2 s. A parameter whose storage another parameter shares (weights tied as two
    tensors on one storage) is left alone, so ties hold. Returns how many parameters were copied."""
    users = Counter(p.untyped_storage().data_ptr() for p in model.parameters())  # storage -> parameters on it
    copied = 0
    for p in model.parameters():
        if p.requires_grad and p.device.type == "cpu" and users[p.untyped_storage().data_ptr()] == 1:
            p.data = p.data.clone()  # `.data`: outside autograd
            copied += 1
    return copied


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` every decoder layer of every transformers model in ``model``, in place
    (regional compilation: the layers share one compiled graph, so compiling costs one layer's time,
    not the model's; parameter names and checkpoints are unchanged). The first new sequence length
    recompiles with that dimension dynamic, so later lengths reuse it (train, eval and no-grad modes
    each compile once). Returns the number of layers compiled."""
    from rlhfkit.sharding import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Activation checkpointing on every transformers model inside ``model`` (non-reentrant: works
    with frozen inputs, LoRA, and FSDP2, whose hooks stay outside the recomputed ``forward``).
    transformers applies it to a module in training mode with gradients on. Returns how many models."""
    from transformers import PreTrainedModel

    count = 0
    for m in model.modules():
        if not (isinstance(m, PreTrainedModel) and getattr(m, "supports_gradient_checkpointing", False)):
            continue
        if hasattr(m, "activation_checkpointing_enable"):  # newer transformers (where the older names warn)
            if not m.is_activation_checkpointing:
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                count += 1
        elif not m.is_gradient_checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            count += 1
    return count


def gathered(module: Any) -> Any:
    """A context in which an FSDP-sharded module holds its full weights (`sharding.gathered`), so
    that ranks may run different numbers of forwards; a no-op otherwise. For inference loops."""
    from rlhfkit import sharding

    return sharding.gathered(module)


def gather_model(model: torch.nn.Module, dist: Dist) -> Any:
    """The model to save (`models.save_model_dir`, `models.merged`, `models.save_adapter`): itself,
    or, under FSDP, a plain copy with the full weights gathered to rank 0 (None on the other ranks).
    Under FSDP this is a collective: call it on every rank."""
    from rlhfkit import sharding

    if not sharding.is_sharded(model):
        return model
    return sharding.plain_copy(model, dist.is_main)


def clip_grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the total gradient norm to ``max_norm`` (0 = no clipping); return the norm before
    clipping as a plain tensor (under FSDP the norm over every rank's shards)."""
    from rlhfkit import sharding

    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm if max_norm > 0 else float("inf"))
    return sharding.to_local_value(norm)


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    max_grad_norm: float,
    *,
    step: int,
    dist: Dist,
    device: torch.device,
    **finite: Any,
) -> tuple[torch.Tensor, float]:
    """The end of one optimizer step, after its micro-batches' backward passes: unscale the gradients
    (float16's ``scaler``, or None), clip the norm of the trainable parameters' gradients to
    ``max_grad_norm`` (0 = no clipping), stop at a non-finite ``finite`` quantity or gradient norm
    (`check_finite` at ``step``, the step being taken; float16's scaler skips steps with an infinite
    gradient itself) before the weights see it, step the optimizer (through the scaler) and the
    schedule, drop the gradients, and wait for the device so that throughput counts finished work.
    Returns (the gradient norm before clipping, the learning rate this step used)."""
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    check_finite(step, dist, **finite, grad_norm=None if scaler else grad_norm)
    lr = scheduler.get_last_lr()[0]
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return grad_norm, lr


def mixed_precision(dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], contextlib.AbstractContextManager], Any]:
    """(autocast, scaler) for training float32 weights in ``dtype``: an autocast context factory for
    bfloat16/float16 (a no-op one otherwise), and float16's gradient scaler (None otherwise)."""
    amp_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    return autocast, torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def periodic(
    step: int,
    total_steps: int,
    eval_every: int,
    save_every: int,
    held_out: Callable[[int], Any],
    checkpoint: Callable[[int], Any],
) -> bool:
    """After optimizer step ``step``: the held-out evaluation every ``eval_every`` steps (not at the
    last, whose evaluation follows the loop) and a checkpoint every ``save_every`` steps (0 = none
    on the way) and at the last step. True when it saved one."""
    if eval_every and step % eval_every == 0 and step < total_steps:
        held_out(step)
    if (save_every and step % save_every == 0) or step == total_steps:
        checkpoint(step)
        return True
    return False


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside the training wrappers: DDP (``.module``) and ``torch.compile``
    (``._orig_mod``), in any nesting. A peft model stays a peft model (its adapters are the weights
    a checkpoint or ``save_adapter`` needs). The one place rlhfkit unwraps a model: the layers below
    (models, scoring) are handed unwrapped models."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


# --- optimisation --------------------------------------------------------------------------------


def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    lr_of: dict[int, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and norm weights (1-D tensors) get no decay.

    ``lr_of`` maps ``id(parameter)`` to a learning rate of its own (a reward model's score head
    with ``--head-lr``); every other parameter gets ``lr``. Schedules scale every group alike.

    ``fused`` (default: when every trainable parameter is a floating-point tensor on the CPU or a CUDA
    device) uses PyTorch's fused kernel: one kernel for all parameters instead of a loop of
    elementwise ops over them (measured for SmolLM2-135M on one CPU thread: 0.06 s per step instead
    of 0.42 s; in a float32 PPO update on SmolLM2 with a separate value model the unfused step's
    addcdiv/sqrt/lerp/addcmul took ~4 s of 39).
    """
    lr_of = lr_of or {}
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, lr_of.get(id(p), lr)), []).append(p)
    if fused is None:
        params = [p for group in groups.values() for p in group]
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    param_groups = [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": group_lr}
        for (decays, group_lr), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1] != lr))
    ]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=fused)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_steps``, then ``cosine`` or ``linear`` decay to 0 at
    ``total_steps``, or ``constant``."""
    if schedule not in choices(Schedule):
        raise ConfigError(f"--schedule: expected one of {', '.join(choices(Schedule))}, got {schedule!r}")
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation that depends only on (seed, epoch), so a resumed
    run sees exactly the batches it would have seen."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# --- RNG state -----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    import numpy as np

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_rng_to_tensor()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": pos, "has_gauss": has_gauss, "cached": cached}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    _python_rng_from_tensor(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_to_tensor() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_rng_from_tensor(state: dict[str, Any]) -> None:
    random.setstate((state["version"], tuple(state["internal"].tolist()), state["gauss"]))


# --- checkpoints ---------------------------------------------------------------------------------


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (complete = has state.json, which is written last)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold: all of them, or only the trainable ones (LoRA adapters,
    a partly frozen model) when some parameters are frozen — frozen ones come from the input model."""
    # remove_duplicate=False: a tied weight (lm_head.weight = embed_tokens.weight) is listed under
    # every name that state_dict uses for it, so a frozen tied embedding stays out of the checkpoint
    params = dict(module.named_parameters(remove_duplicate=False))
    frozen = {n for n, p in params.items() if not p.requires_grad}
    state = module.state_dict()
    if not frozen:
        return state
    return {k: v for k, v in state.items() if k not in frozen}


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
    dist: Dist = Dist(),
) -> Path | None:
    """Write a checkpoint atomically (temporary directory + rename) and keep the newest ``keep``.
    A module with a non-finite weight is refused (NonFiniteError) before anything is written, so
    the last checkpoint on disk stays the last good one.

    Call it on every rank with ``dist``: DDP checkpoints are written by rank 0 alone (the others
    return None at once); with ``--strategy fsdp`` every rank writes its shard (`sharding.save`, DCP),
    and rank 0 the rest. ``state.json`` records the world size."""
    from rlhfkit import sharding

    state = {**state, "world_size": dist.world_size}
    if any(sharding.is_fsdp(m) for m in modules.values()):
        return _save_sharded(run_dir, step, modules=modules, optimizers=optimizers, schedulers=schedulers, state=state,
                             keep=keep, dist=dist)  # fmt: skip
    if not dist.is_main:
        return None
    from safetensors.torch import save_file

    from rlhfkit.models import check_finite_weights

    for name, module in modules.items():
        check_finite_weights(unwrap(module), f"step {step}: {name}")
    target = checkpoint_dir(run_dir, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, module in modules.items():
            weights = {k: v.detach().contiguous().clone() for k, v in trainable_state_dict(unwrap(module)).items()}
            save_file(weights, str(tmp / f"{name}.safetensors"))
        trainer = {
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "rng": rng_state(),
        }
        save_trainer_state(trainer, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in target.parent.glob("step-*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def save_trainer_state(trainer: dict[str, Any], path: Path) -> None:
    """``torch.save`` of a checkpoint's ``trainer.pt`` (optimizer states, schedulers, RNG) without
    the zip's CRC-32 of every record. ``torch.load`` never checks those checksums (a flipped byte in
    a saved tensor loads silently with or without them), so computing them protected nothing and
    cost time: SmolLM2-135M's AdamW state (1.08 GB) took 1.96–2.29 s to write inside sft with them,
    1.62–1.66 s without. A torn write is caught as before: the checkpoint is renamed into place
    only once complete."""
    from torch.utils.serialization import config

    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save(trainer, path)
    finally:
        config.save.compute_crc32 = before


def _save_sharded(
    run_dir: str | os.PathLike, step: int, *, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any], state: dict[str, Any], keep: int, dist: Dist,
) -> Path | None:  # fmt: skip
    """`save_checkpoint` under FSDP: ``.metadata`` + ``__<rank>_0.distcp`` (weights and optimizer
    states, every rank its shard), ``trainer.pt`` (schedulers, RNG) and ``state.json`` (rank 0),
    assembled in ``checkpoints/.step-NNNNNN.dcp`` and renamed into place once complete."""
    from rlhfkit import sharding

    bad = [sharding.local_non_finite(unwrap(m)) for m in modules.values()]
    flags = torch.tensor([b is not None for b in bad], dtype=torch.int32, device=_collective_device(dist))
    if dist.enabled:
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
    for (name, _), weight, flag in zip(modules.items(), bad, flags.tolist(), strict=True):
        if flag:
            where = f"weight {weight!r}" if weight is not None else "a weight on another rank"
            raise NonFiniteError(f"step {step}: {name}: {where} is not finite (a non-finite weight: not saved)")
    target = checkpoint_dir(run_dir, step)
    tmp = target.parent / f".{target.name}.dcp"
    if dist.is_main:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(dist)
    try:
        sharding.save(tmp, modules, optimizers)
        barrier(dist)
        if dist.is_main:
            trainer = {"schedulers": {k: s.state_dict() for k, s in schedulers.items()}, "rng": rng_state()}
            save_trainer_state(trainer, tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            for old in sorted(p for p in target.parent.glob("step-*") if p.is_dir())[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(dist)
    return target if dist.is_main else None


def _collective_device(dist: Dist) -> torch.device:
    on_gpu = dist.enabled and dist_device_type() == "cuda"
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def load_checkpoint(
    path: Path,
    *,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; return the stage's state (``step`` included).
    A checkpoint that cannot be read (a damaged file) is one line naming it. A sharded (DCP)
    checkpoint is read by any number of processes (`sharding.load` reshards it); call this after
    `wrap_model` and after building the optimizers."""
    from rlhfkit import sharding

    if sharding.is_dcp_checkpoint(path):
        return _load_sharded(path, modules=modules, optimizers=optimizers, schedulers=schedulers)
    if any(sharding.is_fsdp(m) for m in modules.values()):
        raise RlhfkitError(f"{path}: a DDP checkpoint; resume it with --strategy ddp (the strategy it was written with)")
    from safetensors.torch import load_file

    for name, module in modules.items():
        try:
            weights = load_file(str(path / f"{name}.safetensors"))
        except Exception as e:  # safetensors raises its own error type for a damaged file
            message = f"{path}/{name}.safetensors: cannot read it ({_first_line(e)}); delete {path} to resume earlier"
            raise RlhfkitError(message) from e
        missing, unexpected = unwrap(module).load_state_dict(weights, strict=False)
        expected = set(trainable_state_dict(unwrap(module)))
        if unexpected or (expected - set(weights)):
            raise RlhfkitError(f"{path}: checkpoint of '{name}' does not match the model (different model or options?)")
    return _load_trainer(path, optimizers, schedulers)


def _load_sharded(
    path: Path, *, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any]
) -> dict[str, Any]:
    from rlhfkit import sharding

    if not any(sharding.is_fsdp(m) for m in modules.values()):
        raise RlhfkitError(f"{path}: a sharded (FSDP) checkpoint; resume it with --strategy fsdp (as it was written)")
    try:
        sharding.load(path, modules, optimizers)
    except Exception as e:  # DCP reports a damaged or mismatching checkpoint with its own error types
        message = f"{path}: cannot read the sharded checkpoint ({_first_line(e)}); delete {path} to resume earlier"
        raise RlhfkitError(message) from e
    return _load_trainer(path, {}, schedulers)  # the optimizers' state came with the shards


def _load_trainer(path: Path, optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any]) -> dict[str, Any]:
    """The rest of a checkpoint, from ``trainer.pt`` (optimizer state unless sharded, schedulers, RNG
    states) and ``state.json``: the stage's state."""
    try:
        trainer = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    except Exception as e:
        raise RlhfkitError(f"{path}/trainer.pt: cannot read it ({_first_line(e)}); delete {path} to resume earlier") from e
    for k, o in optimizers.items():
        o.load_state_dict(trainer["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(trainer["schedulers"][k])
    set_rng_state(trainer["rng"])
    return read_state(path)


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json`` (strictly: a damaged one is a FILE:LINE error)."""
    from rlhfkit.data.files import parse_json

    state = parse_json((path / "state.json").read_text(encoding="utf-8", errors="replace"), path / "state.json")
    if not isinstance(state, dict):
        raise RlhfkitError(f"{path / 'state.json'}: expected a JSON object")
    return state


def is_run_dir(out: Path) -> bool:
    """Whether ``out`` holds a run of a training stage (a finished model or one under way)."""
    return (out / "rlhfkit.json").is_file() or (out / CHECKPOINTS).is_dir() or (out / "metrics.jsonl").is_file()


# options --resume may give other values in every training stage that has them (the rest must match):
# `config.TrainConfig`'s that do not change what a step computes, and the epoch loop's of sft, train-rm,
# dpo and ilql (how far the run goes, how often it evaluates and logs); a stage may add its own
RESUME_MAY_CHANGE = ("save_every", "keep_checkpoints", "save_adapter", "device", "gradient_checkpointing", "cpu_offload",
                     "compile", "max_steps", "epochs", "eval_every", "eval_batch_size", "log_every")  # fmt: skip


def prepare_run_dir(
    out: str | os.PathLike, resume: bool, stage: str, config: dict[str, Any], may_change: Sequence[str] = (), dist: Dist = Dist(),
    per_process: Sequence[str] = (),
) -> Path | None:
    """Decide what ``--out`` is before anything is trained: the checkpoint to resume from, or None.

    The final save replaces OUT as a whole, so: OUT must be a directory (or absent); without
    ``--resume`` it must be empty (hidden files aside), and an earlier run there is refused with a
    hint to pass ``--resume``; with ``--resume`` and no checkpoint, a non-empty OUT must be a run
    directory (then training starts from the beginning, with a warning). A checkpoint is resumed
    only with the same options, except `RESUME_MAY_CHANGE` and the stage's ``may_change``, and
    ``per_process`` sizes on another number of processes as long as size × processes is unchanged
    (`check_resume_config`).
    """
    from rlhfkit.console import console

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    has_files = out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())
    if not resume:
        if has_files:
            what = "holds an earlier run (pass --resume to continue it)" if is_run_dir(out) else "exists and is not empty"
            raise ConfigError(f"--out {out}: {what}; choose another directory or remove it")
        return _claim(out, None, dist)
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        if has_files and not is_run_dir(out):
            raise ConfigError(f"--out {out}: exists and is not a run directory of rlhfkit {stage}")
        if dist.is_main:
            message = f"[yellow]--resume: no checkpoint in {out}; starting from the beginning[/]"
            console.print(message, highlight=False, soft_wrap=True)
        return _claim(out, None, dist)
    # trackers may join a resumed run
    ignore = ("resume", "report_to", *RESUME_MAY_CHANGE, *may_change)
    check_resume_config(checkpoint, config, ignore=ignore, world_size=dist.world_size, per_process=per_process)
    return _claim(out, checkpoint, dist)


def _claim(out: Path, checkpoint: Path | None, dist: Dist) -> Path | None:
    """OUT is this run's from here on: what a killed run left half-written goes (rank 0), and a
    failure of this run is cleaned up by `distributed_run`."""
    if dist.is_main:
        clean_stale_temporaries(out)
    _claimed.append((out, out.exists()))
    return checkpoint


def check_resume_config(
    path: Path, config: dict[str, Any], ignore: Sequence[str] = ("resume", "max_steps", "save_every", "epochs"),
    world_size: int = 1, per_process: Sequence[str] = (),
) -> None:
    """Refuse to resume with options that change the run (different lr, data, batch size, ...).

    ``per_process`` names sizes counted per process (sft's ``batch_size``): resumed on another
    number of processes (a sharded checkpoint is read by any number), each may change as long as
    it times the world size is what it was, so that every optimizer step sees the same rows: saved
    by 2 processes with ``--batch-size 2``, resumed by 1 with ``--batch-size 4``."""
    state = read_state(path)
    saved = state.get("config", {})
    saved_world = int(state.get("world_size", world_size))

    def differs(k: str, v: Any) -> bool:
        if k in per_process and isinstance(v, int) and isinstance(saved[k], int):
            return saved[k] * saved_world != v * world_size
        return saved[k] != v

    changed = [k for k, v in config.items() if k not in ignore and k in saved and differs(k, v)]
    if changed:
        k = changed[0]
        hint = ""
        if k in per_process and saved_world != world_size:
            hint = f" × {saved_world} processes (give {saved[k] * saved_world / world_size:g} for {world_size})"
        raise ConfigError(
            f"--resume: option '{k}' was {saved[k]!r}{hint} in {path}, now {config[k]!r}; resume with the same options"
        )


def check_same_data(state: dict[str, Any], data: str, data_sha256: str | None, checkpoint: Path) -> None:
    """Refuse to resume from ``checkpoint`` (its ``state``) when the training data ``data`` is not the
    data it was written for: the ``data_sha256`` a stage keeps in its checkpoints' state (one of
    them None: nothing to compare, e.g. data read from stdin)."""
    if data_sha256 is not None and state.get("data_sha256") not in (None, data_sha256):
        raise ConfigError(f"--resume: {data} changed since {checkpoint} was written; resume with the same data")


# --- metrics and progress ------------------------------------------------------------------------


class MetricsLog:
    """``RUN/metrics.jsonl``: one JSON object per logged step. On resume, lines after the
    checkpoint's step are dropped so the file reads as one uninterrupted run. Rank 0 only.

    Given the stage's ``run`` (its `provenance.RunInfo`), every line also goes to the trackers of
    its ``--report-to`` (`rlhfkit.tracking`), with the run's options as hyper-parameters; ``tables``
    names JSONL files of sample rows (ppo's ``samples.jsonl``) that trackers show as tables. The
    trackers end when the model directory is saved (`models.save_model_dir`), or at `close`."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        dist: Dist = Dist(),
        resume_step: int | None = None,
        run: Any = None,
        tables: dict[str, Path] | None = None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = dist.is_main
        self.trackers: Any = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if run is not None:  # first: a tracker that cannot start leaves no metrics.jsonl behind
            from rlhfkit import tracking

            self.trackers = tracking.start(run_dir, run, resume_step, tables)
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
        from rlhfkit.data.files import atomic_open

        with atomic_open(self.path) as f:
            f.writelines(line + "\n" for line in kept)
        self.last: dict[str, Any] = {}

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        """Append one line; tensors are turned into floats here (the only place they sync). A
        non-finite value stops the run (NonFiniteError naming the step and the metric) before it
        is written: metrics.jsonl holds numbers only. Call it on every rank with the same values."""
        row = {"step": step, **{k: _to_float(v) for k, v in metrics.items()}}
        bad = next((k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)), None)
        if bad is not None:
            raise NonFiniteError(f"step {step}: {bad} is not finite ({row[bad]}); training stopped (lower --lr, check the data)")
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            self.last = row
            if self.trackers is not None:
                self.trackers.log(step, row)
        return row

    def close(self) -> None:
        """End the trackers' runs (a no-op without trackers, or once `models.save_model_dir` has)."""
        if self.trackers is not None:
            self.trackers.close()


def _to_float(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item())
    return v


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def last_metrics(run_dir: str | os.PathLike, key: str = "loss/train") -> dict[str, Any]:
    """The newest line of ``run_dir``'s metrics.jsonl that holds ``key`` ({} if none): the training
    metrics a resumed run starts from, so that one resumed after its last step still reports them."""
    return next((row for row in reversed(read_metrics(run_dir)) if key in row), {})
