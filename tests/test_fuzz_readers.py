"""Property tests (hypothesis) of every reader: fed arbitrary bytes, or arbitrary JSON values, each
one returns its records or raises a DataError that says where (the file, and the line of a bad
record) — never another exception, never a traceback for the user.

The readers: `data.files.read_records` for every supported suffix and stdin, the validator of each
data kind (`data.records.load_kind`: demonstrations, prompts, samples, comparisons), and the rankings
reader of every format, checked against a samples file (`rankings.load_checked`, what rank-import
and ``validate --kind rankings`` run), CSV included.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfkit.data import files, records
from rlhfkit.errors import DataError
from rlhfkit.rankings import FORMATS, load_checked

SETTINGS = settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SAMPLES = [
    {
        "prompt_id": "p0",
        "prompt": "q",
        "completions": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "c", "text": "z"}],
    },
    {
        "prompt_id": "p1",
        "prompt": [{"role": "user", "content": "hi"}],
        "completions": [{"id": "d", "text": "x"}, {"id": "e", "text": "w"}],
    },
]
# the field names the schemas and the rankings formats look for, so that arbitrary records reach deep into them
FIELDS = [
    "prompt",
    "messages",
    "role",
    "content",
    "response",
    "text",
    "chosen",
    "rejected",
    "margin",
    "group",
    "id",
    "prompt_id",
    "completions",
    "finish_reason",
    "num_tokens",
    "logprob",
    "sampling",
    "ranking",
    "scores",
    "best",
    "annotator",
    "data",
    "annotations",
    "result",
    "value",
    "ranker",
    "selected",
    "responses",
    "values",
    "items",
    "completion_id",
    "score",
    "can_judge",
    "a",
    "b",
    "c",
    "d",
    "p0",
    "p1",
]

# any text, lone surrogates included (they reach the file as \ud800 escapes)
texts = st.text(alphabet=st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    [*FIELDS, "user", "assistant", "a > b"]
)
numbers = st.integers(-(2**70), 2**70) | st.floats() | st.sampled_from([math.nan, math.inf, -math.inf])
scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | texts, children, max_size=5),
    max_leaves=24,
)
records_like = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
# JSON nested deeper than any reader recurses (as a line, or inside a record)
deep = st.integers(500, 5000).map(lambda n: ("[" * n + "]" * n).encode()) | st.integers(500, 5000).map(
    lambda n: ('{"prompt": "a", "x": ' + "[" * n + "]" * n + "}").encode()
)


@contextlib.contextmanager
def scratch():
    with tempfile.TemporaryDirectory(prefix="rlhfkit-fuzz-") as d:
        yield Path(d)


def located(e: DataError, path: Path | str) -> bool:
    """A DataError that names the file (and, for a problem inside a record, its line)."""
    return isinstance(e, DataError) and (e.path == str(path) or e.path == "<stdin>") and (e.field is None or e.line is not None)


def read_everything(path: Path | str, samples: Path) -> None:
    """Every reader on one source; each either returns or raises a located DataError."""
    attempts = [lambda: list(files.read_records(path))]
    attempts += [
        lambda kind=kind, skip=skip: records.load_kind(path, kind, skip_invalid=skip)
        for kind in records.KINDS
        for skip in (False, True)
    ]
    attempts += [lambda fmt=fmt: load_checked(str(path), str(samples), fmt) for fmt in ("auto", *FORMATS)]
    attempts += [lambda: load_checked(str(path), str(samples), "auto", skip_invalid=True)]
    for attempt in attempts:
        try:
            attempt()
        except DataError as e:
            assert located(e, path), f"{e!r}: path={e.path!r} line={e.line!r} field={e.field!r}"


def write_samples(d: Path) -> Path:
    path = d / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    return path


@SETTINGS
@given(
    data=st.binary(max_size=300) | deep, suffix=st.sampled_from([".jsonl", ".json", ".jsonl.gz", ".csv", ".tsv", ".parquet", ""])
)
def test_every_reader_takes_arbitrary_bytes(data, suffix):
    with scratch() as d:
        samples = write_samples(d)
        path = d / f"input{suffix}"
        path.write_bytes(data)
        read_everything(path, samples)
        if suffix.endswith(".gz") or suffix == ".csv":  # a valid gzip container around arbitrary bytes too
            (d / "input.csv.gz").write_bytes(gzip.compress(data))
            path.write_bytes(gzip.compress(data))
            read_everything(path, samples)
            read_everything(d / "input.csv.gz", samples)


@SETTINGS
@given(lines=st.lists(json_values | records_like, min_size=1, max_size=4), as_array=st.booleans())
def test_every_parser_takes_arbitrary_json_values(lines, as_array):
    """JSON lines (or one .json array) of arbitrary values: NaN/Infinity tokens, lone surrogates,
    wrong types, missing fields, deep structures."""
    with scratch() as d:
        samples = write_samples(d)
        if as_array:
            path = d / "input.json"
            path.write_text(json.dumps(lines, indent=1))
        else:
            path = d / "input.jsonl"
            path.write_text("".join(json.dumps(v) + "\n" for v in lines))
        read_everything(path, samples)


@SETTINGS
@given(
    header=st.lists(st.sampled_from(FIELDS) | texts.filter(lambda t: "\n" not in t and "\r" not in t), min_size=1, max_size=4),
    rows=st.lists(
        st.lists(texts | st.sampled_from(["1.5", "nan", "inf", "a > b = c", '{"a": NaN}', "[", "d"]), max_size=4), max_size=4
    ),
)
def test_csv_rankings_take_arbitrary_cells(header, rows):
    import csv

    with scratch() as d:
        samples = write_samples(d)
        path = d / "rankings.csv"
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(rows)
        path.write_text(buffer.getvalue().encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
        read_everything(path, samples)


@SETTINGS
@given(data=st.binary(max_size=200) | deep | json_values.map(lambda v: (json.dumps(v) + "\n").encode()))
def test_stdin_takes_anything(data):
    """``-``: the same readers on standard input."""
    with scratch() as d:
        samples = write_samples(d)
        for read in (
            lambda: list(files.read_records("-")),
            lambda: records.load_kind("-", "prompts"),
            lambda: load_checked("-", str(samples)),
        ):
            saved = sys.stdin
            sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
            try:
                read()
            except DataError as e:
                assert located(e, "-"), repr(e)
            finally:
                sys.stdin = saved
