"""``--report-to``: a real tiny ``rlhfkit sft`` run (the CLI, in a subprocess) reports to
TensorBoard, W&B (offline), MLflow and Trackio at once, and each is read back with the tracker's
own reader and compared value by value and step by step with ``metrics.jsonl``; sample tables,
resume, and the error paths are checked on `training.MetricsLog` directly."""

from __future__ import annotations

import glob
import json
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import rlhfkit_command, subprocess_env
from rlhfkit import tracking
from rlhfkit.errors import ConfigError
from rlhfkit.provenance import RunInfo
from rlhfkit.testing import corpus
from rlhfkit.training import MetricsLog, read_metrics

ALL = "tensorboard,wandb,mlflow,trackio"


def numeric_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {key: [(step, value), ...]} (what a scalar chart holds)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(key, []).append((row["step"], float(value)))
    return series


def merged_by_step(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Lines of the same step merged (W&B keeps one history row per step)."""
    merged: dict[int, dict[str, float]] = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update(
            {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        )
    return merged


@pytest.fixture(scope="module")
def tracked_sft(tmp_path_factory, tiny_llama_dir):
    """One tiny sft run through the CLI with every tracker; W&B offline, Trackio's store in tmp."""
    root = tmp_path_factory.mktemp("tracked")
    lines = corpus(160, seed=3)
    demos = root / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": lines[2 * i], "response": lines[2 * i + 1]}) + "\n" for i in range(60)))
    out = root / "sft"
    env = subprocess_env(WANDB_MODE="offline", TRACKIO_DIR=str(root / "trackio"))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "TRACKIO_PROJECT"):
        env.pop(name, None)
    proc = subprocess.run(
        rlhfkit_command("sft", "--model", tiny_llama_dir, "--data", demos, "--out", out, "--epochs", 1, "--batch-size", 8,
                        "--max-length", 48, "--val-fraction", 0.2, "--eval-every", 3, "--log-every", 1, "--lr", 3e-3,
                        "--report-to", ALL),
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout is the JSON result alone: the trackers' banners went to stderr
    rows = read_metrics(out)
    assert len(rows) == 7 and rows[0]["step"] == 0 and "loss/eval" in rows[0]  # step 0: held-out loss before training
    return {"out": out, "rows": rows, "result": result, "trackio_dir": root / "trackio"}


def test_tensorboard_events_read_back_equal_metrics_jsonl(tracked_sft):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, rows = tracked_sft["out"], tracked_sft["rows"]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    expected = numeric_series(rows)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():
        events = acc.Scalars(key)
        # TensorBoard keeps scalars as float32: the same value, rounded to float32, at the same step
        assert [(e.step, e.value) for e in events] == [(step, float(np.float32(v))) for step, v in points], key
    # the options as hyper-parameters (HParams) and as a text panel; the curves as an image
    start = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["lr"].number_value == 3e-3 and hparams["stage"].string_value == "sft"
    assert "--report-to" in hparams["command"].string_value
    assert "rlhfkit/options/text_summary" in acc.Tags()["tensors"]
    assert [e.step for e in acc.Images("curves")] == [rows[-1]["step"]]


def wandb_records(path: Path):
    """The records of a W&B transaction log (``run-ID.wandb``): a LevelDB-style log of 32 KiB blocks
    of CRC-checked chunks after a 7-byte ``:W&B`` header, each record a ``wandb_internal.Record``."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", raw[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    pos, chunks, block = 7, b"", 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        chunks += data
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            yield wandb_internal_pb2.Record.FromString(chunks)
            chunks = b""


def test_wandb_offline_run_holds_the_same_history(tracked_sft):
    out, rows = tracked_sft["out"], tracked_sft["rows"]
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]["id"]
    files = glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(files) == 1
    history: dict[int, dict[str, float]] = {}
    config: dict[str, object] = {}
    exit_code = None
    for record in wandb_records(Path(files[0])):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = {
                k: v for k, v in items.items() if not k.startswith("_") and k != "curves" and not k.startswith("curves/")
            }
        elif kind == "run":
            config = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.run.config.update}
            assert record.run.project == "rlhfkit" and record.run.display_name == "sft"
        elif kind == "exit":
            exit_code = record.exit.exit_code
    assert history == merged_by_step(rows)  # the same keys, steps and values (JSON floats: exact)
    assert config["lr"] == 3e-3 and config["val_fraction"] == 0.2 and config["stage"] == "sft" and config["report_to"] == ALL
    assert exit_code == 0  # finished when the model directory was saved


def test_mlflow_run_read_back_through_its_client(tracked_sft):
    from mlflow.tracking import MlflowClient

    out, rows = tracked_sft["out"], tracked_sft["rows"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhfkit")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "sft" and run.info.status == "FINISHED"
    assert run.info.run_id == json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    assert run.data.params["lr"] == "0.003" and run.data.params["stage"] == "sft" and run.data.tags["rlhfkit.stage"] == "sft"
    expected = numeric_series(rows)
    assert set(run.data.metrics) == set(expected)
    for key, points in expected.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == points, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "README.md", "rlhfkit.json"} <= artifacts


def test_trackio_run_read_back_through_its_storage(tracked_sft, monkeypatch):
    from trackio import sqlite_storage

    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", tracked_sft["trackio_dir"])
    logs = sqlite_storage.SQLiteStorage.get_logs("rlhfkit", "sft")
    got: dict[int, dict[str, float]] = {}
    for entry in logs:
        values = {k: v for k, v in entry.items() if k not in ("step", "timestamp") and isinstance(v, (int, float))}
        if values:
            got.setdefault(entry["step"], {}).update(values)
    assert got == merged_by_step(tracked_sft["rows"])


# --- sample tables, resume, errors (MetricsLog directly) -------------------------------------------


def run_info(stage: str, report_to: str, **options) -> RunInfo:
    return RunInfo(stage, {"report_to": report_to, "lr": 0.5, **options}, {})


def test_sample_rows_become_tables_at_their_steps(tmp_path, monkeypatch):
    """ppo's way: samples.jsonl rows written after a step's metrics line reach the trackers at their
    own step (TensorBoard text, MLflow tables in a local file store)."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "ppo"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{run / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    samples = run / "samples.jsonl"
    log = MetricsLog(run, run=run_info("ppo", "tensorboard,mlflow"), tables={"samples": samples})
    for step in (1, 2, 3):
        log.log(step, {"objective/score": 0.1 * step, "note": "not a number"})
        if step in (1, 3):
            with open(samples, "a") as f:
                for i in range(2):
                    prompt = [{"role": "user", "content": f"q{step}{i} | pipe"}]
                    f.write(
                        json.dumps({"step": step, "prompt": prompt, "response": f"r{step}{i}", "score": step + i / 10}) + "\n"
                    )
    log.close()

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("samples/text_summary")}
    assert sorted(texts) == [1, 3]
    assert "| step | prompt | response | score |" in texts[3] and "| 3 | user: q31 \\| pipe | r31 | 3.1 |" in texts[3]
    assert acc.Tags()["scalars"] == ["objective/score"]  # "note" is not a number: metrics.jsonl only

    client = MlflowClient(tracking_uri=f"file:{run / 'mlruns'}")
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    assert {a.path for a in client.list_artifacts(run_id, "samples")} == {"samples/step-000001.json", "samples/step-000003.json"}
    table = json.loads(Path(client.download_artifacts(run_id, "samples/step-000003.json", str(tmp_path))).read_text())
    assert table["columns"] == ["step", "prompt", "response", "score"] and table["data"][1] == [3, "user: q31 | pipe", "r31", 3.1]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_resume_continues_the_tensorboard_run_from_the_checkpoint(tmp_path):
    """A run killed after step 5 and resumed from its step-3 checkpoint: TensorBoard drops the
    events after step 3 (purge_step), as metrics.jsonl drops its lines."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "sft"
    first = MetricsLog(run, run=run_info("sft", "tensorboard"))
    for step in range(1, 6):
        first.log(step, {"loss/train": float(step)})
    first.trackers.trackers[0].writer.flush()  # killed: no close
    resumed = MetricsLog(run, resume_step=3, run=run_info("sft", "tensorboard"))
    for step in range(4, 7):
        resumed.log(step, {"loss/train": 10.0 + step})
    resumed.close()
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    points = [(e.step, e.value) for e in acc.Scalars("loss/train")]
    assert (
        points
        == [(r["step"], r["loss/train"]) for r in read_metrics(run)]
        == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
    )


def test_report_to_values_and_missing_extras(monkeypatch):
    assert tracking.parse_report_to("none") == [] and tracking.parse_report_to("") == []
    assert tracking.parse_report_to(" TensorBoard, wandb,tensorboard") == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"^--report-to: unknown tracker 'comet'"):
        tracking.parse_report_to("tensorboard,comet")
    with pytest.raises(ConfigError, match=r"^--report-to: 'none' cannot be combined"):
        tracking.parse_report_to("none,wandb")
    monkeypatch.setattr(tracking, "_installed", lambda module: module != "wandb")
    with pytest.raises(ConfigError) as error:
        tracking.check_report_to("tensorboard,wandb")
    assert str(error.value) == "--report-to wandb needs `pip install rlhfkit[wandb]`"


def test_cli_refuses_a_missing_extra_before_doing_anything(cli, monkeypatch, tiny_llama_dir, tmp_path):
    monkeypatch.setattr(tracking, "_installed", lambda module: module not in ("mlflow", "sqlalchemy"))
    out = tmp_path / "sft"
    result = cli("sft", "--model", tiny_llama_dir, "--data", tmp_path / "none.jsonl", "--out", out, "--report-to", "mlflow")
    assert result.exit_code == 1 and result.stderr.strip() == "error: --report-to mlflow needs `pip install rlhfkit[mlflow]`"
    assert result.stdout == "" and not out.exists()
    # a config file's value is checked the same way
    (tmp_path / "c.yaml").write_text("report-to: tensorboard,neptune\n")
    result = cli("sft", "--config", tmp_path / "c.yaml", "--model", tiny_llama_dir, "--out", out)
    assert result.exit_code == 1 and "--report-to: unknown tracker 'neptune'" in result.stderr and not out.exists()


def test_a_tracker_that_cannot_start_leaves_nothing_behind(tmp_path, monkeypatch):
    """wandb fails (say, not logged in) after TensorBoard started: one ConfigError line, and the run
    directory holds neither TensorBoard's files nor metrics.jsonl, so the same command can run again."""

    def not_logged_in(self, meta, resume_step, saved):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore detail")

    monkeypatch.setattr(tracking.WandB, "__init__", not_logged_in)
    run = tmp_path / "sft"
    with pytest.raises(ConfigError) as error:
        MetricsLog(run, run=run_info("sft", "tensorboard,wandb"))
    assert str(error.value) == "--report-to wandb: api_key not configured (no-tty). call wandb.login(key=[your_api_key])"
    assert list(run.iterdir()) == [] and tracking._OPEN == {}


