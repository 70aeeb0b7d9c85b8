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
4. Win-rate of each policy against the baseline with a confidence interval (`rlhfkit.stats.win_rate`:
   Wilson score interval by default, or a bootstrap over prompts); Elo ratings of all models from all
   matches (`rlhfkit.stats.elo_table`, bootstrap over prompts, the baseline anchored at 1000);
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

Where things are: this file holds the flow (`run`) and the report (`assemble`, `write_outputs`);
the models, the sampling and the measures of phases 1-2 are in `rlhfkit.stages.eval_sampling`;
the statistics of phases 3-5 in `rlhfkit.stats`; report.md and the plots in `rlhfkit.report`.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfkit.config import EvalConfig, named_path
from rlhfkit.seeds import row_seed
from rlhfkit.stages.eval_sampling import (
    Player,
    Sampler,
    checkpoint_config,
    completion_id,
    find_checkpoints,
    load_checkpoint_policy,
    perplexity,
)
from rlhfkit.stats import (
    Match,
    best_of_curve,
    best_of_kl,
    elo_table,
    mean_std,
    outcome,
    player_outcomes,
    rm_accuracy,
    win_rate,
)


def run(config: EvalConfig) -> dict[str, Any]:
    """Phases 1-6; the result dict (the CLI prints it as JSON)."""
    import torch

    from rlhfkit.chat import check_prompts
    from rlhfkit.config import check_outputs, is_script, is_served, parse_script_spec
    from rlhfkit.console import console
    from rlhfkit.data.records import load_kind
    from rlhfkit.models import load_tokenizer, model_context, resolve_device, resolve_dtype

    config.check()
    started = time.perf_counter()
    out = Path(config.out) if config.out else None
    rm_path = parse_script_spec(config.rm)[0] if is_script(config.rm) else config.rm
    inputs = [("--prompts", config.prompts), ("--demos", config.demos), ("--checkpoints", config.checkpoints), ("--rm", rm_path),
              ("--baseline", named_path(config.baseline, "--baseline")[1])]  # fmt: skip
    inputs += [("--policy", named_path(p)[1]) for p in config.policy]
    check_outputs([("--out", str(out / name), "file") for name in OUT_FILES] if out is not None else [], inputs)
    # the inputs first: a bad record or checkpoint fails before any model is loaded
    prompts = load_kind(config.prompts, "prompts", skip_invalid=config.skip_invalid)
    items = list(prompts)[: config.max_prompts] if config.max_prompts else list(prompts)
    demos = load_kind(config.demos, "demonstrations", skip_invalid=config.skip_invalid) if config.demos else None
    checkpoints = find_checkpoints(config.checkpoints) if config.checkpoints else []
    bases = [str(checkpoint_config(config.checkpoints, path)["policy"]) for _, path in checkpoints]  # each names its policy
    # every prompt fits every model (its tokenizer takes it, it leaves room for --max-new-tokens in the context)
    specs = [named_path(config.baseline, "--baseline")[1], *(named_path(p)[1] for p in config.policy), *bases]
    for spec in dict.fromkeys(spec for spec in specs if not is_served(spec)):  # a served model's server checks its own
        check_prompts(load_tokenizer(spec, trust_remote_code=config.trust_remote_code), [it.prompt for it in items],
                      source="<stdin>" if config.prompts == "-" else config.prompts, lines=prompts.lines[: len(items)],
                      mode=config.chat_template, context=model_context(spec, trust_remote_code=config.trust_remote_code),
                      max_new_tokens=config.max_new_tokens)  # fmt: skip

    # served policies (NAME=openai:URL): each server reached and its model named before any sampling
    from rlhfkit.served import Client

    clients = {spec: Client(named_path(spec)[1], name=named_path(spec)[0], concurrency=config.concurrency)
               for spec in config.policy if is_served(named_path(spec)[1])}  # fmt: skip
    for client in clients.values():
        client.check()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    rows = [(i, j) for i in range(len(items)) for j in range(config.n_samples)]
    kl_temperature = config.temperature if config.temperature > 0 else 1.0
    sampler = Sampler(config, items, rows, device, dtype, kl_temperature, console)

    # 1.-2. every model samples the same rows; its scores, KL to the baseline, lengths, perplexity
    with torch.no_grad():
        baseline = Player(*named_path(config.baseline), kind="baseline")
        sampler.base_model, sampler.base_tok = sampler.load(baseline.path)
        if config.rm:
            from rlhfkit.reward import load_reward

            sampler.reward = load_reward(
                config.rm,
                sampler.base_tok,
                device,
                dtype,
                trust_remote_code=config.trust_remote_code,
                batch_size=config.batch_size,
                chat_template=config.chat_template,
            )
        sampler.sample_player(baseline, sampler.base_model, sampler.base_tok)
        if demos is not None:
            baseline.perplexity = perplexity(
                sampler.base_model, sampler.base_tok, demos, config.batch_size, config.demos, config.chat_template
            )

        # 5. best-of-n from the baseline
        best = None
        if config.best_of:
            best = Player(f"best-of-{config.best_of}", baseline.path, kind="best-of")
            sampler.sample_best_of(best, sampler.base_model, sampler.base_tok)

        policies = []
        for spec in config.policy:
            player = Player(*named_path(spec))
            if spec in clients:
                sampler.sample_served(player, clients[spec])  # no perplexity: the server gives no log-probs
                policies.append(player)
                continue
            model, tok = sampler.load(player.path)
            sampler.sample_player(player, model, tok)
            if demos is not None:
                player.perplexity = perplexity(model, tok, demos, config.batch_size, config.demos, config.chat_template)
            policies.append(player)
            del model

        checkpoint_players = []
        for step, path in checkpoints:
            player = Player(f"step-{step}", str(path), kind="checkpoint", step=step)
            model, tok = load_checkpoint_policy(
                config.checkpoints, path, device=device, dtype=dtype, trust_remote_code=config.trust_remote_code
            )
            model.eval()
            sampler.sample_player(player, model, tok)
            checkpoint_players.append(player)
            del model

    # 3. matches: the judge ranks every model's completions of a prompt, blind (the RM's are by score)
    matched = [baseline, *policies, *([best] if best else [])]
    for player in matched:
        for r, (i, j) in enumerate(rows):
            player.completions[r]["id"] = completion_id(items[i].id, player.name, j, config.seed)

    judgements, judge_answer = [], None
    if config.judge:
        from rlhfkit.judge import run_judge

        judge_input = judge_samples(items, rows, matched, config)
        console.print(f"[bold]judge[/] {config.judge} ({len(judge_input)} prompts)")
        with tempfile.TemporaryDirectory(prefix="rlhfkit-eval-") as scratch:  # the raw answer joins --out's files at the end
            answer = Path(scratch) / "judge_rankings.jsonl"
            judgements = run_judge(config.judge, judge_input, answer, timeout=config.judge_timeout)
            judge_answer = answer.read_text(encoding="utf-8")

    # 3.-5. win-rates, Elo and agreement from the matches; 6. the outputs
    result = assemble(config, items, rows, baseline, policies, best, checkpoint_players, judgements, kl_temperature)
    result["throughput"] = {
        "tokens_per_s": sampler.tokens / max(1e-9, sampler.sampling_seconds),
        "seconds": time.perf_counter() - started,
    }
    if out is not None:
        result["files"] = write_outputs(result, out, items, rows, [*matched, *checkpoint_players], config, judge_answer)
    from rlhfkit.tracking import report_eval

    report_eval(config, result, out)  # --report-to: the report's numbers, samples and plots to the trackers
    return result


