"""``rlhfkit plot``: training curves of one or more runs from their ``metrics.jsonl`` (`rlhfkit.plot`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rlhfkit.cli.common import command


@command
def command(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Run directories (sft, train-rm or ppo --out) or metrics.jsonl files; several are overlaid.",
            metavar="RUN_DIR",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="Directory for curves.png.")] = Path("."),
) -> dict:
    """Plot training curves as one PNG (OUT/curves.png): loss, reward, reward-model accuracy, KL and β,
    entropy, clip fractions, perplexity, learning rate, gradient norm, throughput.

    Several runs are drawn into the same panels, one colour per run.

    Every training stage also writes curves.png into its run directory at the end.
    """
    from rlhfkit.plot import plot

    return plot(runs, out)
