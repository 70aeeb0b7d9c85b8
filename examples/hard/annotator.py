#!/usr/bin/env python3
"""The hard example's simulated annotator: a preference spread over the whole answer.

Reads samples JSONL (``rlhfkit collect`` output, or what ``rlhfkit eval --judge`` pipes in) on stdin
and writes one ranking per prompt on stdout in rlhfkit's native format, best first, ties as inner
lists, so it stands in for people in ``rank-import`` and for ``eval --judge``:

    rlhfkit collect ... --out - | python examples/hard/annotator.py | rlhfkit rank-import - --samples ...

Each completion gets the sum of seven aspects (higher is better). Every rule is plain text
arithmetic a reader can check with ``--explain FILE`` (writes each completion's aspects as JSONL):

  ended        +1.5   the answer ended by itself (finish_reason "stop"), rather than being cut off
  length       -0.04 per word beyond 60 words (the prompts ask for a short answer);
               -0.15 per word below 12 words (too thin to help)
  readability  up to +1.5: Flesch reading ease 206.835 - 1.015 (words/sentence) - 84.6 (syllables/word),
               scored (FRE - 30) / 50, clipped to [0, 1]; short sentences of short words read easiest
  direct       +1.0   the first sentence (at most 30 words) answers the question: it shares a content
                      word with it (e.g. "To keep slugs away from lettuce, ..."); 0 otherwise
               -1.0   it talks about itself or refuses instead ("I'm sorry", "as an AI", "I can't", "SmolLM")
  tone         +0.4 per warm phrase ("you can", "try", "hope", "enjoy", "good luck", "feel free", "gently", ...)
               -0.4 per curt or negative one ("never", "stupid", "nuisance", "disaster", "terrible", "waste", ...),
               each side counted up to 3
  concrete     +0.4 per number (digits, or a number word such as "two") or example marker ("for example",
               "such as", "e.g."), counted up to 3
  repetition   -3 x the share of repeated word trigrams (a loop of the same phrase costs up to 3 points)

An answer with fewer than 3 words scores -3 whatever else holds. Scores are rounded to the nearest
whole point; completions with equal rounded scores are tied (32% of the couples among 4 answers of
SmolLM2-135M-Instruct to the train prompts, 22% on the test prompts). No aspect decides alone:
ordered by any single aspect, the strict pairs agree with the ranking 57-65% of the time; ended and
length together 73%; all seven are needed for the rest.

``--annotators N --noise P`` simulates N labelers who each swap adjacent tiers with probability P.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from typing import Any

ROUND_TO = 1.0
BUDGET_WORDS = 60
MIN_WORDS = 12

WARM = ("you can", "try", "hope", "enjoy", "good luck", "feel free", "gently", "glad", "happy to", "don't worry",
        "it's okay", "it is okay", "helpful", "easy", "great")
CURT = ("never", "stupid", "nuisance", "disaster", "terrible", "waste", "hate", "annoying", "joke", "useless",
        "impossible", "ridiculous", "shut up", "obviously", "boring")
SELF_TALK = ("i'm sorry", "i am sorry", "as an ai", "i can't", "i cannot", "i'm unable", "i am unable", "smollm",
             "i'm not able", "as a language model", "i don't have")
EXAMPLES = ("for example", "such as", "e.g.", "for instance")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty",
                "half", "once", "twice", "hundred", "dozen")
STOPWORDS = set(
    "a an the and or but if so to of in on at for with from by about into over under as is are was were be been "
    "do does did doing how what why when where which who whom whose should can could would will shall may might must "
    "i my me you your yours we our it its this that these those there their they them he she his her not no "
    "please keep short answer two three sentences give quick brief few enough make get have has had just very "
    "more most less best good way".split()
)
WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d+(?:[.,:/\-]\d+)*")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def words(text: str) -> list[str]:
    return WORD.findall(text)


def sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in SENTENCE_END.split(text)) if words(s)]


def syllables(word: str) -> int:
    """Vowel groups, less a silent final 'e'; at least one (a number counts as one)."""
    w = word.lower().strip("'-")
    if not w.isalpha():
        return 1
    groups = len(re.findall(r"[aeiouy]+", w))
    if w.endswith("e") and not w.endswith(("le", "ee")) and groups > 1:
        groups -= 1
    return max(1, groups)


def stem(word: str) -> str:
    w = word.lower().strip("'-")
    for suffix in ("ing", "ed", "es", "s"):
        if len(w) > len(suffix) + 2 and w.endswith(suffix):
            return w[: -len(suffix)]
    return w


def content_words(text: str) -> set[str]:
    return {stem(w) for w in words(text) if w.lower() not in STOPWORDS and len(w) > 2 and not w[0].isdigit()}


def count_phrases(text: str, phrases: tuple[str, ...]) -> int:
    lower = f" {text.lower()} "
    return sum(len(re.findall(r"(?<![a-z])" + re.escape(p) + r"(?![a-z])", lower)) for p in phrases)


def prompt_text(prompt: Any) -> str:
    """The user's question: a string prompt, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def aspects(question: str, text: str, finish_reason: str) -> dict[str, float]:
    """Each aspect's points for one completion (see the module docstring)."""
    ws = words(text)
    n = len(ws)
    if n < 3:
        return {"degenerate": -3.0}
    sents = sentences(text) or [text]
    fre = 206.835 - 1.015 * (n / len(sents)) - 84.6 * (sum(syllables(w) for w in ws) / n)
    first = sents[0]
    if count_phrases(first, SELF_TALK):
        direct = -1.0
    else:
        direct = 1.0 if len(words(first)) <= 30 and content_words(first) & content_words(question) else 0.0
    numbers = sum(1 for w in ws if w[0].isdigit()) + count_phrases(text, NUMBER_WORDS)
    lowered = [w.lower() for w in ws]
    trigrams = list(zip(lowered, lowered[1:], lowered[2:]))
    repeated = 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    return {
        "ended": 1.5 if finish_reason == "stop" else 0.0,
        "length": -0.04 * max(0, n - BUDGET_WORDS) - 0.15 * max(0, MIN_WORDS - n),
        "readability": 1.5 * min(1.0, max(0.0, (fre - 30) / 50)),
        "direct": direct,
        "tone": 0.4 * min(3, count_phrases(text, WARM)) - 0.4 * min(3, count_phrases(text, CURT)),
        "concrete": 0.4 * min(3, numbers + count_phrases(text, EXAMPLES)),
        "repetition": -3.0 * repeated,
    }


