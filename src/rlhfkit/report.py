"""``rlhfkit eval``'s files for people: ``report.md`` and three PNG plots, drawn from the result dict.

Everything here reads the JSON-able result that `rlhfkit.stages.eval.run` returns, so the report
can never disagree with the numbers printed on stdout. Plots use matplotlib's object API
(``matplotlib.figure.Figure``, the Agg canvas): no pyplot global state, no display needed.

* ``reward_vs_kl.png`` — mean normalised RM score against KL to the baseline: the baseline at 0,
  every policy (error bars: standard error of the mean), the PPO checkpoints as a line, and the
  best-of-n curve at its analytic KL ``log n − (n−1)/n``. Needs a reward model.
* ``winrate.png`` — each policy's win-rate against the baseline with its confidence interval, one
  bar per judge (reward model, external judge), and the 50% line.
* ``elo.png`` — Elo ratings with bootstrap intervals (the baseline anchored at 1000).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from rlhfkit.data.files import atomic_open

JUDGE_LABELS = {"rm": "reward model", "judge": "judge"}
COLORS = {"rm": "#4C72B0", "judge": "#DD8452"}


def write_report(result: dict[str, Any], out: str | os.PathLike) -> dict[str, Any]:
    """Write ``report.md`` and the plots into ``out``; return ``{"report": path, "plots": {name: path}}``.

    A plot without data (no reward model: no reward-vs-KL; no judgement at all: no win-rates) is
    not written and is left out of the returned paths.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    if plot_reward_vs_kl(result, out / "reward_vs_kl.png"):
        plots["reward_vs_kl"] = str(out / "reward_vs_kl.png")
    if plot_winrate(result, out / "winrate.png"):
        plots["winrate"] = str(out / "winrate.png")
    if plot_elo(result, out / "elo.png"):
        plots["elo"] = str(out / "elo.png")
    with atomic_open(out / "report.md") as f:
        f.write(markdown(result, {k: Path(v).name for k, v in plots.items()}))
    return {"report": str(out / "report.md"), "plots": plots}


# --- plots ---------------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 4.2) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _save(fig: Any, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


def _sem(stat: dict[str, Any] | None, n: int) -> float:
    """Standard error of a mean from its recorded std and sample count."""
    if not stat or stat.get("std") is None or n <= 1:
        return 0.0
    return float(stat["std"]) / math.sqrt(n)


