"""Scripted rewards for the ppo tests (loaded as python:tests/ppo_rewards.py:NAME)."""

from __future__ import annotations

import time


def constant(prompts, completions):
    return [0.7] * len(completions)


def slow_e_count(prompts, completions):
    """The letter-e count of examples/scripted_rewards.py, slowed down so that a test can kill a run
    between two checkpoints."""
    time.sleep(0.25)
    return [sum(c in "eE" for c in text) / 4 for text in completions]
