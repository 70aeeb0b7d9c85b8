"""The layers point down only: no module imports from a layer above its own (function-local imports
included), so every layer can be read, tested and reused without the ones above it.

The order is written out here, once; docs/ARCHITECTURE.md draws the same picture. A new top-level
module must be given a layer below (every module of ``stages/`` and ``cli/`` gets its package's).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

# low to high; a module may import from its own layer and the ones before it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("rlhfkit", "rlhfkit.errors", "rlhfkit.console", "rlhfkit.seeds", "rlhfkit.config")),
    ("data", ("rlhfkit.data", "rlhfkit.provenance")),
    ("math", ("rlhfkit.losses", "rlhfkit.stats")),
    (
        "models, text and reports",
        (
            "rlhfkit.chat",
            "rlhfkit.demonstrations",
            "rlhfkit.rm_data",
            "rlhfkit.rankings",
            "rlhfkit.generation",
            "rlhfkit.scoring",
            "rlhfkit.models",
            "rlhfkit.reward",
            "rlhfkit.value",
            "rlhfkit.judge",
            "rlhfkit.report",
            "rlhfkit.plot",
            "rlhfkit.probe",
            "rlhfkit.testing",
            "rlhfkit.tracking",
            "rlhfkit.modelcard",
            "rlhfkit.ilql_heads",
            "rlhfkit.served",
        ),
    ),  # fmt: skip
    ("training", ("rlhfkit.training", "rlhfkit.sharding", "rlhfkit.attention")),
    ("stages", ("rlhfkit.stages", "rlhfkit.label")),
    ("cli", ("rlhfkit.cli", "rlhfkit.__main__")),
]
RANK = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}


def layer_of(module: str) -> int | None:
    """The rank of a module's layer: its own entry, or its package's (longest prefix wins)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        rank = RANK.get(".".join(parts[:end]))
        if rank is not None and (end == len(parts) or ".".join(parts[:end]) != "rlhfkit"):
            return rank
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = SRC / Path(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every rlhfkit import in a file, at any depth (function-local ones too).
    ``from rlhfkit.data import files`` imports ``rlhfkit.data.files``; ``from rlhfkit import
    __version__`` imports ``rlhfkit``."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if is_module(sub) else base))
    return [(line, name) for line, name in found if name == "rlhfkit" or name.startswith("rlhfkit.")]


SOURCES = sorted((SRC / "rlhfkit").rglob("*.py"))


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in SOURCES if layer_of(module_name(p)) is None]
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    here = module_name(path)
    rank = layer_of(here)
    assert rank is not None
    upward = [
        f"{path.relative_to(SRC)}:{line} imports {name} ({LAYERS[there][0]}, above {LAYERS[rank][0]})"
        for line, name in imported_modules(path)
        if (there := layer_of(name)) is not None and there > rank
    ]
    assert not upward, "\n".join(upward)


def test_the_checker_sees_local_and_package_imports(tmp_path):
    """The parser itself: a function-local import and ``from package import module`` are found."""
    found = dict((name, line) for line, name in imported_modules(SRC / "rlhfkit" / "stages" / "sft.py"))
    assert "rlhfkit.training" in found  # from rlhfkit import training
    assert layer_of("rlhfkit.cli.common") == len(LAYERS) - 1 and layer_of("rlhfkit.stages.ppo") == len(LAYERS) - 2
    assert layer_of("rlhfkit.data.files") == 1 and layer_of("rlhfkit") == 0
    local = [name for line, name in imported_modules(SRC / "rlhfkit" / "training.py") if name == "rlhfkit.data.files"]
    assert local, "training imports data.files inside a function"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_private_names_cross_modules(path):
    """A name with a leading underscore stays in its module: what another module needs is public."""
    private = [
        f"{path.relative_to(SRC)}:{node.lineno} imports {alias.name} from {node.module}"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhfkit")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert not private, "\n".join(private)
