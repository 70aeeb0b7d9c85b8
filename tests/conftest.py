"""Shared fixtures and helpers: tiny models and tokenizers built in-process (no download,
HF_HUB_OFFLINE=1), JSONL files under tmp_path, and what a test needs to run rlhfkit in a subprocess.

Helpers are imported by name (``from conftest import write_jsonl, subprocess_env``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models gain nothing from intra-op threads, and tests start subprocesses (CLI runs, torchrun
# ranks) that would oversubscribe the cores; one thread each keeps the suite fast and predictable
os.environ.setdefault("OMP_NUM_THREADS", "1")
# --dtype auto computes in bf16 on CPUs where bf16 is faster (models.cpu_bf16_fast: AMX or AVX512-BF16); the suite
# keeps float32 there so that its numbers do not depend on the machine (tests of the rule set it themselves)
os.environ["RLHFKIT_CPU_BF16"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from rlhfkit.testing import make_model, make_tokenizer, save_tiny_model  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"


# the scripted rewards ppo, its algorithms and collect train against in the tests
E_COUNT = f"python:{REPO / 'examples' / 'scripted_rewards.py'}:letter_e_count"
SLOW_E_COUNT = f"python:{REPO / 'tests' / 'ppo_rewards.py'}:slow_e_count"
# six prompts, plain and chat, of different lengths: the ppo tests' prompt file (`prompts_file`)
PROMPTS = [
    {"id": "a", "prompt": "the cat"},
    {"id": "b", "messages": [{"role": "user", "content": "Tell me a story about a dog."}]},
    {"id": "c", "prompt": "What is the sky"},
    {"id": "d", "messages": [{"role": "user", "content": "hi"}]},
    {"id": "e", "prompt": "one two three"},
    {"id": "f", "prompt": "The river and the sea"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line; returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of an rlhfkit subprocess (CLI runs, torchrun ranks): this checkout's sources,
    no downloads, one thread per process (the suite runs on 2 cores)."""
    env = {"PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**os.environ, **env, **extra}


def rlhfkit_command(*args: object) -> list[str]:
    """``python -m rlhfkit ARGS...`` with this interpreter."""
    return [sys.executable, "-m", "rlhfkit", *[str(a) for a in args]]


def kill_at_checkpoint(proc: subprocess.Popen, out: Path, step: int, poll: float = 0.01) -> None:
    """SIGKILL the run ``proc`` (writing ``out``) as soon as its step-``step`` checkpoint is complete,
    and check that it died mid-run (no model file yet)."""
    deadline = time.time() + 120
    while not (out / "checkpoints" / f"step-{step:06d}" / "state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1].decode()[-2000:]
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()  # it died mid-run


def wait_all(*procs: subprocess.Popen) -> None:
    """Wait for the runs to finish; each must succeed (its stderr's tail shown otherwise)."""
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]


def start_run(*args: object) -> subprocess.Popen:
    """``rlhfkit ARGS...`` in a subprocess of its own (stdout and stderr piped), from the repository root."""
    command = rlhfkit_command(*args)
    return subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)


def sigkill_and_resume(tmp_path: Path, args: list, step: int, poll: float = 0.01) -> tuple[Path, Path]:
    """Run ``rlhfkit ARGS --out FULL`` to the end beside ``rlhfkit ARGS --out KILLED``, which is killed
    (SIGKILL) once its step-``step`` checkpoint is complete and then resumed with ``--resume``.
    Returns (FULL, KILLED), both finished."""
    full_out, killed_out = tmp_path / "full", tmp_path / "killed"
    full = start_run(*args, "--out", full_out)
    kill_at_checkpoint(start_run(*args, "--out", killed_out), killed_out, step, poll)
    wait_all(full, start_run(*args, "--out", killed_out, "--resume"))
    return full_out, killed_out


def stop_and_resume(cli, args: list, tmp_path: Path, step: int, keep: tuple[str, ...] = ("checkpoints", "metrics.jsonl")):
    """In process: run ``rlhfkit ARGS --out RUN`` to the end and keep a copy as FULL; take RUN back to the
    moment after its step-``step`` checkpoint (only ``keep`` left, no later checkpoint; the later lines
    of the files kept stay, as a killed run leaves them: the resumed run must drop them) and resume it.
    Returns (FULL, RUN, the resumed run's click Result)."""
    import shutil

    run, full = tmp_path / "run", tmp_path / "full"
    first = cli(*args, "--out", run)
    assert first.exit_code == 0, first.stderr
    shutil.copytree(run, full)
    for path in run.iterdir():
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for checkpoint in (run / "checkpoints").glob("step-*"):
        if int(checkpoint.name.removeprefix("step-")) > step:
            shutil.rmtree(checkpoint)
    resumed = cli(*args, "--out", run, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    return full, run, resumed


def assert_same_weights(a: Path, b: Path, names: tuple[str, ...] = ("model.safetensors",), exact: bool = True) -> None:
    """The safetensors files ``names`` of model directories ``a`` and ``b`` hold the same tensors: bit
    for bit, or (``exact=False``) within torch.testing.assert_close's float tolerance."""
    from safetensors.torch import load_file

    for name in names:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys(), name
        for k in x:
            if exact:
                assert torch.equal(x[k], y[k]), f"{name}: {k}"
            else:
                torch.testing.assert_close(x[k], y[k], msg=f"{name}: {k}")


def measured_metrics(out: Path, drop: tuple[str, ...] = ("perf/",)) -> list[dict]:
    """The metrics lines of the run in ``out`` without the timing keys (prefixes ``drop``), which
    differ between two runs that compute the same."""
    from rlhfkit.training import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(out)]


@pytest.fixture()
def prompts_file(tmp_path):
    """`PROMPTS` as a prompt file under tmp_path."""
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture()
def tiny_llama(tokenizer):
    return make_model(tokenizer, arch="llama")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama + tokenizer saved as a plain Hugging Face directory (read-only for tests)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", arch="gpt2")


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture()
def cli(runner):
    """Invoke ``rlhfkit ARGS...`` in-process; returns the click Result (stdout/stderr separate)."""
    from rlhfkit.cli import app

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke
