"""``rlhfkit validate``: check a data file against its schema before a long run reads it."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from rlhfkit.cli.common import ChatTemplate, ConfigOption, RankingsFormat, SkipInvalidOption, command
from rlhfkit.config import SFTConfig
from rlhfkit.errors import ConfigError


class Kind(str, Enum):
    demonstrations = "demonstrations"
    prompts = "prompts"
    samples = "samples"
    comparisons = "comparisons"
    rankings = "rankings"


@command
def command(
    path: Annotated[
        Path, typer.Argument(help="A .jsonl, .jsonl.gz, .json or .parquet file, a saved dataset directory, or - for stdin.")
    ],
    kind: Annotated[Kind, typer.Option(help="Which record kind the file holds.")],
    samples: Annotated[Optional[Path], typer.Option(help="rankings: the samples file they refer to (collect output).")] = None,
    format: Annotated[RankingsFormat, typer.Option(help="rankings: their format (auto = detected).")] = RankingsFormat.auto,
    model: Annotated[
        str,
        typer.Option(help="prompts, demonstrations: also run the checks that need the model (its tokenizer, its context)."),
    ] = "",
    max_new_tokens: Annotated[int, typer.Option(help="prompts with --model: room each prompt leaves in the context.")] = 0,
    max_length: Annotated[int, typer.Option(help="demonstrations with --model: sft's --max-length.")] = SFTConfig().max_length,
    chat_template: Annotated[ChatTemplate, typer.Option(help="With --model: how string prompts render.")] = ChatTemplate.auto,
    skip_invalid: SkipInvalidOption = False,
    config: ConfigOption = None,
) -> dict:
    """Validate every record of a data file with the validator the stage that reads it uses;
    print counts as JSON, or the first error as FILE:LINE: field."""
    from rlhfkit.data import records

    source = str(path)
    result: dict = {"path": source, "kind": kind.value}
    if kind is Kind.rankings:
        from rlhfkit.rankings import load_checked

        if samples is None:
            raise ConfigError("--samples: required with --kind rankings (the samples the rankings refer to)")
        loaded, _, _ = load_checked(source, str(samples), format.value, skip_invalid=skip_invalid)
        return {**result, "valid": len(loaded.judgements), "skipped": loaded.skipped, "format": loaded.format}
    items = records.load_kind(source, kind.value, skip_invalid=skip_invalid)
    result.update(valid=len(items), skipped=items.skipped)
    if model and kind is Kind.prompts:
        from rlhfkit.chat import check_prompts
        from rlhfkit.models import load_tokenizer, model_context

        tokenizer = load_tokenizer(model)
        name = "<stdin>" if source == "-" else source
        check_prompts(tokenizer, [p.prompt for p in items], source=name, lines=items.lines, mode=chat_template.value,
                      context=model_context(model), max_new_tokens=max_new_tokens)  # fmt: skip
    elif model and kind is Kind.demonstrations:
        from rlhfkit.demonstrations import encode_dataset
        from rlhfkit.models import load_tokenizer

        tokenizer = load_tokenizer(model)
        examples, stats = encode_dataset(
            tokenizer, items, items.lines, source=source, max_length=max_length, skip_invalid=skip_invalid,
            skipped=items.skipped, chat_template=chat_template.value,
        )  # fmt: skip
        from rlhfkit.stages.sft import check_context

        check_context(examples, model, max_length)  # as sft: no row longer than the model's context
        result.update(valid=len(examples), skipped=stats.skipped_invalid, truncated=stats.truncated)
    elif model:
        raise ConfigError(f"--model: checks prompts and demonstrations, not {kind.value}")
    return result
