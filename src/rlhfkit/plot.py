"""Training curves from ``metrics.jsonl``: one PNG with a panel per kind of quantity.

``rlhfkit plot RUN_DIR...`` draws every run it is given into the same panels (one colour per run,
one line style per series), so runs can be compared; every training stage also writes
``curves.png`` into its run directory when it saves its model (`write_curves`).

A panel is drawn when at least one run has one of its metrics:

=====================  ===================================================================
panel                  metrics (the keys of ``metrics.jsonl``)
=====================  ===================================================================
loss                   ``loss/*`` (training and held-out loss; PPO's policy and value loss)
reward                 ``objective/score``, ``objective/rm_score``, ``objective/rlhf_reward``,
                       ``rm/reward_mean``
reward-model accuracy  ``rm/train_accuracy``, ``rm/accuracy``
KL and β               ``objective/kl`` (left axis), ``objective/kl_coef`` = β (right axis)
entropy                ``objective/entropy``
clip fractions         ``policy/clipfrac``, ``val/clipfrac``
held-out perplexity    ``eval/perplexity``
learning rate          ``lr``, ``*/lr``
gradient norm          ``*grad_norm``
throughput             ``*/tokens_per_s``
=====================  ===================================================================

Plots use matplotlib's object API (``matplotlib.figure.Figure`` on the Agg canvas): no pyplot
state, no display. Values that are missing or not finite are left out of their line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.errors import DataError

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


@dataclass(frozen=True)
class Panel:
    """One subplot: its title, the y-axis label, and the series it draws (key, words)."""

    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...] = ()
    match: Callable[[str], bool] | None = None  # more keys, labelled by the key itself
    right: tuple[tuple[str, str], ...] = ()  # series on a second y-axis
    right_label: str = ""
    log: bool = False

    def keys(self, available: Sequence[str]) -> list[tuple[str, str]]:
        """The (key, label) pairs of this panel present in ``available``, known keys first."""
        known = [(k, label) for k, label in self.series if k in available]
        named = {k for k, _ in self.series} | {k for k, _ in self.right}
        extra = [(k, k) for k in available if self.match is not None and k not in named and self.match(k)]
        return known + sorted(extra)


PANELS: tuple[Panel, ...] = (
    Panel(
        "Loss",
        "loss",
        (
            ("loss/train", "training loss"),
            ("loss/eval", "held-out loss"),
            ("loss/policy", "policy loss (clipped surrogate)"),
            ("loss/value", "value loss"),
            ("loss/ptx", "pretraining loss (ptx)"),
        ),  # fmt: skip
        match=lambda k: k.startswith("loss/") and not k.endswith("_initial"),
    ),
    Panel(
        "Reward",
        "reward",
        (
            ("objective/score", "score (normalised reward-model score)"),
            ("objective/rm_score", "reward-model score before clipping"),
            ("objective/rlhf_reward", "score − β·KL"),
            ("rm/reward_mean", "mean raw reward of the training batch"),
        ),  # fmt: skip
    ),
    Panel(
        "Reward-model accuracy",
        "pairs ranked the right way",
        (("rm/train_accuracy", "training accuracy"), ("rm/accuracy", "held-out accuracy")),
    ),
    Panel(
        "KL to the reference and β",
        "KL (nats per response)",
        (("objective/kl", "KL to the reference"),),
        right=(("objective/kl_coef", "β (KL coefficient)"),),
        right_label="β",
    ),
    Panel("Entropy", "entropy (nats per response)", (("objective/entropy", "policy entropy"),)),
    Panel(
        "Clip fractions",
        "share of tokens clipped",
        (("policy/clipfrac", "policy ratio clipped"), ("val/clipfrac", "value clipped")),
        match=lambda k: k.endswith("clipfrac"),
    ),
    Panel("Held-out perplexity", "perplexity", (("eval/perplexity", "held-out perplexity"),), log=True),
    Panel(
        "Learning rate",
        "learning rate",
        (("lr", "learning rate"), ("train/lr", "learning rate"), ("optim/lr", "learning rate")),
        match=lambda k: k == "lr" or k.endswith("/lr"),
    ),
    Panel(
        "Gradient norm",
        "gradient norm (before clipping)",
        (("train/grad_norm", "gradient norm"), ("optim/grad_norm", "gradient norm"), ("policy/grad_norm", "gradient norm")),
        match=lambda k: k.endswith("grad_norm"),
    ),
    Panel(
        "Throughput",
        "tokens per second",
        (("throughput/tokens_per_s", "tokens per second"), ("perf/tokens_per_s", "tokens per second")),
        match=lambda k: k.endswith("tokens_per_s"),
    ),
)

LINESTYLES = ("-", "--", ":", "-.")


@dataclass
class Run:
    """One run's metrics: ``rows`` are the lines of its ``metrics.jsonl``."""

    name: str
    path: Path
    stage: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric, without missing or non-finite values."""
        xs, ys = [], []
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            step = row.get("step")
            if isinstance(step, (int, float)):
                xs.append(float(step))
                ys.append(float(value))
        return xs, ys

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update((k, None) for k in row if k != "step")
        return list(seen)


def metrics_path(run: str | os.PathLike) -> Path:
    """``RUN/metrics.jsonl`` for a run directory; a ``.jsonl`` file is taken as is."""
    path = Path(run)
    return path if path.suffix == ".jsonl" and not path.is_dir() else path / METRICS_FILE


def load_run(run: str | os.PathLike, name: str | None = None) -> Run:
    """Read a run directory's ``metrics.jsonl`` (and its stage from ``rlhfkit.json`` when there is one)."""
    path = metrics_path(run)
    if not path.is_file():
        what = (
            "no such file"
            if path.suffix == ".jsonl" and Path(run) == path
            else f"no {METRICS_FILE} (not a training run directory)"
        )
        raise DataError(run if Path(run) != path else path, None, None, what)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, line_no, None, f"not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(path, line_no, None, f"expected a JSON object, got {type(row).__name__}")
            step = row.get("step")
            if isinstance(step, bool) or not isinstance(step, (int, float)):
                raise DataError(path, line_no, "step", "missing or not a number")
            rows.append(row)
    if not rows:
        raise DataError(path, None, None, "no metrics (the file is empty)")
    stage = ""
    info = path.parent / "rlhfkit.json"
    if info.is_file():
        try:
            stage = str(json.loads(info.read_text(encoding="utf-8")).get("stage", ""))
        except (json.JSONDecodeError, AttributeError):
            stage = ""
    return Run(name or _default_name(path), path, stage, rows)


