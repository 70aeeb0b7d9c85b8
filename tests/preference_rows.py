"""Comparisons and scored samples for the dpo and ilql tests: short sentences of the tiny test
vocabulary, where a completion that says WORD is preferred to one that does not."""

from __future__ import annotations

import random

# words of the tiny test tokenizer's corpus (rlhfkit.testing)
WORDS = (
    "the a and or but if then so of to in on at for with from is are was be have do will can good bad great small large "
    "cat dog bird fish tree river sea sky sun moon star city house road car book word story song game time day night "
    "red blue green yellow black white one two three four five people friend team work school water food"
).split()

WORD = "please"


def _sentence(rng: random.Random, vocab: list[str], good: bool) -> str:
    words = [rng.choice(vocab) for _ in range(rng.randint(2, 5))]
    if good:
        words.insert(rng.randint(0, len(words)), WORD)
    return " ".join(words) + "."


def comparisons(n_prompts: int, k: int = 4, seed: int = 0, group: bool = True) -> list[dict]:
    """One ranking of k completions per prompt (k/2 with WORD beat k/2 without), as rank-import
    writes them: every ordered pair, sharing ``group``."""
    rng = random.Random(seed)
    vocab = [w for w in WORDS if w not in (WORD, "thank", "thanks")]
    rows = []
    for p in range(n_prompts):
        prompt = f"Tell me about the {rng.choice(vocab)}."
        good = [_sentence(rng, vocab, True) for _ in range(k // 2)]
        bad = [_sentence(rng, vocab, False) for _ in range(k - k // 2)]
        for g in good:
            for b in bad:
                rows.append({"prompt": prompt, "chosen": g, "rejected": b, **({"group": f"p{p}/ann-1"} if group else {})})
    return rows


def scored_samples(n_prompts: int, k: int = 4, seed: int = 0, field: str = "score") -> list[dict]:
    """Samples lines (collect's format) whose completions carry a ``score``: 1 with WORD, 0 without."""
    rng = random.Random(seed)
    vocab = [w for w in WORDS if w not in (WORD, "thank", "thanks")]
    lines = []
    for p in range(n_prompts):
        completions = []
        for j in range(k):
            good = j % 2 == 0
            completions.append(
                {"id": f"p{p}-{j}", "text": _sentence(rng, vocab, good), "finish_reason": "stop", field: float(good)}
            )
        lines.append({"prompt_id": f"p{p}", "prompt": f"Tell me about the {rng.choice(vocab)}.", "completions": completions})
    return lines
