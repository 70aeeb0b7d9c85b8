"""``rlhfkit validate``: check a data file against its schema before a long run reads it."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from rlhfkit.cli.common import ConfigOption, SkipInvalidOption, command


class Kind(str, Enum):
    demonstrations = "demonstrations"
    prompts = "prompts"
    samples = "samples"
    comparisons = "comparisons"


@command
def command(
    path: Annotated[
        Path, typer.Argument(help="A .jsonl, .jsonl.gz, .json or .parquet file, a saved dataset directory, or - for stdin.")
    ],
    kind: Annotated[Kind, typer.Option(help="Which record kind the file holds.")],
    skip_invalid: SkipInvalidOption = False,
    config: ConfigOption = None,
) -> dict:
    """Validate every record of a data file; print counts as JSON, or the first error as FILE:LINE: field."""
    from rlhfkit.data import records

    parse = {
        Kind.demonstrations: records.parse_demonstration,
        Kind.prompts: records.parse_prompt,
        Kind.samples: records.parse_samples,
        Kind.comparisons: records.parse_comparison,
    }[kind]
    loaded = records.load(str(path), parse, skip_invalid=skip_invalid)
    return {"path": str(path), "kind": kind.value, "valid": len(loaded), "skipped": loaded.skipped}
