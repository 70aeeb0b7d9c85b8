"""``rlhfkit collect``: options -> CollectConfig -> stages.collect.run."""

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
    SeedOption,
    SkipInvalidOption,
    TrustRemoteCodeOption,
    build_config,
    command,
    option,
    result_or_stderr,
)
from rlhfkit.config import CollectConfig

D = CollectConfig()
SELECT_PANEL = "Choosing prompts to label"


@command
def command(
    policy: Annotated[
        list[str],
        option(
            "Model directory, hub id or .gguf file; NAME=PATH names it; NAME=openai:http://HOST:PORT/v1[#MODEL] samples "
            "from an OpenAI-compatible server (vLLM, SGLang, llama.cpp, TGI, transformers serve). Repeat to compare policies "
            "(blind, shuffled).",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.policy,
    prompts: Annotated[
        str, option("Prompts JSONL: {id?, prompt} or {id?, messages}; - for stdin.", INPUT_PANEL, show_default=False)
    ] = D.prompts,
    max_prompts: Annotated[int, option("Use the first N prompts only; 0 = all.", INPUT_PANEL)] = D.max_prompts,
    out: Annotated[
        str, option("Samples JSONL (resumed if it exists), or - for stdout.", INPUT_PANEL, show_default=False)
    ] = D.out,
    dedup: Annotated[bool, option("Drop completions whose text repeats another of the same prompt.", INPUT_PANEL)] = D.dedup,
    k: Annotated[int, option("Completions per prompt and policy.", SAMPLING_PANEL, "--k")] = D.k,
    max_new_tokens: Annotated[int, option("Tokens generated at most per completion.", SAMPLING_PANEL)] = D.max_new_tokens,
    temperature: Annotated[float, option("Sampling temperature; 0 = greedy.", SAMPLING_PANEL)] = D.temperature,
    top_p: Annotated[float, option("Nucleus sampling: keep the most likely tokens up to this mass.", SAMPLING_PANEL)] = D.top_p,
    top_k: Annotated[int, option("Keep only the K most likely tokens; 0 = off.", SAMPLING_PANEL)] = D.top_k,
    stop: Annotated[
        list[str], option("Stop string (repeatable); the EOS token always stops.", SAMPLING_PANEL, show_default=False)
    ] = D.stop,
    batch_size: Annotated[int, option("Sequences per generation batch.", SAMPLING_PANEL)] = D.batch_size,
    concurrency: ConcurrencyOption = D.concurrency,
    select: Annotated[
        int,
        option(
            "Keep only the N prompts whose completions the --select-by ensemble disagrees on most (every prompt's "
            "samples stay in OUT's .pool file); 0 = every prompt.",
            SELECT_PANEL,
        ),
    ] = D.select,
    select_by: Annotated[
        str,
        option("A reward-model ensemble (train-rm --ensemble M): its members' disagreement picks the prompts.", SELECT_PANEL,
               show_default=False),
    ] = D.select_by,  # fmt: skip
    seed: SeedOption = D.seed,
    device: DeviceOption = D.device,  # type: ignore[assignment]
    dtype: DTypeOption = D.dtype,  # type: ignore[assignment]
    skip_invalid: SkipInvalidOption = D.skip_invalid,
    trust_remote_code: TrustRemoteCodeOption = D.trust_remote_code,
    chat_template: ChatTemplateOption = D.chat_template,  # type: ignore[assignment]
    config: ConfigOption = None,
) -> dict | None:
    """Sample K completions per prompt from each policy and write them as samples JSONL for ranking.

    Prompts already in OUT are skipped, so an interrupted run continues where it stopped.
    """
    from rlhfkit.stages import collect

    cfg = build_config(CollectConfig, locals())
    return result_or_stderr(cfg.out, collect.run(cfg))
