#!/usr/bin/env python3
"""Print the demo's bottom line from RUN/eval/report.json: the simulated annotator's win-rate of
the PPO policy over the SFT policy with its interval, the reward-model score and the KL, and the
paths of the plots.  Usage: python examples/summarize.py RUN [SECONDS]"""

import json
import sys
from pathlib import Path


def fmt(stat):
    return "n/a" if not stat else f"{stat['mean']:+.3f} ± {stat['std']:.3f}"


def main() -> None:
    run = Path(sys.argv[1])
    report = json.loads((run / "eval" / "report.json").read_text())
    base = report["baseline"]
    print()
    print(f"rlhfkit demo — {report['prompts']} held-out prompts × {report['n_samples']} samples", end="")
    print(f", {int(sys.argv[2])} s in all" if len(sys.argv) > 2 else "")
    for policy in report["policies"]:
        print(f"\n{policy['name']} vs {base['name']}:")
        for judge, label in (("judge", "simulated annotator"), ("rm", "reward model")):
            w = (policy.get("win_rate") or {}).get(judge)
            if w:
                print(f"  win-rate judged by the {label:<19} {w['rate']:.1%}  "
                      f"[{w['ci_low']:.1%}, {w['ci_high']:.1%}] 95% CI  ({w['wins']} wins, {w['ties']} ties, {w['losses']} losses)")
        print(f"  reward-model score (normalised)  {fmt(policy.get('score'))}   ({base['name']}: {fmt(base.get('score'))})")
        print(f"  KL to {base['name']} (nats per sequence)  {fmt(policy.get('kl'))}")
        print(f"  stopped by itself  {policy['stopped']:.0%}   ({base['name']}: {base['stopped']:.0%})")
    plots = (report.get("files") or {}).get("plots") or {}
    if plots:
        print("\nplots:")
        for name, path in plots.items():
            if path:
                print(f"  {name:<13} {path}")
    print(f"report:  {run / 'eval' / 'report.md'}")


if __name__ == "__main__":
    main()
