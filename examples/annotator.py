#!/usr/bin/env python3
"""The demo's simulated annotator: a transparent rubric that ranks the K completions of a prompt.

Reads samples JSONL (``rlhfkit collect`` output) on stdin and writes rankings JSONL on stdout in
rlhfkit's native format, best first, ties as inner lists — exactly what a person using a labeling
tool would return, so it can stand in for people in ``rank-import`` and for ``eval --judge``:

    rlhfkit collect ... --out - | python examples/annotator.py | rlhfkit rank-import - --samples ...

The rubric (higher is better):
  +2   the answer closes warmly with "hope this helps" (any case)
  +1   the answer ended by itself (finish_reason "stop"), rather than being cut off
  -0.02 per word beyond 30 words (rambling)
Completions with equal rubric scores are tied. The preference is something a reward model can
learn from the text and PPO can move: the SFT data shows the closing phrase in about a third of
the answers.

``--annotators N --noise P`` simulates N labelers who each swap adjacent completions with
probability P, so that inter-annotator agreement has something to measure.
"""

from __future__ import annotations

import argparse
import json
import random
import sys

PHRASE = "hope this helps"


def rubric(text: str, finish_reason: str) -> float:
    score = 2.0 if PHRASE in text.lower() else 0.0
    score += 1.0 if finish_reason == "stop" else 0.0
    score -= 0.02 * max(0, len(text.split()) - 30)
    return round(score, 4)


def rank(completions: list[dict]) -> list:
    """Best first; completions with the same score form a tie (an inner list)."""
    by_score: dict[float, list[str]] = {}
    for c in completions:
        by_score.setdefault(rubric(c["text"], c.get("finish_reason", "stop")), []).append(c["id"])
    tiers = [by_score[s] for s in sorted(by_score, reverse=True)]
    return [t[0] if len(t) == 1 else t for t in tiers]


def noisy(ranking: list, p: float, rng: random.Random) -> list:
    """Swap neighbouring tiers with probability p each (a careless labeler)."""
    ranking = list(ranking)
    for i in range(len(ranking) - 1):
        if rng.random() < p:
            ranking[i], ranking[i + 1] = ranking[i + 1], ranking[i]
    return ranking


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", type=int, default=1)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for line in sys.stdin:
        if not line.strip():
            continue
        sample = json.loads(line)
        ranking = rank(sample["completions"])
        for a in range(args.annotators):
            name = "rubric" if args.annotators == 1 else f"rubric-{a}"
            out = noisy(ranking, args.noise, rng) if args.noise > 0 else ranking
            print(json.dumps({"prompt_id": sample["prompt_id"], "ranking": out, "annotator": name}))


if __name__ == "__main__":
    main()
