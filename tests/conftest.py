"""Shared fixtures: tiny models and tokenizers built in-process (no download, HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models gain nothing from intra-op threads, and tests start subprocesses (CLI runs, torchrun
# ranks) that would oversubscribe the cores; one thread each keeps the suite fast and predictable
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from rlhfkit.testing import make_model, make_tokenizer, save_tiny_model  # noqa: E402

torch.set_num_threads(1)


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
