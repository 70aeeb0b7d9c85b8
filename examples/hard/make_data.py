#!/usr/bin/env python3
"""Writes the hard example's prompts (deterministic; the files in examples/hard/data/ came from it).

Everyday how-to questions from 14 topic families. The 8 TRAIN families and the 6 TEST families share
no topic, so the reward model's agreement with the annotator on test prompts measures what it learnt
about the preference itself (examples/hard/annotator.py), not about the topics it saw ranked.

Each question ends with one of a few requests for a short answer (the same wordings in train and
test, assigned in turn). They are what a user of a small assistant would write, and they matter for
the measurement: without them SmolLM2-135M-Instruct finishes fewer than 1 in 10 answers within 96
tokens, with them about 4 in 10, so its K samples differ along every aspect of the rubric, including
whether the answer ends by itself.

- train_prompts.jsonl       64 prompts (8 families x 8), plain strings: {"id", "prompt", "family"}
- test_prompts.jsonl        48 prompts (6 families x 8), plain strings
- *.chat.jsonl              the same prompts as one-turn conversations {"id", "messages", "family"}
                            (for rlhfkit versions that use string prompts as raw text)

Run: python examples/hard/make_data.py examples/hard/data
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TRAIN = {
    "cooking": [
        "How do I cook rice so it is not sticky?",
        "What is the best way to store fresh herbs?",
        "How long should I boil an egg for a soft yolk?",
        "How can I make a simple tomato sauce?",
        "Why does my bread come out dense?",
        "How do I keep cut apples from turning brown?",
        "What can I cook with only eggs, cheese and bread?",
        "How do I know when a steak is done?",
    ],
    "gardening": [
        "How often should I water a basil plant on a windowsill?",
        "Why are the leaves on my tomato plant turning yellow?",
        "How do I start a small compost pile?",
        "When should I plant tulip bulbs?",
        "How can I keep slugs away from my lettuce?",
        "What vegetables are easiest for a beginner to grow?",
        "How do I repot a plant that has outgrown its pot?",
        "How much sun does a lavender plant need?",
    ],
    "money": [
        "How can I start saving money each month?",
        "What is a simple way to make a budget?",
        "How do I pay off a credit card faster?",
        "Should I keep an emergency fund, and how big should it be?",
        "How can I spend less on groceries?",
        "What is compound interest?",
        "How do I split bills fairly with roommates?",
        "How can I stop buying things on impulse?",
    ],
    "fitness": [
        "How do I start running if I have never run before?",
        "How many days a week should I exercise?",
        "What is a good warm-up before lifting weights?",
        "How can I improve my posture at my desk?",
        "How do I do a proper push-up?",
        "What should I eat after a workout?",
        "How can I stay motivated to exercise?",
        "How do I stretch my hamstrings safely?",
    ],
    "pets": [
        "How often should I feed an adult cat?",
        "How do I teach my dog to sit?",
        "How can I stop my puppy from chewing shoes?",
        "What do I need before bringing home a pet rabbit?",
        "How often should I clean a fish tank?",
        "How do I trim my dog's nails without hurting him?",
        "Why does my cat scratch the furniture?",
        "How do I help a new kitten feel safe at home?",
    ],
    "home": [
        "How do I unclog a slow bathroom sink?",
        "How can I get rid of a musty smell in my closet?",
        "What is the easiest way to clean an oven?",
        "How do I fix a squeaky door hinge?",
        "How can I keep my home warm without raising the heating bill?",
        "How do I remove a coffee stain from a carpet?",
        "How often should I wash my bed sheets?",
        "How do I hang a heavy picture on a wall?",
    ],
    "study": [
        "How can I remember what I read?",
        "What is a good way to study for a math test?",
        "How do I stop procrastinating on homework?",
        "How many hours should I study each day?",
        "How can I take better notes in class?",
        "How do I learn new vocabulary in a foreign language?",
        "What should I do the night before an exam?",
        "How can I focus when studying at home?",
    ],
    "travel": [
        "How do I pack a carry-on bag for a week-long trip?",
        "How can I deal with jet lag?",
        "What should I do if I lose my passport abroad?",
        "How can I find cheap flights?",
        "How do I stay safe when travelling alone?",
        "What should I bring on a long train ride?",
        "How early should I arrive at the airport?",
        "How can I travel on a small budget?",
    ],
}

TEST = {
    "computers": [
        "How do I make my laptop battery last longer?",
        "How can I create a strong password I can remember?",
        "Why is my computer running slowly?",
        "How do I back up the photos on my phone?",
        "How can I tell if an email is a phishing scam?",
        "How do I free up storage space on my phone?",
        "What should I do if my Wi-Fi keeps disconnecting?",
        "How do I keep my computer safe from viruses?",
    ],
    "music": [
        "How can I learn to play the guitar on my own?",
        "How often should I practice the piano?",
        "How do I tune a ukulele?",
        "How can I sing without straining my voice?",
        "What is the easiest instrument for an adult to learn?",
        "How do I read sheet music?",
        "How can I get better at keeping rhythm?",
        "How do I stop my fingers hurting when I play guitar?",
    ],
    "work": [
        "How do I prepare for a job interview?",
        "How can I ask my boss for a raise?",
        "How do I write a good cover letter?",
        "How can I manage my time better at work?",
        "What should I do on my first day at a new job?",
        "How do I say no to extra work politely?",
        "How can I run a short and useful meeting?",
        "How do I give feedback to a coworker?",
    ],
    "outdoors": [
        "What should I pack for a day hike?",
        "How do I set up a tent?",
        "How can I stay warm when camping in the cold?",
        "What should I do if I get lost on a trail?",
        "How do I start a campfire safely?",
        "How much water should I carry on a hike?",
        "How can I avoid mosquito bites outdoors?",
        "How do I choose a good sleeping bag?",
    ],
    "cars": [
        "How often should I change my car's oil?",
        "How do I check the air pressure in my tires?",
        "What should I do if my car battery dies?",
        "How can I use less fuel when driving?",
        "How do I jump-start a car?",
        "How do I keep my bike chain from rusting?",
        "What should I check before a long road trip?",
        "How do I fix a flat bicycle tire?",
    ],
    "crafts": [
        "How do I start learning to knit?",
        "What supplies do I need to start painting with watercolors?",
        "How can I get better at drawing faces?",
        "How do I make a simple paper airplane that flies far?",
        "How do I sew a button back on a shirt?",
        "How can I take better photos with my phone?",
        "How do I start a scrapbook?",
        "How do I choose the right glue for a craft project?",
    ],
}


HINTS = [
    "Please keep it short.",
    "Answer in two or three sentences.",
    "Give me a quick answer.",
    "Keep it brief, please.",
    "A few sentences are enough.",
]


def rows(families: dict[str, list[str]], prefix: str) -> list[dict]:
    out = []
    for family, questions in families.items():
        for question in questions:
            hint = HINTS[len(out) % len(HINTS)]
            out.append({"id": f"{prefix}{len(out):03d}", "prompt": f"{question} {hint}", "family": family})
    return out


def write(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main(out: Path) -> None:
    train, test = rows(TRAIN, "tr"), rows(TEST, "te")
    assert not set(TRAIN) & set(TEST), "train and test topic families must be disjoint"
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train_prompts", train), ("test_prompts", test)):
        write(out / f"{name}.jsonl", records)
        chat = [{"id": r["id"], "messages": [{"role": "user", "content": r["prompt"]}], "family": r["family"]} for r in records]
        write(out / f"{name}.chat.jsonl", chat)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/hard/data"))
