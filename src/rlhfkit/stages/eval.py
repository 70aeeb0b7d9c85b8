"""``rlhfkit eval``: compare policies with a baseline on held-out prompts.

1. Every model (the baseline, each ``--policy``, each checkpoint of ``--checkpoints``) samples
   ``--n-samples`` completions per prompt with the *same per-row seeds*: row (prompt p, sample j)
   draws from a generator seeded by ``hash(seed, p, j)``, so two identical models write identical
   completions and a difference between policies is never a difference of luck in the seeds.
2. Per model: the normalised reward-model score of each completion (``--rm``), its KL to the
   baseline, its length and whether it stopped, and the perplexity on ``--demos``.
   KL is the sampled per-sequence estimate on the policy's own samples,
   ``KL = Σ_t log π(y_t|x, y_<t) − log π_base(y_t|x, y_<t)`` over the response tokens, both
   log-probs of ``logits / temperature`` (the distribution the policy sampled from; SPEC §5 ppo 2).
3. Matches: per row, every two models' completions meet once. The reward model judges by score
   (higher wins, equal ties); ``--judge CMD`` ranks each prompt's completions of all models, blind
   and shuffled (`rlhfkit.judge`), and a ranking gives the outcome of every two ranked completions
   of the same row. Ties count ½ everywhere.
4. Win-rate of each policy against the baseline with a confidence interval (`win_rate`: Wilson
   score interval by default, or a bootstrap over prompts); Elo ratings of all models from all
   matches (`rlhfkit.stats.elo_with_ci`, bootstrap over prompts, the baseline anchored at 1000);
   with both judges, the reward model's pairwise accuracy on the judge's preferences.
5. Best-of-n from the baseline (``--best-of N``): N more samples per row, the one the reward model
   scores highest is kept. Its KL to the baseline is analytic, ``log n − (n−1)/n`` (the value used
   by Stiennon et al. 2020 and Gao et al. 2022; Beirami et al. 2024 show it is an upper bound, exact
   when the samples are distinct), and the first k of the N samples give the curve for k ≤ N.
   ``--checkpoints RUN`` adds every checkpoint of a ppo run (RM score and KL only: the points of the
   reward-vs-KL curve); ppo keeps only the newest ``--keep-checkpoints`` of them (0 = all).
6. Outputs: the result dict (printed as JSON by the CLI) and, with ``--out``, ``report.json``,
   ``report.md``, PNG plots (`rlhfkit.report`), ``samples.jsonl`` (every completion with its model,
   score and KL) and the judge's raw answer ``judge_rankings.jsonl``.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
import tempfile
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.config import EvalConfig
from rlhfkit.errors import ConfigError, RlhfkitError

INTERVALS = ("wilson", "bootstrap")


# --- aggregation (pure functions over plain values) ------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, float] | None:
    """``{"mean", "std"}`` (population std, ddof 0) or None for no values."""
    if not values:
        return None
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / len(values)
    return {"mean": mean, "std": math.sqrt(var)}


def z_value(confidence: float) -> float:
    """The two-sided normal quantile: 1.95996... for 0.95."""
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (Wilson 1927).

    ``center = (p + z²/2n) / (1 + z²/n)``, ``half = z / (1 + z²/n) · sqrt(p(1−p)/n + z²/4n²)``.
    Unlike the normal approximation it stays inside [0, 1] and is sensible at p = 0 or 1 and small n.
    With ties counted ½ the true variance is below p(1−p)/n, so the interval is conservative.
    """
    if n <= 0:
        return (0.0, 1.0)
    z = z_value(confidence)
    p = successes / n
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n)))
    return (max(0.0, center - half), min(1.0, center + half))


def outcome(score_a: float, score_b: float) -> float:
    """A match decided by scores: 1.0 if a wins, 0.5 for a tie, 0.0 if b wins."""
    return 1.0 if score_a > score_b else 0.5 if score_a == score_b else 0.0


