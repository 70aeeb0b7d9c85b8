"""The data layer: every source format, every record kind, errors as FILE:LINE: field, atomic writes."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rlhfkit.data import files, records
from rlhfkit.errors import DataError

ROWS = [{"id": "a", "prompt": "Say hi."}, {"id": "b", "messages": [{"role": "user", "content": "Hi?"}]}]


def _check_prompts(source):
    loaded = records.load(source, records.parse_prompt)
    assert [p.id for p in loaded] == ["a", "b"]
    assert loaded[1].prompt == [{"role": "user", "content": "Hi?"}]


def test_every_source_format(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    _check_prompts(jsonl)
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    _check_prompts(gz)
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps(ROWS, indent=2))
    _check_prompts(as_json)
    import datasets

    ds = datasets.Dataset.from_list([{"id": r["id"], "prompt": r.get("prompt"), "messages": r.get("messages")} for r in ROWS])
    ds.to_parquet(str(tmp_path / "p.parquet"))
    loaded = records.load(tmp_path / "p.parquet", records.parse_prompt)
    assert loaded[0].prompt == "Say hi." and loaded[1].prompt == [{"role": "user", "content": "Hi?"}]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert len(records.load(tmp_path / "saved", records.parse_prompt)) == 2


def test_stdin(monkeypatch, tmp_path):
    import io as pyio

    data = ("\n".join(json.dumps(r) for r in ROWS) + "\n").encode()
    monkeypatch.setattr(sys, "stdin", pyio.TextIOWrapper(pyio.BytesIO(data)))
    _check_prompts("-")


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"prompt": "ok"}\n{"prompt": "x",\n', ":2: invalid JSON"),
        (b'{"prompt": "ok"}\n{"id": "x"}\n', ":2: field 'prompt': missing"),
        (b'{"prompt": "ok"}\n\n{"prompt": ["x"]}\n', ":3: field 'prompt.0': expected a message object, got str"),
        (b'{"prompt": "ok"}\n{"prompt": 7}\n', ":2: field 'prompt': expected a string or a list, got int 7"),
        (b"", ": no records (the file is empty)"),
        (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', ":2: not valid UTF-8"),
        (b"[1, 2]\n", ":1: expected a JSON object, got list"),
    ],
    ids=["malformed", "missing-field", "bad-message", "wrong-type", "empty", "non-utf8", "not-object"],
)
def test_bad_input_names_file_line_and_field(tmp_path, cli, content, expected):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        records.load(path, records.parse_prompt)
    assert str(err.value).startswith(str(path)) and expected in str(err.value)
    result = cli("validate", path, "--kind", "prompts")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {err.value}"
    assert "Traceback" not in result.stderr


def test_missing_path(cli, tmp_path):
    result = cli("validate", tmp_path / "nope.jsonl", "--kind", "prompts")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file or directory"


def test_skip_invalid_counts(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": 1, "rejected": "b"}\n')
    loaded = records.load(path, records.parse_comparison, skip_invalid=True)
    assert len(loaded) == 1 and loaded.skipped == 1 and loaded.lines == [1]


def test_demonstration_shapes():
    assert records.parse_demonstration({"text": "x"}).kind == "text"
    assert records.parse_demonstration({"prompt": "q", "response": "a"}).kind == "prompt"
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert records.parse_demonstration(chat).kind == "messages"
    with pytest.raises(records.RecordError, match="no assistant turn"):
        records.parse_demonstration({"messages": [{"role": "user", "content": "q"}]})
    with pytest.raises(records.RecordError) as e:
        records.parse_demonstration({"messages": [{"role": "robot", "content": "q"}]})
    assert e.value.field == "messages.0.role"
    with pytest.raises(records.RecordError) as e:
        records.parse_demonstration({"prompt": "q"})
    assert e.value.field == "response"


def test_prompt_ids_are_stable_hashes():
    a = records.parse_prompt({"prompt": "same"})
    assert a.id == records.parse_prompt({"prompt": "same"}).id != records.parse_prompt({"prompt": "other"}).id
    assert records.parse_prompt({"id": 17, "prompt": "x"}).id == "17"


def test_samples_roundtrip_and_duplicate_ids():
    line = {
        "prompt_id": "p17",
        "prompt": "...",
        "completions": [
            {"id": "p17-3f9a", "text": "t", "policy": "sft", "finish_reason": "stop", "num_tokens": 41, "logprob": -37.2}
        ],
        "sampling": {"temperature": 1.0},
    }
    assert records.parse_samples(line).to_dict() == line
    line["completions"].append(dict(line["completions"][0]))
    with pytest.raises(records.RecordError) as e:
        records.parse_samples(line)
    assert e.value.field == "completions.1.id"


def test_comparisons_explicit_and_implicit_prompt():
    c = records.parse_comparison({"prompt": "Q", "chosen": "good", "rejected": "bad", "group": "p1/ann", "margin": 1})
    assert (c.prompt, c.chosen, c.rejected, c.group, c.margin) == ("Q", "good", "bad", "p1/ann", 1.0)
    implicit = records.parse_comparison({"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: go away"})
    assert implicit.prompt == "Human: hi Assistant: " and implicit.chosen == "hello" and implicit.rejected == "go away"
    user = {"role": "user", "content": "hi"}
    conv = records.parse_comparison(
        {"chosen": [user, {"role": "assistant", "content": "hello"}], "rejected": [user, {"role": "assistant", "content": "no"}]}
    )
    assert conv.prompt == [user] and conv.chosen == [{"role": "assistant", "content": "hello"}]
    assert conv.to_dict() == {"prompt": [user], "chosen": conv.chosen, "rejected": conv.rejected}


def test_atomic_writer_leaves_nothing_when_killed(tmp_path):
    """A writer killed with SIGKILL midway leaves no file under the final name."""
    out = tmp_path / "out.jsonl"
    script = textwrap.dedent(
        f"""
        import time
        from rlhfkit.data.files import write_jsonl
        def records():
            for i in range(1000):
                yield {{"i": i}}
                if i == 10:
                    print("started", flush=True)
                    time.sleep(60)
        write_jsonl({str(out)!r}, records())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.1)
    assert not out.exists()
    files.write_jsonl(out, [{"i": 1}])
    assert out.read_text() == '{"i": 1}\n'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]  # the killed run's temp file


