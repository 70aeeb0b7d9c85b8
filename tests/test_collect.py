"""collect on a tiny model: determinism, resume, blind shuffling, stop strings, finish_reason,
de-duplication, stdout, and the pipe collect | judge | rank-import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env, write_jsonl
from rlhfkit.stages.collect import parse_policies

PROMPTS = [
    {"id": "a", "prompt": "Tell me about the cat."},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]},
    {"prompt": "the dog"},  # no id: a hash of the content
]


@pytest.fixture()
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


@pytest.fixture()
def collect(cli, tiny_llama_dir, prompts_file):
    """Run ``rlhfkit collect`` on the tiny model; return (result JSON, sample lines)."""

    def run(out, *args, policies=None, expect_ok=True):
        policy_args = [a for p in (policies or [str(tiny_llama_dir)]) for a in ("--policy", p)]
        result = cli("collect", *policy_args, "--prompts", prompts_file, "--out", out, "--k", "2", "--max-new-tokens", "6", *args)
        if not expect_ok:
            return result, None
        assert result.exit_code == 0, result.stderr
        lines = [json.loads(line) for line in Path(out).read_text().splitlines()]
        return json.loads(result.stdout), lines

    return run


def test_same_seed_same_file_whatever_the_batch(collect, tmp_path, tiny_llama_dir):
    result, lines = collect(tmp_path / "one.jsonl")
    assert result["prompts"] == result["collected"] == result["lines"] == 3 and result["completions"] == 6
    assert result["tokens"] > 0 and result["tokens_per_s"] > 0 and result["policies"] == [tiny_llama_dir.name]
    assert [line["prompt_id"] for line in lines][:2] == ["a", "b"] and lines[2]["prompt_id"].startswith("p-")
    assert lines[1]["prompt"] == PROMPTS[1]["messages"]  # the chat prompt is kept as messages
    assert lines[0]["sampling"] == {
        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6, "stop": [], "k": 2, "seed": 0,
        "policies": [tiny_llama_dir.name], "dedup": False, "chat_template": "auto",
    }  # fmt: skip
    ids = [c["id"] for line in lines for c in line["completions"]]
    assert len(set(ids)) == 6 and all(c["id"].startswith(line["prompt_id"] + "-") for line in lines for c in line["completions"])
    for c in (c for line in lines for c in line["completions"]):
        assert c["policy"] == tiny_llama_dir.name and isinstance(c["logprob"], float) and c["logprob"] < 0
        assert (c["finish_reason"], c["num_tokens"]) == ("length", 6) or (c["finish_reason"] == "stop" and c["num_tokens"] <= 6)
    # same seed, other batch size: byte for byte the same file (each row has its own generator)
    collect(tmp_path / "two.jsonl", "--batch-size", "1")
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    # another seed: other completions, other ids
    _, other = collect(tmp_path / "three.jsonl", "--seed", "1")
    assert not {c["id"] for line in other for c in line["completions"]} & set(ids)
    assert [c["text"] for c in other[0]["completions"]] != [c["text"] for c in lines[0]["completions"]]


def test_several_policies_are_shuffled_together(collect, tmp_path, tiny_llama_dir):
    result, lines = collect(tmp_path / "s.jsonl", "--k", "3", policies=[f"sft={tiny_llama_dir}", f"ppo={tiny_llama_dir}"])
    assert result["policies"] == ["sft", "ppo"] and result["completions"] == 18
    orders = [[c["policy"] for c in line["completions"]] for line in lines]
    assert all(sorted(o) == ["ppo"] * 3 + ["sft"] * 3 for o in orders)
    assert any(o != ["sft"] * 3 + ["ppo"] * 3 for o in orders)  # not in generation order: blind
    # the same weights under two names sample with different seeds
    texts = {p: [c["text"] for c in lines[0]["completions"] if c["policy"] == p] for p in ("sft", "ppo")}
    assert texts["sft"] != texts["ppo"]


def test_stop_strings_and_finish_reason(collect, tmp_path):
    # raw prompts: after a chat template's "assistant\n" the random tiny model says only newlines
    raw = ("--chat-template", "never")
    _, free = collect(tmp_path / "free.jsonl", "--temperature", "0", "--k", "1", "--max-new-tokens", "12", *raw)
    texts = [line["completions"][0]["text"] for line in free]
    assert all(line["completions"][0]["finish_reason"] == "length" for line in free)  # a random tiny model never says EOS
    # a stop string that greedy decoding is known to produce: two printable characters of a completion
    chosen = next(i for i, t in enumerate(texts) if len(t) > 3 and t[1:3].isprintable() and t[1:3].strip())
    stop = texts[chosen][1:3]
    _, cut = collect(tmp_path / "cut.jsonl", "--temperature", "0", "--k", "1", "--max-new-tokens", "12", "--stop", stop, *raw)
    for text, line in zip(texts, cut):
        c = line["completions"][0]
        if stop in text:
            assert (c["text"], c["finish_reason"]) == (text[: text.index(stop)], "stop") and c["num_tokens"] <= 12
        else:
            assert (c["text"], c["finish_reason"]) == (text, "length")
    assert cut[chosen]["completions"][0]["finish_reason"] == "stop"


def test_dedup_drops_repeated_texts(collect, tmp_path):
    # greedy decoding gives K identical completions
    result, lines = collect(tmp_path / "d.jsonl", "--temperature", "0", "--k", "3", "--dedup")
    assert result["duplicates_dropped"] == 6 and all(len(line["completions"]) == 1 for line in lines)


def test_resume_skips_done_prompts_and_ends_identical(collect, tmp_path):
    collect(tmp_path / "fresh.jsonl")
    out = tmp_path / "out.jsonl"
    # a finished run on the first two prompts, then the whole file
    result, _ = collect(out, "--max-prompts", "2")
    assert result["collected"] == 2
    result, _ = collect(out)
    assert (result["resumed"], result["collected"], result["lines"]) == (2, 1, 3)
    assert out.read_bytes() == (tmp_path / "fresh.jsonl").read_bytes()
    # a run killed while writing its second line: the partial file beside OUT holds one line and a half
    out.unlink()
    partial = tmp_path / ".out.jsonl.partial"
    text = (tmp_path / "fresh.jsonl").read_text().splitlines()
    partial.write_text(text[0] + "\n" + text[1][:40])
    result, _ = collect(out)
    assert (result["resumed"], result["collected"]) == (1, 2)
    assert out.read_bytes() == (tmp_path / "fresh.jsonl").read_bytes() and not partial.exists()
    # nothing left to do
    result, _ = collect(out)
    assert (result["resumed"], result["collected"], result["tokens"]) == (3, 0, 0)
    # other settings cannot resume into the same file
    result, _ = collect(out, "--temperature", "0.5", expect_ok=False)
    assert result.exit_code == 1
    assert f"{out}:1: collected with temperature = 1.0, this run has 0.5" in result.stderr


def test_out_dash_streams_samples(collect, cli, tiny_llama_dir, prompts_file):
    result = cli(
        "collect", "--policy", tiny_llama_dir, "--prompts", prompts_file, "--out", "-", "--k", "2", "--max-new-tokens", "4"
    )
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [len(line["completions"]) for line in lines] == [2, 2, 2]
    assert '"tokens_per_s"' in result.stderr


def test_bad_input_is_one_line(collect, cli, tmp_path, tiny_llama_dir, prompts_file):
    result, _ = collect(tmp_path / "o.jsonl", policies=[f"x={tiny_llama_dir}", f"x={tiny_llama_dir}"], expect_ok=False)
    assert result.exit_code == 1 and "the name 'x' is given twice" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "hi"}\n{"id": "a", "prompt": "again"}\n')
    result = cli("collect", "--policy", tiny_llama_dir, "--prompts", bad, "--out", tmp_path / "o.jsonl")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {bad}:2: field 'id': duplicate prompt id 'a' (also line 1)"
    assert not (tmp_path / "o.jsonl").exists()
    assert [p.name for p in parse_policies(["m/sft/", "ppo=/x/y", "a/b.gguf"])] == ["sft", "ppo", "b"]


@pytest.mark.slow  # subprocesses, seconds of imports each: make test-slow
def test_pipe_collect_judge_rank_import(tmp_path, tiny_llama_dir, prompts_file):
    """The README pipe: samples stream out of collect, a scripted judge ranks them, rank-import reads stdin."""
    python = sys.executable
    samples, pairs = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    pipe = (
        f"{python} -m rlhfkit collect --policy {tiny_llama_dir} --prompts {prompts_file} --k 3 --max-new-tokens 5 --out - "
        f"| tee {samples} | {python} {REPO / 'examples' / 'judge_length.py'} "
        f"| {python} -m rlhfkit rank-import - --samples {samples} --out {pairs}"
    )
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", pipe], check=False, capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["format"] == "native" and result["judgements"] == 3 and result["pairs"] == 3 * 3  # 3 prompts, K=3
    for pair in map(json.loads, pairs.read_text().splitlines()):
        assert (len(pair["chosen"]), pair["chosen_id"]) < (len(pair["rejected"]), pair["rejected_id"])  # the judge's taste
        assert pair["annotator"] == "judge-length"
