"""The labeling app's state and rules, apart from HTTP: what an annotator sees next, what a
submission must look like, and the record it becomes.

The page knows completions only by position (A = 0, B = 1, ...) in the annotator's blind order;
`Labeler` maps positions back to ids. What a submission holds, per ``--mode``, and the record
appended to RANKINGS.jsonl (rank-import's formats, SPEC §4):

========== ======================================= ===============================================
mode       submission (positions)                  record
========== ======================================= ===============================================
rank       ``"ranks": [1, 3, 1, 2]`` (1 = best;    ``"ranking": [[a, c], d, b]`` (ids): equal ranks
           equal numbers tie)                      are one tier, tiers best first
best-of-k  ``"best": 2``                           ``"best": id``
scores     ``"scores": [6, 2, 7, 4]`` (Likert 1-7) ``"scores": {id: score}``
pairwise   ``"best": 0`` (of the two shown)        ``"chosen": id, "rejected": id, "prompt": ...``
any        ``"flag": "reason"`` (can't judge)      ``"ranking": [], "flag": "reason"``
========== ======================================= ===============================================

Worked example (rank): shown order ``[c2, c0, c3, c1]`` and ``"ranks": [2, 1, 2, 3]`` give
``"ranking": ["c0", ["c2", "c3"], "c1"]``: c0 best, c2 and c3 tied, c1 last.

Every record also carries ``annotator``, ``timestamp`` (UTC, ISO 8601), ``seconds`` (from serving
the task to its submission), ``shown`` (the ids in the order shown) and ``comment`` if one was given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from rlhfkit.data.records import Samples
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.label.store import RankingsStore
from rlhfkit.label.tasks import Assignment, Task, blind_order, build_tasks, done_key

SCORE_SCALE = 7  # Likert ratings 1..7, as InstructGPT's labelers gave
MAX_FLAG, MAX_COMMENT = 500, 5000  # characters
JUDGEMENT_FIELDS = {"rank": "ranking", "best-of-k": "best", "scores": "scores", "pairwise": "chosen"}


class RequestError(Exception):
    """A request the app refuses; the server answers ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def record_mode(record: dict[str, Any]) -> str | None:
    """The mode that wrote a record ("flag" for a can't-judge record), None if it is none of them."""
    if record.get("flag") and record.get("ranking") == []:
        return "flag"
    return next((mode for mode, name in JUDGEMENT_FIELDS.items() if name in record), None)