def test_atomic_writer_exception_cleans_up(tmp_path):
    out = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with files.atomic_open(out) as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_gzip_output(tmp_path):
    out = tmp_path / "o.jsonl.gz"
    assert files.write_jsonl(out, [{"a": 1}, {"a": 2}]) == 2
    assert [r for _, r in files.read_records(out)] == [{"a": 1}, {"a": 2}]


SAMPLES_LINE = {
    "prompt_id": "p1",
    "prompt": "Q",
    "completions": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}],
}


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"prompt_id": "p1", "ranking": ["a", "b"]}\n{"prompt_id": "p1", \n', ":2: invalid JSON"),
        (b'{"prompt_id": "p1"}\n', ":1: field 'ranking': missing"),
        (b'{"prompt_id": "p1", "ranking": 7}\n', ":1: field 'ranking': expected"),
        (b"", ": no records (the file is empty)"),
        (b'{"prompt_id": "p1", "ranking": ["a", "b"], "annotator": "caf\xe9"}\n', ":1: not valid UTF-8"),
    ],
    ids=["malformed", "missing-field", "wrong-type", "empty", "non-utf8"],
)
def test_a_writing_command_stops_on_bad_input_and_writes_nothing(tmp_path, cli, content, expected):
    """The same one-line errors from a command that writes: exit 1, no output file, no temp file."""
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps(SAMPLES_LINE) + "\n")
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_bytes(content)
    out = tmp_path / "out" / "pairs.jsonl"
    result = cli("rank-import", rankings, "--samples", samples, "--out", out, "--format", "native")
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {rankings}") and expected in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    result = cli("rank-import", tmp_path / "missing.jsonl", "--samples", samples, "--out", out)
    assert result.exit_code == 1 and "no such file or directory" in result.stderr and not out.exists()
