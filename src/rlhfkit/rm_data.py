"""Reward-model data: comparisons → token sequences → batch elements → padded batches.

The InstructGPT batching (Ouyang et al. 2022, §3.5): the C(K, 2) pairs of one ranking are
strongly correlated, and a model trained on them as separate, shuffled examples overfits in one
epoch. InstructGPT instead puts all pairs of one ranking into one batch element, so each
completion goes through the model once, not once per pair (K forward passes instead of K·(K−1)).

Here a batch **element** is:

* all comparisons that share a ``group`` (rank-import writes one group per ranking by one
  annotator): their *distinct* completions, each encoded once — deduplicated by their token ids
  (prompt + completion, with the EOS only when the completion ended: a ``finish_reason`` of
  ``length`` in the comparison means it was cut off) — and the (winner, loser) index pairs between them;
* or one comparison without ``group`` (public prompt/chosen/rejected data): two sequences and
  one pair.

A comparison whose ``margin`` is exactly 0 is a tie (rank-import writes ties that way, with
``--tie-pairs``): it is kept as a pair flagged ``tie``, and the loss pulls its two rewards
together instead of ordering them (`losses.bradley_terry_loss` with ``ties``).

The pairs are kept as an explicit list instead of being rebuilt from tiers, because the pairs of
a group need not form a consistent ranking (majority-aggregated pairs may even form a cycle); the
loss is `losses.bradley_terry_loss` over rewards gathered at the winner and loser indices, which
for pairs that come from a ranking is exactly `losses.ranking_loss`.

Token sequences are built by `rlhfkit.chat` — ``encode_prompt(prompt) + encode_completion(
completion, stopped=True)`` — the very ids that ppo and eval score, so the reward model is trained
on what it will be asked about.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit import chat
from rlhfkit.config import ChatTemplate
from rlhfkit.data import records
from rlhfkit.data.records import Comparison, Conversation
from rlhfkit.errors import DataError, RlhfkitError
from rlhfkit.generation import right_pad


def content_key(value: Conversation) -> str:
    """A canonical text key for a prompt or completion (string or message list)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


class Encoder:
    """(prompt, completion) → token ids, the way ppo and eval will score them (string prompts
    rendered by ``chat_template``, `rlhfkit.chat`). Prompt ids are cached, because every completion
    of a prompt (and every pair of a ranking) shares them."""

    def __init__(self, tokenizer: Any, chat_template: ChatTemplate = "auto"):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._prompts: dict[str, tuple[int, ...]] = {}

    def prompt(self, prompt: Conversation) -> tuple[int, ...]:
        key = content_key(prompt)
        if key not in self._prompts:
            try:
                self._prompts[key] = tuple(chat.encode_prompt(self.tokenizer, prompt, self.chat_template))
            except Exception as e:  # a chat template that refuses these roles: one line, not a traceback
                raise RlhfkitError(f"the tokenizer rejects the prompt {key[:60]} ({type(e).__name__}: {str(e)[:120]})") from e
        return self._prompts[key]

    def __call__(self, prompt: Conversation, completion: Conversation, *, stopped: bool = True) -> tuple[int, ...]:
        return self.prompt(prompt) + tuple(chat.encode_completion(self.tokenizer, completion, stopped=stopped))

    def start(self, prompt: Conversation) -> int:
        """Where the completion begins in ``self(prompt, ...)``: the prompt's length in tokens."""
        return len(self.prompt(prompt))


# --- batch elements -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Element:
    """One batch element: distinct sequences and the (winner, loser) pairs among them.

    Example, a ranking A > B > C of one prompt (three comparisons in the file):
    ``sequences = (ids(A), ids(B), ids(C))``, ``winners = (0, 0, 1)``, ``losers = (1, 2, 2)``.
    """

    sequences: tuple[tuple[int, ...], ...]
    winners: tuple[int, ...]
    losers: tuple[int, ...]
    margins: tuple[float, ...]  # per pair; 0.0 where the comparison had no margin
    group: str | None = None
    ties: tuple[bool, ...] = ()  # per pair: judged equal (a margin of exactly 0); () = none
    starts: tuple[int, ...] = ()  # per sequence: index of its completion's first token; () = unknown

    @property
    def num_pairs(self) -> int:
        return len(self.winners)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