def _default_name(path: Path) -> str:
    return path.parent.name if path.name == METRICS_FILE else path.stem


def run_names(paths: Sequence[Path]) -> list[str]:
    """Short distinct names: each run's directory name, with as many parent directories as it takes
    to tell the runs apart (``a/ppo`` and ``b/ppo``)."""
    parts = [(p.parent if p.name == METRICS_FILE else p.with_suffix("")).resolve().parts for p in paths]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return ["/".join(p[-depth:]) for p in parts]


def _x_label(runs: Sequence[Run]) -> str:
    stages = {r.stage for r in runs}
    if stages == {"ppo"}:
        return "PPO step (one rollout batch and its updates)"
    if stages and "ppo" not in stages and "" not in stages:
        return "optimizer step"
    return "step (optimizer steps; PPO steps for ppo runs)"


def panels_for(runs: Sequence[Run]) -> list[tuple[Panel, list[tuple[str, str]], list[tuple[str, str]]]]:
    """The panels that have data in at least one run, with their left and right (key, label) series."""
    available: dict[str, None] = {}
    for run in runs:
        available.update((k, None) for k in run.keys())
    keys = list(available)
    drawn = []
    for panel in PANELS:
        left = panel.keys(keys)
        right = [(k, label) for k, label in panel.right if k in available]
        if left or right:
            drawn.append((panel, left, right))
    return drawn


