"""What every command shares: the help panels, the choices, the general options, ``--config``
files, and turning errors into one red line.

A command module declares its options with `option` and these aliases, each defaulting to its
stage config's field (``D = <Stage>Config()``; ``= D.lr``), so the config dataclass stays the one
home of defaults; choices are Enums made from the config's ``Literal`` types (`choice_enum`). It
builds its stage's config with `build_config` and calls the stage inside `command`, which prints
the result as JSON on stdout. The stage's ``config.check()`` reports a missing or bad option.

Help panels, in this order in every command: the command's inputs and outputs, its own panels
(``Training``, ``Sampling``, ``PPO``, ...), then `RUN_PANEL`, `LORA_PANEL`, `SCALE_PANEL` and `GENERAL`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import click
import tomllib
import typer
from rich.markup import escape

from rlhfkit import config
from rlhfkit.console import console
from rlhfkit.errors import ConfigError, RlhfkitError

# the help panels every command shares (a command's own panels sit between INPUT_PANEL and RUN_PANEL)
INPUT_PANEL = "Input and output"
TRAINING_PANEL = "Training"
EVAL_PANEL = "Held-out evaluation"
SAMPLING_PANEL = "Sampling"
RUN_PANEL = "Checkpoints and logging"
LORA_PANEL = "LoRA"
GENERAL = "General"


def option(help: str, panel: str, *flags: str, **kwargs: Any) -> Any:
    """``typer.Option`` in one help panel: ``Annotated[float, option("Peak learning rate.", TRAINING_PANEL)] = D.lr``."""
    return typer.Option(*flags, help=help, rich_help_panel=panel, **kwargs)


def choice_enum(name: str, literal: Any) -> type[Enum]:
    """A str Enum with the values of a config ``Literal`` type: the CLI's choices, written once in config.py."""
    members = {value.replace("-", "_"): value for value in config.choices(literal)}
    return Enum(name, members, type=str)  # type: ignore[return-value]


Device = choice_enum("Device", config.Device)
DType = choice_enum("DType", config.DType)
Schedule = choice_enum("Schedule", config.Schedule)
ValueHead = choice_enum("ValueHead", config.ValueHead)
KLEstimator = choice_enum("KLEstimator", config.KLEstimator)
Interval = choice_enum("Interval", config.Interval)
RankingsFormat = choice_enum("RankingsFormat", config.RankingsFormat)
Aggregate = choice_enum("Aggregate", config.Aggregate)
HeadInit = choice_enum("HeadInit", config.HeadInit)
Pooling = choice_enum("Pooling", config.Pooling)
ChatTemplate = choice_enum("ChatTemplate", config.ChatTemplate)
Strategy = choice_enum("Strategy", config.Strategy)


# --- configuration files ------------------------------------------------------------------------


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML or TOML mapping of option names (``max-new-tokens`` or ``max_new_tokens``) to values."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # yaml and toml each raise their own error types
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return data


def config_defaults(path: Path, command: click.Command, command_name: str) -> dict[str, Any]:
    """The defaults that a config file gives one command. Keys at the top level apply to the
    command; a table named after a command (``[ppo]``) applies to that command only and wins."""
    data = read_config_file(path)
    params = {p.name for p in command.params if p.name}
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    section = data.get(command_name) or data.get(command_name.replace("-", "_")) or {}
    out = {}
    for key, value in {**flat, **section}.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name == "config":
            continue
        if name not in params:
            raise ConfigError(f"{path}: key '{key}': not an option of 'rlhfkit {command_name}'")
        out[name] = value
    return out


def use_config_file(ctx: click.Context, path: Path, command: click.Command, command_name: str) -> None:
    """Make a config file's values the defaults of ``command`` (the one place ``--config`` is
    applied): for the command's own ``--config``, ``ctx`` is the command's context; for the global
    ``rlhfkit --config FILE COMMAND``, the root's, whose default map holds one entry per command.
    Options given on the command line still win. A bad file is one red line."""
    try:
        defaults = config_defaults(path, command, command_name)
    except RlhfkitError as e:
        fail(e)
    if ctx.command is command:
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
    else:
        ctx.default_map = {**(ctx.default_map or {}), command_name: defaults}