def test_eval_report_goes_to_the_trackers(tmp_path):
    """eval's hook: the report's numbers per model at step 0, the checkpoint curve at its steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhfkit.config import EvalConfig

    stats = {
        "score": {"mean": 0.5, "std": 1.0},
        "kl": {"mean": 0.2, "std": 0.1},
        "length": {"mean": 9.0, "std": 2.0},
        "stopped": 0.75,
        "perplexity": None,
    }
    result = {
        "baseline": {"name": "sft", **stats},
        "policies": [{"name": "ppo", **stats, "win_rate": {"rm": {"rate": 0.625, "ci_low": 0.5, "ci_high": 0.75}}}],
        "checkpoints": [
            {"step": 20, "name": "step-20", **stats},
            {"step": 10, "name": "step-10", **stats, "score": {"mean": 0.25, "std": 1.0}},
        ],
        "elo": {"rm": {"ratings": {"ppo": {"rating": 1040.0}, "sft": {"rating": 1000.0}}}},
    }
    config = EvalConfig(policy=["x"], baseline="y", prompts="p.jsonl", out=str(tmp_path), report_to="tensorboard")
    tracking.report_eval(config, result, tmp_path)
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("ppo/win_rate/rm")] == [(0, 0.625)]
    assert [(e.step, e.value) for e in acc.Scalars("elo/rm/ppo")] == [(0, 1040.0)]
    assert [(e.step, e.value) for e in acc.Scalars("checkpoints/score")] == [(10, 0.25), (20, 0.5)]
    assert "sft/perplexity" not in acc.Tags()["scalars"]  # None: not measured