def _sampling(config: EvalConfig) -> dict[str, Any]:
    return {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
        "chat_template": config.chat_template,
    }


def judge_samples(
    items: Sequence[Any], rows: Sequence[tuple[int, int]], players: Sequence[Player], config: EvalConfig
) -> list[dict[str, Any]]:
    """One samples record per prompt with the completions of every model, shuffled and without
    the ``policy`` field: the judge cannot tell which model wrote what."""
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for r, (i, _) in enumerate(rows):
        for p in players:
            c = p.completions[r]
            by_prompt.setdefault(i, []).append(
                {"id": c["id"], "text": c["text"], "finish_reason": c["finish_reason"], "num_tokens": c["num_tokens"]}
            )
    records = []
    for i, completions in by_prompt.items():
        random.Random(row_seed(config.seed, items[i].id, "judge", scheme="sha63")).shuffle(completions)
        records.append(
            {"prompt_id": items[i].id, "prompt": items[i].prompt, "completions": completions, "sampling": _sampling(config)}
        )
    return records


def player_stats(player: Player) -> dict[str, Any]:
    """Mean ± std of score, KL and length over a model's completions; the share that stopped."""
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

    # 3. matches: every two models' completions of a row, decided by RM score and by the judge's rankings
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

    # 4. win-rates against the baseline (with the RM's accuracy on the judge's preferences), Elo
    interval = {"method": config.interval, "confidence": config.confidence, "n_bootstrap": config.bootstrap, "seed": config.seed}

    def with_wins(player: Player, stats: dict[str, Any]) -> dict[str, Any]:
        stats["win_rate"] = {}
        for source, ms in matches.items():
            outcomes, clusters = player_outcomes(ms, player.name, baseline.name)
            stats["win_rate"][source] = win_rate(outcomes, clusters, **interval)
        if config.rm and config.judge:
            stats["agreement"] = rm_accuracy(agreement_pairs[player.name])
        return stats

    base_stats = player_stats(baseline)
    base_stats["kl"] = {"mean": 0.0, "std": 0.0}
    best_stats = None  # 5. best-of-n at its analytic KL, and the checkpoints of a ppo run
    if best is not None:
        best_stats = with_wins(best, player_stats(best))
        best_stats.update(n=config.best_of, kl_analytic=best_of_kl(config.best_of), curve=best_of_curve(best.best_of_scores))
    checkpoint_stats = [{"step": p.step, **player_stats(p)} for p in checkpoints]
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
        "judge": (
            {"command": config.judge, "judgements": len(judgements), "prompts_judged": len({j.prompt_id for j in judgements})}
            if config.judge
            else None
        ),
    }


