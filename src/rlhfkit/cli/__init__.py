"""The ``rlhfkit`` command line: a Typer app whose commands gather options, build a stage config
and call the stage. Each command lives in its own module beside this one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rlhfkit import __version__
from rlhfkit.cli import collect, dpo, ilql, plot, ppo, rank_import, sft, train_rm, validate
from rlhfkit.cli import eval as eval_cmd
from rlhfkit.cli import label as label_cmd
from rlhfkit.cli.common import GENERAL, set_debug, use_config_file

app = typer.Typer(
    name="rlhfkit",
    help="The RLHF recipe as composable commands: sft → collect → rank-import → train-rm → ppo → eval.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
)


def _version(value: bool) -> None:
    """rlhfkit's version, torch's and transformers', and the device ``--device auto`` picks (the one
    place the CLI imports torch before a command runs)."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        from rlhfkit.models import resolve_device

        typer.echo(f"rlhfkit {__version__}")
        for package in ("torch", "transformers"):
            try:
                typer.echo(f"{package} {version(package)}")
            except PackageNotFoundError:
                typer.echo(f"{package} not installed")
        device = resolve_device("auto")
        name = ""
        if device.type == "cuda":
            import torch

            name = f" ({torch.cuda.get_device_name(device)}, {torch.cuda.device_count()} visible)"
        typer.echo(f"device {device}{name}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        Optional[bool],
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            help="Print the versions of rlhfkit, torch and transformers, and the device --device auto uses.",
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.", rich_help_panel=GENERAL)
    ] = False,
    config: Annotated[
        Optional[Path],
        typer.Option("--config", help="YAML or TOML defaults for the command (keys = option names).", rich_help_panel=GENERAL),
    ] = None,
) -> None:
    set_debug(debug)
    if config is not None and ctx.invoked_subcommand:
        sub = ctx.command.get_command(ctx, ctx.invoked_subcommand)  # type: ignore[attr-defined]
        use_config_file(ctx, config, sub, ctx.invoked_subcommand)


# --help lists the commands in this order: the recipe's, then the tools
RECIPE, TOOLS = "The recipe, in order", "Tools"
app.command("sft", rich_help_panel=RECIPE)(sft.command)
app.command("collect", rich_help_panel=RECIPE)(collect.command)
app.command("label", rich_help_panel=RECIPE)(label_cmd.command)
app.command("rank-import", rich_help_panel=RECIPE)(rank_import.command)
app.command("train-rm", rich_help_panel=RECIPE)(train_rm.command)
app.command("ppo", rich_help_panel=RECIPE)(ppo.command)
app.command("dpo", rich_help_panel=RECIPE)(dpo.command)  # instead of train-rm + ppo
app.command("ilql", rich_help_panel=RECIPE)(ilql.command)  # offline RL instead of ppo
app.command("eval", rich_help_panel=RECIPE)(eval_cmd.command)
app.command("validate", rich_help_panel=TOOLS)(validate.command)
app.command("plot", rich_help_panel=TOOLS)(plot.command)


def main() -> None:
    app(prog_name="rlhfkit")
