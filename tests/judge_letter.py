"""A scripted judge for the ppo --judge tests (eval --judge's protocol): reads samples JSONL on stdin,
writes one native ranking per prompt on stdout, completions ranked by how often a letter occurs in
them (``judge_letter.py e``: more e's is better; ``judge_letter.py e --fewer``: fewer is better);
equal counts are a tie."""

from __future__ import annotations

import json
import sys


def main() -> None:
    letter, fewer = sys.argv[1], "--fewer" in sys.argv[2:]
    for line in sys.stdin:
        if not line.strip():
            continue
        sample = json.loads(line)
        tiers: dict[int, list[str]] = {}
        for c in sample["completions"]:
            tiers.setdefault(c["text"].count(letter), []).append(c["id"])
        order = sorted(tiers, reverse=not fewer)
        ranking = [tiers[n] if len(tiers[n]) > 1 else tiers[n][0] for n in order]
        print(json.dumps({"prompt_id": sample["prompt_id"], "ranking": ranking, "annotator": f"letter-{letter}"}))


if __name__ == "__main__":
    main()
