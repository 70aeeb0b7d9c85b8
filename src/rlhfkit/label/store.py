"""RANKINGS.jsonl, the one file the labeling app writes: read on start, appended per submission,
rewritten on undo. The caller serialises every change (one writer).

Crash safety, by the three ways a process can stop:

- killed between submissions: every acknowledged record was written whole and fsynced first;
- killed inside ``append``: a record is one ``os.write`` of the whole line (a few hundred bytes, far
  below a page), so the kernel puts all of it in the file or none of it;
- the machine loses power inside ``append`` (or a disk fills up mid-line): the file may end in a
  line without its newline. `RankingsStore` cuts that torn tail off when it opens the file, and
  an ``append`` that fails half-way truncates the file back to where it was.

Undo rewrites the file atomically (a temporary file beside it, fsync, rename), so a crash during
an undo leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from rlhfkit.data.files import atomic_open, dumps
from rlhfkit.errors import DataError


def _fsync_dir(path: Path) -> None:
    """Make a created or renamed file's directory entry durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RankingsStore:
    """The records of RANKINGS.jsonl in file order, each with its exact line as written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        self.lines: list[int] = []  # 1-based file line of each record (for messages)
        self._raw: list[bytes] = []  # each record's line, newline included, exactly as in the file
        self.torn_bytes = 0  # size of a torn last line cut off on open
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        if self.path.is_dir():
            raise DataError(self.path, None, None, "is a directory (--out names the rankings JSONL file)")
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            tail = data[cut:]
            if _is_object(tail):  # written by hand without a final newline: keep it, add the newline
                self._write_tail(b"\n")
                data += b"\n"
            else:  # a line torn by a crash mid-write: it was never acknowledged, drop it
                self.torn_bytes = len(tail)
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
                    f.flush()
                    os.fsync(f.fileno())
                data = data[:cut]
        for number, raw in enumerate(data.splitlines(keepends=True), start=1):
            text = raw.strip()
            if not text:
                continue
            try:
                record = json.loads(text.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(self.path, number, None, f"not valid UTF-8 (byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(self.path, number, None, f"invalid JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(record, dict):
                raise DataError(self.path, number, None, f"expected a JSON object, got {type(record).__name__}")
            self.records.append(record)
            self.lines.append(number)
            self._raw.append(raw)

    def _write_tail(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def append(self, record: dict[str, Any]) -> None:
        """Add one record as one whole line, fsynced before returning."""
        raw = (dumps(record) + "\n").encode("utf-8")
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(raw)
                while view:  # os.write may write less than asked (a full disk); never leave half a line
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)
        self.records.append(record)
        self.lines.append((self.lines[-1] if self.lines else 0) + 1)
        self._raw.append(raw)

    def remove(self, i: int) -> dict[str, Any]:
        """Remove record ``i`` by rewriting the file atomically; the other lines stay byte for byte."""
        mode = stat.S_IMODE(self.path.stat().st_mode)
        keep = self._raw[:i] + self._raw[i + 1 :]
        with atomic_open(self.path, "wb") as f:
            f.write(b"".join(keep))
        os.chmod(self.path, mode)  # the temporary file was created 0600
        _fsync_dir(self.path.parent)
        record = self.records.pop(i)
        del self._raw[i]
        self.lines = list(range(1, len(self.records) + 1))
        return record


def _is_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
