"""The ``rlhfkit`` command line: a Typer app whose commands gather options, build a stage config
and call the stage. Each command lives in its own module beside this one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rlhfkit import __version__
from rlhfkit.cli import collect, ppo, rank_import, sft, train_rm, validate
from rlhfkit.cli import eval as eval_cmd
from rlhfkit.cli.common import GENERAL, config_defaults, fail, set_debug
from rlhfkit.errors import RlhfkitError

app = typer.Typer(
    name="rlhfkit",
    help="The RLHF recipe as composable commands: sft → collect → rank-import → train-rm → ppo → eval.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rlhfkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.", rich_help_panel=GENERAL)] = False,
    config: Annotated[
        Optional[Path],
        typer.Option("--config", help="YAML or TOML defaults for the command (keys = option names).", rich_help_panel=GENERAL),
    ] = None,
) -> None:
    set_debug(debug)
    if config is not None and ctx.invoked_subcommand:
        sub = ctx.command.get_command(ctx, ctx.invoked_subcommand)  # type: ignore[attr-defined]
        try:
            defaults = config_defaults(config, sub, ctx.invoked_subcommand)
        except RlhfkitError as e:
            fail(e)
        ctx.default_map = {ctx.invoked_subcommand: defaults}


app.command("validate")(validate.command)
app.command("sft")(sft.command)
app.command("train-rm")(train_rm.command)
app.command("collect")(collect.command)
app.command("rank-import")(rank_import.command)
app.command("eval")(eval_cmd.command)
app.command("ppo")(ppo.command)


def main() -> None:
    app(prog_name="rlhfkit")
