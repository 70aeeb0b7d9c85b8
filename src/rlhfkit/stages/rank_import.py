"""``rank-import``: labelers' rankings -> validated comparison pairs, agreement, Elo, train/val split.

1. read the rankings, then the samples (``collect`` output), and index the samples;
2. check every ranking against them (`rlhfkit.rankings`): nothing is written unless all are
   valid (or the invalid ones are skipped with ``--skip-invalid``);
3. expand each ranking into its ordered pairs (K ranked completions -> K·(K−1)/2 pairs; a tie
   gives no pair, or a margin-0 pair with ``--tie-pairs``; best-of-K -> K−1 pairs), or aggregate
   all annotators of a prompt by majority;
4. measure inter-annotator agreement, and rate the policies (Elo, win rates) when the
   completions come from several;
5. split by prompt (a hash of the prompt id, so a prompt is never on both sides) and write the
   comparisons, the validation comparisons and the statistics.

A comparison line (SPEC §4) also carries the ids it came from (``prompt_id``, ``chosen_id``,
``rejected_id``), so that later stages can trace a pair back to its samples. A pair with
``margin`` 0 is a tie; without ``--score-margin`` the other pairs carry no margin.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit import stats
from rlhfkit.config import RankImportConfig, check_outputs
from rlhfkit.data import files
from rlhfkit.losses import expand_ranking
from rlhfkit.rankings import Judgement, SampleIndex, load_checked

ANONYMOUS = "(anonymous)"


@dataclass(frozen=True)
class Pair:
    """One preference between two completions of a prompt (``tie``: neither is better)."""

    prompt_id: str
    chosen: str
    rejected: str
    group: str
    annotator: str | None
    margin: float | None = None
    tie: bool = False


def val_out_path(out: str) -> str:
    """Where the validation pairs go by default: ``.val`` before the extension of OUT.

    ``pairs.jsonl`` -> ``pairs.val.jsonl``, ``pairs.jsonl.gz`` -> ``pairs.val.jsonl.gz``.
    """
    path = Path(out)
    name = path.name
    for ext in (".jsonl.gz", ".jsonl", ".json"):
        if name.endswith(ext):
            return str(path.with_name(name[: -len(ext)] + ".val" + ext))
    return str(path.with_name(name + ".val"))


def is_validation(prompt_id: str, val_fraction: float, seed: int = 0) -> bool:
    """Deterministic split by prompt: a hash of (seed, prompt id) mapped to [0, 1)."""
    if val_fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()
    return int(digest[:16], 16) / 16**16 < val_fraction


# --- pairs --------------------------------------------------------------------------------------


def _group(prompt_id: str, annotator: str | None) -> str:
    return f"{prompt_id}/{annotator}" if annotator is not None else prompt_id


def judgement_pairs(judgement: Judgement, score_margin: bool) -> list[Pair]:
    """Every ordered pair of one judgement, then its ties (as ``tie`` pairs, margin 0)."""
    ids = judgement.completion_ids
    group = _group(judgement.prompt_id, judgement.annotator)
    scores = judgement.scores if score_margin else None
    pairs = []
    for winner, loser in expand_ranking(judgement.ordered_tiers()):
        w, lo = ids[winner], ids[loser]
        margin = scores[w] - scores[lo] if scores and w in scores and lo in scores else None
        pairs.append(Pair(judgement.prompt_id, w, lo, group, judgement.annotator, margin))
    for a, b in judgement.tied_couples():
        pairs.append(Pair(judgement.prompt_id, a, b, group, judgement.annotator, 0.0, tie=True))
    return pairs


def couple_votes(pairs: list[Pair]) -> dict[tuple[str, str, str], dict[str, tuple[int, float | None]]]:
    """``(prompt, a, b)`` with a < b -> {annotator: (label, margin)}; label +1 = a better,
    −1 = b better, 0 = tie. The units of agreement and of the majority vote."""
    votes: dict[tuple[str, str, str], dict[str, tuple[int, float | None]]] = defaultdict(dict)
    for p in pairs:
        a, b = sorted((p.chosen, p.rejected))
        label = 0 if p.tie else (1 if p.chosen == a else -1)
        votes[p.prompt_id, a, b][p.annotator if p.annotator is not None else ANONYMOUS] = (label, p.margin)
    return votes


def majority_pairs(votes: dict[tuple[str, str, str], dict[str, tuple[int, float | None]]]) -> list[Pair]:
    """One pair per couple: the side more annotators preferred (ties abstain); a draw is a tie.
    The margin is the mean margin of the annotators on the winning side, if they all gave one."""
    out = []
    for (prompt_id, a, b), by_annotator in votes.items():
        labels = [label for label, _ in by_annotator.values()]
        balance = labels.count(1) - labels.count(-1)
        group = _group(prompt_id, "majority")
        if balance == 0:
            out.append(Pair(prompt_id, a, b, group, "majority", 0.0, tie=True))
            continue
        winner_label = 1 if balance > 0 else -1
        margins = [m for label, m in by_annotator.values() if label == winner_label]
        margin = sum(margins) / len(margins) if all(m is not None for m in margins) else None  # type: ignore[misc]
        chosen, rejected = (a, b) if winner_label == 1 else (b, a)
        out.append(Pair(prompt_id, chosen, rejected, group, "majority", abs(margin) if margin is not None else None))
    return out


def comparison_record(pair: Pair, index: SampleIndex) -> dict[str, Any]:
    """The comparison line of SPEC §4 (+ the ids it came from)."""
    sample = index.samples[pair.prompt_id]
    chosen = index.completion(pair.prompt_id, pair.chosen)
    rejected = index.completion(pair.prompt_id, pair.rejected)
    record: dict[str, Any] = {"prompt": sample.prompt, "chosen": chosen.text, "rejected": rejected.text, "group": pair.group}
    if pair.margin is not None:
        record["margin"] = float(pair.margin)
    if pair.annotator is not None:
        record["annotator"] = pair.annotator
    if chosen.policy:
        record["chosen_policy"] = chosen.policy
    if rejected.policy:
        record["rejected_policy"] = rejected.policy
    record.update(chosen_finish_reason=chosen.finish_reason, rejected_finish_reason=rejected.finish_reason)
    record.update(prompt_id=pair.prompt_id, chosen_id=pair.chosen, rejected_id=pair.rejected)
    return record


# --- statistics ---------------------------------------------------------------------------------


def agreement_stats(votes: dict[tuple[str, str, str], dict[str, tuple[int, float | None]]]) -> dict[str, Any] | None:
    """Pairwise agreement rate and Krippendorff's alpha (ordinal), overall, per annotator, per prompt.

    A unit is a couple of completions of one prompt; its value for an annotator is +1, 0 or −1
    (first better, tie, second better). Alpha sees every couple in both orientations, so that it
    does not depend on which completion is called "first"; with the ordinal metric a tie against a
    preference is a smaller disagreement than a reversal. None when no couple has two annotators.
    """
    units = [{who: label for who, (label, _) in by.items()} for by in votes.values()]
    if not any(len(u) > 1 for u in units):
        return None
    symmetric = units + [{who: -label for who, label in u.items()} for u in units]
    overall = stats.pairwise_agreement(units)
    annotators = sorted({who for u in units for who in u})
    per_annotator = {}
    for who in annotators:
        agreement = stats.pairwise_agreement(units, annotator=who)
        per_annotator[who] = {
            "pairwise": stats.rounded(agreement.rate),
            "alpha": stats.rounded(stats.krippendorff_alpha(symmetric, "ordinal", annotator=who)),
            "comparisons": agreement.comparisons,
        }
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for (prompt_id, _, _), unit in zip(votes, units):
        by_prompt[prompt_id].append(unit)
    per_prompt = {}
    for prompt_id, prompt_units in by_prompt.items():
        agreement = stats.pairwise_agreement(prompt_units)
        if agreement.comparisons:
            per_prompt[prompt_id] = {"pairwise": stats.rounded(agreement.rate), "comparisons": agreement.comparisons}
    return {
        "pairwise": stats.rounded(overall.rate),
        "alpha": stats.rounded(stats.krippendorff_alpha(symmetric, "ordinal")),
        "comparisons": overall.comparisons,
        "per_annotator": per_annotator,
        "per_prompt": per_prompt,
    }


def policy_stats(pairs: list[Pair], index: SampleIndex, n_bootstrap: int, seed: int) -> dict[str, Any] | None:
    """Elo ratings (bootstrap over prompts) and the win-rate matrix of the policies, from the pairs
    whose two completions come from different policies. None with fewer than two policies."""
    outcomes, clusters, ties, tie_clusters = [], [], [], []
    for p in pairs:
        a = index.completion(p.prompt_id, p.chosen).policy
        b = index.completion(p.prompt_id, p.rejected).policy
        if not a or not b or a == b:
            continue
        (ties if p.tie else outcomes).append((a, b))
        (tie_clusters if p.tie else clusters).append(p.prompt_id)
    if len(stats.players_of(outcomes, ties)) < 2:
        return None
    elo = stats.elo_with_ci(outcomes, ties, clusters=clusters, tie_clusters=tie_clusters, n_bootstrap=n_bootstrap, seed=seed)
    return {
        "elo": {
            p: {k: stats.rounded(v, 1) for k, v in r.as_dict().items()}
            for p, r in sorted(elo.items(), key=lambda kv: -kv[1].rating)
        },
        "confidence": 0.95,
        "bootstrap": n_bootstrap,
        "win_rate": {
            a: {b: {"win_rate": stats.rounded(c["win_rate"]), "games": c["games"]} for b, c in row.items()}
            for a, row in stats.win_rates(outcomes, ties).items()
        },
    }


# --- the stage ----------------------------------------------------------------------------------


def run(config: RankImportConfig) -> dict[str, Any]:
    from rlhfkit.console import console

    config.check()
    val_out = config.val_out or (val_out_path(config.out) if config.val_fraction > 0 else "")
    outputs = [("--out", config.out, "file"), ("--val-out", val_out, "file"), ("--stats", config.stats, "file")]
    check_outputs(outputs, [("RANKINGS", config.rankings), ("--samples", config.samples)])  # before any work
    # 1. the rankings (read to the end first: in a pipe, the samples file may still be being written)
    # 2. every ranking checked against the samples, before anything is written (as `rlhfkit validate --kind rankings`)
    loaded, index, samples = load_checked(config.rankings, config.samples, config.format, skip_invalid=config.skip_invalid)
    if loaded.detected:
        detail = f" ({loaded.row_format} rows)" if loaded.format == "csv" else ""
        console.print(f"rank-import: format auto -> [bold]{loaded.format}[/]{detail}", highlight=False)

    # 3. pairs: every annotator's, or one majority pair per couple
    all_pairs = [p for j in loaded.judgements for p in judgement_pairs(j, config.score_margin)]
    votes = couple_votes(all_pairs)
    pairs = majority_pairs(votes) if config.aggregate == "majority" else all_pairs
    written = [p for p in pairs if config.tie_pairs or not p.tie]
    # two completions with the same text teach nothing (train-rm refuses chosen == rejected): dropped and counted
    same = [p for p in written if index.completion(p.prompt_id, p.chosen).text == index.completion(p.prompt_id, p.rejected).text]
    written = [p for p in written if p not in same]

    # 4. statistics
    agreement = agreement_stats(votes)
    policies = policy_stats(pairs, index, config.bootstrap, config.seed)

    # 5. split by prompt, write
    train = [comparison_record(p, index) for p in written if not is_validation(p.prompt_id, config.val_fraction, config.seed)]
    val = [comparison_record(p, index) for p in written if is_validation(p.prompt_id, config.val_fraction, config.seed)]
    prompts = sorted({j.prompt_id for j in loaded.judgements})
    val_prompts = [p for p in prompts if is_validation(p, config.val_fraction, config.seed)]
    annotators: dict[str, int] = defaultdict(int)
    for j in loaded.judgements:
        annotators[j.annotator if j.annotator is not None else ANONYMOUS] += 1
    summary = {
        "format": loaded.format,
        "row_format": loaded.row_format,
        "records": loaded.records,
        "skipped": loaded.skipped,
        "abstained": loaded.abstained,  # "can't judge" records (rlhfkit label's flag): no pairs
        "samples_skipped": samples.skipped,
        "judgements": len(loaded.judgements),
        "prompts": len(prompts),
        "annotators": dict(sorted(annotators.items())),
        "pairs": len(written),
        "train_pairs": len(train),
        "val_pairs": len(val),
        "train_prompts": len(prompts) - len(val_prompts),
        "val_prompts": len(val_prompts),
        "ties": sum(p.tie for p in pairs),
        "identical_dropped": len(same),
        "aggregate": config.aggregate,
        "agreement": agreement,
        "policies": policies,
    }
    with files.output_group():  # pairs, validation pairs and statistics: all or none
        files.write_jsonl(config.out, train)
        if val_out:
            files.write_jsonl(val_out, val)
        if config.stats:
            files.write_json(config.stats, summary)
    print_stats(summary, console)

    result = {
        k: summary[k]
        for k in ("format", "records", "skipped", "judgements", "prompts", "pairs", "train_pairs", "val_pairs", "ties",
                  "identical_dropped")  # fmt: skip
    }
    result.update(out=config.out, val_out=val_out or None, stats=config.stats or None)
    if agreement is not None:
        result["agreement"] = {"pairwise": agreement["pairwise"], "alpha": agreement["alpha"]}
    if policies is not None:
        result["elo"] = {p: r["rating"] for p, r in policies["elo"].items()}
    return result


def print_stats(summary: dict[str, Any], console: Any) -> None:
    """The statistics as rich tables, for people (stderr)."""
    from rich.table import Table

    table = Table(title="rank-import", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("format", summary["format"] if summary["format"] != "csv" else f"csv ({summary['row_format']} rows)"),
        ("records read", summary["records"]),
        ("records skipped", summary["skipped"]),
        ("abstentions (can't judge)", summary["abstained"]),
        ("judgements", summary["judgements"]),
        ("prompts (train / val)", f"{summary['train_prompts']} / {summary['val_prompts']}"),
        ("pairs (train / val)", f"{summary['train_pairs']} / {summary['val_pairs']}"),
        ("tied couples", summary["ties"]),
        ("pairs of identical texts dropped", summary["identical_dropped"]),
        ("annotators", len(summary["annotators"])),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)

    agreement = summary["agreement"]
    if agreement is not None:
        table = _table(
            "inter-annotator agreement", "annotator", "pairwise agreement", "Krippendorff's α (ordinal)", "comparisons"
        )
        table.add_row("[bold]overall[/]", _fmt(agreement["pairwise"]), _fmt(agreement["alpha"]), str(agreement["comparisons"]))
        for who, row in agreement["per_annotator"].items():
            table.add_row(who, _fmt(row["pairwise"]), _fmt(row["alpha"]), str(row["comparisons"]))
        console.print(table)

    policies = summary["policies"]
    if policies is not None:
        table = _table("policies: Elo (95% bootstrap interval over prompts)", "policy", "Elo", "interval", "games")
        for name, r in policies["elo"].items():
            table.add_row(name, f"{r['rating']:.0f}", f"{r['ci_low']:.0f} – {r['ci_high']:.0f}", f"{r['games']:g}")
        console.print(table)
        names = list(policies["elo"])
        table = _table("win rate of the row policy against the column policy", "", *names)
        for a in names:
            row = policies["win_rate"].get(a, {})
            table.add_row(a, *[_fmt(row[b]["win_rate"]) + f" ({row[b]['games']:g})" if b in row else "–" for b in names])
        console.print(table)


def _table(title: str, *columns: str) -> Any:
    """A rich table: the first column (row names) left-aligned, the numbers right-aligned."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="right" if i else "left")
    return table


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