def rubric(question: str, text: str, finish_reason: str) -> float:
    """The rounded score: the sum of the aspects, to the nearest ROUND_TO."""
    return round(sum(aspects(question, text, finish_reason).values()) / ROUND_TO) * ROUND_TO


def reward(prompts: list, completions: list[str]) -> list[float]:
    """The rubric as a scripted reward for ``ppo --rm python:examples/hard/annotator.py:reward`` (a
    gold-reward check of what PPO can move). A scripted reward sees texts only, not whether they
    stopped, so it scores every answer as if it had ended; give cut-off answers their score with
    ``ppo --missing-eos-penalty``. Unrounded, so that small improvements count."""
    return [sum(aspects(prompt_text(p), c, "stop").values()) for p, c in zip(prompts, completions)]


def rank(sample: dict) -> list:
    """Best first; completions with the same rounded score form a tie (an inner list)."""
    question = prompt_text(sample["prompt"])
    by_score: dict[float, list[str]] = {}
    for c in sample["completions"]:
        by_score.setdefault(rubric(question, c["text"], c.get("finish_reason", "stop")), []).append(c["id"])
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
    parser.add_argument("--explain", help="also write each completion's aspects and score as JSONL to this file")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    explain = open(args.explain, "w", encoding="utf-8") if args.explain else None
    for line in sys.stdin:
        if not line.strip():
            continue
        sample = json.loads(line)
        ranking = rank(sample)
        if explain:
            question = prompt_text(sample["prompt"])
            for c in sample["completions"]:
                reason = c.get("finish_reason", "stop")
                parts = aspects(question, c["text"], reason)
                row = {"prompt_id": sample["prompt_id"], "id": c["id"], "score": rubric(question, c["text"], reason)}
                explain.write(json.dumps({**row, **{k: round(v, 3) for k, v in parts.items()}}) + "\n")
        for a in range(args.annotators):
            name = "rubric" if args.annotators == 1 else f"rubric-{a}"
            out = noisy(ranking, args.noise, rng) if args.noise > 0 else ranking
            print(json.dumps({"prompt_id": sample["prompt_id"], "ranking": out, "annotator": name}))
    if explain:
        explain.close()


if __name__ == "__main__":
    main()