@dataclass
class ElementStats:
    """What `build_elements` kept and dropped."""

    pairs: int = 0
    elements: int = 0
    sequences: int = 0  # forward passes per epoch
    sequences_if_expanded: int = 0  # forward passes if every pair were its own example (2 per pair)
    dropped_too_long: int = 0  # pairs with a sequence longer than max_length
    ties: int = 0  # pairs with margin 0: judged equal, trained towards equal rewards


def build_elements(comparisons: Iterable[Comparison], encode: Encoder, max_length: int) -> tuple[list[Element], ElementStats]:
    """Group comparisons into batch elements (see the module docstring), in order of first appearance.

    A pair in which either sequence is longer than ``max_length`` tokens is dropped and counted
    (truncating it would change the token the reward is read at, or cut off the EOS that ppo
    scores); a completion that only such pairs used is not encoded into the element.
    """
    stats = ElementStats()
    buckets: dict[str, list[Comparison]] = {}
    order: list[tuple[str | None, list[Comparison]]] = []
    for c in comparisons:
        if c.group is None:
            order.append((None, [c]))
        elif c.group in buckets:
            buckets[c.group].append(c)
        else:
            buckets[c.group] = [c]
            order.append((c.group, buckets[c.group]))

    elements = []
    for group, members in order:
        index: dict[tuple[int, ...], int] = {}  # prompt + completion ids -> row in `sequences`
        sequences: list[tuple[int, ...]] = []
        starts: list[int] = []
        winners, losers, margins, ties = [], [], [], []
        for c in members:
            chosen = encode(c.prompt, c.chosen, stopped=c.chosen_stopped)
            rejected = encode(c.prompt, c.rejected, stopped=c.rejected_stopped)
            if len(chosen) > max_length or len(rejected) > max_length:
                stats.dropped_too_long += 1
                continue
            for ids in (chosen, rejected):  # the token ids themselves tell completions apart (EOS or not)
                if ids not in index:
                    index[ids] = len(sequences)
                    sequences.append(ids)
                    starts.append(encode.start(c.prompt))
            winners.append(index[chosen])
            losers.append(index[rejected])
            margins.append(c.margin if c.margin is not None else 0.0)
            ties.append(c.margin == 0.0)
        if not winners:
            continue
        elements.append(
            Element(tuple(sequences), tuple(winners), tuple(losers), tuple(margins), group,
                    tuple(ties) if any(ties) else (), tuple(starts))
        )  # fmt: skip
        stats.pairs += len(winners)
        stats.ties += sum(ties)
        stats.sequences += len(sequences)
        stats.sequences_if_expanded += 2 * len(winners)
    stats.elements = len(elements)
    return elements, stats


# --- collation ------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # (N, L) every distinct sequence of the batch, right-padded
    attention_mask: torch.Tensor  # (N, L) 1 = real token
    winners: torch.Tensor  # (P,) row of the preferred completion of each pair
    losers: torch.Tensor  # (P,) row of the other one
    margins: torch.Tensor  # (P,) float
    ties: torch.Tensor | None = None  # (P,) bool, or None when no pair of the batch is a tie
    starts: torch.Tensor | None = None  # (N,) each row's first completion position (`scoring.pooled_hidden`)

    @property
    def num_pairs(self) -> int:
        return self.winners.numel()

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            *(move(t) for t in (self.input_ids, self.attention_mask, self.winners, self.losers, self.margins, self.ties,
                                self.starts))
        )  # fmt: skip