class Labeler:
    """Tasks, assignment and progress over a `RankingsStore`. Not thread-safe: the server calls
    `prepare` + ``store.append`` + `committed`, and `undo_index` + ``store.remove`` + `recount`,
    under one lock."""

    def __init__(
        self,
        samples: Sequence[Samples],
        store: RankingsStore,
        *,
        mode: str = "rank",
        annotators: Sequence[str] = (),
        overlap: int = 0,
        k_max: int = 0,
        seed: int = 0,
    ):
        self.mode, self.seed, self.store = mode, seed, store
        self.tasks, self.too_few = build_tasks(samples, mode, k_max, seed)
        if not self.tasks:
            raise ConfigError("nothing to label: no prompt in the samples file has 2 or more completions")
        self.assignment = Assignment(annotators, overlap, len(samples))
        self._served: dict[tuple[str, int], float] = {}
        self.check_records()
        self.recount()

    # --- state --------------------------------------------------------------------------------

    def check_records(self) -> None:
        """Every record already in RANKINGS was written by this command in this mode."""
        for record, line in zip(self.store.records, self.store.lines):
            for name in ("prompt_id", "annotator"):
                if not isinstance(record.get(name), str):
                    raise DataError(self.store.path, line, name, "missing: not a file written by 'rlhfkit label'")
            found = record_mode(record)
            if found is None:
                raise DataError(self.store.path, line, None, "no judgement: not a file written by 'rlhfkit label'")
            if found not in (self.mode, "flag"):
                raise ConfigError(
                    f"{self.store.path}:{line}: a {found} judgement, but this is --mode {self.mode}; "
                    f"continue it with --mode {found}, or write to another --out"
                )

    def recount(self) -> None:
        """What each annotator has done, from the records."""
        self.done: dict[str, set[tuple]] = {}
        for record in self.store.records:
            shown = record.get("shown") or [record.get("chosen"), record.get("rejected")]
            self.done.setdefault(record["annotator"], set()).add(done_key(self.mode, record["prompt_id"], shown))

    def committed(self, record: dict[str, Any]) -> None:
        """`record` was appended to the store."""
        self.done.setdefault(record["annotator"], set()).add(done_key(self.mode, record["prompt_id"], record["shown"]))

    # --- reading ------------------------------------------------------------------------------

    def check_annotator(self, annotator: Any) -> str:
        if not isinstance(annotator, str) or not annotator:
            raise RequestError(400, "annotator: missing (give your name)")
        if not self.assignment.accepts(annotator):
            if not self.assignment.annotators:
                raise RequestError(400, "annotator: a name is 1-64 letters, digits or . _ @ -")
            raise RequestError(403, f"annotator {annotator!r} is not one of this session's annotators")
        return annotator

    def assigned(self, annotator: str) -> list[Task]:
        return [t for t in self.tasks if self.assignment.judges(annotator, t.prompt_index)]

    def progress(self, annotator: str) -> dict[str, int]:
        tasks = self.assigned(annotator)
        done = self.done.get(annotator, set())
        return {"done": sum(t.key(self.mode) in done for t in tasks), "total": len(tasks)}

    def next_task(self, annotator: str) -> Task | None:
        done = self.done.get(annotator, set())
        return next((t for t in self.assigned(annotator) if t.key(self.mode) not in done), None)

    def view(self, annotator: str, task: Task | None, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the page gets: the task by positions (no ids, no policies), progress, undo state."""
        out: dict[str, Any] = {
            "annotator": annotator,
            "mode": self.mode,
            "scale": SCORE_SCALE,
            "progress": self.progress(annotator),
            "can_undo": any(r["annotator"] == annotator for r in self.store.records),
            "task": None,
            "previous": previous,
        }
        if task is not None:
            self._served[(annotator, task.index)] = time.monotonic()
            by_id = {c.id: c for c in task.sample.completions}
            prompt = task.sample.prompt
            out["task"] = {
                "index": task.index,
                "prompt_id": task.prompt_id,
                "prompt": [{"role": "prompt", "content": prompt}] if isinstance(prompt, str) else prompt,
                "completions": [
                    {"label": _label(i), "text": by_id[cid].text, "cut_off": by_id[cid].finish_reason == "length"}
                    for i, cid in enumerate(blind_order(self.seed, annotator, task))
                ],
            }
        return out

    # --- writing ------------------------------------------------------------------------------

    def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check a submission; return the record to append. Raises RequestError (4xx)."""
        annotator = self.check_annotator(body.get("annotator"))
        index = body.get("index")
        if isinstance(index, bool) or not isinstance(index, int):
            raise RequestError(400, "index: expected the task's index (an integer)")
        if not 0 <= index < len(self.tasks):
            raise RequestError(404, f"index: no task {index}")
        task = self.tasks[index]
        if body.get("prompt_id") != task.prompt_id:
            raise RequestError(409, "prompt_id: does not match the task (the page is out of date: reload it)")
        if not self.assignment.judges(annotator, task.prompt_index):
            raise RequestError(403, f"task {index} is not assigned to {annotator!r}")
        if task.key(self.mode) in self.done.get(annotator, set()):
            raise RequestError(409, f"task {index} was already judged by {annotator!r} (undo it first to change it)")
        order = blind_order(self.seed, annotator, task)

        record: dict[str, Any] = {"prompt_id": task.prompt_id}
        flag = body.get("flag")
        if flag is not None:
            if not isinstance(flag, str) or not flag.strip() or len(flag) > MAX_FLAG:
                raise RequestError(400, f"flag: expected the reason as text (1-{MAX_FLAG} characters)")
            if any(k in body for k in ("ranks", "best", "scores")):
                raise RequestError(400, "flag: give a judgement or a flag, not both")
            record.update(ranking=[], flag=flag.strip())
        else:
            record.update(self._judgement(body, order, task))
        record["annotator"] = annotator
        record["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        served = self._served.get((annotator, index))
        if served is not None:
            record["seconds"] = round(time.monotonic() - served, 1)
        record["shown"] = order
        comment = body.get("comment")
        if comment not in (None, ""):
            if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
                raise RequestError(400, f"comment: expected text of at most {MAX_COMMENT} characters")
            record["comment"] = comment
        return record

    def _judgement(self, body: dict[str, Any], order: list[str], task: Task) -> dict[str, Any]:
        k = len(order)
        if self.mode == "rank":
            ranks = _int_list(body, "ranks", k, 1, k)
            tiers = [[order[i] for i in range(k) if ranks[i] == r] for r in sorted(set(ranks))]
            return {"ranking": [tier[0] if len(tier) == 1 else tier for tier in tiers]}
        if self.mode == "scores":
            scores = _int_list(body, "scores", k, 1, SCORE_SCALE)
            return {"scores": dict(zip(order, scores))}
        best = body.get("best")
        if isinstance(best, bool) or not isinstance(best, int) or not 0 <= best < k:
            raise RequestError(400, f"best: expected the position of the best completion (0-{k - 1})")
        if self.mode == "best-of-k":
            return {"best": order[best]}
        # pairwise: the prompt goes along so that rank-import never has to guess whether two strings are ids or texts
        return {"prompt": task.sample.prompt, "chosen": order[best], "rejected": order[1 - best]}

    def undo_index(self, annotator: str) -> int:
        """The store index of the annotator's latest record (the one undo removes)."""
        for i in range(len(self.store.records) - 1, -1, -1):
            if self.store.records[i]["annotator"] == annotator:
                return i
        raise RequestError(409, "nothing to undo")

    def task_of(self, record: dict[str, Any]) -> Task | None:
        key = done_key(self.mode, record["prompt_id"], record.get("shown") or [record.get("chosen"), record.get("rejected")])
        return next((t for t in self.tasks if t.key(self.mode) == key), None)

    def previous(self, record: dict[str, Any], task: Task) -> dict[str, Any]:
        """An undone record as the page's positions, so that the page can show it again."""
        position = {cid: i for i, cid in enumerate(blind_order(self.seed, record["annotator"], task))}
        out: dict[str, Any] = {"comment": record.get("comment", "")}
        if record_mode(record) == "flag":
            out["flag"] = record["flag"]
        elif self.mode == "rank":
            ranks = [0] * len(position)
            for r, tier in enumerate(record["ranking"], start=1):
                for cid in tier if isinstance(tier, list) else [tier]:
                    ranks[position[cid]] = r
            out["ranks"] = ranks
        elif self.mode == "scores":
            out["scores"] = [record["scores"][cid] for cid in sorted(position, key=position.__getitem__)]
        else:
            out["best"] = position[record["best"] if self.mode == "best-of-k" else record["chosen"]]
        return out


def _label(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"#{i + 1}"


def _int_list(body: dict[str, Any], name: str, k: int, low: int, high: int) -> list[int]:
    value = body.get(name)
    if (
        not isinstance(value, list)
        or len(value) != k
        or not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in value)
    ):
        raise RequestError(400, f"{name}: expected {k} integers from {low} to {high}, one per completion in the order shown")
    return value
