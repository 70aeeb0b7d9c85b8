"""Experiment trackers: ``--report-to tensorboard,wandb,mlflow,trackio`` sends a run's metric stream
where people already look, besides ``metrics.jsonl``.

What a tracker receives is what ``metrics.jsonl`` holds: every line `training.MetricsLog.log` writes
goes to every tracker with the same keys and the same step (numbers only; rank 0 only). Besides:

* the run's options (the stage's config), its stage, rlhfkit's version and the command line, as
  hyper-parameters (TensorBoard's HParams and a text panel, W&B's config, MLflow's params,
  Trackio's config);
* sample tables — a JSONL file the stage appends rows to, such as ppo's ``samples.jsonl`` — as
  tables (W&B, Trackio, MLflow ``log_table``) or as a Markdown table in TensorBoard's text panel,
  at the step of their rows;
* at the end (`finish`, called when the model directory is saved), the run's ``curves.png`` as an
  image (and, for MLflow, the model card and ``rlhfkit.json`` as artifacts).

Where each tracker writes, unless its own environment variables say otherwise:

===========  =====================================================================================
tensorboard  ``RUN/tensorboard/`` (``tensorboard --logdir RUN`` or a parent of several runs)
wandb        ``RUN/wandb/`` (``WANDB_DIR``); project ``rlhfkit`` (``WANDB_PROJECT``), run name =
             RUN's directory name; ``WANDB_MODE=offline`` keeps everything local (``wandb sync``)
mlflow       ``MLFLOW_TRACKING_URI``, else ``sqlite:///RUN/mlflow.db`` with artifacts in
             ``RUN/mlartifacts/``; experiment ``rlhfkit`` (``MLFLOW_EXPERIMENT_NAME``)
trackio      Trackio's own local store (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``);
             project ``rlhfkit`` (``TRACKIO_PROJECT``); ``trackio show`` opens the dashboard
===========  =====================================================================================

MLflow's default here is its SQLite store, not the ``./mlruns`` file store: MLflow 3 keeps the
file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set
(``MLFLOW_TRACKING_URI=file:RUN/mlruns`` still selects it).

A resumed run continues the same tracker run: the ids are kept in ``RUN/trackers.json``;
TensorBoard purges the events after the checkpoint's step (``purge_step``), as ``metrics.jsonl``
drops its lines. A tracker that fails while logging prints one warning and is dropped for the
rest of the run: ``metrics.jsonl`` stays the record, and training goes on.

Each tracker is an optional extra (``pip install rlhfkit[tensorboard]``, ``[wandb]``, ``[mlflow]``,
``[trackio]``); its package is imported only when it is asked for.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rlhfkit.errors import ConfigError

STATE_FILE = "trackers.json"
# what a tracker leaves in the run directory (models.save_model_dir keeps these when it writes the model there)
RUN_FILES = ("tensorboard", "wandb", "mlflow.db", "mlartifacts", STATE_FILE)
TB_TABLE_ROWS = 200  # TensorBoard renders a Markdown table: the first rows of a bigger one


# --- parsing and checking --report-to ----------------------------------------------------------------


def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """``none`` / ``""`` → []; ``"tensorboard,wandb"`` (or a list) → the names, in order, once each
    (`config.report_to_names`, where the choices live)."""
    from rlhfkit.config import report_to_names

    return report_to_names(value)


def _missing_module(name: str) -> str | None:
    """The first package ``name`` needs that is not installed, or None."""
    if name == "tensorboard":
        return None if _installed("tensorboard") or _installed("tensorboardX") else "tensorboard"
    if name == "mlflow":
        if not _installed("mlflow"):
            return "mlflow"
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri or uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql"):
            return next((m for m in ("sqlalchemy", "alembic") if not _installed(m)), None)
        return None
    return None if _installed(name) else name


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_report_to(value: str | Sequence[str] | None) -> list[str]:
    """`parse_report_to`, and every tracker's package installed (found, not imported)."""
    names = parse_report_to(value)
    for name in names:
        if _missing_module(name) is not None:
            raise ConfigError(f"--report-to {name} needs `pip install rlhfkit[{name}]`")
    return names


# --- what every tracker receives ---------------------------------------------------------------------