def _config_callback(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """Eager: runs before the other options are read, so the file's values become their defaults."""
    if value is not None and not ctx.resilient_parsing:
        use_config_file(ctx, value, ctx.command, ctx.info_name or "")
    return value


# --- option aliases shared by every command ----------------------------------------------------

ConfigOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        help="YAML or TOML file whose keys are option names; command-line options win.",
        is_eager=True,
        callback=_config_callback,
        rich_help_panel=GENERAL,
    ),
]
SeedOption = Annotated[int, option("Random seed (data order, sampling, initialisation).", GENERAL)]
DeviceOption = Annotated[Device, option("auto = CUDA if present, else CPU.", GENERAL)]
DTypeOption = Annotated[
    DType,
    option("auto = bfloat16 on a GPU that supports it or a CPU with AMX or AVX512-BF16 (bf16 is faster there), else float32.",
           GENERAL),
]
SkipInvalidOption = Annotated[bool, option("Skip and count invalid records instead of stopping.", GENERAL)]
TrustRemoteCodeOption = Annotated[bool, option("Allow model code from the model's directory or hub repo.", GENERAL)]
ChatTemplateOption = Annotated[
    ChatTemplate,
    option(
        "String prompts: auto = one user turn of the model's chat template if it has one (a note says so); always = "
        "a user turn even without one (ChatML); never = raw text. Message prompts always use the template.",
        INPUT_PANEL,
    ),
]


ConcurrencyOption = Annotated[
    int, option("Requests in flight per served policy (NAME=openai:http://HOST:PORT/v1[#MODEL]).", SAMPLING_PANEL)
]


# --- option aliases shared by the training commands (sft, train-rm, ppo, dpo, ilql) ----------------

ResumeOption = Annotated[bool, option("Continue from the newest checkpoint in --out (the same options are required).", RUN_PANEL)]
SaveEveryOption = Annotated[int, option("Checkpoint every N optimizer steps (0 = only at the end).", RUN_PANEL)]
KeepCheckpointsOption = Annotated[int, option("Keep the newest N checkpoints (0 = all).", RUN_PANEL)]
LogEveryOption = Annotated[int, option("Optimizer steps per metrics.jsonl line.", RUN_PANEL)]
LoraROption = Annotated[int, option("LoRA rank.", LORA_PANEL)]
LoraAlphaOption = Annotated[int, option("LoRA alpha (scale = alpha / r).", LORA_PANEL)]
LoraDropoutOption = Annotated[float, option("Dropout on the LoRA path.", LORA_PANEL)]
LoraTargetModulesOption = Annotated[str, option("all-linear, or comma-separated module names (q_proj,v_proj).", LORA_PANEL)]
SaveAdapterOption = Annotated[bool, option("Also save the LoRA adapter alone in OUT/adapter/ (peft format).", LORA_PANEL)]
WeightDecayOption = Annotated[float, option("AdamW weight decay (not on biases and norms).", TRAINING_PANEL)]
MaxGradNormOption = Annotated[float, option("Clip the gradient norm (0 = no clipping).", TRAINING_PANEL)]
# the epoch-based ones (train-rm, dpo, ilql); sft says more about its own
MaxStepsOption = Annotated[int, option("Stop after this many optimizer steps (0 = every epoch).", TRAINING_PANEL)]
GradAccumOption = Annotated[int, option("Micro-batches per optimizer step.", TRAINING_PANEL)]
ScheduleOption = Annotated[Schedule, option("Learning-rate decay after warmup.", TRAINING_PANEL)]
WarmupStepsOption = Annotated[int, option("Linear warmup steps.", TRAINING_PANEL)]
ValFractionOption = Annotated[
    float, option("Share of prompts held out of --data when --val-data is not given (0 = no held-out set).", EVAL_PANEL)
]
# scale: how the trained models are spread over the processes of a torchrun job (README, "Scale")
SCALE_PANEL = "Scale"
StrategyOption = Annotated[
    Strategy,
    option(
        "Under torchrun: ddp = a whole replica of the trained models per process (fastest while they fit); fsdp = weights, "
        "gradients and optimizer state sharded over the processes (FSDP2, a unit per decoder layer; the frozen reference and "
        "reward model too), checkpoints sharded (torch.distributed.checkpoint, resumable on another number of processes).",
        SCALE_PANEL,
    ),
]
GradientCheckpointingOption = Annotated[
    bool, option("Recompute activations during the backward pass: less memory, ~30% more compute.", SCALE_PANEL)
]
CompileOption = Annotated[
    bool,
    option(
        "torch.compile every decoder layer (regional compilation, compiled once and reused by all layers; the first "
        "steps pay the compile). Off by default: it saved 0-2% of a SmolLM2 training step on a 2-core Xeon CPU.",
        SCALE_PANEL,
    ),
]
CpuOffloadOption = Annotated[
    bool,
    option("With --strategy fsdp: weights, gradients and optimizer state in CPU memory (AdamW steps on the CPU).", SCALE_PANEL),
]


