"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for every training stage: ``--strategy fsdp``.

DDP keeps a whole replica on every device: weights, gradients and AdamW's two moments, about 16
bytes per float32 parameter. FSDP shards all of them across the ``N`` processes (16/N bytes per
parameter) and all-gathers a unit's weights only while it computes. `training.wrap_model` calls
`shard`; stages never import this module directly except through `rlhfkit.training`.

Units, built bottom-up (the order FSDP2 needs):

1. every decoder layer (a transformers ``GradientCheckpointingLayer``, or a class named in a
   model's ``_no_split_modules``) is a unit of its own;
2. per model (the outermost ``PreTrainedModel`` of each subtree: the policy, a value model, a reward
   model) the modules that still own parameters — embeddings, final norm, output layer or score
   head, LoRA layers outside the decoder layers — form *one* unit (``fully_shard([...])``), so a
   tied embedding / output layer stays in one unit, and any of them may be called on its own
   (rlhfkit calls the backbone and the head separately: `scoring.last_token_scores`,
   `stages.sft.TokenNLL`, the value model);
3. whatever else owns parameters (ppo's value head on the policy) is one more unit;
4. the module given (what the optimizer trains: ``TokenNLL``, ``RewardScorer``, ``ActorCritic``)
   is the root; it is initialised at once, so any unit may run first.

Precision: on a CUDA GPU with bfloat16 (``--dtype auto`` or ``bfloat16``) units compute in bfloat16
(``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``) from float32 shards that the
optimizer updates; elsewhere (CPU, ``--dtype float32``) everything stays float32.
``--cpu-offload`` keeps the shards, their gradients and the optimizer's state in CPU memory
(``CPUOffloadPolicy``; AdamW then steps on the CPU).

Collectives: under FSDP every forward of a unit all-gathers its weights, so every rank must run
the same number of forwards. Training steps do; loops whose length depends on the rank's data
(sampling until every row stopped, held-out evaluation over uneven shards) run inside `gathered`,
which all-gathers every unit of a module once, keeps them gathered (forwards then communicate
nothing) and frees them at the end: for its duration the module takes its full size in memory (in
bfloat16 with the mixed-precision policy), as the rollout engines of OpenRLHF and verl do.

Checkpoints (`save` / `load`): ``torch.distributed.checkpoint`` (DCP), each rank writing its own
shard (``__<rank>_0.distcp``) and rank 0 the ``.metadata``; a checkpoint written by N processes is
read by M (DCP reshards), and by one process without any process group. The final model is gathered
to rank 0 (`plain_copy`): a plain module with full float32 weights that ``save_pretrained`` writes
as an ordinary Hugging Face directory.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

# set on every module of a tree wrapped with --strategy fsdp (also in a single process, where
# nothing is sharded): its checkpoints use the DCP format, so that a run can continue on N processes
FSDP_MARK = "_rlhfkit_fsdp"


def is_fsdp(module: Any) -> bool:
    """Whether ``module`` belongs to a tree wrapped with ``--strategy fsdp`` (checkpoints in DCP)."""
    return bool(getattr(module, FSDP_MARK, False))


def is_sharded(module: Any) -> bool:
    """Whether any part of ``module`` is an FSDP unit (its weights are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, nn.Module) and any(isinstance(m, FSDPModule) for m in module.modules())


def mark(module: nn.Module) -> None:
    for m in module.modules():
        object.__setattr__(m, FSDP_MARK, True)


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every transformers model in ``module``, outermost first."""
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = {
        name
        for m in module.modules()
        if isinstance(m, PreTrainedModel)
        for name in (getattr(m, "_no_split_modules", None) or ())
    }
    found: list[nn.Module] = []
    for m in module.modules():
        if (isinstance(m, GradientCheckpointingLayer) or type(m).__name__ in names) and not any(
            m in f.modules() for f in found
        ):
            found.append(m)
    return found


def _owners(module: nn.Module) -> list[nn.Module]:
    """The outermost transformers models in ``module`` (each one's leftover modules form a unit)."""
    from transformers import PreTrainedModel

    owners: list[nn.Module] = []
    for m in module.modules():
        if isinstance(m, PreTrainedModel) and not any(m in o.modules() for o in owners):
            owners.append(m)
    return owners


def mixed_precision(device: torch.device, dtype_option: str) -> Any:
    """bf16 compute with fp32 gradient reduction on a CUDA GPU that supports it (``--dtype auto``
    or ``bfloat16``); None (full precision) elsewhere."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and dtype_option in ("auto", "bfloat16") and torch.cuda.is_bf16_supported():
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard(
    module: nn.Module, device: torch.device, world_size: int, *, mp_policy: Any = None, cpu_offload: bool = False
) -> nn.Module:
    """Apply FSDP2 to ``module`` in place (units as the module docstring says) and return it.
    Needs the process group (torchrun); ``world_size`` processes share every unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {"mesh": init_device_mesh(device.type, (world_size,))}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    layers = decoder_layers(module)
    for layer in layers:
        fully_shard(layer, **kwargs)
    taken = {id(p) for layer in layers for p in layer.parameters()}

    def leftovers(tree: nn.Module) -> list[nn.Module]:
        # every module that owns a parameter no earlier unit took: a tied output layer joins the
        # embedding's unit (a parameter shared by two units is refused by FSDP2, and a module left
        # out would hand its tied weight to the root)
        found = [m for m in tree.modules() if any(id(p) not in taken for p in m.parameters(recurse=False))]
        taken.update(id(p) for m in found for p in m.parameters(recurse=False))
        return found

    for group in [*(leftovers(owner) for owner in _owners(module)), leftovers(module)]:
        if group:
            fully_shard(group if len(group) > 1 else group[0], **kwargs)
    fully_shard(module, **kwargs)
    # FSDP2 makes the first module to run forward the root; initialise now, so that any unit may run
    # first (generation calls the policy inside the ActorCritic root, evaluation the backbone alone)
    module._get_fsdp_state()._lazy_init()  # type: ignore[operator]
    mark(module)
    return module


def _units(module: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(module: Any) -> Iterator[None]:
    """Inside: every FSDP unit of ``module`` holds its full weights (one all-gather per unit on
    entry, freed on exit), so forwards communicate nothing and ranks may run different numbers of
    them (sampling, uneven evaluation shards). A no-op for a module that is not sharded. For
    inference: no gradients inside."""
    units = _units(module) if isinstance(module, nn.Module) else []
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) float weights of ``module`` on rank 0, in CPU memory; {} elsewhere.
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _rebuild(model: nn.Module) -> nn.Module:
    """An empty (meta-device) module of the same architecture: a transformers model from its config,
    a peft model as its base model with the same adapter config."""
    from transformers import PreTrainedModel

    try:
        from peft import PeftModel, get_peft_model
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = None  # noqa: N806
    if PeftModel is not None and isinstance(model, PeftModel):
        base = _rebuild(model.get_base_model())
        with torch.device("meta"):
            return get_peft_model(base, copy.deepcopy(model.peft_config[model.active_adapter]))
    if isinstance(model, PreTrainedModel):
        with torch.device("meta"):
            plain = type(model)(copy.deepcopy(model.config))
        if getattr(model, "generation_config", None) is not None:
            plain.generation_config = copy.deepcopy(model.generation_config)
        return plain
    raise TypeError(f"cannot rebuild a {type(model).__name__} outside FSDP (expected a transformers or peft model)")


def plain_copy(model: nn.Module, is_main: bool) -> nn.Module | None:
    """``model`` (a transformers or peft model inside an FSDP tree) as a plain module with its full
    float32 weights, on rank 0 (None elsewhere): what `models.save_model_dir`, `models.merged` and
    `models.save_adapter` take. A collective: every rank calls it."""
    state = full_state_dict(model)
    if not is_main:
        return None
    plain = _rebuild(model)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()  # the output layer of a tied model is the embedding (one entry in the state dict)
    if unexpected:
        raise RuntimeError(f"gathered weights that the model does not have: {unexpected[:3]}")
    buffers = dict(model.named_buffers())
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (rotary frequencies) are not in a state dict
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, buffers[name].detach().to("cpu").clone(), persistent=False)
    still_meta = [n for n, p in plain.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"weights missing after gathering the model: {still_meta[:3]} (missing {missing[:3]})")
    return plain.eval()


# --- checkpoints (DCP) ------------------------------------------------------------------------------

METADATA = ".metadata"  # DCP's index, written by rank 0 last among the shard files


def is_dcp_checkpoint(path: Path) -> bool:
    return (Path(path) / METADATA).is_file()


def _states(modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> tuple[nn.Module, dict[str, Any]]:
    """The state DCP reads and writes: each module's trainable weights (frozen ones come from the
    input model, as in `training.trainable_state_dict`), each optimizer's state, keyed by the
    parameters' names under ``modules``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    container = nn.ModuleDict(modules)
    options = StateDictOptions(ignore_frozen_params=True)
    state = {
        "model": get_model_state_dict(container, options=options),
        "optimizers": {k: get_optimizer_state_dict(container, o, options=options) for k, o in optimizers.items()},
    }
    return container, state


def save(directory: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Every rank writes its shard of the weights and optimizer states into ``directory`` (a
    collective; without a process group, one process writes everything)."""
    import torch.distributed.checkpoint as dcp

    _, state = _states(modules, optimizers)
    dcp.save(state, checkpoint_id=str(directory))


def load(directory: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Read what `save` wrote, resharded to this run's processes, into the modules and optimizers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    container, state = _states(modules, optimizers)
    dcp.load(state, checkpoint_id=str(directory))  # fails if an entry asked for is not in the checkpoint
    # not strict: frozen weights (LoRA's base, train-rm's lower layers) are not in it, by design
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_model_state_dict(container, state["model"], options=options)
    for k, o in optimizers.items():
        set_optimizer_state_dict(container, o, state["optimizers"][k], options=options)


def load_module(directory: Path, name: str, module: nn.Module) -> None:
    """Read one module's weights (its trainable ones, as `save` wrote them under ``name``) from a
    sharded checkpoint into a plain ``module``: any number of processes wrote it, none is needed to
    read it (eval ``--checkpoints`` of an FSDP ppo run)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    container = nn.ModuleDict({name: module})
    state = {"model": get_model_state_dict(container, options=StateDictOptions(ignore_frozen_params=True))}
    dcp.load(state, checkpoint_id=str(directory))  # fails if an entry asked for is not in the checkpoint
    set_model_state_dict(container, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))


def local_non_finite(module: nn.Module) -> str | None:
    """The name of the first weight whose local shard (or whole tensor) holds a NaN or an infinity."""
    from torch.distributed.tensor import DTensor

    from rlhfkit.models import all_finite

    for name, tensor in module.state_dict().items():
        if not all_finite(tensor.to_local() if isinstance(tensor, DTensor) else tensor):
            return name
    return None


def to_local_value(value: Any) -> Any:
    """A DTensor (a gradient norm under FSDP) as the plain full tensor; anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value