def plot_reward_vs_kl(result: dict[str, Any], path: Path) -> bool:
    baseline = result["baseline"]
    if baseline.get("score") is None:
        return False
    fig, ax = _figure()
    ax.errorbar([0.0], [baseline["score"]["mean"]], yerr=[_sem(baseline["score"], baseline["samples"])],
                fmt="s", color="black", capsize=3, label=f"baseline ({baseline['name']})")  # fmt: skip
    best = result.get("best_of")
    if best and best.get("curve"):
        curve = best["curve"]
        ax.plot(
            [c["kl"] for c in curve], [c["score"] for c in curve], "--", color="grey", marker=".", label="best-of-n (baseline)"
        )
        for c in curve:
            if c["n"] in (curve[-1]["n"], 2, 4, 8, 16, 32, 64):
                ax.annotate(
                    f"n={c['n']}", (c["kl"], c["score"]), textcoords="offset points", xytext=(4, -10), fontsize=7, color="grey"
                )
    checkpoints = [c for c in result.get("checkpoints") or [] if c.get("score") and c.get("kl")]
    if checkpoints:
        xs = [c["kl"]["mean"] for c in checkpoints]
        ys = [c["score"]["mean"] for c in checkpoints]
        ax.plot(xs, ys, "-o", color="#55A868", markersize=4, label="PPO checkpoints")
        for c, x, y in zip(checkpoints, xs, ys):
            ax.annotate(str(c["step"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="#55A868")
    for i, p in enumerate(result["policies"]):
        if p.get("score") is None or p.get("kl") is None:
            continue
        x, y, xerr, yerr = p["kl"]["mean"], p["score"]["mean"], _sem(p["kl"], p["samples"]), _sem(p["score"], p["samples"])
        ax.errorbar([x], [y], yerr=[yerr], xerr=[xerr], fmt="o", capsize=3, color=f"C{(i + 3) % 10}", label=p["name"])
    ax.set_xlabel("KL to the baseline (nats per sequence)")
    ax.set_ylabel("reward-model score (normalised)")
    ax.set_title("Reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _win_rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = [(p["name"], p.get("win_rate") or {}) for p in result["policies"]]
    best = result.get("best_of")
    if best:
        rows.append((best["name"], best.get("win_rate") or {}))
    return rows


def plot_winrate(result: dict[str, Any], path: Path) -> bool:
    rows = _win_rows(result)
    judges = [j for j in ("rm", "judge") if any(j in w for _, w in rows)]
    if not judges:
        return False
    fig, ax = _figure(6.4, 1.6 + 0.6 * len(rows) * len(judges))
    height = 0.8 / len(judges)
    for k, judge in enumerate(judges):
        ys, rates, lo, hi = [], [], [], []
        for i, (_, wins) in enumerate(rows):
            w = wins.get(judge)
            if w is None or w.get("rate") is None:
                continue
            ys.append(i + (k - (len(judges) - 1) / 2) * height)
            rates.append(w["rate"])
            lo.append(w["rate"] - w["ci_low"])
            hi.append(w["ci_high"] - w["rate"])
        ax.barh(
            ys,
            rates,
            height=height * 0.9,
            xerr=[lo, hi],
            capsize=3,
            color=COLORS[judge],
            label=f"judged by {JUDGE_LABELS[judge]}",
        )
    ax.axvline(0.5, color="black", linewidth=1, linestyle=":")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    confidence = result.get("interval", {}).get("confidence", 0.95)
    ax.set_xlabel(f"win-rate against {result['baseline']['name']} ({confidence:.0%} interval, ties count ½)")
    ax.set_title("Win-rate against the baseline")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    return True


def plot_elo(result: dict[str, Any], path: Path) -> bool:
    elo = {j: e for j, e in (result.get("elo") or {}).items() if e and e.get("ratings")}
    if not elo:
        return False
    names = sorted(
        {n for e in elo.values() for n in e["ratings"]},
        key=lambda n: -max(e["ratings"].get(n, {}).get("rating", -1e9) for e in elo.values()),
    )
    fig, ax = _figure(6.4, 1.6 + 0.5 * len(names) * len(elo))
    height = 0.8 / len(elo)
    for k, (judge, e) in enumerate(elo.items()):
        ys, xs, lo, hi = [], [], [], []
        for i, name in enumerate(names):
            r = e["ratings"].get(name)
            if r is None:
                continue
            ys.append(i + (k - (len(elo) - 1) / 2) * height)
            xs.append(r["rating"])
            lo.append(max(0.0, r["rating"] - r["ci_low"]))
            hi.append(max(0.0, r["ci_high"] - r["rating"]))
        ax.errorbar(
            xs,
            ys,
            xerr=[lo, hi],
            fmt="o",
            capsize=3,
            color=COLORS.get(judge, "C0"),
            label=f"judged by {JUDGE_LABELS.get(judge, judge)}",
        )
    ax.axvline(1000, color="black", linewidth=1, linestyle=":")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"Elo (baseline = 1000; {result.get('interval', {}).get('confidence', 0.95):.0%} bootstrap interval)")
    ax.set_title("Elo ratings")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


# --- report.md -----------------------------------------------------------------------------------


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mean_std(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat:
        return "–"
    return f"{_num(stat['mean'], digits)} ± {_num(stat['std'], digits)}"


def _win(w: dict[str, Any] | None) -> str:
    if not w or w.get("rate") is None:
        return "–"
    return f"{w['rate']:.1%} [{w['ci_low']:.1%}, {w['ci_high']:.1%}] ({w['wins']}W/{w['ties']}T/{w['losses']}L)"


def markdown(result: dict[str, Any], plots: dict[str, str]) -> str:
    s = result["sampling"]
    interval = result.get("interval", {})
    lines = [
        "# rlhfkit eval report",
        "",
        f"- prompts: {result['prompts']} ({result['n_samples']} sample(s) per prompt and policy), "
        f"from `{result['inputs']['prompts']}`",
        f"- sampling: temperature {s['temperature']}, top-p {s['top_p']}, max new tokens {s['max_new_tokens']}, seed {s['seed']}"
        + (f"; KL computed at temperature {s['kl_temperature']}" if s.get("kl_temperature") != s["temperature"] else ""),
        f"- baseline: `{result['baseline']['name']}` ({result['baseline']['path']})",
        f"- reward model: {('`' + result['inputs']['rm'] + '`') if result['inputs'].get('rm') else 'none'}",
        f"- judge: {('`' + result['inputs']['judge'] + '`') if result['inputs'].get('judge') else 'none'}",
        f"- win-rate intervals: {interval.get('method')} {interval.get('confidence', 0.95):.0%}; ties count ½",
        "",
        "## Policies",
        "",
        "| policy | RM score (mean ± std) | KL to baseline (nats/seq) | length (tokens) | stopped | perplexity |",
        "|---|---|---|---|---|---|",
    ]
    rows = [result["baseline"], *result["policies"]] + ([result["best_of"]] if result.get("best_of") else [])
    for p in rows:
        kl = (
            _mean_std(p.get("kl"))
            if p.get("kl")
            else (_num(p.get("kl_analytic")) + " (analytic)" if p.get("kl_analytic") is not None else "–")
        )
        if p is result["baseline"]:
            kl = "0 (reference)"
        lines.append(
            f"| {p['name']} | {_mean_std(p.get('score'))} | {kl} | {_mean_std(p.get('length'), 1)} | "
            f"{_num(p.get('stopped'), 2)} | {_num(p.get('perplexity'))} |"
        )
    lines += [
        "",
        f"## Win-rate against `{result['baseline']['name']}`",
        "",
        "| policy | by reward model | by judge |",
        "|---|---|---|",
    ]
    for name, wins in _win_rows(result):
        lines.append(f"| {name} | {_win(wins.get('rm'))} | {_win(wins.get('judge'))} |")
    agreement = result.get("agreement")
    if agreement:
        lines += [
            "",
            "## Reward model vs judge",
            "",
            "Pairwise accuracy of the reward model on the judge's strict preferences (an RM tie counts ½). "
            "A low value means the reward model does not measure what the judge wants: PPO against it can "
            "raise the RM score without winning.",
            "",
            "| policy | pairs vs baseline | RM accuracy |",
            "|---|---|---|",
        ]
        for p in [*result["policies"], *([result["best_of"]] if result.get("best_of") else [])]:
            a = p.get("agreement") or {}
            lines.append(f"| {p['name']} | {a.get('pairs', 0)} | {_num(a.get('accuracy'))} |")
        lines.append(f"| all pairs of all players | {agreement.get('pairs', 0)} | {_num(agreement.get('accuracy'))} |")
    for judge, e in (result.get("elo") or {}).items():
        if not e or not e.get("ratings"):
            continue
        lines += [
            "",
            f"## Elo (judged by {JUDGE_LABELS.get(judge, judge)})",
            "",
            "| player | Elo | interval | games |",
            "|---|---|---|---|",
        ]
        for name, r in sorted(e["ratings"].items(), key=lambda kv: -kv[1]["rating"]):
            lines.append(f"| {name} | {r['rating']:.0f} | [{r['ci_low']:.0f}, {r['ci_high']:.0f}] | {r['games']:.0f} |")
    best = result.get("best_of")
    if best and best.get("curve"):
        lines += ["", "## Best-of-n from the baseline", "", "| n | KL (analytic) | RM score |", "|---|---|---|"]
        lines += [f"| {c['n']} | {c['kl']:.3f} | {c['score']:.3f} |" for c in best["curve"]]
    if result.get("checkpoints"):
        lines += ["", "## PPO checkpoints", "", "| step | RM score | KL | length | stopped |", "|---|---|---|---|---|"]
        for c in result["checkpoints"]:
            cells = [str(c["step"]), _mean_std(c.get("score")), _mean_std(c.get("kl")), _mean_std(c.get("length"), 1)]
            lines.append("| " + " | ".join([*cells, _num(c.get("stopped"), 2)]) + " |")
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({file})" for name, file in plots.items()]
    lines += ["", f"All samples: `{result['files'].get('samples', 'samples.jsonl')}`" if result.get("files") else ""]
    return "\n".join(lines).rstrip() + "\n"