# what eval may write in --out (`config.check_outputs` refuses an input among them)
OUT_FILES = ("samples.jsonl", "report.json", "report.md", "judge_rankings.jsonl", "reward_vs_kl.png", "winrate.png", "elo.png")


def write_outputs(
    result: dict[str, Any],
    out: Path,
    items: Sequence[Any],
    rows: Sequence[tuple[int, int]],
    players: Sequence[Player],
    config: EvalConfig,
    judge_answer: str | None = None,
) -> dict[str, Any]:
    """``samples.jsonl`` (every completion, with its model, score and KL), ``report.md``, the
    plots, ``report.json`` (this result) and the judge's raw answer in ``out``, all or none
    (`data.files.output_group`); returns their paths."""
    from rlhfkit.data.files import atomic_open, output_group, write_json, write_jsonl
    from rlhfkit.report import write_report

    def records():
        for i, item in enumerate(items):
            completions = []
            for p in players:
                for r in range(i * config.n_samples, (i + 1) * config.n_samples):
                    c = p.completions[r]
                    cid = c.get("id") or completion_id(item.id, p.name, rows[r][1], config.seed)
                    completions.append({
                        "id": cid, "text": c["text"], "policy": p.name, "finish_reason": c["finish_reason"],
                        "num_tokens": c["num_tokens"], "logprob": c["logprob"], "score": c["score"], "kl": c["kl"],
                        "sample": rows[r][1],
                    })  # fmt: skip
            yield {"prompt_id": item.id, "prompt": item.prompt, "completions": completions, "sampling": _sampling(config)}

    existed = out.exists()
    try:
        with output_group():
            files: dict[str, Any] = {"samples": str(out / "samples.jsonl"), "report_json": str(out / "report.json")}
            write_jsonl(out / "samples.jsonl", records())
            if judge_answer is not None:
                with atomic_open(out / "judge_rankings.jsonl") as f:
                    f.write(judge_answer)
                files["judge_rankings"] = str(out / "judge_rankings.jsonl")
            result["files"] = files
            files.update(write_report(result, out))
            write_json(out / "report.json", result)
            return files
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