class RunMeta:
    """What identifies a run to a tracker: stage, directory, name, options, command line."""

    def __init__(self, stage: str, run_dir: str | os.PathLike, options: dict[str, Any], argv: Sequence[str] | None = None):
        from rlhfkit import __version__

        self.stage = stage
        self.run_dir = Path(run_dir)
        self.name = self.run_dir.resolve().name or stage
        self.options = options
        argv = list(sys.argv if argv is None else argv)
        self.command = shlex.join(["rlhfkit", *argv[1:]]) if argv else ""
        self.version = __version__

    @classmethod
    def from_info(cls, info: Any, run_dir: str | os.PathLike) -> RunMeta:
        """From a stage's `provenance.RunInfo` (stage, resolved config, argv)."""
        return cls(info.stage, run_dir, dict(info.config), info.argv)

    def hparams(self) -> dict[str, Any]:
        return {**self.options, "stage": self.stage, "rlhfkit_version": self.version, "command": self.command}

    def flat_hparams(self) -> dict[str, str | int | float | bool]:
        """Scalars only (TensorBoard, MLflow): lists and dicts as JSON, None as ``None``."""
        flat: dict[str, str | int | float | bool] = {}
        for key, value in self.hparams().items():
            if isinstance(value, (bool, int, float, str)):
                flat[key] = value
            else:
                flat[key] = "None" if value is None else json.dumps(value, ensure_ascii=False)
        return flat

    def options_markdown(self) -> str:
        rows = "\n".join(f"| {k} | {_cell(v)} |" for k, v in self.hparams().items())
        return f"| option | value |\n|---|---|\n{rows}"


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics line (what a scalar chart can show), as floats."""
    return {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", "<br>")


def _text(value: Any) -> Any:
    """A table cell: numbers and strings as they are; a chat as ``role: content`` lines; the rest as JSON."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(f"{m.get('role', '?')}: {m['content']}" for m in value)
    return json.dumps(value, ensure_ascii=False)


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update((k, None) for k in row)
    return list(columns)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Trackers print banners on stdout; stdout carries rlhfkit's JSON result, so they go to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# --- the trackers ------------------------------------------------------------------------------------


class Tracker:
    """One tracker's run. ``log`` gets numbers only; ``table`` rows of plain values."""

    name = ""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def files(self, step: int, paths: Sequence[Path]) -> None:
        """The run's final files (``curves.png``, the model card): images as images, the rest where the tracker keeps files."""

    def close(self) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue this tracker's run (kept in ``RUN/trackers.json``)."""
        return {}


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, meta: RunMeta, resume_step: int | None, saved: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:  # tensorboardX alone, without the tensorboard package
            from tensorboardX import SummaryWriter
            from tensorboardX.summary import hparams

        # purge_step: on resume, TensorBoard drops the events after the checkpoint, like metrics.jsonl
        self.writer = SummaryWriter(
            log_dir=str(meta.run_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
        )
        if resume_step is None:
            for summary in hparams(meta.flat_hparams(), {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("rlhfkit/options", meta.options_markdown(), 0)
            self.writer.add_text("rlhfkit/command", f"`{meta.command}`", 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        columns = table_columns(rows)
        shown = rows[:TB_TABLE_ROWS]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in shown]
        if len(rows) > len(shown):
            lines.append(f"\n(the first {len(shown)} of {len(rows)} rows)")
        self.writer.add_text(name, "\n".join(lines), step)

    def files(self, step: int, paths: Sequence[Path]) -> None:
        import matplotlib.image

        for path in paths:
            if path.suffix == ".png":
                self.writer.add_image(path.stem, matplotlib.image.imread(str(path)), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class _RunLogTracker(Tracker):
    """W&B and trackio, whose runs share one API: ``run.log(values, step=)`` with the module's
    ``Table`` and ``Image`` types (``self.lib``: the module)."""

    lib: Any
    run: Any

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        columns = table_columns(rows)
        self.run.log({name: self.lib.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])}, step=step)

    def files(self, step: int, paths: Sequence[Path]) -> None:
        images = {p.stem: self.lib.Image(str(p)) for p in paths if p.suffix == ".png"}
        if images:
            self.run.log(images, step=step)


class WandB(_RunLogTracker):
    name = "wandb"

    def __init__(self, meta: RunMeta, resume_step: int | None, saved: dict[str, Any]):
        import wandb

        resume_id = saved.get("id") if resume_step is not None else None
        self.lib = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "rlhfkit"),
            name=os.environ.get("WANDB_NAME", meta.name),
            dir=os.environ.get("WANDB_DIR", str(meta.run_dir)),
            config=meta.hparams(),
            job_type=meta.stage,
            tags=["rlhfkit", meta.stage],
            id=resume_id,
            resume="allow" if resume_id else None,
            reinit="create_new",  # several rlhfkit runs in one Python process are separate W&B runs
            settings=wandb.Settings(console="off"),  # no capture of stdout (rlhfkit's JSON result)
        )

    def close(self) -> None:
        self.run.finish()

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id}


