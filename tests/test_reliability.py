"""Reliability (issue 11): every bad input, option and environment stops the command with exit code 1
and one line (no traceback), before any work where it can be told, and loses nothing; nothing
non-finite is trained on or saved. One test per class of bad input, parametrised over the commands
and cases. Fuzzing of the readers (hypothesis) is in test_fuzz_readers.py.

Every case goes through the CLI in-process (the ``cli`` fixture) unless it checks a library
function; the torchrun cases start subprocesses and are marked slow.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import subprocess_env, write_jsonl
from rlhfkit import config as config_module
from rlhfkit import models
from rlhfkit.config import CommonConfig, flag
from rlhfkit.errors import ConfigError, DataError, NonFiniteError, RlhfkitError
from rlhfkit.provenance import RunInfo

PROMPTS = [{"id": f"p{i}", "prompt": f"the cat and the dog {i}"} for i in range(4)]
DEMOS = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(6)]
COMPARISONS = [{"prompt": f"q {i}", "chosen": f"a good answer {i}", "rejected": f"bad {i}"} for i in range(8)]
SAMPLES = [
    {
        "prompt_id": f"p{i}",
        "prompt": f"q {i}",
        "completions": [{"id": f"c{i}{k}", "text": f"t {i} {k}", "policy": "ab"[k % 2]} for k in range(3)],
    }
    for i in range(4)
]
RANKINGS = [{"prompt_id": f"p{i}", "ranking": [f"c{i}0", f"c{i}1", f"c{i}2"]} for i in range(4)]
CONSTANT_REWARD = "def constant(prompts, completions):\n    return [0.5] * len(completions)\n"


# --- helpers --------------------------------------------------------------------------------------


def one_line(result) -> str:
    """The error of a failed command: exit code 1, no traceback, exactly one ``error:`` line, the
    last on stderr. Returns it without the ``error: `` prefix."""
    assert result.exit_code == 1, f"exit {result.exit_code}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    return errors[0].removeprefix("error: ")


def listing(root: Path) -> list[str]:
    """Every path under ``root`` (hidden ones too), for "nothing was written" checks."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def classifier_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """A one-label sequence classifier saved as train-rm saves a reward model."""
    torch.manual_seed(0)
    rm = models.load_model(str(tiny_llama_dir), kind="reward")
    out = tmp_path_factory.mktemp("cls") / "rm"
    return models.save_model_dir(
        rm,
        models.load_tokenizer(str(tiny_llama_dir)),
        out,
        RunInfo("train-rm", {}, {}),
        extra={"reward": {"gain": 1.0, "bias": 0.0}},
    )


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "reward.py").write_text(CONSTANT_REWARD)
    return {
        "prompts": write_jsonl(inputs / "prompts.jsonl", PROMPTS),
        "demos": write_jsonl(inputs / "demos.jsonl", DEMOS),
        "cmp": write_jsonl(inputs / "cmp.jsonl", COMPARISONS),
        "samples": write_jsonl(inputs / "samples.jsonl", SAMPLES),
        "rankings": write_jsonl(inputs / "rankings.jsonl", RANKINGS),
        "reward": inputs / "reward.py",
    }


def command(name: str, model: Path, f: dict[str, Path], out: Path) -> list:
    """A small, valid invocation of each command (the cases below change one thing in it)."""
    sampling = ["--max-new-tokens", 4, "--device", "cpu", "--dtype", "float32"]
    return {
        "sft": [
            "sft",
            "--model",
            model,
            "--data",
            f["demos"],
            "--out",
            out,
            "--max-steps",
            1,
            "--max-length",
            64,
            "--device",
            "cpu",
        ],
        "train-rm": [
            "train-rm",
            "--model",
            model,
            "--data",
            f["cmp"],
            "--out",
            out,
            "--max-steps",
            1,
            "--val-fraction",
            0,
            "--device",
            "cpu",
        ],
        "ppo": [
            "ppo",
            "--policy",
            model,
            "--rm",
            f"python:{f['reward']}:constant",
            "--prompts",
            f["prompts"],
            "--out",
            out,
            "--steps",
            1,
            "--batch-size",
            2,
            "--ppo-epochs",
            1,
            *sampling,
        ],
        "collect": ["collect", "--policy", model, "--prompts", f["prompts"], "--out", out, "--k", 1, *sampling],
        "eval": ["eval", "--policy", model, "--baseline", f"base={model}", "--prompts", f["prompts"], "--out", out, *sampling],
        "rank-import": ["rank-import", f["rankings"], "--samples", f["samples"], "--out", out],
        "label": ["label", f["samples"], "--out", out, "--export", "argilla"],
    }[name]


def set_option(args: list, option: str, value) -> list:
    """``args`` with ``option`` set to ``value`` (replaced if present, appended otherwise)."""
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


def out_path(name: str, tmp_path: Path) -> Path:
    return tmp_path / ("out.jsonl" if name in ("collect", "rank-import", "label") else "out")


# --- 1. numbers: every numeric option finite and in its range, one line naming it ----------------

NUMBER_CASES = [
    ("sft", "--lr", "nan"),
    ("sft", "--lr", "inf"),
    ("sft", "--lr", "0"),
    ("sft", "--lr", "-1e-5"),
    ("sft", "--max-grad-norm", "nan"),
    ("sft", "--weight-decay", "inf"),
    ("sft", "--weight-decay", "-0.1"),
    ("sft", "--warmup-ratio", "nan"),
    ("sft", "--warmup-ratio", "1.5"),
    ("sft", "--val-fraction", "nan"),
    ("sft", "--val-fraction", "1"),
    ("sft", "--lora-dropout", "nan"),
    ("sft", "--lora-alpha", "0"),
    ("sft", "--lora-r", "0"),
    ("sft", "--batch-size", "0"),
    ("sft", "--grad-accum", "0"),
    ("sft", "--max-length", "1"),
    ("sft", "--seed", "-1"),
    ("sft", "--seed", str(2**40)),
    ("sft", "--save-every", "-1"),
    ("sft", "--keep-checkpoints", "-2"),
    ("train-rm", "--lr", "nan"),
    ("train-rm", "--center-rewards-coef", "inf"),
    ("train-rm", "--val-fraction", "nan"),
    ("train-rm", "--max-grad-norm", "inf"),
    ("train-rm", "--batch-size", "0"),
    ("train-rm", "--max-length", "1"),
    ("train-rm", "--weight-decay", "-1"),
    ("train-rm", "--epochs", "0"),
    ("ppo", "--kl-coef", "nan"),
    ("ppo", "--kl-coef", "-0.1"),
    ("ppo", "--gamma", "nan"),
    ("ppo", "--gamma", "1.5"),
    ("ppo", "--lam", "inf"),
    ("ppo", "--temperature", "inf"),
    ("ppo", "--temperature", "0"),
    ("ppo", "--top-p", "nan"),
    ("ppo", "--top-p", "0"),
    ("ppo", "--target-kl", "inf"),
    ("ppo", "--target-kl", "0"),
    ("ppo", "--cliprange", "nan"),
    ("ppo", "--cliprange", "0"),
    ("ppo", "--cliprange-value", "-1"),
    ("ppo", "--vf-coef", "inf"),
    ("ppo", "--adam-eps", "nan"),
    ("ppo", "--reward-clip", "nan"),
    ("ppo", "--missing-eos-penalty", "nan"),
    ("ppo", "--missing-eos-penalty", "-inf"),
    ("ppo", "--early-stop-kl", "nan"),
    ("ppo", "--ptx-coef", "nan"),
    ("ppo", "--ptx-coef", "-1"),
    ("ppo", "--steps", "0"),
    ("ppo", "--lr", "inf"),
    ("ppo", "--max-grad-norm", "-1"),
    ("collect", "--temperature", "nan"),
    ("collect", "--temperature", "inf"),
    ("collect", "--temperature", "-1"),
    ("collect", "--top-p", "nan"),
    ("collect", "--top-p", "1.5"),
    ("collect", "--k", "0"),
    ("collect", "--batch-size", "0"),
    ("collect", "--max-new-tokens", "0"),
    ("collect", "--top-k", "-1"),
    ("eval", "--confidence", "nan"),
    ("eval", "--confidence", "1"),
    ("eval", "--judge-timeout", "inf"),
    ("eval", "--judge-timeout", "0"),
    ("eval", "--temperature", "nan"),
    ("eval", "--top-p", "inf"),
    ("eval", "--n-samples", "0"),
    ("eval", "--best-of", "1"),
    ("eval", "--bootstrap", "-1"),
    ("rank-import", "--val-fraction", "nan"),
    ("rank-import", "--val-fraction", "1"),
    ("rank-import", "--bootstrap", "-1"),
    ("rank-import", "--seed", "-5"),
    ("label", "--overlap", "-1"),
    ("label", "--k-max", "1"),
    ("label", "--port", "70000"),
]


@pytest.mark.parametrize(("name", "option", "value"), NUMBER_CASES, ids=[f"{n} {o} {v}" for n, o, v in NUMBER_CASES])
def test_numeric_options_are_finite_and_in_range(cli, tiny_llama_dir, files, tmp_path, name, option, value):
    """Checked before anything is read or loaded: one line naming the option, nothing written."""
    before = listing(tmp_path)
    error = one_line(cli(*set_option(command(name, tiny_llama_dir, files, out_path(name, tmp_path)), option, value)))
    assert error.startswith(f"{option}: must be") or error.startswith(f"{option}: must"), error
    assert listing(tmp_path) == before


def _config_classes() -> list[type]:
    return [
        c for c in vars(config_module).values() if isinstance(c, type) and issubclass(c, CommonConfig) and c is not CommonConfig
    ]


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_number_of_every_config_is_checked_finite(cls):
    """By construction: CommonConfig.check refuses nan/inf in every float field of every config
    (a new option is covered without a new check), naming the option."""
    floats = [f for f in dataclasses.fields(cls) if "float" in str(f.type)]
    for f in floats:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match=rf"^{flag(f.name)}: must be a finite number, got"):
                cls(**{f.name: bad}).check()


# --- 2. numbers in data files and rlhfkit.json: JSON NaN/Infinity is an error at FILE:LINE ------


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


DATA_NUMBER_CASES = {
    # name: (command, kind, file name, content (lines, or rows for parquet), expected location + reason)
    "margin NaN": (
        "train-rm",
        "comparisons",
        "c.jsonl",
        ['{"prompt":"a","chosen":"b","rejected":"c"}', '{"prompt":"a","chosen":"b","rejected":"c","margin":NaN}'],
        ":2: invalid JSON: NaN at column",
    ),
    "margin Infinity": (
        "train-rm",
        "comparisons",
        "c.jsonl",
        ['{"prompt":"a","chosen":"b","rejected":"c","margin":Infinity}'],
        ":1: invalid JSON: Infinity",
    ),
    "margin 1e999": (
        "train-rm",
        "comparisons",
        "c.jsonl",
        ['{"prompt":"a","chosen":"b","rejected":"c","margin":1e999}'],
        ":1: field 'margin': must be a finite number, got inf",
    ),
    "margin NaN parquet": (
        "train-rm",
        "comparisons",
        "c.parquet",
        [
            {"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1.0},
            {"prompt": "a", "chosen": "b", "rejected": "c", "margin": math.nan},
        ],
        ":2: field 'margin': must be a finite number, got nan",
    ),
    "NaN in a .json array": (
        "sft",
        "demonstrations",
        "d.json",
        ["[", '{"text": "a"},', '{"text": "b", "weight": NaN}', "]"],
        ":3: invalid JSON: NaN at column 25",
    ),
    "logprob -Infinity": (
        "rank-import",
        "samples",
        "s.jsonl",
        ['{"prompt_id":"p0","prompt":"q","completions":[{"id":"c","text":"t","logprob":-Infinity}]}'],
        ":1: invalid JSON: -Infinity",
    ),
    "score NaN": (
        "rank-import",
        None,
        "r.jsonl",
        ['{"prompt_id":"p0","scores":{"c00":NaN,"c01":1,"c02":2}}'],
        ":1: invalid JSON: NaN",
    ),
    "score inf in a CSV": (
        "rank-import",
        None,
        "r.csv",
        ["prompt_id,completion_id,score", "p0,c00,1", "p0,c01,inf", "p0,c02,2"],
        ":3: field 'score': must be a finite number",
    ),
    "score NaN in a CSV cell": (
        "rank-import",
        None,
        "r.csv",
        ["prompt_id,scores", 'p0,"{""c00"": NaN, ""c01"": 1}"'],
        ":2: field 'scores.c00': must be a finite number",
    ),
}


@pytest.mark.parametrize("case", list(DATA_NUMBER_CASES))
def test_non_finite_numbers_in_data_files_are_errors_at_file_line(cli, tiny_llama_dir, files, tmp_path, case):
    """The stage that reads the file, and ``validate`` where the kind has one, stop at FILE:LINE."""
    name, kind, filename, content, expected = DATA_NUMBER_CASES[case]
    path = tmp_path / filename
    if filename.endswith(".parquet"):
        _parquet(path, content)
    else:
        path.write_text("\n".join(content) + "\n")
    option = {"train-rm": "--data", "sft": "--data"}.get(name)
    if name == "rank-import":
        args = command(name, tiny_llama_dir, files, tmp_path / "pairs.jsonl")
        args = [*args[:1], path, *args[2:]] if kind is None else set_option(args, "--samples", path)
    else:
        args = set_option(command(name, tiny_llama_dir, files, tmp_path / "out"), option, path)
    assert one_line(cli(*args)).startswith(f"{path}{expected}")
    if kind is not None:
        assert one_line(cli("validate", path, "--kind", kind)).startswith(f"{path}{expected}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "pairs.jsonl").exists()


RUN_INFO_CASES = {
    "gain NaN": ('"gain": NaN', "invalid JSON: NaN"),
    "gain Infinity": ('"gain": Infinity', "invalid JSON: Infinity"),
    "gain a string": ('"gain": "2.0"', "field 'reward.gain': must be a finite number, got '2.0'"),
    "bias 1e999": ('"bias": 1e999', "field 'reward.bias': must be a finite number, got inf"),
    "garbage": (None, "invalid JSON: Expecting"),
}


@pytest.mark.parametrize("case", list(RUN_INFO_CASES))
def test_rlhfkit_json_numbers_and_garbage_are_errors_at_file_line(cli, classifier_dir, tiny_llama_dir, files, tmp_path, case):
    """A reward model's normalisation is read strictly: ppo and eval stop at its rlhfkit.json:LINE."""
    replacement, expected = RUN_INFO_CASES[case]
    rm = tmp_path / "rm"
    shutil.copytree(classifier_dir, rm)
    info = json.loads((rm / "rlhfkit.json").read_text())
    info["reward"] = {"gain": 1.0, "bias": 0.0}
    text = json.dumps(info, indent=2)
    if replacement is None:
        text = "{garbage\n" + text
    else:
        key = replacement.split(":")[0]
        text = text.replace(f"{key}: {1.0 if 'gain' in key else 0.0}", replacement)
    (rm / "rlhfkit.json").write_text(text)
    line = text.splitlines().index(next(row for row in text.splitlines() if (replacement or "{garbage") in row)) + 1
    for name in ("ppo", "eval"):
        args = set_option(command(name, tiny_llama_dir, files, tmp_path / "out"), "--rm", rm)
        assert one_line(cli(*args)).startswith(f"{rm / 'rlhfkit.json'}:{line}: {expected}"), name
        assert not (tmp_path / "out").exists(), sorted(str(p) for p in (tmp_path / "out").rglob("*"))


