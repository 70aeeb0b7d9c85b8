"""Scripted rewards for ``rlhfkit ppo --rm python:examples/scripted_rewards.py:NAME`` (and eval).

A scripted reward is any function ``f(prompts, completions) -> list[float]``: ``prompts`` as the
data gave them (a string or a list of chat messages), ``completions`` the completion texts. These
are small, transparent, rule-based rewards: for trying the PPO loop without a reward model, and
for the tests, where a tiny policy has to be able to learn them within a few steps.
"""

from __future__ import annotations


def letter_e_share(prompts, completions):
    """Share of the completion's non-space characters that are the letter 'e' (0 for an empty one).

    Dense and easy to move: nearly every token's probability changes it a little, so even a tiny
    random policy climbs it within a few PPO steps."""
    out = []
    for text in completions:
        chars = [c for c in text if not c.isspace()]
        out.append(sum(c in "eE" for c in chars) / len(chars) if chars else 0.0)
    return out


def brevity(prompts, completions):
    """−(number of words) / 10: shorter is better (a policy learns to stop early)."""
    return [-len(text.split()) / 10 for text in completions]


def politeness(prompts, completions):
    """1 for a completion that says please or thanks, else 0."""
    return [float(any(w in text.lower() for w in ("please", "thank"))) for text in completions]


def letter_e_count(prompts, completions):
    """How many times the letter 'e' occurs in the completion, divided by 4 (about mean 0.5-1 for
    a random tiny model's 12-token completions): `letter_e_share` on the scale of a normalised
    reward model, where length is not penalised."""
    return [sum(c in "eE" for c in text) / 4 for text in completions]