def _report_to_callback(ctx: typer.Context, param: typer.CallbackParam, value: Optional[str]) -> Optional[str]:
    """``--report-to`` checked when it is read (a config file's value too), before any work: known
    trackers, each one's extra installed."""
    if value is not None and not ctx.resilient_parsing:
        from rlhfkit.tracking import check_report_to

        try:
            check_report_to(value)
        except RlhfkitError as e:
            fail(e)
    return value


# the training commands and eval
ReportToOption = Annotated[
    str,
    typer.Option(
        help="Experiment trackers that get the metric stream too (same keys and steps as metrics.jsonl, the options as "
        "hyper-parameters): none, or tensorboard, wandb, mlflow, trackio, comma-separated. "
        "Each is an extra: pip install rlhfkit[wandb].",
        callback=_report_to_callback,
        rich_help_panel=RUN_PANEL,
    ),
]


# --- running a stage -----------------------------------------------------------------------------

C = TypeVar("C")


def build_config(cls: type[C], values: dict[str, Any]) -> C:
    """The stage config from a command's option values: enums become their strings, paths strings."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for name, value in values.items():
        if name not in names:
            continue
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


_debug = False  # set by the root callback for this invocation (`--debug`)


def set_debug(value: bool) -> None:
    global _debug
    _debug = value


def debug_enabled() -> bool:
    return _debug or bool(os.environ.get("RLHFKIT_DEBUG"))


def fail(error: BaseException) -> None:
    """One red line on stderr, exit code 1 (a traceback only with ``--debug``)."""
    if debug_enabled():
        raise error
    text = str(error).encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate in the input stays printable
    console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(1) from None


def run_command(fn: Callable[[], Any]) -> None:
    """Run a stage; print its result as JSON on stdout; map rlhfkit errors to exit code 1."""
    try:
        result = fn()
    except RlhfkitError as e:
        fail(e)
    except OSError as e:  # the environment: a full disk, a file that vanished or may not be written
        fail(RlhfkitError(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else f"{type(e).__name__}: {e}"))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    if result is not None:
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
        sys.stdout.flush()


def result_or_stderr(out: str, result: Any) -> Any:
    """The result to print on stdout, or, when ``--out -`` makes stdout carry the data (collect's
    samples, rank-import's pairs), None after printing it to stderr instead."""
    if out != "-":
        return result
    console.print(json.dumps(result, ensure_ascii=False), highlight=False, soft_wrap=True, markup=False)
    return None


F = TypeVar("F", bound=Callable[..., Any])


def command(fn: F) -> F:
    """Decorator for a command body that raises rlhfkit errors (see `run_command`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        run_command(lambda: fn(*args, **kwargs))

    return wrapper  # type: ignore[return-value]