# --- 3. inputs are what they claim: one line each ---------------------------------------------------


def _damaged(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    damage(dst)
    return dst


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _bad_header(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json} and no tensors")


def _garbage_config(d: Path) -> None:
    (d / "config.json").write_text("{garbage")


def _nan_weight(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(d / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name][0] = math.nan
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})


def _lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _gz_cut_short(path: Path) -> Path:
    body = gzip.compress("".join(json.dumps({"id": f"p{i}", "prompt": "x" * 50}) + "\n" for i in range(200)).encode())
    path.write_bytes(body[: len(body) // 2])
    return path


def _gz_flipped(path: Path) -> Path:
    body = bytearray(gzip.compress("".join(json.dumps({"id": f"p{i}", "prompt": "y" * 40}) + "\n" for i in range(200)).encode()))
    body[len(body) // 2] ^= 0xFF
    path.write_bytes(bytes(body))
    return path


# name: (command, option, make the bad input (tmp_path, classifier, lm) -> path, expected substring)
INPUT_CASES = {
    "sft --model a classifier": ("sft", "--model", lambda t, c, m: c, "not a causal language model"),
    "collect --policy a classifier": ("collect", "--policy", lambda t, c, m: c, "not a causal language model"),
    "ppo --policy a classifier": ("ppo", "--policy", lambda t, c, m: c, "not a causal language model"),
    "eval --baseline a classifier": ("eval", "--baseline", lambda t, c, m: c, "not a causal language model"),
    "ppo --rm a causal LM": ("ppo", "--rm", lambda t, c, m: m, "not a reward model"),
    "eval --rm a causal LM": ("eval", "--rm", lambda t, c, m: m, "not a reward model"),
    "sft truncated safetensors": (
        "sft",
        "--model",
        lambda t, c, m: _damaged(m, t / "m", _truncate),
        "cannot load as a causal-lm model",
    ),
    "collect corrupt safetensors header": (
        "collect",
        "--policy",
        lambda t, c, m: _damaged(m, t / "m", _bad_header),
        "cannot load",
    ),
    "train-rm truncated safetensors": ("train-rm", "--model", lambda t, c, m: _damaged(m, t / "m", _truncate), "cannot load"),
    "ppo --rm truncated safetensors": (
        "ppo",
        "--rm",
        lambda t, c, m: _damaged(c, t / "m", _truncate),
        "cannot load as a reward model",
    ),
    "sft garbage config.json": ("sft", "--model", lambda t, c, m: _damaged(m, t / "m", _garbage_config), "config.json"),
    "collect a NaN weight": (
        "collect",
        "--policy",
        lambda t, c, m: _damaged(m, t / "m", _nan_weight),
        "holds nan (a non-finite weight",
    ),
    "sft no model directory": ("sft", "--model", lambda t, c, m: t / "nowhere", "no such model directory"),
    "validate deep JSON lines": (
        "validate",
        "prompts",
        lambda t, c, m: _lines(t / "d.jsonl", ["[" * 100_000 + "]" * 100_000]),
        ":1: invalid JSON: nested too deeply",
    ),
    "sft deep .json": (
        "sft",
        "--data",
        lambda t, c, m: _lines(t / "d.json", ["[" * 50_000 + "]" * 50_000]),
        ":1: invalid JSON: nested too deeply",
    ),
    "validate deep record": (
        "validate",
        "prompts",
        lambda t, c, m: _lines(t / "d.jsonl", ['{"prompt": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"]),
        ":1: invalid JSON: nested too deeply",
    ),
    "validate .gz cut short": ("validate", "prompts", lambda t, c, m: _gz_cut_short(t / "p.jsonl.gz"), "not a valid gzip file"),
    "collect .gz with a flipped byte": ("collect", "--prompts", lambda t, c, m: _gz_flipped(t / "p.jsonl.gz"), "p.jsonl.gz"),
    "validate .gz that is not gzip": (
        "validate",
        "prompts",
        lambda t, c, m: _lines(t / "p.jsonl.gz", ["hello"]),
        "not a valid gzip file",
    ),
    "validate lone surrogate": (
        "validate",
        "prompts",
        lambda t, c, m: _lines(t / "s.jsonl", ['{"prompt": "a \\ud800 b"}']),
        ":1: field 'prompt': not valid Unicode: a lone surrogate",
    ),
    "collect lone surrogate": (
        "collect",
        "--prompts",
        lambda t, c, m: _lines(t / "s.jsonl", ['{"prompt": "a \\udfff"}']),
        ":1: field 'prompt': not valid Unicode",
    ),
    "sft lone surrogate in a message": (
        "sft",
        "--data",
        lambda t, c, m: _lines(
            t / "s.jsonl", ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\ud83d"}]}']
        ),
        ":1: field 'messages.1.content': not valid Unicode",
    ),
    "train-rm lone surrogate": (
        "train-rm",
        "--data",
        lambda t, c, m: _lines(t / "s.jsonl", ['{"prompt": "a", "chosen": "\\ud800", "rejected": "b"}']),
        ":1: field 'chosen': not valid Unicode",
    ),
    "rank-import lone surrogate in a key": (
        "rank-import",
        "--samples",
        lambda t, c, m: _lines(t / "s.jsonl", ['{"prompt_id": "p", "prompt": "q", "completions": [], "\\ud800": 1}']),
        ":1: not valid Unicode: a lone surrogate",
    ),
    "validate invalid UTF-8": (
        "validate",
        "prompts",
        lambda t, c, m: (t / "u.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n') and t / "u.jsonl",
        ":2: not valid UTF-8",
    ),
    "collect empty file": ("collect", "--prompts", lambda t, c, m: _lines(t / "e.jsonl", [""]), "no records"),
    "collect prompt longer than the context": (
        "collect",
        "--prompts",
        lambda t, c, m: _lines(t / "l.jsonl", [json.dumps({"prompt": "the cat " * 400})]),
        ":1: field 'prompt': ",
    ),
    "eval prompt longer than the context": (
        "eval",
        "--prompts",
        lambda t, c, m: _lines(t / "l.jsonl", [json.dumps({"prompt": "a"}), json.dumps({"prompt": "the dog " * 400})]),
        ":2: field 'prompt': ",
    ),
    "ppo prompt longer than the context": (
        "ppo",
        "--prompts",
        lambda t, c, m: _lines(t / "l.jsonl", [json.dumps({"prompt": "the sky " * 400})]),
        "--max-prompt-length N keeps the last N tokens",
    ),
}


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_bad_inputs_are_one_line(cli, classifier_dir, tiny_llama_dir, files, tmp_path, case):
    name, option, make, expected = INPUT_CASES[case]
    bad = make(tmp_path, classifier_dir, tiny_llama_dir)
    if name == "validate":
        args = ["validate", bad, "--kind", option]
    elif option == "--baseline":
        args = set_option(command(name, tiny_llama_dir, files, tmp_path / "out"), option, f"base={bad}")
    else:
        args = set_option(command(name, tiny_llama_dir, files, out_path(name, tmp_path)), option, bad)
    error = one_line(cli(*args))
    assert expected in error, error
    if "context" in case:
        assert "do not fit the model's context of 512 tokens" in error
    assert not out_path(name, tmp_path).exists()


NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages here') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYSTEM = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
REJECTED_TEXT = {  # command: (option, its records, expected error start)
    "collect": ("--prompts", [PROMPTS[0], {"id": "s", "messages": SYSTEM}], ":2: field 'prompt': the tokenizer rejects it"),
    "ppo": ("--prompts", [{"id": "s", "messages": SYSTEM}], ":1: field 'prompt': the tokenizer rejects it"),
    "eval": ("--prompts", [{"id": "s", "messages": SYSTEM}], ":1: field 'prompt': the tokenizer rejects it"),
    "sft": ("--data", [DEMOS[0], {"messages": [*SYSTEM, {"role": "assistant", "content": "hello"}]}], ":2: field 'messages'"),
    "train-rm": ("--data", [{"prompt": SYSTEM, "chosen": "a", "rejected": "b"}], "the tokenizer rejects the prompt"),
}


@pytest.mark.parametrize("name", list(REJECTED_TEXT))
def test_text_the_tokenizer_rejects_is_one_line(cli, tiny_llama_dir, files, tmp_path, name):
    """A model whose chat template refuses system messages: every stage that encodes says so in one line."""
    model = tmp_path / "no-system"
    shutil.copytree(tiny_llama_dir, model)
    (model / "chat_template.jinja").write_text(NO_SYSTEM_TEMPLATE)
    option, rows, expected = REJECTED_TEXT[name]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    args = set_option(command(name, model, files, out_path(name, tmp_path)), option, data)
    if name == "eval":
        args = set_option(set_option(args, "--baseline", f"base={model}"), "--policy", model)
    error = one_line(cli(*args))
    assert (error.startswith(f"{data}{expected}") or error.startswith(expected)) and "no system messages here" in error, error
    assert not out_path(name, tmp_path).exists()


@pytest.mark.parametrize("packing", [False, True])
def test_sft_refuses_examples_longer_than_the_context(cli, tiny_llama_dir, files, tmp_path, packing):
    """The tiny model has 512 positions; --max-length 1024 would train on positions it never had."""
    long = write_jsonl(tmp_path / "long.jsonl", [*DEMOS, {"text": "the cat and the dog " * 200}])
    args = set_option(set_option(command("sft", tiny_llama_dir, files, tmp_path / "out"), "--data", long), "--max-length", 1024)
    error = one_line(cli(*args, *(["--packing"] if packing else [])))
    assert error.startswith("--max-length 1024: the longest example is ") and error.endswith(
        "(512); give --max-length 512 or less"
    )
    assert not (tmp_path / "out").exists(), sorted(str(p) for p in (tmp_path / "out").rglob("*"))
    if not packing:  # validate --model runs the same check
        assert (
            one_line(cli("validate", long, "--kind", "demonstrations", "--model", tiny_llama_dir, "--max-length", 1024)) == error
        )


def test_max_prompt_length_truncates_and_counts(cli, tiny_llama_dir, files, tmp_path):
    """ppo --max-prompt-length keeps the end of a prompt longer than the context, and says how many."""
    long = write_jsonl(tmp_path / "long.jsonl", [{"id": "a", "prompt": "the cat " * 400}, {"id": "b", "prompt": "hi"}])
    args = set_option(command("ppo", tiny_llama_dir, files, tmp_path / "out"), "--prompts", long)
    result = cli(*args, "--max-prompt-length", 64)
    assert result.exit_code == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "rlhfkit.json").read_text())["ppo"]["prompts_truncated"] == 1


# --- 4. degenerate comparisons: rejected, or skipped and counted --------------------------------

DEGENERATE = {
    "chosen == rejected": {"prompt": "q", "chosen": "same", "rejected": "same"},
    "identical transcripts": {"chosen": "q: same answer", "rejected": "q: same answer"},
    "identical message lists": {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    },
    "negative margin": {"prompt": "q", "chosen": "a", "rejected": "b", "margin": -1.0},
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_comparisons_are_rejected_or_skipped_and_counted(cli, tiny_llama_dir, files, tmp_path, case):
    data = write_jsonl(tmp_path / "cmp.jsonl", [*COMPARISONS[:3], DEGENERATE[case], *COMPARISONS[3:]])
    field = "margin" if "margin" in case else "rejected"
    expected = f"{data}:4: field '{field}': "
    assert one_line(cli("validate", data, "--kind", "comparisons")).startswith(expected)
    args = set_option(command("train-rm", tiny_llama_dir, files, tmp_path / "out"), "--data", data)
    assert one_line(cli(*args)).startswith(expected)
    skipped = cli("validate", data, "--kind", "comparisons", "--skip-invalid")
    assert skipped.exit_code == 0 and json.loads(skipped.stdout) == {
        "path": str(data),
        "kind": "comparisons",
        "valid": 8,
        "skipped": 1,
    }


def test_rank_import_drops_and_counts_pairs_of_identical_texts(cli, tiny_llama_dir, files, tmp_path):
    """Two completions with the same text make no comparison: rank-import drops and counts the pair,
    so that what it writes is what train-rm accepts."""
    samples = [dict(s, completions=[dict(c) for c in s["completions"]]) for s in SAMPLES]
    samples[0]["completions"][2]["text"] = samples[0]["completions"][0]["text"]
    samples_file = write_jsonl(tmp_path / "samples.jsonl", samples)
    result = cli("rank-import", files["rankings"], "--samples", samples_file, "--out", tmp_path / "pairs.jsonl")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["identical_dropped"] == 1 and json.loads(result.stdout)["pairs"] == 11
    assert cli("validate", tmp_path / "pairs.jsonl", "--kind", "comparisons").exit_code == 0


# --- 5. scripted rewards and judges -------------------------------------------------------------

BAD_REWARDS = {
    "a string": ("def f(p, c):\n    return ['1.5'] * len(c)\n", "score 0 is a str ('1.5'), not a number"),
    "too few": ("def f(p, c):\n    return [1.0]\n", "returned 1 scores for 2 completions"),
    "NaN": ("def f(p, c):\n    return [1.0, float('nan')]\n", "non-finite score (nan) at position 1"),
    "-inf": ("def f(p, c):\n    return [float('-inf'), 1.0]\n", "non-finite score (-inf) at position 0"),
    "beyond float32": ("def f(p, c):\n    return [0.0, 1e308]\n", "too large for float32 (1e+308) at position 1"),
    "a dict": ("def f(p, c):\n    return {'a': 1.0, 'b': 2.0}\n", "must return a list of numbers"),
    "None": ("def f(p, c):\n    pass\n", "must return a list of numbers (one per completion), got NoneType"),
    "nested lists": ("def f(p, c):\n    return [[1.0], [2.0]]\n", "score 0 is a list"),
    "a 2-D array": ("import numpy\ndef f(p, c):\n    return numpy.zeros((2, 1))\n", "must return a list of numbers"),
    "raises": ("def f(p, c):\n    raise KeyError('boom')\n", "raised KeyError: 'boom' while scoring"),
    "sys.exit while scoring": ("import sys\ndef f(p, c):\n    sys.exit(0)\n", "called sys.exit(0) while scoring"),
    "sys.exit on import": ("import sys\nsys.exit(3)\ndef f(p, c):\n    return [0.0] * len(c)\n", "called sys.exit(3)"),
    "raises on import": (
        "raise RuntimeError('no config')\ndef f(p, c):\n    return [0.0] * len(c)\n",
        "raised RuntimeError: no config",
    ),
    "no such function": ("def g(p, c):\n    return [0.0] * len(c)\n", "has no function 'f'"),
}
GOOD_REWARDS = {
    "a tuple": "def f(p, c):\n    return (1, 2.5)\n",
    "a generator": "def f(p, c):\n    return (float(len(x)) for x in c)\n",
    "a numpy array": "import numpy\ndef f(p, c):\n    return numpy.array([1.0, 2.0])\n",
    "a tensor": "import torch\ndef f(p, c):\n    return torch.tensor([1.0, 2.0])\n",
    "bools (verifiable rewards)": "def f(p, c):\n    return [True, False]\n",
}


@pytest.mark.parametrize("case", [*BAD_REWARDS, *GOOD_REWARDS])
def test_scripted_rewards_are_checked(tmp_path, case):
    """A sequence of finite numbers, one per completion; anything else is one line naming the reward."""
    from rlhfkit.reward import load_reward

    script = tmp_path / f"reward_{abs(hash(case))}.py"
    script.write_text(BAD_REWARDS[case][0] if case in BAD_REWARDS else GOOD_REWARDS[case])
    spec = f"python:{script}:f"
    if case in GOOD_REWARDS:
        scores = load_reward(spec, None).score(["q", "q"], ["ab", "a"])
        assert scores.dtype == torch.float32 and scores.shape == (2,) and torch.isfinite(scores).all()
        return
    with pytest.raises(RlhfkitError) as raised:
        load_reward(spec, None).score(["q", "q"], ["ab", "a"])
    assert str(raised.value).startswith(spec) and BAD_REWARDS[case][1] in str(raised.value)


def test_a_reward_that_exits_on_import_is_one_line_and_leaves_nothing(cli, tiny_llama_dir, files, tmp_path):
    script = tmp_path / "inputs" / "exits.py"
    script.write_text("import sys\nsys.exit(3)\n")
    args = set_option(command("ppo", tiny_llama_dir, files, tmp_path / "out"), "--rm", f"python:{script}:f")
    assert one_line(cli(*args)).endswith("called sys.exit(3)")  # not a silent exit code 3
    assert not (tmp_path / "out").exists(), sorted(str(p) for p in (tmp_path / "out").rglob("*"))


JUDGES = {
    "not UTF-8": (
        "import sys\nsys.stdin.read()\nsys.stdout.buffer.write(b'\\xff\\xfe{}\\n')\n",
        "its output is not UTF-8 text (line 1, byte b'\\xff')",
    ),
    "exits 3": (
        "import sys\nsys.stdin.read()\nprint('judge broke', file=sys.stderr)\nsys.exit(3)\n",
        "exited with status 3: judge broke",
    ),
    "no rankings": ("import sys\nsys.stdin.read()\n", "wrote no rankings on stdout"),
    "garbage": ("import sys\nsys.stdin.read()\nprint('{oops')\n", "invalid rankings in its output"),
}


@pytest.mark.parametrize("case", list(JUDGES))
def test_a_failing_judge_is_one_line_and_eval_writes_nothing(cli, tiny_llama_dir, files, tmp_path, case):
    script, expected = JUDGES[case]
    judge = tmp_path / "inputs" / "judge.py"
    judge.write_text(script)
    args = command("eval", tiny_llama_dir, files, tmp_path / "report")
    error = one_line(cli(*args, "--judge", f"{sys.executable} {judge}"))
    assert expected in error, error
    assert not (tmp_path / "report").exists()


# --- 6. validate and the stages share one validator per data kind --------------------------------

AGREE = {
    # name: (kind, bad lines, the commands that read that kind: (command, option))
    "prompts: a duplicate id": (
        "prompts",
        [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}],
        [("collect", "--prompts"), ("ppo", "--prompts"), ("eval", "--prompts")],
    ),
    "prompts: no prompt": (
        "prompts",
        [{"id": "a", "prompt": "x"}, {"id": "b", "text": "y"}],
        [("collect", "--prompts"), ("ppo", "--prompts"), ("eval", "--prompts")],
    ),
    "prompts: an unknown role": (
        "prompts",
        [{"messages": [{"role": "robot", "content": "x"}]}],
        [("collect", "--prompts"), ("ppo", "--prompts")],
    ),
    "demonstrations: no assistant turn": (
        "demonstrations",
        [{"messages": [{"role": "user", "content": "x"}]}],
        [("sft", "--data"), ("ppo", "--ptx-data")],
    ),
    "demonstrations: an empty text": ("demonstrations", [{"text": ""}], [("sft", "--data")]),
    "samples: a duplicate prompt id": (
        "samples",
        [SAMPLES[0], {**SAMPLES[1], "prompt_id": "p0"}],
        [("rank-import", "--samples"), ("label", "SAMPLES")],
    ),
    "samples: a completion id under two prompts": (
        "samples",
        [SAMPLES[0], {**SAMPLES[1], "completions": SAMPLES[0]["completions"]}],
        [("rank-import", "--samples"), ("label", "SAMPLES")],
    ),
    "comparisons: chosen == rejected": (
        "comparisons",
        [COMPARISONS[0], {"prompt": "q", "chosen": "x", "rejected": "x"}],
        [("train-rm", "--data"), ("train-rm", "--val-data")],
    ),
    "comparisons: a margin that is a string": ("comparisons", [{**COMPARISONS[0], "margin": "1"}], [("train-rm", "--data")]),
}


@pytest.mark.parametrize("case", list(AGREE))
def test_validate_and_the_stages_reject_the_same_records(cli, tiny_llama_dir, files, tmp_path, case):
    """What ``rlhfkit validate`` rejects, the stage that reads the file rejects, with the same line."""
    kind, rows, readers = AGREE[case]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    expected = one_line(cli("validate", path, "--kind", kind))
    assert expected.startswith(f"{path}:")
    for name, option in readers:
        args = command(name, tiny_llama_dir, files, out_path(name, tmp_path))
        args = [args[0], path, *args[2:]] if option == "SAMPLES" else set_option(args, option, path)
        if option == "--ptx-data":
            args += ["--ptx-coef", 0.1]
        assert one_line(cli(*args)) == expected, name


def test_validate_and_rank_import_check_rankings_alike(cli, files, tmp_path):
    rankings = write_jsonl(tmp_path / "r.jsonl", [RANKINGS[0], {"prompt_id": "p1", "ranking": ["c10", "c99"]}])
    expected = one_line(cli("validate", rankings, "--kind", "rankings", "--samples", files["samples"]))
    assert expected.startswith(f"{rankings}:2: field 'ranking.1': unknown completion id 'c99'")
    assert one_line(cli("rank-import", rankings, "--samples", files["samples"], "--out", tmp_path / "p.jsonl")) == expected
    good = cli("validate", files["rankings"], "--kind", "rankings", "--samples", files["samples"])
    assert good.exit_code == 0 and json.loads(good.stdout)["valid"] == 4


def test_validate_with_a_model_checks_what_the_sampling_stages_check(cli, tiny_llama_dir, files, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"id": "a", "prompt": "hi"}, {"id": "b", "prompt": "the cat " * 400}])
    assert cli("validate", long, "--kind", "prompts").exit_code == 0  # the records are fine
    expected = one_line(cli("validate", long, "--kind", "prompts", "--model", tiny_llama_dir, "--max-new-tokens", 4))
    assert expected.startswith(f"{long}:2: field 'prompt': ")
    assert (
        one_line(cli(*set_option(command("collect", tiny_llama_dir, files, tmp_path / "s.jsonl"), "--prompts", long))) == expected
    )


# --- 7. outputs: refused before any work when they collide or cannot be written ------------------

READ_ONLY_SKIP = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes in read-only directories")

# name: (command, change the command (args, tmp_path, files) -> args, expected start of the error)
OUTPUT_CASES = {
    "collect --out = --prompts": (
        "collect",
        lambda a, t, f: set_option(a, "--out", f["prompts"]),
        "--out {prompts}: the same path as the input --prompts",
    ),
    "rank-import --val-out = --out": (
        "rank-import",
        lambda a, t, f: a + ["--val-fraction", 0.5, "--val-out", t / "out.jsonl"],
        "--val-out {t}/out.jsonl: the same path as --out",
    ),
    "rank-import --stats = --out": (
        "rank-import",
        lambda a, t, f: a + ["--stats", t / "out.jsonl"],
        "--stats {t}/out.jsonl: the same path as --out",
    ),
    "rank-import --out = --samples": (
        "rank-import",
        lambda a, t, f: set_option(a, "--out", f["samples"]),
        "--out {samples}: the same path as the input --samples",
    ),
    "rank-import default --val-out = RANKINGS": (
        "rank-import",
        lambda a, t, f: [a[0], t / "out.val.jsonl", *a[2:], "--val-fraction", 0.5],
        "--val-out {t}/out.val.jsonl: the same path as the input RANKINGS",
    ),
    "rank-import --stats under a file": (
        "rank-import",
        lambda a, t, f: a + ["--stats", f["samples"] / "stats.json"],
        "--stats {samples}/stats.json: {samples} is a file, not a directory",
    ),
    "rank-import --out under /proc": (
        "rank-import",
        lambda a, t, f: set_option(a, "--out", "/proc/rlhfkit-nowhere/p.jsonl"),
        "--out /proc/rlhfkit-nowhere/p.jsonl: cannot create anything in /proc",
    ),
    "collect --out is a directory": (
        "collect",
        lambda a, t, f: set_option(a, "--out", t / "inputs"),
        "--out {t}/inputs: is a directory",
    ),
    "collect --out under /proc": (
        "collect",
        lambda a, t, f: set_option(a, "--out", "/proc/self/rlhfkit/s.jsonl"),
        "--out /proc/self/rlhfkit/s.jsonl: cannot create anything in /proc/self",
    ),
    "sft --data inside --out": (
        "sft",
        lambda a, t, f: set_option(a, "--out", t / "inputs"),
        "--data {demos} is inside --out {t}/inputs, which the run replaces",
    ),
    "sft --out under /sys": (
        "sft",
        lambda a, t, f: set_option(a, "--out", "/sys/rlhfkit-nowhere/run"),
        "--out /sys/rlhfkit-nowhere/run: cannot create anything in /sys",
    ),
    "sft --out is a file": (
        "sft",
        lambda a, t, f: set_option(a, "--out", f["demos"]),
        "--out {demos}: the same path as the input --data",
    ),
    "train-rm --out under a file": (
        "train-rm",
        lambda a, t, f: set_option(a, "--out", f["cmp"] / "rm"),
        "--out {cmp}/rm: {cmp} is a file, not a directory",
    ),
    "ppo --out = --prompts": (
        "ppo",
        lambda a, t, f: set_option(a, "--out", f["prompts"]),
        "--out {prompts}: the same path as the input --prompts",
    ),
    "ppo --out = --policy": (
        "ppo",
        lambda a, t, f: set_option(a, "--policy", t / "out"),
        "--out {t}/out: the same path as the input --policy",
    ),
    "eval --prompts among the outputs": (
        "eval",
        lambda a, t, f: _prompts_in_report(a, t),
        "--out {t}/inputs/samples.jsonl: the same path as the input --prompts",
    ),
    "eval --out under a file": (
        "eval",
        lambda a, t, f: set_option(a, "--out", f["prompts"] / "report"),
        "--out {prompts}/report/samples.jsonl: {prompts} is a file, not a directory",
    ),
    "label --out = SAMPLES": (
        "label",
        lambda a, t, f: set_option(a, "--out", f["samples"]),
        "--out {samples}: the same path as the input SAMPLES",
    ),
}


def _prompts_in_report(args: list, tmp_path: Path) -> list:
    """eval --out DIR with the prompts in DIR/samples.jsonl, a file eval writes."""
    write_jsonl(tmp_path / "inputs" / "samples.jsonl", PROMPTS)
    return set_option(set_option(args, "--out", tmp_path / "inputs"), "--prompts", tmp_path / "inputs" / "samples.jsonl")


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_bad_output_paths_are_refused_before_any_work(cli, tiny_llama_dir, files, tmp_path, case):
    name, change, expected = OUTPUT_CASES[case]
    args = change(command(name, tiny_llama_dir, files, out_path(name, tmp_path)), tmp_path, files)
    before = listing(tmp_path)
    error = one_line(cli(*args))
    assert error.startswith(expected.format(t=tmp_path, **files)), error
    assert listing(tmp_path) == before  # nothing written, nothing removed


@READ_ONLY_SKIP
@pytest.mark.parametrize("name", ["sft", "collect", "rank-import", "eval"])
def test_a_read_only_directory_is_refused_before_any_work(cli, tiny_llama_dir, files, tmp_path, name):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        error = one_line(
            cli(*command(name, tiny_llama_dir, files, locked / ("o.jsonl" if name in ("collect", "rank-import") else "o")))
        )
        assert "cannot create anything in" in error and "Permission denied" in error
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# --- 8. several outputs: all or none --------------------------------------------------------------


def _full_disk(*args, **kwargs):
    """A stand-in writer that finds the disk full (an OSError naming the file it was writing)."""
    path = next((a for a in args if isinstance(a, (str, os.PathLike))), None)
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_rank_import_writes_all_of_its_outputs_or_none(cli, files, tmp_path, monkeypatch):
    from rlhfkit.data import files as data_files

    args = [
        "rank-import",
        files["rankings"],
        "--samples",
        files["samples"],
        "--out",
        tmp_path / "pairs.jsonl",
        "--val-fraction",
        0.5,
        "--stats",
        tmp_path / "stats.json",
    ]
    monkeypatch.setattr(data_files, "write_json", _full_disk)  # the last of the three fails
    assert one_line(cli(*args)) == f"{tmp_path / 'stats.json'}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]  # neither the pairs nor the validation pairs
    monkeypatch.undo()
    assert cli(*args).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "pairs.jsonl", "pairs.val.jsonl", "stats.json"]


def test_eval_writes_all_of_its_outputs_or_none(cli, tiny_llama_dir, files, tmp_path, monkeypatch):
    import rlhfkit.report

    judge = tmp_path / "inputs" / "judge.py"
    judge.write_text(
        "import json, sys\nfor line in sys.stdin:\n    s = json.loads(line)\n"
        "    print(json.dumps({'prompt_id': s['prompt_id'], 'best': s['completions'][0]['id']}))\n"
    )
    args = [*command("eval", tiny_llama_dir, files, tmp_path / "report"), "--judge", f"{sys.executable} {judge}"]
    monkeypatch.setattr(rlhfkit.report, "plot_elo", _full_disk)  # after samples.jsonl, the judge's answer, two plots
    assert one_line(cli(*args)).endswith("No space left on device")
    assert not (tmp_path / "report").exists()
    monkeypatch.undo()
    assert cli(*args).exit_code == 0
    assert {"samples.jsonl", "judge_rankings.jsonl", "report.md", "report.json"} <= {
        p.name for p in (tmp_path / "report").iterdir()
    }


def test_output_group_renames_all_or_none(tmp_path):
    from rlhfkit.data.files import output_group, write_json, write_jsonl

    with pytest.raises(RuntimeError), output_group():
        write_jsonl(tmp_path / "a.jsonl", [{"x": 1}])
        with output_group():  # nested: its files wait for the outer group
            write_json(tmp_path / "b.json", {"y": 2})
        assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.json").exists()
        raise RuntimeError("the third output failed")
    assert listing(tmp_path) == []  # no file, no temporary left
    with output_group():
        write_jsonl(tmp_path / "a.jsonl", [{"x": 1}])
        write_json(tmp_path / "b.json", {"y": 2})
    assert listing(tmp_path) == ["a.jsonl", "b.json"]


# --- 9. a failed run leaves nothing, so the corrected command just runs ---------------------------

RAISES = "def f(p, c):\n    raise ValueError(1)\n"
FAILING_RUNS = {
    "ppo: the reward raises at step 1": ("ppo", "--rm", lambda t, c, m: f"python:{_script(t, RAISES)}:f", "raised ValueError"),
    "ppo: a reward beyond float32": (
        "ppo",
        "--rm",
        lambda t, c, m: _gain(c, t / "rm", 1e300),
        "step 1: the reward is not finite (",
    ),
    "ppo: an unloadable value model": ("ppo", "--value-model", lambda t, c, m: _damaged(c, t / "vm", _truncate), "cannot load"),
    "sft: the loss diverges at step 2": ("sft", "--lr", lambda t, c, m: "1e30", "step 2: the "),
    "train-rm: an unloadable model": ("train-rm", "--model", lambda t, c, m: _damaged(m, t / "m", _truncate), "cannot load"),
    "collect: an unloadable second policy": (
        "collect",
        "--policy",
        lambda t, c, m: _damaged(m, t / "m", _bad_header),
        "cannot load",
    ),
    "eval: the judge fails": (
        "eval",
        "--judge",
        lambda t, c, m: f"{sys.executable} -c 'import sys; sys.exit(2)'",
        "exited with status 2",
    ),
}


def _script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inputs" / f"script_{abs(hash(text))}.py"
    path.write_text(text)
    return path


def _gain(src: Path, dst: Path, gain: float) -> Path:
    shutil.copytree(src, dst)
    info = json.loads((dst / "rlhfkit.json").read_text())
    info["reward"] = {"gain": gain, "bias": 0.0}
    (dst / "rlhfkit.json").write_text(json.dumps(info))
    return dst


@pytest.mark.parametrize("case", list(FAILING_RUNS))
def test_a_failed_run_leaves_no_output_and_the_corrected_command_runs(cli, classifier_dir, tiny_llama_dir, files, tmp_path, case):
    name, option, make, expected = FAILING_RUNS[case]
    out = out_path(name, tmp_path)
    good = command(name, tiny_llama_dir, files, out)
    if name == "sft":
        good += ["--max-steps", 3, "--max-grad-norm", 0, "--lr", 1e-4]
    bad = set_option(good, option, make(tmp_path, classifier_dir, tiny_llama_dir))
    if name == "collect":
        bad = [*good, "--policy", f"second={bad[bad.index('--policy') + 1]}"]
        bad[bad.index("--policy") + 1] = f"first={tiny_llama_dir}"
    if name == "sft":
        bad = set_option(bad, "--max-grad-norm", 0)
    before = listing(tmp_path)
    assert expected in one_line(cli(*bad))
    assert listing(tmp_path) == before  # no OUT, no metrics.jsonl, no .partial, no temporary
    assert cli(*good).exit_code == 0
    assert out.exists()


# --- 10. training never saves garbage -------------------------------------------------------------


@pytest.mark.parametrize("name", ["sft", "train-rm"])
def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(cli, tiny_llama_dir, files, tmp_path, name):
    out = tmp_path / "out"
    args = command(name, tiny_llama_dir, files, out)
    for option, value in {"--max-steps": 4, "--save-every": 1, "--lr": "1e30", "--max-grad-norm": 0, "--batch-size": 2}.items():
        args = set_option(args, option, value)
    error = one_line(cli(*args))
    assert error.startswith("step 2: the ") and "is not finite" in error
    assert error.endswith(f"{out}/checkpoints/step-000001 is kept (--resume continues from it)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert not (out / "rlhfkit.json").exists() and not (out / "model.safetensors").exists()
    from rlhfkit.data.files import parse_json

    rows = [parse_json(line, out / "metrics.jsonl") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["step"] <= 1 for r in rows)  # numbers only, and only the good step's


def test_no_model_or_checkpoint_with_a_non_finite_weight_is_written(tiny_llama, tokenizer, tmp_path):
    from rlhfkit.training import save_checkpoint

    with torch.no_grad():
        next(tiny_llama.parameters())[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="holds inf"):
        models.save_model_dir(tiny_llama, tokenizer, tmp_path / "model", RunInfo("sft", {}, {}))
    optimizer = torch.optim.AdamW(tiny_llama.parameters())
    with pytest.raises(NonFiniteError, match="step 3: model: weight"):
        save_checkpoint(
            tmp_path / "run", 3, modules={"model": tiny_llama}, optimizers={"model": optimizer}, schedulers={}, state={}
        )
    assert listing(tmp_path) == []


def test_check_finite_names_the_step_and_the_quantity():
    from rlhfkit.training import check_finite

    check_finite(3, loss=torch.tensor(1.0), grad_norm=2.0, reward=torch.zeros(4), value=None)
    with pytest.raises(NonFiniteError, match=r"^step 7: the reward is not finite \(nan\)"):
        check_finite(7, loss=torch.tensor(1.0), reward=torch.tensor([0.0, math.nan]), kl=torch.tensor([math.inf]))
    with pytest.raises(NonFiniteError, match=r"^step 2: the grad norm is not finite \(inf\)"):
        check_finite(2, grad_norm=math.inf)


# --- 11. what a killed run left behind is cleaned by the next run of the same --out -----------------


def test_stale_temporaries_of_a_killed_run_are_cleaned_on_resume(tmp_path):
    from rlhfkit import training

    out = tmp_path / "run"
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "checkpoints" / "step-000002" / "state.json").write_text(json.dumps({"step": 2, "config": {"lr": 1.0}}))
    stale = [
        out / "checkpoints" / ".step-000004.k2j3h4g5",
        out / ".metrics.jsonl.abcd1234.tmp",
        tmp_path / ".run.q1w2e3r4.tmp",
        tmp_path / ".run.old-4242",
    ]
    for path in stale:
        if path.name.endswith(".tmp") and path.parent == out:
            path.write_text("half a metrics.jsonl")
        else:
            path.mkdir()
    others = [tmp_path / ".run.x.q1w2e3r4.tmp", tmp_path / ".other.q1w2e3r4.tmp"]  # another OUT's temporaries stay
    for path in others:
        path.mkdir()
    checkpoint = training.prepare_run_dir(out, True, "sft", {"lr": 1.0})
    assert checkpoint == out / "checkpoints" / "step-000002"
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)


