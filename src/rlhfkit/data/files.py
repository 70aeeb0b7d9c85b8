"""Reading records from every supported source, and writing files atomically.

Sources (SPEC §4): ``.jsonl``, ``.jsonl.gz``, ``.json`` (an array of objects, or one object per
line), ``.parquet``, a ``datasets`` directory written by ``save_to_disk``, a hub dataset name
(``org/name`` or ``org/name:split``) when the network allows it, and ``-`` for stdin.

Every record comes out as ``(line, dict)`` where ``line`` is the 1-based JSONL line (or row number
for tabular sources), so that validation errors can say ``FILE:LINE: field 'x': reason``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from rlhfkit.errors import DataError

STDIO = "-"


def read_records(source: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line, record)`` from any supported source; raise DataError on unreadable input.

    An empty source is an error: every stage needs at least one record.
    """
    source = str(source)
    count = 0
    for line, record in _read_any(source):
        if not isinstance(record, dict):
            raise DataError(source, line, None, f"expected a JSON object, got {type(record).__name__}")
        count += 1
        yield line, record
    if count == 0:
        raise DataError(source, None, None, "no records (the file is empty)")


def _read_any(source: str) -> Iterator[tuple[int, Any]]:
    if source == STDIO:
        yield from _read_json_lines(sys.stdin.buffer, "<stdin>")
        return
    path = Path(source)
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    if not path.exists():
        if _looks_like_hub_name(source):
            yield from _read_hub_dataset(source)
            return
        raise DataError(source, None, None, "no such file or directory")
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _read_parquet(path)
    elif name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            try:
                yield from _read_json_lines(f, source)
            except (OSError, EOFError) as e:
                raise DataError(source, None, None, f"not a valid gzip file ({e})") from None
    elif name.endswith(".json"):
        yield from _read_json_file(path)
    else:
        with open(path, "rb") as f:
            yield from _read_json_lines(f, source)


def _decode(raw: bytes, source: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(source, line, None, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None


def _read_json_lines(f: IO[bytes], source: str) -> Iterator[tuple[int, Any]]:
    for line, raw in enumerate(f, start=1):
        text = _decode(raw, source, line).strip()
        if not text:
            continue
        try:
            yield line, json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(source, line, None, f"invalid JSON: {e.msg} at column {e.colno}") from None


def _read_json_file(path: Path) -> Iterator[tuple[int, Any]]:
    """A ``.json`` file holds one array of records, one object, or (commonly mislabelled) JSON lines."""
    raw = path.read_bytes()
    text = _decode(raw, str(path), 1) if raw else ""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, None, f"invalid JSON: {e.msg} at column {e.colno}") from None
        yield from enumerate(records, start=1)
        return
    yield from _read_json_lines(io.BytesIO(raw), str(path))


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(path, None, None, f"not a readable parquet file ({e})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _read_saved_dataset(path: Path) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError or ValueError here
        raise DataError(path, None, None, f"not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    yield from enumerate(ds, start=1)


def _looks_like_hub_name(source: str) -> bool:
    head = source.split(":", 1)[0]
    return head.count("/") == 1 and not head.startswith((".", "/")) and "." not in head.split("/")[1][-6:]


def _read_hub_dataset(source: str) -> Iterator[tuple[int, Any]]:
    import datasets

    name, _, split = source.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown name, or no such split
        raise DataError(source, None, None, f"no such file, and not loadable as a hub dataset ({type(e).__name__})") from None
    yield from enumerate(ds, start=1)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash, an exception or a SIGKILL inside the block leaves no file under the final name
    (at most a hidden ``.NAME.*.tmp`` beside it). ``-`` writes to stdout instead.
    """
    if str(path) == STDIO:
        stream = sys.stdout.buffer if "b" in mode else sys.stdout
        yield stream
        stream.flush()
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def dumps(record: dict[str, Any]) -> str:
    """One JSONL line: compact, UTF-8 kept readable, no trailing newline."""
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSONL atomically (``.gz`` compresses); return how many were written."""
    n = 0
    gz = str(path).endswith(".gz")
    with atomic_open(path, "wb" if gz else "w") as f:
        out = gzip.GzipFile(fileobj=f, mode="wb") if gz else f
        for record in records:
            line = dumps(record) + "\n"
            out.write(line.encode("utf-8") if gz else line)
            n += 1
        if gz:
            out.close()
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document atomically, indented for people."""
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