_MLFLOW_KEY = re.compile(r"[^\w\-. :/]")


class MLflow(Tracker):
    name = "mlflow"

    def __init__(self, meta: RunMeta, resume_step: int | None, saved: dict[str, Any]):
        import logging

        for noisy in ("mlflow.store.db.utils", "alembic.runtime.migration", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)  # the SQLite store's creation log
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str((meta.run_dir / "mlflow.db").resolve())
        self.client = MlflowClient(tracking_uri=self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlhfkit")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            experiment_id = self.client.create_experiment(name)
        else:
            experiment_id = self.client.create_experiment(
                name, artifact_location=(meta.run_dir / "mlartifacts").resolve().as_uri()
            )
        run_id = saved.get("run_id") if resume_step is not None and saved.get("tracking_uri") == self.uri else None
        if run_id is not None:
            self.run_id = run_id
            # params were logged by the first part (MLflow's params never change)
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                experiment_id, run_name=meta.name, tags={"rlhfkit.stage": meta.stage, "rlhfkit.command": meta.command[:5000]}
            )
            self.run_id = run.info.run_id
            params = [Param(_MLFLOW_KEY.sub("_", k)[:250], str(v)[:6000]) for k, v in meta.flat_hparams().items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_MLFLOW_KEY.sub("_", k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        columns = table_columns(rows)
        self.client.log_table(
            self.run_id, data={c: [r.get(c) for r in rows] for c in columns}, artifact_file=f"{name}/step-{step:06d}.json"
        )

    def files(self, step: int, paths: Sequence[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri}


class Trackio(_RunLogTracker):
    name = "trackio"

    def __init__(self, meta: RunMeta, resume_step: int | None, saved: dict[str, Any]):
        import trackio

        self.lib = trackio
        self.project = os.environ.get("TRACKIO_PROJECT", "rlhfkit")
        self.run_name = saved.get("name", meta.name) if resume_step is not None else meta.name
        with _quiet():
            self.run = trackio.init(
                project=self.project,
                name=self.run_name,
                config=meta.hparams(),
                resume="allow" if resume_step is not None else "never",
                auto_log_cpu=False,  # the metric stream is metrics.jsonl's: no system metrics mixed in
                auto_log_gpu=False,
                embed=False,
            )

    def close(self) -> None:
        current = getattr(getattr(self.lib, "context_vars", None), "current_run", None)
        if current is not None and current.get() is self.run:
            self.lib.finish()  # also forgets the run: trackio's exit hook would finish it again (on stdout)
        else:
            self.run.finish()

    def state(self) -> dict[str, Any]:
        return {"project": self.project, "name": self.run_name}


CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


# --- a run's trackers --------------------------------------------------------------------------------


class TableSource:
    """A JSONL file a stage appends sample rows to (``{"step": ..., ...}`` per line): the rows added
    since the last look, read from where the last look stopped."""

    def __init__(self, name: str, path: Path, after_step: int):
        self.name, self.path, self.after_step = name, path, after_step
        self._file: tuple[int, int] | None = None  # (inode, offset): a rewritten file is read again
        self._partial = b""

    def new_rows(self) -> list[dict[str, Any]]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        inode, offset = self._file if self._file is not None else (None, 0)
        if inode != stat.st_ino or stat.st_size < offset:
            offset, self._partial = 0, b""
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = self._partial + f.read()
            self._file = (stat.st_ino, f.tell())
        *lines, self._partial = data.split(b"\n")
        rows = []
        for line in lines:
            if not line.strip():
                continue
            row = json.loads(line)
            step = row.get("step", 0)
            if isinstance(step, (int, float)) and step > self.after_step:
                rows.append({k: _text(v) for k, v in row.items()})
        if rows:
            self.after_step = max(int(r["step"]) for r in rows)
        return rows


class Trackers:
    """The trackers of one run (rank 0). Every call goes to every tracker; one that fails is
    reported once and dropped."""

    def __init__(
        self, names: Sequence[str], meta: RunMeta, resume_step: int | None = None, tables: dict[str, Path] | None = None
    ):
        self.meta = meta
        self.run_dir = meta.run_dir
        earlier = _OPEN.get(_key(meta.run_dir))
        if earlier is not None:  # a run in this directory that stopped without saving its model, in this process
            earlier.close()
        self.trackers: list[Tracker] = []
        self.last_step = resume_step or 0
        self.tables = [TableSource(name, Path(path), resume_step or 0) for name, path in (tables or {}).items()]
        saved = self._saved() if resume_step is not None else {}
        existed = {name for name in RUN_FILES if (self.run_dir / name).exists()}
        try:
            for name in names:
                try:
                    with _quiet():
                        self.trackers.append(CLASSES[name](meta, resume_step, saved.get(name, {})))
                except ImportError:
                    raise ConfigError(f"--report-to {name} needs `pip install rlhfkit[{name}]`") from None
                except Exception as e:  # a tracker's own error (not logged in, server down, ...): one line
                    raise ConfigError(f"--report-to {name}: {_first_line(e)}") from None
        except BaseException:
            self.close()
            for name in RUN_FILES:  # what the trackers that did start wrote: nothing is left half-made
                path = self.run_dir / name
                if name in existed:
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            raise
        self._save_state(saved)
        _OPEN[_key(meta.run_dir)] = self

    def _saved(self) -> dict[str, Any]:
        path = self.run_dir / STATE_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except json.JSONDecodeError:
            return {}

    def _save_state(self, saved: dict[str, Any]) -> None:
        """``RUN/trackers.json``: each tracker's run id (kept for trackers this part of the run does not use)."""
        from rlhfkit.data.files import write_json

        state = {**saved, **{t.name: t.state() for t in self.trackers if t.state()}}
        if state:
            write_json(self.run_dir / STATE_FILE, state)

    def _each(self, what: str, call: Any) -> None:
        for tracker in list(self.trackers):
            try:
                with _quiet():
                    call(tracker)
            except Exception as e:
                from rlhfkit.console import console

                self.trackers.remove(tracker)
                console.print(f"[yellow]--report-to {tracker.name}: {what} failed ({_first_line(e)}); {tracker.name} "
                              "gets nothing more in this run (metrics.jsonl has everything)[/]", highlight=False)  # fmt: skip

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One metrics line (non-numbers left out); sample rows written before it go first, at their own steps."""
        self.forward_tables()
        values = numbers(metrics)
        if values:
            self._each("logging", lambda t: t.log(step, values))
        self.last_step = max(self.last_step, step)

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            rows = [{k: _text(v) for k, v in r.items()} for r in rows]
            self._each(f"the {name} table", lambda t: t.table(step, name, rows))

    def forward_tables(self) -> None:
        for source in self.tables:
            try:
                rows = source.new_rows()
            except (OSError, json.JSONDecodeError):
                continue  # a table is a courtesy; the file itself is the record
            by_step: dict[int, list[dict[str, Any]]] = {}
            for row in rows:
                by_step.setdefault(int(row["step"]), []).append(row)
            for step in sorted(by_step):
                self.table(step, source.name, by_step[step])

    def close(self, files: Sequence[Path] = ()) -> None:
        """Send what is left (sample rows, the final files) and end every tracker's run."""
        if self.trackers:
            self.forward_tables()
            present = [Path(p) for p in files if Path(p).is_file()]
            if present:
                self._each("sending files", lambda t: t.files(self.last_step, present))
            self._each("closing", lambda t: t.close())
        self.trackers = []
        _OPEN.pop(_key(self.run_dir), None)


_OPEN: dict[str, Trackers] = {}


def _key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def start(
    run_dir: str | os.PathLike, info: Any, resume_step: int | None = None, tables: dict[str, Path] | None = None
) -> Trackers | None:
    """The trackers of a training run, from its `RunInfo` (``config["report_to"]``); None when none is asked for."""
    names = check_report_to(info.config.get("report_to"))
    if not names:
        return None
    return Trackers(names, RunMeta.from_info(info, run_dir), resume_step, tables)


def finish(run_dir: str | os.PathLike, files: Sequence[Path] = ()) -> None:
    """End the trackers of the run in ``run_dir``, if it has any (called by ``models.save_model_dir``)."""
    trackers = _OPEN.get(_key(Path(run_dir)))
    if trackers is not None:
        trackers.close(files)


@atexit.register
def _close_all() -> None:
    """A run that stopped before saving its model (an error, Ctrl-C) still closes its trackers."""
    for trackers in list(_OPEN.values()):
        with contextlib.suppress(Exception):
            trackers.close()


# --- eval ----------------------------------------------------------------------------------------------


def eval_metrics(result: dict[str, Any]) -> tuple[dict[str, float], list[tuple[int, dict[str, float]]]]:
    """``rlhfkit eval``'s report as scalars: per model (``NAME/score``, ``NAME/kl``, ``NAME/win_rate/rm``,
    with interval bounds, ``NAME/perplexity``, ...) and Elo ratings, for step 0; and the
    checkpoints of ``--checkpoints`` as a curve over their steps (``checkpoints/score``, ...)."""
    summary: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            summary[key] = float(value)

    def model_stats(prefix: str, stats: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in ("score", "kl", "length"):
            value = stats.get(name) or {}
            if isinstance(value.get("mean"), (int, float)):
                out[f"{prefix}/{name}"] = float(value["mean"])
            if isinstance(value.get("std"), (int, float)):
                out[f"{prefix}/{name}_std"] = float(value["std"])
        for name in ("stopped", "perplexity"):
            if isinstance(stats.get(name), (int, float)):
                out[f"{prefix}/{name}"] = float(stats[name])
        return out

    models = [result.get("baseline"), *(result.get("policies") or []), result.get("best_of")]
    for stats in (m for m in models if m):
        name = stats["name"]
        summary.update(model_stats(name, stats))
        for source, w in (stats.get("win_rate") or {}).items():
            put(f"{name}/win_rate/{source}", w.get("rate"))
            put(f"{name}/win_rate/{source}_ci_low", w.get("ci_low"))
            put(f"{name}/win_rate/{source}_ci_high", w.get("ci_high"))
        put(f"{name}/agreement", (stats.get("agreement") or {}).get("accuracy"))
    for source, table in (result.get("elo") or {}).items():
        for name, rating in (table.get("ratings") or {}).items():
            put(f"elo/{source}/{name}", rating.get("rating"))
    put("agreement/accuracy", (result.get("agreement") or {}).get("accuracy"))
    put("throughput/tokens_per_s", (result.get("throughput") or {}).get("tokens_per_s"))
    curve = sorted(
        (
            (int(c["step"]), {k.replace(f"{c['name']}/", "checkpoints/"): v for k, v in model_stats(c["name"], c).items()})
            for c in result.get("checkpoints") or []
        ),
        key=lambda item: item[0],
    )
    return summary, curve


def eval_rows(samples_file: Path) -> list[dict[str, Any]]:
    """eval's ``samples.jsonl`` (one record per prompt) as one row per completion."""
    rows = []
    with open(samples_file, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            for c in record.get("completions", []):
                rows.append({
                    "prompt_id": record.get("prompt_id"), "prompt": _text(record.get("prompt")), "model": c.get("policy"),
                    "sample": c.get("sample"), "completion": c.get("text"), "score": c.get("score"), "kl": c.get("kl"),
                    "num_tokens": c.get("num_tokens"), "finish_reason": c.get("finish_reason"),
                })  # fmt: skip
    return rows


def report_eval(config: Any, result: dict[str, Any], out: str | os.PathLike | None = None) -> None:
    """Send an ``rlhfkit eval`` report to the trackers of ``config.report_to`` (eval's hook): the
    scalars of `eval_metrics` at step 0, the checkpoint curve at its steps, every completion as the
    ``samples`` table, and the report's plots and ``report.md``. The trackers' files go to
    ``--out`` (the current directory without it)."""
    from rlhfkit.provenance import to_jsonable

    names = check_report_to(getattr(config, "report_to", None))
    if not names:
        return
    run_dir = Path(out) if out else Path.cwd()
    files = result.get("files") or {}
    plots = files.get("plots") or {}
    paths = [Path(p) for p in (plots.values() if isinstance(plots, dict) else plots)]
    paths += [Path(files[k]) for k in ("report", "report_json") if files.get(k)]
    trackers = Trackers(names, RunMeta("eval", run_dir, to_jsonable(config)))
    try:
        summary, curve = eval_metrics(result)
        trackers.log(0, summary)
        for step, values in curve:
            trackers.log(step, values)
        if out and (run_dir / "samples.jsonl").is_file():
            trackers.table(trackers.last_step, "samples", eval_rows(run_dir / "samples.jsonl"))
    finally:
        trackers.close(paths)
