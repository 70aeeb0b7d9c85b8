#!/usr/bin/env python3
"""A scripted judge that prefers shorter completions: samples JSONL on stdin, rankings on stdout.

The smallest stand-in for a labeler (or an LLM judge) in a pipe:

    rlhfkit collect ... --out - | tee samples.jsonl | python examples/judge_length.py \\
        | rlhfkit rank-import - --samples samples.jsonl --out pairs.jsonl

Each prompt's completions are ranked by text length, shortest first, ties broken by id so that a
ranking of K completions always gives K·(K−1)/2 pairs. Output: rlhfkit's native rankings format.
"""

from __future__ import annotations

import argparse
import json
import sys


def rank(completions: list[dict]) -> list[str]:
    return [c["id"] for c in sorted(completions, key=lambda c: (len(c["text"]), c["id"]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotator", default="judge-length", help="name written in every ranking")
    args = parser.parse_args()
    for line in sys.stdin:
        if line.strip():
            sample = json.loads(line)
            ranking = {"prompt_id": sample["prompt_id"], "ranking": rank(sample["completions"]), "annotator": args.annotator}
            sys.stdout.write(json.dumps(ranking) + "\n")


if __name__ == "__main__":
    main()
