"""What ``dpo`` and ``ilql`` read: comparisons (or scored samples) → prompt and completion ids.

The same files, ranking groups and validation split as train-rm (`rlhfkit.rm_data`), kept apart
from train-rm's batch elements because these stages score the completion *after* its prompt: a
sequence here is a (prompt ids, completion ids) pair, the very ids ppo samples and scores
(`rlhfkit.chat`: the prompt rendered with ``--chat-template``, a completion that stopped ends with
its EOS, one cut off at the length limit does not: a comparison's ``chosen_finish_reason`` /
``rejected_finish_reason``, a sample's ``finish_reason``).

* `load_comparisons` — ``--data`` and the held-out set: ``--val-data``, or ``--val-fraction`` of the
  prompts split off ``--data`` by `rm_data.split_by_prompt` (train-rm's split, with the same seed);
* `build_groups` — comparisons → `Group`s: all comparisons that share a ``group`` (one ranking) form
  one batch element whose distinct completions are encoded once, and a comparison without ``group``
  is an element of its own (InstructGPT's batching, as train-rm); a tie (margin exactly 0) orders
  nothing and is dropped and counted;
* `load_scored_samples` — samples whose completions carry a ``score`` or ``reward`` (eval's
  ``samples.jsonl``, or collect's output scored by any means) → `ScoredSequence`s, for ilql;
* `epoch_batches` — a rank's micro-batches of element indices for one epoch, a function of
  (seed, epoch) only, padded so that every rank runs as many as the others;
* `StepBatches` — the micro-batches of optimizer step ``s`` (train-rm, dpo and ilql's loops);
* `collate` — sequences → the (query, query_mask, response, response_mask) tensors of
  `rlhfkit.generation` (left-padded prompts, right-padded completions).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit import chat, rm_data, training
from rlhfkit.data import records
from rlhfkit.data.records import Comparison, Conversation, RecordError
from rlhfkit.errors import DataError

Ids = tuple[int, ...]


# --- comparisons ------------------------------------------------------------------------------------


def load_comparisons(
    data: str, val_data: str, val_fraction: float, seed: int, *, skip_invalid: bool = False
) -> tuple[list[Comparison], list[Comparison], int]:
    """(training comparisons, held-out comparisons, invalid records skipped): ``val_data``, or
    ``val_fraction`` of the prompts of ``data`` held out exactly as train-rm holds them out."""
    train = records.load(data, records.parse_comparison, skip_invalid=skip_invalid)
    skipped = train.skipped
    if val_data:
        val = records.load(val_data, records.parse_comparison, skip_invalid=skip_invalid)
        return list(train), list(val), skipped + val.skipped
    train_part, val_part = rm_data.split_by_prompt(list(train), val_fraction, seed)
    return train_part, val_part, skipped


class Encoder:
    """Prompt ids and completion ids, apart, as ppo would sample and score them; prompts cached."""

    def __init__(self, tokenizer: Any, chat_template: str = "auto"):
        self.tokenizer = tokenizer
        self.prompts = rm_data.Encoder(tokenizer, chat_template)  # the prompt cache train-rm uses

    def prompt(self, prompt: Conversation) -> Ids:
        return self.prompts.prompt(prompt)

    def completion(self, completion: Conversation, stopped: bool = True) -> Ids:
        return tuple(chat.encode_completion(self.tokenizer, completion, stopped=stopped))


@dataclass(frozen=True)
class Group:
    """One batch element: a prompt, its distinct completions, and the (winner, loser) pairs among them.

    Example, a ranking A > B > C of one prompt (three comparisons in the file): ``completions =
    (ids(A), ids(B), ids(C))``, ``winners = (0, 0, 1)``, ``losers = (1, 2, 2)``.
    """

    prompt: Ids
    completions: tuple[Ids, ...]
    winners: tuple[int, ...]
    losers: tuple[int, ...]
    group: str | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.winners)

    @property
    def num_tokens(self) -> int:
        return sum(len(self.prompt) + len(c) for c in self.completions)

    def outcomes(self) -> list[float]:
        """Each completion's mean outcome over its pairs: +1 per win, −1 per loss. A plain pair
        gives chosen +1 and rejected −1; a ranking A > B > C gives A +1, B 0, C −1."""
        wins, counts = [0.0] * len(self.completions), [0] * len(self.completions)
        for w, lo in zip(self.winners, self.losers):
            wins[w] += 1
            wins[lo] -= 1
            counts[w] += 1
            counts[lo] += 1
        return [w / max(1, n) for w, n in zip(wins, counts)]


@dataclass
class GroupStats:
    pairs: int = 0
    elements: int = 0
    sequences: int = 0  # distinct completions: forward passes per epoch
    dropped_too_long: int = 0  # pairs with a prompt + completion longer than max_length
    dropped_ties: int = 0  # pairs with margin exactly 0: they order nothing

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def build_groups(comparisons: Iterable[Comparison], encode: Encoder, max_length: int) -> tuple[list[Group], GroupStats]:
    """Comparisons → `Group`s in order of first appearance (see the module docstring). A pair with
    a sequence longer than ``max_length`` tokens is dropped and counted (cutting it would cut off the
    completion's end); so is a tie. A group that mixes prompts is split by prompt."""
    stats = GroupStats()
    order: list[list[Comparison]] = []
    buckets: dict[tuple[str, str], list[Comparison]] = {}
    for c in comparisons:
        if c.margin == 0.0:
            stats.dropped_ties += 1
            continue
        if c.group is None:
            order.append([c])
            continue
        key = (c.group, rm_data.content_key(c.prompt))
        if key not in buckets:
            buckets[key] = []
            order.append(buckets[key])
        buckets[key].append(c)

    groups = []
    for members in order:
        prompt = encode.prompt(members[0].prompt)
        index: dict[tuple[str, bool], int] = {}
        completions: list[Ids] = []
        winners, losers = [], []
        for c in members:
            chosen, rejected = encode.completion(c.chosen, c.chosen_stopped), encode.completion(c.rejected, c.rejected_stopped)
            if len(prompt) + max(len(chosen), len(rejected)) > max_length:
                stats.dropped_too_long += 1
                continue
            pair = []
            for completion, stopped, ids in ((c.chosen, c.chosen_stopped, chosen), (c.rejected, c.rejected_stopped, rejected)):
                key = (rm_data.content_key(completion), stopped)
                if key not in index:
                    index[key] = len(completions)
                    completions.append(ids)
                pair.append(index[key])
            winners.append(pair[0])
            losers.append(pair[1])
        if winners:
            groups.append(Group(prompt, tuple(completions), tuple(winners), tuple(losers), members[0].group))
            stats.pairs += len(winners)
            stats.sequences += len(completions)
    stats.elements = len(groups)
    return groups, stats


# --- scored samples (ilql) --------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoredSamples:
    """One samples line whose completions carry a reward: (text, stopped, reward) each."""

    prompt: Conversation
    completions: tuple[tuple[str, bool, float], ...]


def parse_scored_samples(record: dict) -> ScoredSamples:
    """A samples record (``records.parse_samples``) whose every completion has a number ``score``
    (eval's samples.jsonl) or ``reward``."""
    samples = records.parse_samples(record)
    scored = []
    for i, (raw, completion) in enumerate(zip(record["completions"], samples.completions)):
        name = "reward" if "reward" in raw else "score"
        value = records.get_field(raw, name, (int, float), required=False, prefix=f"completions.{i}.")
        if value is None:
            raise RecordError(f"completions.{i}.score", "missing (ilql needs a number 'score' or 'reward' per completion)")
        if not math.isfinite(value):
            raise RecordError(f"completions.{i}.{name}", f"not a finite number: {value}")
        scored.append((completion.text, completion.finish_reason == "stop", float(value)))
    return ScoredSamples(samples.prompt, tuple(scored))


def is_samples_file(source: str | os.PathLike) -> bool:
    """Whether a data file holds samples (field ``completions`` in its first record) rather than comparisons."""
    from rlhfkit.data.files import read_records

    for _, first in read_records(source):
        return "completions" in first
    raise DataError(source, None, None, "no records")


def load_scored_samples(source: str, *, skip_invalid: bool = False) -> list[ScoredSamples]:
    return list(records.load(source, parse_scored_samples, skip_invalid=skip_invalid))


# --- batches ----------------------------------------------------------------------------------------


def epoch_batches(n: int, dist: training.Dist, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches (element indices) for one epoch.

    The order is a function of (seed, epoch) only, so a resumed run sees the batches it would have
    seen. Under torchrun it is padded by wrapping around to a multiple of the world size (as torch's
    DistributedSampler does), so every rank runs the same number of micro-batches.
    """
    order = training.epoch_order(n, seed, epoch)
    if dist.enabled and n % dist.world_size:
        target = math.ceil(n / dist.world_size) * dist.world_size
        order = (order * math.ceil(target / n))[:target]
    mine = training.shard(order, dist)
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def steps_per_epoch(n: int, dist: training.Dist, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch of `epoch_batches` (the same on every rank)."""
    micro = math.ceil(math.ceil(n / dist.world_size) / batch_size)
    return math.ceil(micro / grad_accum)


class StepBatches:
    """The micro-batches of every optimizer step, epoch after epoch: step ``s`` takes the next
    ``grad_accum`` micro-batches of epoch ``s // steps_per_epoch``'s `epoch_batches` (the last step
    of an epoch may take fewer). A function of the step alone, so a resumed run continues exactly.

    Example: 5 elements, one process, batch size 2, grad-accum 2: 3 micro-batches an epoch, so
    ``steps_per_epoch`` is 2; step 0 takes the epoch's first two micro-batches, step 1 the third
    (one element), step 2 the first two of epoch 1 (a new order).
    """

    def __init__(self, n: int, dist: training.Dist, batch_size: int, grad_accum: int, seed: int):
        self.n, self.dist, self.batch_size, self.grad_accum, self.seed = n, dist, batch_size, grad_accum, seed
        self.steps_per_epoch = steps_per_epoch(n, dist, batch_size, grad_accum)
        self._epoch, self._batches = -1, []  # the current epoch's micro-batches

    def __call__(self, step: int) -> list[list[int]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.n, self.dist, self.batch_size, self.seed, epoch)
        return self._batches[index * self.grad_accum : (index + 1) * self.grad_accum]


@dataclass
class Batch:
    """Sequences as `rlhfkit.generation` lays them out: (N, P) left-padded prompts, (N, T) right-padded completions."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.query, self.query_mask, self.response, self.response_mask)))

    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query, self.query_mask, self.response, self.response_mask


def collate(sequences: Sequence[tuple[Ids, Ids]], pad_token_id: int) -> Batch:
    """(prompt ids, completion ids) pairs → a `Batch`; masks from the lengths, never from the pad id.

    Example (pad 0): ``[((5, 6), (7,)), ((9,), (3, 4))]`` → query ``[[5, 6], [0, 9]]``, query_mask
    ``[[1, 1], [0, 1]]``, response ``[[7, 0], [3, 4]]``, response_mask ``[[1, 0], [1, 1]]``.
    """
    from rlhfkit.generation import left_pad, right_pad

    query, query_mask = left_pad([p for p, _ in sequences], pad_token_id)
    response, response_mask = right_pad([c for _, c in sequences], pad_token_id)
    return Batch(query, query_mask, response, response_mask)
