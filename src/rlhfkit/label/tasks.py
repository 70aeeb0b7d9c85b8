"""What there is to judge, for whom, and in which order.

1. `build_tasks`: one `Task` per prompt of the samples file (modes rank, best-of-k, scores), or one
   per couple of its completions (pairwise). With ``k_max`` a seeded subset of k_max completions per
   prompt is judged: the *same* subset for every annotator, so that their judgements can be compared.
2. `Assignment`: which annotators judge which prompts. With ``--overlap N`` and M named annotators,
   prompt i (in samples order) goes to annotators (i·N + j) mod M for j = 0..N-1: each prompt is
   judged exactly N times and each annotator gets ⌊P·N/M⌋ or ⌈P·N/M⌉ of the P prompts. Worked
   example, M = 3, N = 2: p0 → {0, 1}, p1 → {2, 0}, p2 → {1, 2}, p3 → {0, 1}.
3. `blind_order`: the order one annotator sees a task's completions in, a shuffle seeded by
   (seed, annotator, prompt id, completion ids). It differs between annotators (position bias
   averages out), is the same after a restart (the page and the server agree on positions without
   ever sending ids to the page), and says nothing about which policy wrote what.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from rlhfkit.data.records import Samples
from rlhfkit.errors import ConfigError
from rlhfkit.seeds import row_seed

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")  # an annotator's name: safe in a URL, a file and a log


def seeded_rng(*parts: object) -> random.Random:
    """A Random whose state depends only on ``parts`` (not on PYTHONHASHSEED or the process)."""
    return random.Random(row_seed(*parts, scheme="hex64"))


@dataclass(frozen=True)
class Task:
    """One unit of work: some completions of one prompt, judged together."""

    index: int  # position in the task list (what the page sends back)
    prompt_index: int  # position of the prompt in the samples file (what the assignment uses)
    sample: Samples
    completion_ids: tuple[str, ...]  # in the samples file's order

    @property
    def prompt_id(self) -> str:
        return self.sample.prompt_id

    def key(self, mode: str) -> tuple[str, frozenset[str] | None]:
        return done_key(mode, self.prompt_id, self.completion_ids)


def done_key(mode: str, prompt_id: str, shown: Sequence[str]) -> tuple[str, frozenset[str] | None]:
    """What a judgement completes: the prompt, or in pairwise mode the couple of that prompt."""
    return (prompt_id, frozenset(shown) if mode == "pairwise" else None)


def judged_ids(sample: Samples, k_max: int = 0, seed: int = 0) -> list[str]:
    """The completions of a prompt that are judged, in the samples file's order: all of them, or a
    subset of ``k_max`` seeded by (seed, prompt id) (the web app and the exports pick the same)."""
    ids = [c.id for c in sample.completions]
    if k_max and len(ids) > k_max:
        chosen = set(seeded_rng(seed, "k-max", sample.prompt_id).sample(ids, k_max))
        ids = [c for c in ids if c in chosen]
    return ids


def build_tasks(samples: Sequence[Samples], mode: str, k_max: int = 0, seed: int = 0) -> tuple[list[Task], int]:
    """The tasks of a samples file, and how many prompts had fewer than 2 completions (nothing to compare)."""
    tasks: list[Task] = []
    too_few = 0
    for prompt_index, sample in enumerate(samples):
        if len(sample.completions) < 2:
            too_few += 1
            continue
        if mode == "best-of-k" and k_max and len(sample.completions) > k_max:
            raise ConfigError(
                f"--k-max {k_max} with --mode best-of-k: prompt {sample.prompt_id!r} has {len(sample.completions)} completions,"
                " and a best-of-K judgement ranks the best above every completion of the prompt (use --mode rank)"
            )
        ids = judged_ids(sample, k_max, seed)
        groups = list(combinations(ids, 2)) if mode == "pairwise" else [tuple(ids)]
        for group in groups:
            tasks.append(Task(len(tasks), prompt_index, sample, tuple(group)))
    return tasks, too_few


def blind_order(seed: int, annotator: str, task: Task) -> list[str]:
    """The task's completion ids in the order this annotator sees them."""
    order = list(task.completion_ids)
    seeded_rng(seed, "order", annotator, task.prompt_id, *order).shuffle(order)
    return order


def check_names(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    for name in names:
        if not NAME.fullmatch(name):
            raise ConfigError(
                f"--annotator {name!r}: a name is 1-64 letters, digits or . _ @ - (starting with a letter or digit)"
            )
        if name in seen:
            raise ConfigError(f"--annotator {name!r} given twice")
        seen.add(name)
    return list(names)


class Assignment:
    """Which prompts each annotator judges.

    No names: anyone who gives a valid name judges every prompt. Names without ``overlap`` (or with
    overlap = number of names): every named annotator judges every prompt, other names are refused.
    """

    def __init__(self, annotators: Sequence[str], overlap: int, n_prompts: int):
        self.annotators = check_names(annotators)
        m = len(self.annotators)
        if overlap < 0:
            raise ConfigError(f"--overlap {overlap}: expected 0 (every annotator judges every prompt) or a positive count")
        if overlap and not m:
            raise ConfigError(f"--overlap {overlap} needs the annotators' names: give --annotator NAME once per labeler")
        if overlap > m:
            raise ConfigError(f"--overlap {overlap}: only {m} annotator(s) named, so a prompt can be judged at most {m} times")
        self.overlap = overlap if 0 < overlap < m else 0
        self.prompts: dict[str, set[int]] = {}
        if self.overlap:
            self.prompts = {name: set() for name in self.annotators}
            for i in range(n_prompts):
                for j in range(self.overlap):
                    self.prompts[self.annotators[(i * self.overlap + j) % m]].add(i)

    def accepts(self, annotator: str) -> bool:
        return bool(NAME.fullmatch(annotator)) and (not self.annotators or annotator in self.annotators)

    def judges(self, annotator: str, prompt_index: int) -> bool:
        return not self.overlap or prompt_index in self.prompts[annotator]
