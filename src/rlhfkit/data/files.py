"""Reading records from every supported source, and writing files atomically.

Sources (SPEC §4): ``.jsonl``, ``.jsonl.gz``, ``.json`` (an array of objects, or one object per
line), ``.parquet``, a ``datasets`` directory written by ``save_to_disk``, a hub dataset name
(``org/name`` or ``org/name:split``) when the network allows it, and ``-`` for stdin.

Every record comes out as ``(line, dict)`` where ``line`` is the 1-based JSONL line (or row number
for tabular sources), so that validation errors can say ``FILE:LINE: field 'x': reason``.
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import io
import json
import os
import sys
import tempfile
import zlib
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
            except (OSError, EOFError, zlib.error) as e:
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
        line += raw.count(b"\n", 0, e.start)  # a whole file: the line the bad byte is on
        raise DataError(source, line, None, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None


class _NotFinite(ValueError):
    """JSON's NaN, Infinity or -Infinity: Python's json reads them, RFC 8259 has no such numbers."""


def _reject_constant(token: str) -> Any:
    raise _NotFinite(token)


def parse_json(text: str, source: str | os.PathLike, line: int = 1) -> Any:
    """One JSON document, strictly: invalid JSON, ``NaN``/``Infinity`` (never a value: a score or
    margin that is not a number is an error), nesting too deep to read, and text that is not
    Unicode (a lone surrogate such as ``"\\ud800"``, which no tokenizer or UTF-8 file can hold)
    are each a DataError at ``source:LINE`` (``line`` is the line ``text`` starts on)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise DataError(source, line + e.lineno - 1, None, f"invalid JSON: {e.msg} at column {e.colno}") from None
    except _NotFinite as e:
        at = _constant_position(text)
        where = line + text.count("\n", 0, at)
        column = at - text.rfind("\n", 0, at)
        raise DataError(source, where, None, f"invalid JSON: {e} at column {column} (JSON numbers are finite)") from None
    except RecursionError:
        raise DataError(source, line, None, "invalid JSON: nested too deeply to read") from None
    if "\\u" in text:  # a lone surrogate can only come from a \u escape
        bad = _lone_surrogate(value)
        if bad is not None:
            field, char = bad
            field = None if field is None else field.encode("utf-8", "backslashreplace").decode("utf-8")  # printable
            reason = f"not valid Unicode: a lone surrogate {char!r} (half of a UTF-16 pair: no tokenizer or UTF-8 file holds it)"
            raise DataError(source, line, field, reason)
    return value


def _constant_position(text: str) -> int:
    """Where the first NaN/Infinity token outside a string starts."""
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "NI-" and text.startswith(("NaN", "Infinity", "-Infinity"), i):
            return i
    return 0


def _lone_surrogate(value: Any) -> tuple[str | None, str] | None:
    """(dotted field, character) of the first string (key or value) holding a lone surrogate, or None."""
    stack: list[tuple[str | None, Any]] = [(None, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                return where, item[e.start]
        elif isinstance(item, dict):
            for k, v in item.items():
                stack.append((where, k))
                stack.append((k if where is None else f"{where}.{k}", v))
        elif isinstance(item, list):
            stack.extend((str(i) if where is None else f"{where}.{i}", v) for i, v in enumerate(item))
    return None


def _read_json_lines(f: IO[bytes], source: str) -> Iterator[tuple[int, Any]]:
    for line, raw in enumerate(f, start=1):
        text = _decode(raw, source, line).strip()
        if not text:
            continue
        yield line, parse_json(text, source, line)


def _read_json_file(path: Path) -> Iterator[tuple[int, Any]]:
    """A ``.json`` file holds one array of records, one object, or (commonly mislabelled) JSON lines."""
    raw = path.read_bytes()
    text = _decode(raw, str(path), 1) if raw else ""
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = parse_json(text, path)
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


_GROUP: contextvars.ContextVar[list[tuple[str, Path]] | None] = contextvars.ContextVar("rlhfkit_output_group", default=None)


@contextlib.contextmanager
def output_group() -> Iterator[None]:
    """All or none: every file written with `atomic_open` inside the block (so `write_jsonl`,
    `write_json`, report.md, the plots) stays under its temporary name until the block ends, then
    all are renamed into place together; an error inside the block leaves none of them. For the
    commands with several outputs (rank-import's pairs, validation pairs and statistics; eval's
    samples, report and plots). Groups nest: an inner group's files wait for the outer one."""
    outer = _GROUP.get()
    pending: list[tuple[str, Path]] = []
    token = _GROUP.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    finally:
        _GROUP.reset(token)
    if outer is not None:
        outer.extend(pending)
        return
    for tmp, path in pending:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds
    (inside an `output_group`, when the group succeeds).

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
        group = _GROUP.get()
        if group is not None:
            group.append((tmp, path))
        else:
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