# --- 12. distributed failures end every rank, with a message ------------------------------------

RANK_FAILURES = {
    "rank 1 raises": (
        "import os\ndef f(p, c):\n    if os.environ.get('RANK') == '1':\n        raise ValueError('bad input on rank 1')\n"
        "    return [0.5] * len(c)\n"
    ),
    "rank 0 returns NaN": "import os\ndef f(p, c):\n    return [float('nan') if os.environ['RANK'] == '0' else 0.5] * len(c)\n",
}


@pytest.mark.slow  # torchrun: two processes, seconds of imports each
@pytest.mark.parametrize("case", list(RANK_FAILURES))
def test_a_failure_on_one_rank_ends_every_rank_with_a_message(tiny_llama_dir, files, tmp_path, case):
    script = _script(tmp_path, RANK_FAILURES[case])
    args = set_option(command("ppo", tiny_llama_dir, files, tmp_path / "out"), "--rm", f"python:{script}:f")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "rlhfkit",
        *map(str, set_option(args, "--steps", 3)),
    ]
    logs = tmp_path / "logs"
    cmd[3:3] = ["--redirects", "3", "--log-dir", str(logs)]  # each rank's stderr in a file of its own
    started = time.monotonic()
    run = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    assert run.returncode != 0
    ranks = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(ranks) == ["0", "1"], run.stderr[-3000:]
    failing, other = ("1", "0") if "rank 1" in case else ("0", "1")
    for rank, text in ranks.items():
        assert "Traceback" not in text, text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, text[-3000:]
        if rank == failing:
            assert "bad input on rank 1" in errors[0] or "non-finite score (nan)" in errors[0], errors
        else:
            assert errors[0].startswith(f"error: rank {other}: "), errors  # another rank stopped, or torchrun ended it
    assert seconds < 120, seconds
    assert not (tmp_path / "out").exists(), sorted(str(p) for p in (tmp_path / "out").rglob("*"))