def win_rate(
    outcomes: Sequence[float],
    clusters: Sequence[Hashable] | None = None,
    *,
    method: str = "wilson",
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Win-rate of a player from its match outcomes (1 win, 0.5 tie, 0 loss), with an interval.

    ``wilson``: the Wilson score interval with ``successes = wins + ties/2`` over ``n`` matches.
    ``bootstrap``: the percentile interval of the win-rate over resamples of whole ``clusters``
    (the prompts: the matches of one prompt are not independent), ``n_bootstrap`` times.
    """
    n = len(outcomes)
    wins = sum(1 for o in outcomes if o == 1.0)
    ties = sum(1 for o in outcomes if o == 0.5)
    losses = n - wins - ties
    result: dict[str, Any] = {"rate": None, "ci_low": None, "ci_high": None, "wins": wins, "ties": ties, "losses": losses, "n": n}
    if n == 0:
        return result
    rate = (wins + 0.5 * ties) / n
    if method == "wilson":
        low, high = wilson_interval(wins + 0.5 * ties, n, confidence)
    elif method == "bootstrap":
        low, high = _bootstrap_rate(outcomes, clusters, confidence, n_bootstrap, seed)
    else:
        raise ConfigError(f"--interval: expected one of {', '.join(INTERVALS)}, got {method!r}")
    result.update(rate=rate, ci_low=low, ci_high=high)
    return result


def _bootstrap_rate(outcomes: Sequence[float], clusters: Sequence[Hashable] | None, confidence: float, n_bootstrap: int, seed: int) -> tuple[float, float]:
    import numpy as np

    keys = list(clusters) if clusters is not None else list(range(len(outcomes)))
    unit: dict[Hashable, int] = {}
    for k in keys:
        unit.setdefault(k, len(unit))
    total = np.zeros(len(unit))
    count = np.zeros(len(unit))
    for k, o in zip(keys, outcomes):
        total[unit[k]] += o
        count[unit[k]] += 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(unit), size=(n_bootstrap, len(unit)))
    rates = total[draws].sum(1) / count[draws].sum(1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(rates, [tail, 100.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Match:
    """``a`` met ``b`` on one row; ``result`` 1.0 = a won, 0.5 = tie, 0.0 = b won. ``cluster`` is
    the prompt (the bootstrap resamples prompts)."""

    a: str
    b: str
    result: float
    cluster: Hashable


def player_outcomes(matches: Sequence[Match], player: str, opponent: str) -> tuple[list[float], list[Hashable]]:
    """``player``'s outcomes (1/0.5/0) against ``opponent`` and their clusters."""
    outcomes, clusters = [], []
    for m in matches:
        if (m.a, m.b) == (player, opponent):
            outcomes.append(m.result)
        elif (m.a, m.b) == (opponent, player):
            outcomes.append(1.0 - m.result)
        else:
            continue
        clusters.append(m.cluster)
    return outcomes, clusters


def elo_table(matches: Sequence[Match], *, anchor: str | None, n_bootstrap: int, confidence: float, seed: int) -> dict[str, Any]:
    """Elo ratings with bootstrap intervals (whole prompts resampled) and the win-rate matrix,
    from `rlhfkit.stats` (maximum-likelihood Bradley–Terry on the Elo scale)."""
    from rlhfkit.stats import elo_with_ci, win_rates

    outcomes, clusters, ties, tie_clusters = [], [], [], []
    for m in matches:
        if m.result == 0.5:
            ties.append((m.a, m.b))
            tie_clusters.append(m.cluster)
        else:
            outcomes.append((m.a, m.b) if m.result == 1.0 else (m.b, m.a))
            clusters.append(m.cluster)
    if not outcomes and not ties:
        return {"ratings": {}, "win_rates": {}, "matches": 0}
    ratings = elo_with_ci(
        outcomes, ties, clusters=clusters, tie_clusters=tie_clusters, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed, anchor=anchor
    )
    return {
        "ratings": {str(p): r.as_dict() for p, r in ratings.items()},
        "win_rates": {str(a): {str(b): v for b, v in row.items()} for a, row in win_rates(outcomes, ties).items()},
        "matches": len(matches),
    }


def rm_accuracy(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Pairwise accuracy of the reward model on a judge's strict preferences: ``pairs`` holds
    ``(RM score of the judge's winner, RM score of its loser)``; an RM tie counts ½."""
    if not pairs:
        return {"accuracy": None, "pairs": 0}
    return {"accuracy": sum(outcome(winner, loser) for winner, loser in pairs) / len(pairs), "pairs": len(pairs)}


def best_of_kl(n: int) -> float:
    """KL(best-of-n ‖ base) = log n − (n−1)/n, in nats (an upper bound, exact for distinct samples)."""
    return math.log(n) - (n - 1) / n


def best_of_curve(scores: Sequence[Sequence[float]]) -> list[dict[str, float]]:
    """Mean best score of the first k samples of every row, for k = 1..n, at the analytic KL."""
    n = min(len(s) for s in scores)
    return [{"n": k, "kl": best_of_kl(k), "score": math.fsum(max(s[:k]) for s in scores) / len(scores)} for k in range(1, n + 1)]


def row_seed(seed: int, prompt_id: str, sample: int, *extra: object) -> int:
    """The seed of one row: the same for every model, a function of (seed, prompt, sample) only."""
    key = "/".join(str(x) for x in (seed, prompt_id, sample, *extra))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def completion_id(prompt_id: str, player: str, sample: int, seed: int) -> str:
    """A stable completion id that does not show which model wrote it (the judge is blind)."""
    digest = hashlib.sha256(f"{seed}/{player}/{prompt_id}/{sample}".encode()).hexdigest()
    return f"{prompt_id}-{digest[:8]}"


# --- models ------------------------------------------------------------------------------------------


@dataclass
class Player:
    name: str
    path: str
    kind: str = "policy"  # policy | baseline | best-of | checkpoint
    step: int | None = None
    completions: list[dict[str, Any]] = field(default_factory=list)  # one per row
    perplexity: float | None = None
    best_of_scores: list[list[float]] = field(default_factory=list)  # best-of-n: the n scores of each row


def parse_player(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (the name is the directory's or file's name)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and path:
        return name, path
    path = spec.rstrip("/")
    stem = Path(path).name
    return (stem[: -len(".gguf")] if stem.endswith(".gguf") else stem) or spec, spec


def find_checkpoints(run_dir: str) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every complete checkpoint of a ppo run that holds the policy's weights."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        raise ConfigError(f"--checkpoints {run_dir}: no checkpoints/ directory (expected a ppo run directory)")
    found = []
    for d in sorted(root.glob("step-*")):
        if (d / "state.json").is_file() and (d / "policy.safetensors").is_file():
            try:
                found.append((int(d.name.split("-", 1)[1]), d))
            except ValueError:
                continue
    if not found:
        raise ConfigError(f"--checkpoints {run_dir}: no complete checkpoint with policy.safetensors in {root}")
    return found


def _checkpoint_base(run_dir: str, checkpoint: Path) -> dict[str, Any]:
    """The ppo config that made a checkpoint (its input policy and LoRA settings)."""
    import json

    state = json.loads((checkpoint / "state.json").read_text())
    config = state.get("config") or {}
    if not config.get("policy"):
        from rlhfkit.provenance import read_run_info

        config = read_run_info(run_dir).get("config") or {}
    if not config.get("policy"):
        raise ConfigError(f"--checkpoints {run_dir}: {checkpoint}/state.json does not name the policy it started from")
    return config


def load_checkpoint_policy(run_dir: str, checkpoint: Path, *, device: Any, dtype: Any, trust_remote_code: bool) -> tuple[Any, Any]:
    """A ppo checkpoint's policy: its base policy with the checkpoint's weights on top (all of them,
    or only the trainable ones: LoRA adapters are applied with the run's settings, then merged)."""
    from safetensors.torch import load_file

    from rlhfkit.models import apply_lora, load_model, load_tokenizer, merged

    config = _checkpoint_base(run_dir, checkpoint)
    spec = str(config["policy"])
    model = load_model(spec, "causal-lm", dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    weights = load_file(str(checkpoint / "policy.safetensors"), device=str(device))
    if any("lora_" in k for k in weights):
        model = apply_lora(
            model,
            r=int(config.get("lora_r", 16)),
            alpha=int(config.get("lora_alpha", 32)),
            target_modules=str(config.get("lora_target_modules", "all-linear")),
        )
    target = model
    _, unexpected = target.load_state_dict(weights, strict=False)
    if unexpected:
        raise RlhfkitError(f"{checkpoint}/policy.safetensors: weights that the policy {spec} does not have (e.g. {unexpected[0]!r})")
    return merged(model), tokenizer


def _stop_ids(tokenizer: Any, model: Any) -> list[int]:
    from rlhfkit.chat import stop_token_ids

    ids = set(stop_token_ids(tokenizer, model.config))
    ids.update(stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    return sorted(ids)


# --- the stage ----------------------------------------------------------------------------------------


def validate(config: EvalConfig) -> None:
    """Every option checked before a model is loaded."""
    if not config.policy and not config.checkpoints:
        raise ConfigError("--policy: at least one policy to evaluate (or --checkpoints RUN)")
    if not config.baseline:
        raise ConfigError("--baseline: required (the policy the others are compared with, usually the SFT model)")
    if not config.prompts:
        raise ConfigError("--prompts: required (held-out prompts JSONL)")
    for name, value, low in (("--max-new-tokens", config.max_new_tokens, 1), ("--n-samples", config.n_samples, 1), ("--batch-size", config.batch_size, 1)):
        if value < low:
            raise ConfigError(f"{name}: must be at least {low}, got {value}")
    if config.max_prompts < 0:
        raise ConfigError(f"--max-prompts: must be 0 (all) or more, got {config.max_prompts}")
    if config.temperature < 0:
        raise ConfigError(f"--temperature: must be >= 0 (0 = greedy), got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise ConfigError(f"--top-p: must be in (0, 1], got {config.top_p}")
    if config.best_of < 0 or config.best_of == 1:
        raise ConfigError(f"--best-of: must be 0 (off) or at least 2, got {config.best_of}")
    if config.best_of and not config.rm:
        raise ConfigError("--best-of: needs --rm (the reward model picks the best of n)")
    if config.interval not in INTERVALS:
        raise ConfigError(f"--interval: expected one of {', '.join(INTERVALS)}, got {config.interval!r}")
    if not 0 < config.confidence < 1:
        raise ConfigError(f"--confidence: must be in (0, 1), got {config.confidence}")
    if config.bootstrap < 0 or (config.interval == "bootstrap" and config.bootstrap < 1):
        raise ConfigError(f"--bootstrap: must be at least 1 with --interval bootstrap (0 allowed otherwise), got {config.bootstrap}")
    if config.judge_timeout <= 0:
        raise ConfigError(f"--judge-timeout: must be positive, got {config.judge_timeout}")
    if config.judge:
        from rlhfkit.judge import check_command

        check_command(config.judge)
    for option, spec in [("--baseline", config.baseline)] + [("--policy", p) for p in config.policy]:
        path = parse_player(spec)[1]
        if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith(".gguf")):
            raise ConfigError(f"{option} {spec}: no such model directory or file")
    names = [parse_player(config.baseline)[0]] + [parse_player(p)[0] for p in config.policy]
    if config.best_of:
        names.append(f"best-of-{config.best_of}")
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"--policy: two models are called {duplicate!r}; name them with NAME=PATH")


def run(config: EvalConfig) -> dict[str, Any]:
    import torch

    from rlhfkit.console import console
    from rlhfkit.data.records import load, parse_demonstration, parse_prompt
    from rlhfkit.models import resolve_device, resolve_dtype

    validate(config)
    started = time.perf_counter()
    prompts = load(config.prompts, parse_prompt, skip_invalid=config.skip_invalid)
    items = list(prompts)[: config.max_prompts] if config.max_prompts else list(prompts)
    seen: dict[str, int] = {}
    for i, p in enumerate(items):
        if p.id in seen:
            raise RlhfkitError(f"{config.prompts}:{prompts.lines[i]}: field 'id': duplicate prompt id {p.id!r} (also line {prompts.lines[seen[p.id]]})")
        seen[p.id] = i
    demos = load(config.demos, parse_demonstration, skip_invalid=config.skip_invalid) if config.demos else None
    checkpoints = find_checkpoints(config.checkpoints) if config.checkpoints else []
    for _, path in checkpoints:
        _checkpoint_base(config.checkpoints, path)  # each names the policy it started from
    out = Path(config.out) if config.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    rows = [(i, j) for i in range(len(items)) for j in range(config.n_samples)]
    kl_temperature = config.temperature if config.temperature > 0 else 1.0
    ctx = _Context(config, items, rows, device, dtype, kl_temperature, console)

    with torch.no_grad():
        baseline = Player(*parse_player(config.baseline), kind="baseline")
        ctx.base_model, ctx.base_tok = ctx.load(baseline.path)
        if config.rm:
            from rlhfkit.reward import load_reward

            ctx.reward = load_reward(config.rm, ctx.base_tok, device, dtype, trust_remote_code=config.trust_remote_code, batch_size=config.batch_size)
        ctx.sample_player(baseline, ctx.base_model, ctx.base_tok)
        if demos is not None:
            baseline.perplexity = perplexity(ctx.base_model, ctx.base_tok, demos, config.batch_size, config.demos)

        best = None
        if config.best_of:
            best = Player(f"best-of-{config.best_of}", baseline.path, kind="best-of")
            ctx.sample_best_of(best, ctx.base_model, ctx.base_tok)

        policies = []
        for spec in config.policy:
            player = Player(*parse_player(spec))
            model, tok = ctx.load(player.path)
            ctx.sample_player(player, model, tok)
            if demos is not None:
                player.perplexity = perplexity(model, tok, demos, config.batch_size, config.demos)
            policies.append(player)
            del model

        checkpoint_players = []
        for step, path in checkpoints:
            player = Player(f"step-{step}", str(path), kind="checkpoint", step=step)
            model, tok = load_checkpoint_policy(config.checkpoints, path, device=device, dtype=dtype, trust_remote_code=config.trust_remote_code)
            model.eval()
            ctx.sample_player(player, model, tok)
            checkpoint_players.append(player)
            del model

    matched = [baseline, *policies, *([best] if best else [])]
    for player in matched:
        for r, (i, j) in enumerate(rows):
            player.completions[r]["id"] = completion_id(items[i].id, player.name, j, config.seed)

    judgements = []
    if config.judge:
        from rlhfkit.judge import run_judge

        judge_input = judge_samples(items, rows, matched, config)
        console.print(f"[bold]judge[/] {config.judge} ({len(judge_input)} prompts)")
        with tempfile.TemporaryDirectory(prefix="rlhfkit-eval-") as scratch:  # the raw answer is kept only with --out
            answer = (out if out is not None else Path(scratch)) / "judge_rankings.jsonl"
            judgements = run_judge(config.judge, judge_input, answer, timeout=config.judge_timeout)

    result = assemble(config, items, rows, baseline, policies, best, checkpoint_players, judgements, kl_temperature)
    result["throughput"] = {"tokens_per_s": ctx.tokens / max(1e-9, ctx.sampling_seconds), "seconds": time.perf_counter() - started}
    if out is not None:
        result["files"] = write_outputs(result, out, items, rows, [*matched, *checkpoint_players], config)
    return result


class _Context:
    """What every model's sampling shares: prompts, rows, device, the baseline and the reward."""

    def __init__(self, config: EvalConfig, items: list, rows: list, device: Any, dtype: Any, kl_temperature: float, console: Any):
        self.config, self.items, self.rows = config, items, rows
        self.device, self.dtype, self.kl_temperature, self.console = device, dtype, kl_temperature, console
        self.reward: Any = None
        self.base_model: Any = None
        self.base_tok: Any = None
        self.tokens = 0
        self.sampling_seconds = 0.0

    def load(self, path: str) -> tuple[Any, Any]:
        from rlhfkit.models import disable_dropout, load_model, load_tokenizer

        model = load_model(path, "causal-lm", dtype=self.dtype, device=self.device, trust_remote_code=self.config.trust_remote_code)
        disable_dropout(model)
        model.eval()
        return model, load_tokenizer(path, trust_remote_code=self.config.trust_remote_code)

    def sample_player(self, player: Player, model: Any, tokenizer: Any) -> None:
        """Sample every row; score, measure KL to the baseline, and keep one dict per row."""
        seeds = [row_seed(self.config.seed, self.items[i].id, j) for i, j in self.rows]
        is_base = player.kind == "baseline"
        same_vocab = is_base or tokenizer.get_vocab() == self.base_tok.get_vocab()
        if not same_vocab:
            self.console.print(f"[yellow]warning:[/] {player.name}: its tokenizer differs from the baseline's; no KL reported")
        player.completions = self._generate(player.name, model, tokenizer, [i for i, _ in self.rows], seeds, kl=not is_base and same_vocab, same_vocab=same_vocab)

    def sample_best_of(self, player: Player, model: Any, tokenizer: Any) -> None:
        """N fresh baseline samples per row (seeds of their own); keep the RM's favourite."""
        n = self.config.best_of
        index = [i for i, _ in self.rows for _ in range(n)]
        seeds = [row_seed(self.config.seed, self.items[i].id, j, "best-of", k) for i, j in self.rows for k in range(n)]
        samples = self._generate(player.name, model, tokenizer, index, seeds, kl=False, same_vocab=True)
        player.completions, player.best_of_scores = [], []
        for r in range(len(self.rows)):
            group = samples[r * n : (r + 1) * n]
            scores = [c["score"] for c in group]
            player.best_of_scores.append(scores)
            chosen = dict(group[max(range(n), key=lambda k: (scores[k], -k))])  # the first of equal best
            chosen["kl"] = None
            player.completions.append(chosen)

    def _generate(self, name: str, model: Any, tokenizer: Any, prompt_index: list[int], seeds: list[int], *, kl: bool, same_vocab: bool) -> list[dict[str, Any]]:
        """Sample one completion per entry of ``prompt_index`` (with its seed) in batches; return
        ``{text, finish_reason, num_tokens, logprob, score, kl}`` per entry. ``same_vocab``: the
        token ids are the baseline's vocabulary (the reward model may score them directly)."""
        from rlhfkit.chat import encode_prompt
        from rlhfkit.console import progress_bar
        from rlhfkit.generation import sample, sequence_logprobs

        config = self.config
        encoded = {i: encode_prompt(tokenizer, self.items[i].prompt) for i in set(prompt_index)}
        stop_ids = _stop_ids(tokenizer, model)
        pad = tokenizer.pad_token_id
        out: list[dict[str, Any]] = []
        with progress_bar(f"sampling {name}", total=len(prompt_index)) as bar:
            for start in range(0, len(prompt_index), config.batch_size):
                batch = prompt_index[start : start + config.batch_size]
                t0 = time.perf_counter()
                rollout = sample(
                    model,
                    [encoded[i] for i in batch],
                    max_new_tokens=config.max_new_tokens,
                    stop_token_ids=stop_ids,
                    pad_token_id=pad,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    seeds=seeds[start : start + len(batch)],
                )
                self.sampling_seconds += time.perf_counter() - t0
                lengths = rollout.response_lengths.tolist()
                self.tokens += sum(lengths)
                texts = [rollout.completion_text(b, tokenizer, stop_ids) for b in range(len(batch))]
                args = (rollout.query, rollout.query_mask, rollout.response, rollout.response_mask)
                logprobs, _ = sequence_logprobs(model, *args, temperature=self.kl_temperature)  # (B, T)
                logprob = logprobs.sum(1).tolist()
                kls: list[float | None] = [None] * len(batch)
                if kl:
                    ref_logprobs, _ = sequence_logprobs(self.base_model, *args, temperature=self.kl_temperature)
                    kls = ((logprobs - ref_logprobs) * rollout.response_mask).sum(1).tolist()  # (B,) per-sequence k1
                elif model is self.base_model:
                    kls = [0.0] * len(batch)
                scores: list[float | None] = [None] * len(batch)
                if self.reward is not None:
                    prompts = [self.items[i].prompt for i in batch]
                    ids = args if same_vocab else (None, None, None, None)  # else the reward re-encodes the texts
                    scores = self.reward.score(prompts, texts, *ids, stopped=rollout.stopped).float().tolist()
                stopped = rollout.stopped.tolist()
                for b in range(len(batch)):
                    out.append(
                        {
                            "text": texts[b],
                            "finish_reason": "stop" if stopped[b] else "length",
                            "num_tokens": int(lengths[b]),
                            "logprob": float(logprob[b]),
                            "score": scores[b],
                            "kl": kls[b],
                        }
                    )
                bar.update(len(batch), info=f"{self.tokens / max(1e-9, self.sampling_seconds):.0f} tok/s")
        return out


def perplexity(model: Any, tokenizer: Any, demos: Any, batch_size: int, source: str) -> float:
    """Token-weighted perplexity ``exp(Σ NLL / Σ tokens)`` on held-out demonstrations, over the
    tokens SFT trains on (`rlhfkit.data.demonstrations`: the response of prompt/response pairs,
    the assistant turns of chats, every token of plain text), so it is comparable with SFT's own
    eval perplexity."""
    import torch
    import torch.nn.functional as F

    from rlhfkit.data.demonstrations import IGNORE_INDEX, collate, encode_dataset

    max_length = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    examples, _ = encode_dataset(tokenizer, demos, demos.lines, source=source, max_length=max_length)
    device = next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id).to(device)
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits.float()  # (B, T, V)
        targets = batch.labels[:, 1:]  # position t predicts token t + 1
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum").double()
        count += batch.num_label_tokens
    return math.exp(nll.item() / max(1, count))


def _sampling(config: EvalConfig) -> dict[str, Any]:
    return {"temperature": config.temperature, "top_p": config.top_p, "max_new_tokens": config.max_new_tokens, "seed": config.seed}


def judge_samples(items: Sequence[Any], rows: Sequence[tuple[int, int]], players: Sequence[Player], config: EvalConfig) -> list[dict[str, Any]]:
    """One samples record per prompt with the completions of every model, shuffled and without
    the ``policy`` field: the judge cannot tell which model wrote what."""
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for r, (i, _) in enumerate(rows):
        for p in players:
            c = p.completions[r]
            by_prompt.setdefault(i, []).append({"id": c["id"], "text": c["text"], "finish_reason": c["finish_reason"], "num_tokens": c["num_tokens"]})
    records = []
    for i, completions in by_prompt.items():
        random.Random(row_seed(config.seed, items[i].id, "judge")).shuffle(completions)
        records.append({"prompt_id": items[i].id, "prompt": items[i].prompt, "completions": completions, "sampling": _sampling(config)})
    return records


def player_stats(player: Player) -> dict[str, Any]:
    cs = player.completions
    scores = [c["score"] for c in cs if c.get("score") is not None]
    kls = [c["kl"] for c in cs if c.get("kl") is not None]
    return {
        "name": player.name,
        "path": player.path,
        "samples": len(cs),
        "score": mean_std(scores),
        "kl": mean_std(kls),
        "length": mean_std([float(c["num_tokens"]) for c in cs]),
        "stopped": sum(c["finish_reason"] == "stop" for c in cs) / len(cs) if cs else None,
        "perplexity": player.perplexity,
    }


def assemble(
    config: EvalConfig,
    items: Sequence[Any],
    rows: Sequence[tuple[int, int]],
    baseline: Player,
    policies: Sequence[Player],
    best: Player | None,
    checkpoints: Sequence[Player],
    judgements: Sequence[Any],
    kl_temperature: float,
) -> dict[str, Any]:
    """The report: per-model statistics, win-rates, Elo and agreement from the sampled rows."""
    from rlhfkit.judge import judged_outcome, positions

    matched = [baseline, *policies, *([best] if best else [])]
    couples = [(a, b) for k, a in enumerate(matched) for b in matched[k + 1 :]]
    n = config.n_samples

    matches: dict[str, list[Match]] = {}
    if config.rm:
        matches["rm"] = [
            Match(a.name, b.name, outcome(a.completions[r]["score"], b.completions[r]["score"]), items[i].id)
            for r, (i, _) in enumerate(rows)
            for a, b in couples
        ]
    agreement_pairs: dict[str, list[tuple[float, float]]] = {p.name: [] for p in matched}
    all_pairs: list[tuple[float, float]] = []
    if config.judge:
        index = {item.id: i for i, item in enumerate(items)}
        judged: list[Match] = []
        for judgement in judgements:
            ranks = positions(judgement)
            i = index[judgement.prompt_id]
            for r in range(i * n, (i + 1) * n):
                for a, b in couples:
                    ca, cb = a.completions[r], b.completions[r]
                    result = judged_outcome(ranks, ca["id"], cb["id"])
                    if result is None:
                        continue
                    judged.append(Match(a.name, b.name, result, judgement.prompt_id))
                    if config.rm and result != 0.5:
                        pair = (ca["score"], cb["score"]) if result == 1.0 else (cb["score"], ca["score"])
                        all_pairs.append(pair)
                        if a is baseline:
                            agreement_pairs[b.name].append(pair)
        matches["judge"] = judged

    def with_wins(player: Player, stats: dict[str, Any]) -> dict[str, Any]:
        stats["win_rate"] = {}
        for source, ms in matches.items():
            outcomes, clusters = player_outcomes(ms, player.name, baseline.name)
            stats["win_rate"][source] = win_rate(
                outcomes, clusters, method=config.interval, confidence=config.confidence, n_bootstrap=config.bootstrap, seed=config.seed
            )
        if config.rm and config.judge:
            stats["agreement"] = rm_accuracy(agreement_pairs[player.name])
        return stats

    base_stats = player_stats(baseline)
    base_stats["kl"] = {"mean": 0.0, "std": 0.0}
    best_stats = None
    if best is not None:
        best_stats = with_wins(best, player_stats(best))
        best_stats.update(n=config.best_of, kl_analytic=best_of_kl(config.best_of), curve=best_of_curve(best.best_of_scores))
    checkpoint_stats = []
    for p in checkpoints:
        stats = player_stats(p)
        checkpoint_stats.append({"step": p.step, **stats})
    elo = {
        source: elo_table(ms, anchor=baseline.name, n_bootstrap=config.bootstrap, confidence=config.confidence, seed=config.seed)
        for source, ms in matches.items()
    }
    return {
        "prompts": len(items),
        "n_samples": n,
        "sampling": {**_sampling(config), "kl_temperature": kl_temperature},
        "inputs": {
            "prompts": config.prompts,
            "baseline": config.baseline,
            "policies": list(config.policy),
            "rm": config.rm or None,
            "judge": config.judge or None,
            "demos": config.demos or None,
            "checkpoints": config.checkpoints or None,
        },
        "interval": {"method": config.interval, "confidence": config.confidence, "ties": 0.5},
        "baseline": base_stats,
        "policies": [with_wins(p, player_stats(p)) for p in policies],
        "best_of": best_stats,
        "checkpoints": checkpoint_stats,
        "elo": elo,
        "agreement": rm_accuracy(all_pairs) if config.rm and config.judge else None,
        "judge": {"command": config.judge, "judgements": len(judgements), "prompts_judged": len({j.prompt_id for j in judgements})} if config.judge else None,
    }


def write_outputs(result: dict[str, Any], out: Path, items: Sequence[Any], rows: Sequence[tuple[int, int]], players: Sequence[Player], config: EvalConfig) -> dict[str, Any]:
    """``samples.jsonl`` (every completion, with its model, score and KL), ``report.md``, the
    plots and ``report.json`` (this result) in ``out``; returns their paths."""
    from rlhfkit.data.files import write_json, write_jsonl
    from rlhfkit.report import write_report

    def records():
        for i, item in enumerate(items):
            completions = []
            for p in players:
                for r in range(i * config.n_samples, (i + 1) * config.n_samples):
                    c = p.completions[r]
                    cid = c.get("id") or completion_id(item.id, p.name, rows[r][1], config.seed)
                    completions.append({"id": cid, "text": c["text"], "policy": p.name, "finish_reason": c["finish_reason"], "num_tokens": c["num_tokens"],
                                        "logprob": c["logprob"], "score": c["score"], "kl": c["kl"], "sample": rows[r][1]})  # fmt: skip
            yield {"prompt_id": item.id, "prompt": item.prompt, "completions": completions, "sampling": _sampling(config)}

    files: dict[str, Any] = {"samples": str(out / "samples.jsonl"), "report_json": str(out / "report.json")}
    write_jsonl(out / "samples.jsonl", records())
    if config.judge:
        files["judge_rankings"] = str(out / "judge_rankings.jsonl")
    result["files"] = files
    files.update(write_report(result, out))
    write_json(out / "report.json", result)
    return files
