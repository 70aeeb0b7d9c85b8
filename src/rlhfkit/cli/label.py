"""``rlhfkit label``: options -> LabelConfig -> rlhfkit.label.run (serve the page, or --export)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from rlhfkit.cli.common import (
    INPUT_PANEL,
    ConfigOption,
    SeedOption,
    SkipInvalidOption,
    build_config,
    choice_enum,
    command,
    option,
)
from rlhfkit.label import Export, LabelConfig, Mode

D = LabelConfig()
TASKS, SERVER = "Tasks", "Server"
ModeChoice = choice_enum("Mode", Mode)
ExportChoice = choice_enum("Export", Export)


@command
def command(
    samples: Annotated[str, typer.Argument(help="The samples to judge (collect output).", show_default=False)] = D.samples,
    out: Annotated[
        str, option("Rankings JSONL, appended to and resumed (with --export: the tasks JSON).", INPUT_PANEL, show_default=False)
    ] = D.out,
    export: Annotated[
        Optional[ExportChoice],  # type: ignore[valid-type]
        option(
            "Write tasks for this tool to --out (and its config beside it) instead of serving.", INPUT_PANEL, show_default=False
        ),
    ] = D.export,
    annotator: Annotated[
        Optional[list[str]],
        option(
            "A labeler's name (repeat for several); only these may label. Default: anyone who gives a name.",
            TASKS,
            show_default=False,
        ),
    ] = D.annotator,
    overlap: Annotated[int, option("Each prompt goes to this many of the named annotators (0 = to all).", TASKS)] = D.overlap,
    mode: Annotated[
        ModeChoice,  # type: ignore[valid-type]
        option("rank (ties allowed), best-of-k, scores (Likert 1-7) or pairwise (every couple).", TASKS),
    ] = D.mode,  # type: ignore[assignment]
    guidelines: Annotated[str, option("A Markdown file shown beside every task.", TASKS, show_default=False)] = D.guidelines,
    k_max: Annotated[int, option("Show at most N completions per prompt (a seeded subset; 0 = all).", TASKS)] = D.k_max,
    host: Annotated[str, option("Address to listen on; anything but loopback requires --token.", SERVER)] = D.host,
    port: Annotated[int, option("Port (0 = any free port).", SERVER)] = D.port,
    token: Annotated[
        str, option("Secret every request must carry (auto = generate one, printed once in the URL).", SERVER, show_default=False)
    ] = D.token,
    seed: SeedOption = D.seed,
    skip_invalid: SkipInvalidOption = D.skip_invalid,
    config: ConfigOption = None,
) -> dict:
    """Serve a page on which people rank each prompt's completions (blind, resumable, several at once).

    Every submission is appended to --out in rank-import's native format and fsynced first.

    With --export label-studio|argilla, write tasks for that tool instead; its export goes back into rank-import unchanged.
    """
    from rlhfkit.label import run

    return run(build_config(LabelConfig, {**locals(), "annotator": annotator or []}))
