"""``rlhfkit eval``: options → EvalConfig → stages.eval.run."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from rlhfkit.cli.common import (
    ConfigOption,
    DeviceOption,
    DTypeOption,
    SeedOption,
    SkipInvalidOption,
    TrustRemoteCodeOption,
    build_config,
    command,
)
from rlhfkit.config import EvalConfig as C

MODELS, JUDGES, SAMPLING, STATS, OUTPUT = "Models and data", "Judges", "Sampling", "Statistics", "Output"


class Interval(str, Enum):
    wilson = "wilson"
    bootstrap = "bootstrap"


@command
def command(
    policy: Annotated[Optional[list[str]], typer.Option(help="A policy to evaluate: NAME=PATH or PATH (named after the directory). Repeat for several.", rich_help_panel=MODELS)] = None,
    baseline: Annotated[str, typer.Option(help="The reference policy (usually the SFT model), NAME=PATH or PATH: win-rates are against it, KL is to it.", rich_help_panel=MODELS)] = C.baseline,
    prompts: Annotated[str, typer.Option(help="Held-out prompts JSONL ({id?, prompt} or {id?, messages}).", rich_help_panel=MODELS)] = C.prompts,
    max_prompts: Annotated[int, typer.Option(help="Use only the first N prompts (0 = all).", rich_help_panel=MODELS)] = C.max_prompts,
    demos: Annotated[str, typer.Option(help="Held-out demonstrations: report each model's perplexity on the tokens SFT trains on.", rich_help_panel=MODELS)] = C.demos,
    checkpoints: Annotated[str, typer.Option(help="A ppo run directory: evaluate every RUN/checkpoints/step-*/ too (RM score and KL, for the reward-vs-KL plot).", rich_help_panel=MODELS)] = C.checkpoints,
    rm: Annotated[str, typer.Option(help="Reward model judge: a train-rm directory, any one-label classifier, or python:MODULE:FUNCTION. Scores are normalised.", rich_help_panel=JUDGES)] = C.rm,
    judge: Annotated[str, typer.Option(help="External judge, a shell command: reads samples JSONL (blind, shuffled) on stdin, writes rankings JSONL (any rank-import format) on stdout.", rich_help_panel=JUDGES)] = C.judge,
    judge_timeout: Annotated[float, typer.Option(help="Seconds the judge may take.", rich_help_panel=JUDGES)] = C.judge_timeout,
    best_of: Annotated[int, typer.Option(help="Best-of-n from the baseline by RM score as a reference point (KL log n − (n−1)/n); 0 = off. Needs --rm.", rich_help_panel=JUDGES)] = C.best_of,
    n_samples: Annotated[int, typer.Option(help="Completions per prompt and model (the same seeds for every model).", rich_help_panel=SAMPLING)] = C.n_samples,
    max_new_tokens: Annotated[int, typer.Option(help="Longest completion in tokens.", rich_help_panel=SAMPLING)] = C.max_new_tokens,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy; KL is then taken at temperature 1).", rich_help_panel=SAMPLING)] = C.temperature,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.", rich_help_panel=SAMPLING)] = C.top_p,
    batch_size: Annotated[int, typer.Option(help="Prompts per generation batch (and per RM / perplexity forward pass).", rich_help_panel=SAMPLING)] = C.batch_size,
    interval: Annotated[Interval, typer.Option(help="Win-rate interval: wilson (score interval over matches) or bootstrap (percentile, resampling prompts).", rich_help_panel=STATS)] = Interval(C.interval),
    confidence: Annotated[float, typer.Option(help="Confidence level of every interval.", rich_help_panel=STATS)] = C.confidence,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples (Elo intervals; win-rates with --interval bootstrap).", rich_help_panel=STATS)] = C.bootstrap,
    out: Annotated[str, typer.Option(help="Directory for report.md, report.json, reward_vs_kl.png, winrate.png, elo.png and samples.jsonl (none = JSON on stdout only).", rich_help_panel=OUTPUT)] = C.out,
    seed: SeedOption = C.seed,
    device: DeviceOption = C.device,
    dtype: DTypeOption = C.dtype,
    skip_invalid: SkipInvalidOption = C.skip_invalid,
    trust_remote_code: TrustRemoteCodeOption = C.trust_remote_code,
    config: ConfigOption = None,
) -> dict:
    """Compare policies with a baseline on held-out prompts: RM score, KL, length, win-rates with intervals, Elo, agreement of RM and judge, best-of-n; print the report as JSON.

    Every model samples the same prompts with the same per-row seeds. Win-rates count ties as ½.
    """
    from rlhfkit.stages import eval as stage

    policy = list(policy or [])
    return stage.run(build_config(C, locals()))
