"""``rlhfkit collect``: K completions per prompt from one or more policies, for labelers to rank."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from rlhfkit.cli.common import (
    ConfigOption,
    Device,
    DeviceOption,
    DType,
    DTypeOption,
    SeedOption,
    SkipInvalidOption,
    TrustRemoteCodeOption,
    build_config,
    command,
    console,
)
from rlhfkit.config import CollectConfig

D = CollectConfig()
DEFAULT_DEVICE, DEFAULT_DTYPE = Device(D.device), DType(D.dtype)
INPUT, SAMPLING, OUTPUT = "Input", "Sampling", "Output"


@command
def command(
    policy: Annotated[
        list[str],
        typer.Option(
            help="Model directory, hub id or .gguf file; NAME=PATH names it. Repeat to compare policies (blind, shuffled).",
            rich_help_panel=INPUT,
            show_default=False,
        ),
    ],
    prompts: Annotated[
        str,
        typer.Option(
            help="Prompts JSONL: {id?, prompt} or {id?, messages}; - for stdin.", rich_help_panel=INPUT, show_default=False
        ),
    ],
    out: Annotated[
        str,
        typer.Option(help="Samples JSONL (resumed if it exists), or - for stdout.", rich_help_panel=OUTPUT, show_default=False),
    ],
    k: Annotated[int, typer.Option("--k", help="Completions per prompt and policy.", rich_help_panel=SAMPLING)] = D.k,
    max_new_tokens: Annotated[
        int, typer.Option(help="Tokens generated at most per completion.", rich_help_panel=SAMPLING)
    ] = D.max_new_tokens,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature; 0 = greedy.", rich_help_panel=SAMPLING)
    ] = D.temperature,
    top_p: Annotated[
        float, typer.Option(help="Nucleus sampling: keep the most likely tokens up to this mass.", rich_help_panel=SAMPLING)
    ] = D.top_p,
    top_k: Annotated[int, typer.Option(help="Keep only the K most likely tokens; 0 = off.", rich_help_panel=SAMPLING)] = D.top_k,
    stop: Annotated[
        list[str] | None,
        typer.Option(help="Stop string (repeatable); the EOS token always stops.", rich_help_panel=SAMPLING, show_default=False),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per generation batch.", rich_help_panel=SAMPLING)] = D.batch_size,
    dedup: Annotated[
        bool, typer.Option(help="Drop completions whose text repeats another of the same prompt.", rich_help_panel=OUTPUT)
    ] = D.dedup,
    max_prompts: Annotated[
        int, typer.Option(help="Use the first N prompts only; 0 = all.", rich_help_panel=INPUT)
    ] = D.max_prompts,
    seed: SeedOption = D.seed,
    device: DeviceOption = DEFAULT_DEVICE,
    dtype: DTypeOption = DEFAULT_DTYPE,
    trust_remote_code: TrustRemoteCodeOption = D.trust_remote_code,
    skip_invalid: SkipInvalidOption = D.skip_invalid,
    config: ConfigOption = None,
) -> dict | None:
    """Sample K completions per prompt from each policy and write them as samples JSONL for ranking.

    Prompts already in OUT are skipped, so an interrupted run continues where it stopped.
    """
    from rlhfkit.stages import collect

    values = dict(locals())
    values["stop"] = list(stop or [])
    cfg = build_config(CollectConfig, values)
    result = collect.run(cfg)
    if cfg.out == "-":  # stdout carries the samples
        console.print(json.dumps(result, ensure_ascii=False), highlight=False, soft_wrap=True, markup=False)
        return None
    return result
