#!/usr/bin/env python3
"""Writes the demo's bundled data set (deterministic; the files in examples/data/ came from it).

- demos.jsonl        SFT demonstrations (chat messages); about a third close with "Hope this helps!"
- prompts.jsonl      prompts for collect and ppo
- eval_prompts.jsonl held-out prompts for eval (none of them in prompts.jsonl)
- eval_demos.jsonl   held-out demonstrations for eval's perplexity

Run: python examples/make_data.py examples/data
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black", "a tomato": "red",
          "an orange": "orange", "a plum": "purple", "milk": "white", "a lemon": "yellow", "the sea": "blue", "a leaf": "green"}
SOUNDS = {"a dog": "barks", "a cat": "meows", "a cow": "moos", "a duck": "quacks", "a lion": "roars", "a bird": "sings",
          "a sheep": "bleats", "a horse": "neighs", "a frog": "croaks", "an owl": "hoots"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "happy": "sad", "old": "new",
             "light": "dark", "open": "closed", "early": "late", "full": "empty", "hard": "soft"}
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Egypt": "Cairo",
            "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens", "India": "New Delhi"}
CLOSINGS = ["Hope this helps!", "I hope this helps.", "Hope this helps, have a nice day!"]


def qa_pairs(rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for thing, color in COLORS.items():
        pairs.append((f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is usually {color}."))
    for animal, sound in SOUNDS.items():
        pairs.append((f"What sound does {animal} make?", f"{animal[0].upper() + animal[1:]} {sound}."))
    for word, opposite in OPPOSITES.items():
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
    for country, capital in CAPITALS.items():
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {capital}."))
    for _ in range(60):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    for _ in range(30):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        pairs.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    return pairs


def main(out: Path) -> None:
    rng = random.Random(0)
    pairs = qa_pairs(rng)
    rng.shuffle(pairs)
    n_eval = 32
    held_out, train = pairs[:n_eval], pairs[n_eval:]
    out.mkdir(parents=True, exist_ok=True)

    def demo(q: str, a: str) -> dict:
        if rng.random() < 0.33:
            a = f"{a} {rng.choice(CLOSINGS)}"
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    def write(name: str, rows: list[dict]) -> None:
        with open(out / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    write("demos.jsonl", [demo(q, a) for q, a in train])
    write("prompts.jsonl", [{"id": f"p{i:03d}", "messages": [{"role": "user", "content": q}]} for i, (q, _) in enumerate(train)])
    write("eval_prompts.jsonl", [{"id": f"e{i:03d}", "messages": [{"role": "user", "content": q}]} for i, (q, _) in enumerate(held_out)])
    write("eval_demos.jsonl", [demo(q, a) for q, a in held_out])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/data"))
