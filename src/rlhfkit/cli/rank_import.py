"""``rlhfkit rank-import``: labelers' rankings -> comparison pairs for ``train-rm``, with statistics."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer

from rlhfkit.cli.common import ConfigOption, SeedOption, SkipInvalidOption, build_config, command, console
from rlhfkit.config import RankImportConfig

D = RankImportConfig()
INPUT, PAIRS, OUTPUT = "Input", "Pairs", "Output"


class Format(str, Enum):
    auto = "auto"
    native = "native"
    scores = "scores"
    best_of_k = "best-of-k"
    pairwise = "pairwise"
    label_studio = "label-studio"
    argilla = "argilla"
    csv = "csv"


class Aggregate(str, Enum):
    none = "none"
    majority = "majority"


DEFAULT_FORMAT, DEFAULT_AGGREGATE = Format(D.format), Aggregate(D.aggregate)


@command
def command(
    rankings: Annotated[
        str, typer.Argument(help="Rankings file (.jsonl, .json, .csv, ...), or - for stdin.", show_default=False)
    ],
    samples: Annotated[
        str, typer.Option(help="The samples the rankings refer to (collect output).", rich_help_panel=INPUT, show_default=False)
    ],
    out: Annotated[
        str, typer.Option(help="Comparisons JSONL (train split), or - for stdout.", rich_help_panel=OUTPUT, show_default=False)
    ],
    format: Annotated[
        Format,
        typer.Option(
            "--format",
            help="Rankings format; auto detects it from the first record (or a .csv name) and says which.",
            rich_help_panel=INPUT,
        ),
    ] = DEFAULT_FORMAT,
    tie_pairs: Annotated[
        bool, typer.Option(help="A tie gives a pair with margin 0 (else no pair).", rich_help_panel=PAIRS)
    ] = D.tie_pairs,
    score_margin: Annotated[
        bool, typer.Option(help="Scores format: each pair's margin is the score difference.", rich_help_panel=PAIRS)
    ] = D.score_margin,
    aggregate: Annotated[
        Aggregate,
        typer.Option(help="none: every annotator's pairs; majority: one pair per couple, by vote.", rich_help_panel=PAIRS),
    ] = DEFAULT_AGGREGATE,
    val_fraction: Annotated[
        float,
        typer.Option(help="Share of prompts (by a hash of the prompt id) whose pairs go to --val-out.", rich_help_panel=OUTPUT),
    ] = D.val_fraction,
    val_out: Annotated[
        str,
        typer.Option(
            help="Validation comparisons (default: OUT with .val before its extension).",
            rich_help_panel=OUTPUT,
            show_default=False,
        ),
    ] = D.val_out,
    stats: Annotated[
        str, typer.Option(help="Also write the statistics as JSON to this file.", rich_help_panel=OUTPUT, show_default=False)
    ] = D.stats,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples (of prompts) for the Elo intervals.", rich_help_panel=OUTPUT)
    ] = D.bootstrap,
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
    result = rank_import.run(cfg)
    if cfg.out == "-":  # stdout carries the pairs
        console.print(json.dumps(result, ensure_ascii=False), highlight=False, soft_wrap=True, markup=False)
        return None
    return result