def figure(runs: Sequence[Run], title: str | None = None) -> Any:
    """The figure of ``runs``: one panel (axes) per `Panel` that has data, titled, with both axes
    labelled in words and a legend; ``fig.panels`` lists the panels' titles."""
    from matplotlib.figure import Figure

    drawn = panels_for(runs)
    if not drawn:
        known = ", ".join(p.title.lower() for p in PANELS)
        raise DataError(runs[0].path, None, None, f"no metric that rlhfkit plot draws ({known})")
    cols = 1 if len(drawn) == 1 else 2 if len(drawn) <= 4 else 3
    rows = math.ceil(len(drawn) / cols)
    width, height = 5.0 * cols, 3.2 * rows + 0.4
    fig = Figure(figsize=(width, height), dpi=100)
    # margins in inches (the constrained layout engine would double the time of a plot: 0.6 s -> 0.35 s)
    fig.subplots_adjust(
        left=0.75 / width, right=1 - 0.8 / width, bottom=0.55 / height, top=1 - 0.75 / height, wspace=0.36, hspace=0.45
    )
    several = len(runs) > 1
    for index, (panel, left, right) in enumerate(drawn):
        ax = fig.add_subplot(rows, cols, index + 1)
        ax.set_title(panel.title)
        ax.set_xlabel(_x_label(runs))
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        handles = _draw(ax, runs, left, several, offset=0)
        if right:
            twin = ax.twinx()
            twin.set_ylabel(panel.right_label)
            handles += _draw(twin, runs, right, several, offset=len({label for _, label in left}))
        if panel.log and all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
        if handles:
            ax.legend(handles=handles, fontsize="small", loc="best")
    fig.suptitle(title or ", ".join(r.name for r in runs))
    fig.panels = [p.title for p, _, _ in drawn]
    return fig


def plot_runs(runs: Sequence[Run], path: str | os.PathLike, title: str | None = None) -> dict[str, Any]:
    """Draw ``runs`` into one PNG at ``path`` (written atomically); return what was drawn."""
    from rlhfkit.data.files import atomic_open

    fig = figure(runs, title)
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return {"out": str(path), "runs": [r.name for r in runs], "panels": fig.panels}


def _draw(ax: Any, runs: Sequence[Run], series: Sequence[tuple[str, str]], several: bool, offset: int) -> list[Any]:
    """One line per (run, series). Several runs: colour = run, line style = series; one run:
    colour = series. Series with the same words (``lr`` and ``optim/lr``) look the same;
    ``offset`` counts the series already drawn in the panel (on the other y-axis)."""
    labels = list(dict.fromkeys(label for _, label in series))
    handles, labels_seen = [], set()
    for r, run in enumerate(runs):
        for key, label in series:
            xs, ys = run.series(key)
            if not xs:
                continue
            s = labels.index(label) + offset
            style, color = (LINESTYLES[s % len(LINESTYLES)], f"C{r % 10}") if several else ("-", f"C{s % 10}")
            text = f"{run.name}: {label}" if several else label
            (line,) = ax.plot(xs, ys, style, color=color, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.5)
            if text not in labels_seen:
                line.set_label(text)
                labels_seen.add(text)
                handles.append(line)
    return handles


def plot(runs: Sequence[str | os.PathLike], out: str | os.PathLike = ".") -> dict[str, Any]:
    """``rlhfkit plot``: the runs' curves overlaid in ``OUT/curves.png``. Every run is read (and
    checked) before anything is written."""
    if not runs:
        from rlhfkit.errors import ConfigError

        raise ConfigError("RUN_DIR: at least one run directory (or metrics.jsonl file)")
    paths = [metrics_path(r) for r in runs]
    names: Sequence[str | None] = run_names(paths) if len(paths) > 1 else [None]
    loaded = [load_run(r, name) for r, name in zip(runs, names)]
    result = plot_runs(loaded, Path(out) / CURVES_FILE)
    result["points"] = {r.name: len(r.rows) for r in loaded}
    return result


def write_curves(run_dir: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """The end-of-training hook: ``run_dir``'s curves as ``path``; None when the run has no
    metrics (a model directory written outside a training loop) or none that is plotted."""
    source = Path(run_dir) / METRICS_FILE
    if not source.is_file():
        return None
    try:
        run = load_run(run_dir)
    except DataError:
        return None  # an empty metrics file: nothing to draw
    if not panels_for([run]):
        return None
    plot_runs([run], path, title=f"{run.stage or 'run'}: {Path(run_dir).name}")
    return Path(path)
