#!/usr/bin/env python3
"""Print the hard example's bottom line from a run directory (examples/hard/run.sh):

- the reward model's agreement with the annotator on the strict pairs of the base model's answers
  to the TEST prompts (topics never ranked for training), with its 95% interval;
- the PPO policy's win-rate over the base model judged by the annotator, with its 95% interval,
  at the KL it reached;
- best-of-n from the base model by the same reward model, at its analytic KL, and PPO at the
  same KL: ppo's judge monitor (``--judge-every``) measured the annotator's win-rate over the base
  model on the test prompts as PPO went, so the PPO curve is read at best-of-n's KL;
- the seconds each stage took.

Usage: python examples/hard/summarize.py RUN [SECONDS]
"""

import json
import sys
from pathlib import Path


def rate(w):
    if not w or w.get("rate") is None:
        return "n/a"
    return f"{w['rate']:.1%} [{w['ci_low']:.1%}, {w['ci_high']:.1%}]  ({w['wins']} wins, {w['ties']} ties, {w['losses']} losses)"


def mean(stat):
    return "n/a" if not stat else f"{stat['mean']:.2f}"


def ppo_judge_curve(metrics: Path) -> list[tuple[int, float, dict]]:
    """(step, KL, judge row) of every judged PPO step; the KL is the step's objective/kl."""
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    kl = {r["step"]: r["objective/kl"] for r in rows if "objective/kl" in r}
    return [(r["step"], kl[r["step"]], r) for r in rows if "judge/win_rate" in r and r["step"] in kl]


def main() -> None:
    run = Path(sys.argv[1])
    seconds = f", {int(sys.argv[2])} s in all" if len(sys.argv) > 2 else ""
    print(f"\nrlhfkit hard example ({run}){seconds}")

    agreement = json.loads((run / "rm_agreement.json").read_text())
    for value in agreement.values():
        if isinstance(value, dict) and "as_sampled" in value:
            a = value["as_sampled"]
            print(f"\nreward model vs annotator, unseen test topics: {a['test_agreement']:.1%} "
                  f"[{a['ci95'][0]:.1%}, {a['ci95'][1]:.1%}] of {agreement['test_strict_pairs']} strict pairs "
                  f"(Pearson with the rubric {a['test_pearson_with_rubric']:+.2f})")

    report = json.loads((run / "eval" / "report.json").read_text())
    base = report["baseline"]
    print(f"\non {report['prompts']} test prompts x {report['n_samples']} samples, judged by examples/hard/annotator.py:")
    for policy in report["policies"]:
        print(f"  {policy['name']} vs {base['name']}: win-rate {rate((policy.get('win_rate') or {}).get('judge'))}")
        print(f"      KL to {base['name']} {mean(policy.get('kl'))} nats, stopped {policy['stopped']:.0%} "
              f"({base['name']} {base['stopped']:.0%}), length {mean(policy.get('length'))} tokens ({mean(base.get('length'))})")
    best = report.get("best_of")
    if best:
        judged = (best.get("win_rate") or {}).get("judge")
        print(f"  best-of-{best['n']} by the same RM vs {base['name']}: win-rate {rate(judged)}")
        print(f"      KL to {base['name']} {best['kl_analytic']:.2f} nats (analytic, log n - (n-1)/n)")

    curve = ppo_judge_curve(run / "ppo" / "metrics.jsonl")
    if curve:
        print("\nppo's judge monitor (test prompts, 1 answer each, vs the base model):")
        for step, kl, w in curve:
            print(f"  step {step:>3}: KL {kl:5.2f} nats (training prompts), win-rate {w['judge/win_rate']:.1%} "
                  f"[{w['judge/win_rate_low']:.1%}, {w['judge/win_rate_high']:.1%}]")
        if best:
            kl = best["kl_analytic"]
            nearest = min(curve, key=lambda c: abs(c[1] - kl))
            print(f"  at best-of-{best['n']}'s KL ({kl:.2f} nats) the nearest judged PPO step is {nearest[0]} "
                  f"(KL {nearest[1]:.2f}): win-rate {nearest[2]['judge/win_rate']:.1%} against best-of-{best['n']}'s "
                  f"{((best.get('win_rate') or {}).get('judge') or {}).get('rate', float('nan')):.1%}")

    times = run / "times.tsv"
    if times.is_file():
        print("\nseconds per stage:")
        for line in times.read_text().splitlines():
            name, secs = line.rsplit("\t", 1)
            print(f"  {int(secs):>5}  {name}")
    print(f"report: {run / 'eval' / 'report.md'}")


if __name__ == "__main__":
    main()
