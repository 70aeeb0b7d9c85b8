"""An external judge for ``rlhfkit eval --judge CMD``: a program that reads samples JSONL on stdin
and writes rankings JSONL on stdout — the files a labeler would receive and return.

The protocol is the one people use (SPEC §4): each stdin line is a samples record
``{"prompt_id", "prompt", "completions": [{"id", "text", "finish_reason", "num_tokens"}], "sampling"}``
holding the completions of every evaluated model for one prompt, shuffled and with no ``policy``
field (the judge is blind); each stdout line is a ranking in any format ``rank-import`` reads
(native ``{"prompt_id", "ranking": [best, [tied, tied], worst], "annotator"?}``, scores,
best-of-K, pairwise, ...). Several annotators may rank the same prompt; every ranking counts.

``CMD`` runs through the shell (``--judge "python judge.py --strict | tee judged.jsonl"`` works).
A judge that cannot be started, exits with a non-zero status, times out, or writes anything that
is not a valid ranking of the given completions stops eval with one line that says which.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfkit.data.files import dumps
from rlhfkit.errors import RlhfkitError


def run_judge(command: str, samples: Sequence[dict[str, Any]], output: Path, *, timeout: float) -> list[Any]:
    """Send ``samples`` to the judge, keep its raw answer in ``output``, and return the checked
    judgements (`rlhfkit.rankings.Judgement`, completion ids best first)."""
    from rlhfkit.data.files import atomic_open
    from rlhfkit.data.records import parse_samples
    from rlhfkit.rankings import SampleIndex, load_rankings

    payload = "".join(dumps(s) + "\n" for s in samples)
    try:
        # its own process group, so that a timeout also ends what the shell started (a pipeline)
        proc = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)  # fmt: skip
    except OSError as e:
        raise RlhfkitError(f"--judge {command!r}: cannot start it ({e})") from None
    try:
        raw_stdout, raw_stderr = proc.communicate(payload.encode("utf-8"), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise RlhfkitError(f"--judge {command!r}: no answer within {timeout:g} s (--judge-timeout)") from None
    except BaseException:  # Ctrl-C: do not leave the judge running
        _kill_group(proc)
        raise
    stderr = raw_stderr.decode("utf-8", errors="replace")  # for people: shown as it is
    if proc.returncode != 0:  # its last stderr line says why (the error stays one line)
        last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "no message on stderr")
        raise RlhfkitError(f"--judge {command!r}: exited with status {proc.returncode}: {last}")
    if stderr:  # a judge's own progress or warnings, for people
        sys.stderr.write(stderr if stderr.endswith("\n") else stderr + "\n")
    try:
        stdout = raw_stdout.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw_stdout.count(b"\n", 0, e.start) + 1
        bad = raw_stdout[e.start : e.start + 1]
        raise RlhfkitError(f"--judge {command!r}: its output is not UTF-8 text (line {line}, byte {bad!r})") from None
    if not stdout.strip():
        raise RlhfkitError(f"--judge {command!r}: wrote no rankings on stdout")
    with atomic_open(output) as f:
        f.write(stdout)
    index = SampleIndex([parse_samples(s) for s in samples], source="<judge input>")
    try:
        return load_rankings(str(output), index).judgements
    except RlhfkitError as e:
        raise RlhfkitError(f"--judge {command!r}: invalid rankings in its output ({e})") from None


def _kill_group(proc: subprocess.Popen) -> None:
    """End the judge's process group (the shell and everything it started), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):  # already gone, or no process groups
        proc.kill()
    proc.communicate()


def positions(judgement: Any) -> dict[str, int | None]:
    """Completion id -> rank (0 = best; tied completions share a rank). Best-of-K's unordered rest
    gets None: it ranks below every tier, but its members are not ordered among themselves."""
    out: dict[str, int | None] = {}
    for rank, tier in enumerate(judgement.tiers):
        for cid in tier:
            out[cid] = rank
    for cid in getattr(judgement, "below", ()):
        out[cid] = None
    return out


def judged_outcome(ranks: dict[str, int | None], a: str, b: str) -> float | None:
    """1.0 if the judge put ``a`` above ``b``, 0.0 if below, 0.5 if tied; None if it did not
    compare them (one is unranked, or both are in the unordered rest)."""
    if a not in ranks or b not in ranks:
        return None
    ra, rb = ranks[a], ranks[b]
    if ra is None and rb is None:
        return None
    if ra is None:
        return 0.0
    if rb is None:
        return 1.0
    return 1.0 if ra < rb else 0.0 if ra > rb else 0.5