def test_torchruns_sigterm_during_the_clean_up_of_a_failed_rank_does_not_cut_it_short(tmp_path, monkeypatch):
    """torchrun sends SIGTERM to every rank once one fails; a rank already cleaning up its --out
    finishes, and reports its own error (CI once found a half-removed OUT this way)."""
    import os
    import signal

    from rlhfkit import training

    monkeypatch.setattr(training, "init_distributed", lambda device: training.Dist(rank=0, world_size=2))
    real_discard = training.discard_failed_run

    def discard_under_sigterm(out, existed):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the middle of the clean-up
        real_discard(out, existed)

    monkeypatch.setattr(training, "discard_failed_run", discard_under_sigterm)
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match="bad input"):
        with training.distributed_run(torch.device("cpu")) as dist:
            training.prepare_run_dir(out, False, "ppo", {}, dist=dist)
            training.MetricsLog(out, dist)
            assert (out / "metrics.jsonl").exists()
            raise ValueError("bad input")
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) == before


def test_every_training_stage_shares_the_teardown_and_the_finite_guard():
    """Every stage that trains into a run directory (sft, train-rm, ppo, and any new one) sets up and
    tears down through training.distributed_run and checks its step with training.check_finite."""
    stages = Path(__file__).resolve().parent.parent / "src" / "rlhfkit" / "stages"
    training_stages = [p for p in sorted(stages.glob("*.py")) if "prepare_run_dir(" in p.read_text()]
    assert {"sft", "train_rm", "ppo"} <= {p.stem for p in training_stages}
    for path in training_stages:
        source = path.read_text()
        # training.optimizer_step runs check_finite before every step it takes
        assert "distributed_run(" in source and ("check_finite(" in source or "optimizer_step(" in source), path.name
        assert "shutdown_distributed" not in source and "destroy_process_group" not in source, path.name


def test_data_error_locations():
    """DataError always carries its file; a record error its line too (the fuzz tests rely on it)."""
    e = DataError("f.jsonl", 3, "margin", "must be a finite number, got nan")
    assert str(e) == "f.jsonl:3: field 'margin': must be a finite number, got nan" and e.path == "f.jsonl" and e.line == 3
