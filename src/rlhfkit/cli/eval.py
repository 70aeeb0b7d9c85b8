"""``rlhfkit eval``: options -> EvalConfig -> stages.eval.run."""

from __future__ import annotations

from typing import Annotated

from rlhfkit.cli.common import (
    INPUT_PANEL,
    SAMPLING_PANEL,
    ChatTemplateOption,
    ConcurrencyOption,
    ConfigOption,
    DeviceOption,
    DTypeOption,
    Interval,
    ReportToOption,
    SeedOption,
    SkipInvalidOption,
    TrustRemoteCodeOption,
    build_config,
    command,
    option,
)
from rlhfkit.config import EvalConfig

D = EvalConfig()
JUDGES, STATS = "Judges", "Statistics"


@command
def command(
    policy: Annotated[
        list[str],
        option(
            "A policy to evaluate: NAME=PATH or PATH (named after the directory), or NAME=openai:http://HOST:PORT/v1[#MODEL] "
            "(an OpenAI-compatible server; no KL or perplexity for it). Repeat for several.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.policy,
    baseline: Annotated[
        str,
        option(
            "The reference policy (usually the SFT model), NAME=PATH or PATH: win-rates are against it, KL is to it.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.baseline,
    prompts: Annotated[
        str, option("Held-out prompts JSONL ({id?, prompt} or {id?, messages}).", INPUT_PANEL, show_default=False)
    ] = D.prompts,
    max_prompts: Annotated[int, option("Use only the first N prompts (0 = all).", INPUT_PANEL)] = D.max_prompts,
    demos: Annotated[
        str,
        option(
            "Held-out demonstrations: report each model's perplexity on the tokens SFT trains on.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.demos,
    checkpoints: Annotated[
        str,
        option(
            "A ppo run directory: evaluate every RUN/checkpoints/step-*/ too (RM score and KL, for the reward-vs-KL plot).",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.checkpoints,
    out: Annotated[
        str,
        option(
            "Directory for report.md, report.json, reward_vs_kl.png, winrate.png, elo.png and samples.jsonl "
            "(none = JSON on stdout only).",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.out,
    rm: Annotated[
        str,
        option(
            "Reward model judge: a train-rm directory, any one-label classifier, or python:MODULE:FUNCTION. "
            "Scores are normalised.",
            JUDGES,
            show_default=False,
        ),
    ] = D.rm,
    judge: Annotated[
        str,
        option(
            "External judge, a shell command: reads samples JSONL (blind, shuffled) on stdin, writes rankings "
            "JSONL (any rank-import format) on stdout.",
            JUDGES,
            show_default=False,
        ),
    ] = D.judge,
    judge_timeout: Annotated[float, option("Seconds the judge may take.", JUDGES)] = D.judge_timeout,
    best_of: Annotated[
        int,
        option("Best-of-n from the baseline by RM score (KL log n − (n−1)/n), for reference; needs --rm (0 = off).", JUDGES),
    ] = D.best_of,
    n_samples: Annotated[
        int, option("Completions per prompt and model (the same seeds for every model).", SAMPLING_PANEL)
    ] = D.n_samples,
    max_new_tokens: Annotated[int, option("Longest completion in tokens.", SAMPLING_PANEL)] = D.max_new_tokens,
    temperature: Annotated[
        float, option("Sampling temperature (0 = greedy; KL is then taken at temperature 1).", SAMPLING_PANEL)
    ] = D.temperature,
    top_p: Annotated[float, option("Nucleus sampling.", SAMPLING_PANEL)] = D.top_p,
    batch_size: Annotated[
        int, option("Prompts per generation batch (and per RM / perplexity forward pass).", SAMPLING_PANEL)
    ] = D.batch_size,
    concurrency: ConcurrencyOption = D.concurrency,
    interval: Annotated[
        Interval,
        option("Win-rate interval: wilson (score interval over matches) or bootstrap (percentile, resampling prompts).", STATS),
    ] = D.interval,  # type: ignore[assignment]
    confidence: Annotated[float, option("Confidence level of every interval.", STATS)] = D.confidence,
    bootstrap: Annotated[
        int, option("Bootstrap resamples (Elo intervals; win-rates with --interval bootstrap).", STATS)
    ] = D.bootstrap,
    report_to: ReportToOption = D.report_to,
    seed: SeedOption = D.seed,
    device: DeviceOption = D.device,  # type: ignore[assignment]
    dtype: DTypeOption = D.dtype,  # type: ignore[assignment]
    skip_invalid: SkipInvalidOption = D.skip_invalid,
    trust_remote_code: TrustRemoteCodeOption = D.trust_remote_code,
    chat_template: ChatTemplateOption = D.chat_template,  # type: ignore[assignment]
    config: ConfigOption = None,
) -> dict | None:
    """Compare policies with a baseline on held-out prompts; print the report as JSON.

    Per model: RM score, KL, length, win-rates with intervals, Elo, agreement of RM and judge, best-of-n.

    Every model samples the same prompts with the same per-row seeds. Win-rates count ties as ½.
    """
    from rlhfkit.stages import eval as stage

    return stage.run(build_config(EvalConfig, locals()))