def collate(elements: Sequence[Element], pad_token_id: int) -> Batch:
    """Stack the sequences of several elements into one right-padded batch; shift pair indices.

    Example (pad id 0): element 1 = sequences ``[5, 6, 7]``, ``[5, 8]`` with pair (0, 1);
    element 2 = ``[9, 9]``, ``[9, 4, 4, 4]``, ``[9, 3]`` with pairs (0, 1), (2, 1)::

        input_ids      = [[5, 6, 7, 0], [5, 8, 0, 0], [9, 9, 0, 0], [9, 4, 4, 4], [9, 3, 0, 0]]
        attention_mask = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
        winners = [0, 2, 4]     losers = [1, 3, 3]

    With one-token prompts (``starts = (1, 1)`` and ``(1, 1, 1)``), ``starts = [1, 1, 1, 1, 1]``: the
    rows' first completion positions (None unless every element records them).

    The mask comes from the lengths (the pad id may also be a real token: SmolLM2's EOS).
    """
    seqs: list[tuple[int, ...]] = []
    winners: list[int] = []
    losers: list[int] = []
    margins: list[float] = []
    ties: list[bool] = []
    starts: list[int] = []
    for element in elements:
        base = len(seqs)
        starts.extend(element.starts)
        seqs.extend(element.sequences)
        winners.extend(base + i for i in element.winners)
        losers.extend(base + i for i in element.losers)
        margins.extend(element.margins)
        ties.extend(element.ties or [False] * element.num_pairs)
    input_ids, attention_mask = right_pad(seqs, pad_token_id)
    return Batch(
        input_ids,
        attention_mask,
        torch.tensor(winners, dtype=torch.long),
        torch.tensor(losers, dtype=torch.long),
        torch.tensor(margins, dtype=torch.float32),
        torch.tensor(ties, dtype=torch.bool) if any(ties) else None,
        torch.tensor(starts, dtype=torch.long) if len(starts) == len(seqs) else None,
    )


# --- splits and reference sets --------------------------------------------------------------------


def split_by_prompt(comparisons: Sequence[Comparison], fraction: float, seed: int) -> tuple[list[Comparison], list[Comparison]]:
    """Deterministic train/validation split by prompt: every comparison of a prompt lands on the
    same side (never the same prompt in both). round(fraction · #prompts) prompts are held out —
    at least one when ``fraction > 0`` and there are two prompts or more — chosen by a hash of
    (seed, prompt), so the split does not depend on the order of the file."""
    if fraction <= 0:
        return list(comparisons), []
    import hashlib

    prompts = sorted({content_key(c.prompt) for c in comparisons})
    n_val = min(len(prompts) - 1, max(1, round(fraction * len(prompts))))
    if n_val <= 0:
        return list(comparisons), []
    ranked = sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}\n{p}".encode()).hexdigest())
    held_out = set(ranked[:n_val])
    train = [c for c in comparisons if content_key(c.prompt) not in held_out]
    val = [c for c in comparisons if content_key(c.prompt) in held_out]
    return train, val


def comparison_completions(comparisons: Iterable[Comparison]) -> list[tuple[Conversation, Conversation, bool]]:
    """The distinct (prompt, completion, stopped) of comparisons, in order of first appearance."""
    seen: set[tuple[str, str, bool]] = set()
    out = []
    for c in comparisons:
        for completion, stopped in ((c.chosen, c.chosen_stopped), (c.rejected, c.rejected_stopped)):
            key = (content_key(c.prompt), content_key(completion), stopped)
            if key not in seen:
                seen.add(key)
                out.append((c.prompt, completion, stopped))
    return out


def load_reference(source: str | os.PathLike, *, skip_invalid: bool = False) -> list[tuple[Conversation, Conversation, bool]]:
    """The completions that set the reward normalisation, from a samples file (``collect``
    output: every completion, ``stopped`` from its finish_reason) or a comparisons file (every
    distinct chosen/rejected completion). The kind is told from the first record."""
    from rlhfkit.data.files import read_records

    _, first = next(iter(read_records(source)))
    if "completions" in first:
        out = []
        for sample in records.load_kind(source, "samples", skip_invalid=skip_invalid):
            out.extend((sample.prompt, c.text, c.finish_reason == "stop") for c in sample.completions)
        if not out:
            raise DataError(source, None, "completions", "no completions to normalise the reward on")
        return out
    if "chosen" in first or "rejected" in first:
        return comparison_completions(records.load(source, records.parse_comparison, skip_invalid=skip_invalid))
    raise DataError(source, 1, None, "expected samples (field 'completions') or comparisons (fields 'chosen'/'rejected')")
