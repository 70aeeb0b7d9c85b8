"""``rlhfkit rank-import``: options -> RankImportConfig -> stages.rank_import.run."""

from __future__ import annotations

from typing import Annotated

import typer

from rlhfkit.cli.common import (
    INPUT_PANEL,
    Aggregate,
    ConfigOption,
    RankingsFormat,
    SeedOption,
    SkipInvalidOption,
    build_config,
    command,
    option,
    result_or_stderr,
)
from rlhfkit.config import RankImportConfig

D = RankImportConfig()
PAIRS = "Pairs and statistics"


@command
def command(
    rankings: Annotated[
        str, typer.Argument(help="Rankings file (.jsonl, .json, .csv, ...), or - for stdin.", show_default=False)
    ] = D.rankings,
    samples: Annotated[
        str, option("The samples the rankings refer to (collect output).", INPUT_PANEL, show_default=False)
    ] = D.samples,
    format: Annotated[
        RankingsFormat,
        option(
            "Rankings format; auto detects it from the first record (or a .csv name) and says which.", INPUT_PANEL, "--format"
        ),
    ] = D.format,  # type: ignore[assignment]
    out: Annotated[str, option("Comparisons JSONL (train split), or - for stdout.", INPUT_PANEL, show_default=False)] = D.out,
    val_fraction: Annotated[
        float, option("Share of prompts (by a hash of the prompt id) whose pairs go to --val-out.", INPUT_PANEL)
    ] = D.val_fraction,
    val_out: Annotated[
        str, option("Validation comparisons (default: OUT with .val before its extension).", INPUT_PANEL, show_default=False)
    ] = D.val_out,
    stats: Annotated[str, option("Also write the statistics as JSON to this file.", INPUT_PANEL, show_default=False)] = D.stats,
    tie_pairs: Annotated[bool, option("A tie gives a pair with margin 0 (else no pair).", PAIRS)] = D.tie_pairs,
    score_margin: Annotated[bool, option("Scores format: each pair's margin is the score difference.", PAIRS)] = D.score_margin,
    aggregate: Annotated[
        Aggregate, option("none: every annotator's pairs; majority: one pair per couple, by vote.", PAIRS)
    ] = D.aggregate,  # type: ignore[assignment]
    bootstrap: Annotated[int, option("Bootstrap resamples (of prompts) for the Elo intervals.", PAIRS)] = D.bootstrap,
    seed: SeedOption = D.seed,
    skip_invalid: SkipInvalidOption = D.skip_invalid,
    config: ConfigOption = None,
) -> dict | None:
    """Turn labelers' rankings into validated comparison pairs, with agreement and Elo statistics.

    A ranking of K completions gives K·(K−1)/2 pairs; best-of-K gives K−1.

    Every ranking is checked against --samples before anything is written.
    """
    from rlhfkit.stages import rank_import

    cfg = build_config(RankImportConfig, locals())
    return result_or_stderr(cfg.out, rank_import.run(cfg))
