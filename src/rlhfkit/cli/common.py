"""What every command shares: the general options, ``--config`` files, and turning errors into
one red line.

A command module declares its options with these aliases, builds its stage's config dataclass with
`build_config`, and calls the stage inside `run_command`, which prints the result as JSON on stdout.
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

from rlhfkit.console import console
from rlhfkit.errors import ConfigError, RlhfkitError

GENERAL = "General"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


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


def _config_callback(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """Eager: runs before the other options are read, so the file's values become their defaults
    and anything given on the command line still wins."""
    if value is None or ctx.resilient_parsing:
        return value
    try:
        defaults = config_defaults(value, ctx.command, ctx.info_name or "")
    except RlhfkitError as e:
        fail(e)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
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
SeedOption = Annotated[int, typer.Option(help="Random seed (data order, sampling, initialisation).", rich_help_panel=GENERAL)]
DeviceOption = Annotated[Device, typer.Option(help="auto = CUDA if present, else CPU.", rich_help_panel=GENERAL)]
DTypeOption = Annotated[DType, typer.Option(help="auto = bfloat16 on a GPU that supports it, else float32.", rich_help_panel=GENERAL)]
SkipInvalidOption = Annotated[bool, typer.Option(help="Skip and count invalid records instead of stopping.", rich_help_panel=GENERAL)]
TrustRemoteCodeOption = Annotated[bool, typer.Option(help="Allow model code from the model's directory or hub repo.", rich_help_panel=GENERAL)]


# --- option aliases shared by the training commands (sft, train-rm, ppo) ---------------------------

RUN_PANEL = "Checkpoints and logging"
LORA_PANEL = "LoRA"


class Schedule(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


ResumeOption = Annotated[bool, typer.Option(help="Continue from the newest checkpoint in --out (the same options are required).", rich_help_panel=RUN_PANEL)]
KeepCheckpointsOption = Annotated[int, typer.Option(help="Keep the newest N checkpoints (0 = all).", rich_help_panel=RUN_PANEL)]
LogEveryOption = Annotated[int, typer.Option(help="Optimizer steps per metrics.jsonl line.", rich_help_panel=RUN_PANEL)]
LoraROption = Annotated[int, typer.Option(help="LoRA rank.", rich_help_panel=LORA_PANEL)]
LoraAlphaOption = Annotated[int, typer.Option(help="LoRA alpha (scale = alpha / r).", rich_help_panel=LORA_PANEL)]
LoraDropoutOption = Annotated[float, typer.Option(help="Dropout on the LoRA path.", rich_help_panel=LORA_PANEL)]
LoraTargetModulesOption = Annotated[str, typer.Option(help="all-linear, or comma-separated module names (q_proj,v_proj).", rich_help_panel=LORA_PANEL)]
SaveAdapterOption = Annotated[bool, typer.Option(help="Also save the LoRA adapter alone in OUT/adapter/ (peft format).", rich_help_panel=LORA_PANEL)]


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
    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(1) from None


def run_command(fn: Callable[[], Any]) -> None:
    """Run a stage; print its result as JSON on stdout; map rlhfkit errors to exit code 1."""
    try:
        result = fn()
    except RlhfkitError as e:
        fail(e)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    if result is not None:
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
        sys.stdout.flush()


F = TypeVar("F", bound=Callable[..., Any])


def command(fn: F) -> F:
    """Decorator for a command body that raises rlhfkit errors (see `run_command`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        run_command(lambda: fn(*args, **kwargs))

    return wrapper  # type: ignore[return-value]
