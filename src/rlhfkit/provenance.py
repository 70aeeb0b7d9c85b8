"""``rlhfkit.json``: what made an artifact (stage, resolved config, input hashes, versions, times)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("rlhfkit", "torch", "transformers", "datasets", "safetensors", "peft", "tokenizers", "gguf")


def sha256_path(path: str | os.PathLike) -> str | None:
    """sha256 of a file; for a directory, of its files' relative names and hashes (sorted).
    None for what is not on disk (a hub id, ``-``, a ``python:`` reward)."""
    path = Path(path)
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if path.is_dir():
        h = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            if "checkpoints" in file.relative_to(path).parts:
                continue
            h.update(str(file.relative_to(path)).encode())
            h.update((sha256_path(file) or "").encode())
        return h.hexdigest()
    return None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class RunInfo:
    """Started when a stage starts; written beside every artifact the stage produces.

    ``inputs`` maps a role (``model``, ``data``, ...) to a path or model argument; their sha256 is
    taken when the stage starts, so a file that changes during the run cannot go unnoticed.
    """

    def __init__(self, stage: str, config: Any, inputs: dict[str, str | list[str] | None]):
        self.stage = stage
        self.config = to_jsonable(config)
        self.inputs = {}
        for role, value in inputs.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            self.inputs[role] = [{"path": str(v), "sha256": sha256_path(v)} for v in values if v is not None]
        self.started = now()
        self.argv = list(sys.argv)

    def as_dict(self, metrics: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "config": self.config,
            "inputs": self.inputs,
            "versions": package_versions(),
            "argv": self.argv,
            "started": self.started,
            "finished": now(),
            "metrics": to_jsonable(metrics or {}),
            **to_jsonable(extra),
        }

    def write(self, path: str | os.PathLike, metrics: dict[str, Any] | None = None, **extra: Any) -> None:
        from rlhfkit.data.files import write_json

        write_json(path, self.as_dict(metrics, **extra))


def read_run_info(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``rlhfkit.json`` of a model directory, or {} for a model rlhfkit did not write.

    Read strictly (`rlhfkit.data.files.parse_json`): a garbled file, ``NaN``/``Infinity``, or a
    reward normalisation (``reward.gain``, ``reward.bias``) that is not a finite number is a
    DataError at FILE:LINE, never a value."""
    from rlhfkit.data.files import parse_json
    from rlhfkit.errors import DataError

    path = Path(model_dir) / "rlhfkit.json"
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"not valid UTF-8 (byte {e.start})") from None
    info = parse_json(text, path)
    if not isinstance(info, dict):
        raise DataError(path, 1, None, f"expected a JSON object, got {type(info).__name__}")
    reward = info.get("reward")
    if reward is not None and not isinstance(reward, dict):
        raise DataError(path, _line_of(text, '"reward"'), "reward", f"expected an object, got {type(reward).__name__}")
    for key in ("gain", "bias"):
        value = (reward or {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise DataError(path, _line_of(text, f'"{key}"'), f"reward.{key}", f"must be a finite number, got {value!r}")
    return info


def _line_of(text: str, needle: str) -> int:
    at = text.find(needle)
    return text.count("\n", 0, at) + 1 if at >= 0 else 1
