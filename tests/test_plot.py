"""``rlhfkit plot``: training curves from metrics.jsonl, several runs overlaid, axes in words, and
one-line errors that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

from rlhfkit import plot

PPO_ROWS = [
    {"step": s, "objective/score": 0.1 * s, "objective/kl": 0.02 * s, "objective/kl_coef": 0.05 + 0.001 * s,
     "objective/entropy": 60.0 - s, "policy/clipfrac": 0.01 * s, "val/clipfrac": 0.0, "loss/policy": -0.01,
     "loss/value": 0.2 / s, "lr": 1e-5 * (5 - s), "perf/tokens_per_s": 3000.0 + s, "note": "text is not plotted"}
    for s in range(1, 5)
]  # fmt: skip


def write_run(path: Path, rows: list[dict], stage: str | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if stage:
        (path / "rlhfkit.json").write_text(json.dumps({"stage": stage}))
    return path


def test_ppo_panels_hold_the_metrics_with_words_on_the_axes(tmp_path):
    run = plot.load_run(write_run(tmp_path / "ppo", PPO_ROWS, stage="ppo"))
    fig = plot.figure([run])
    assert fig.panels == [
        "Loss",
        "Reward",
        "KL to the reference and β",
        "Entropy",
        "Clip fractions",
        "Learning rate",
        "Throughput",
    ]
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    kl = axes["KL to the reference and β"]
    assert kl.get_xlabel() == "PPO step (one rollout batch and its updates)" and kl.get_ylabel() == "KL (nats per response)"
    (line,) = kl.get_lines()
    assert list(line.get_xdata()) == [1, 2, 3, 4] and list(line.get_ydata()) == [r["objective/kl"] for r in PPO_ROWS]
    beta = next(ax for ax in fig.axes if ax is not kl and ax.get_position().bounds == kl.get_position().bounds)  # the twin axis
    assert beta.get_ylabel() == "β" and list(beta.get_lines()[0].get_ydata()) == [r["objective/kl_coef"] for r in PPO_ROWS]
    legend = [t.get_text() for t in kl.get_legend().get_texts()]
    assert legend == ["KL to the reference", "β (KL coefficient)"]
    assert [t.get_text() for t in axes["Clip fractions"].get_legend().get_texts()] == ["policy ratio clipped", "value clipped"]


def test_cli_overlays_runs_and_names_them_apart(cli, tmp_path):
    sft_rows = [{"step": 0, "loss/eval": 6.0, "eval/perplexity": 400.0}] + [
        {"step": s, "loss/train": 6.0 - s, "train/lr": 1e-3, "perf/tokens_per_s": 1e4} for s in range(1, 4)
    ] + [{"step": 3, "loss/eval": 3.5, "eval/perplexity": 33.0}]  # fmt: skip
    a = write_run(tmp_path / "a" / "sft", sft_rows, stage="sft")
    b = write_run(
        tmp_path / "b" / "sft",
        [{**r, "loss/train": r["loss/train"] + 1} if "loss/train" in r else r for r in sft_rows],
        stage="sft",
    )
    out = tmp_path / "plots"
    result = cli("plot", a, b, "--out", out)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == {"out": str(out / "curves.png"), "runs": ["a/sft", "b/sft"],
                       "panels": ["Loss", "Held-out perplexity", "Learning rate", "Throughput"],
                       "points": {"a/sft": 5, "b/sft": 5}}  # fmt: skip
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "curves.png")).shape[:2] == (680, 1000)  # 2 × 2 panels at 100 dpi
    fig = plot.figure([plot.load_run(a, "a/sft"), plot.load_run(b, "b/sft")])
    loss = fig.axes[0]
    assert loss.get_xlabel() == "optimizer step" and loss.get_ylabel() == "loss"
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [
        "a/sft: training loss",
        "a/sft: held-out loss",
        "b/sft: training loss",
        "b/sft: held-out loss",
    ]
    lines = {(line.get_color(), line.get_linestyle()) for line in loss.get_lines()}
    assert lines == {("C0", "-"), ("C0", "--"), ("C1", "-"), ("C1", "--")}  # colour = run, line style = series


def test_errors_are_one_line_and_write_nothing(cli, tmp_path):
    out = tmp_path / "plots"
    result = cli("plot", tmp_path / "missing", "--out", out)
    assert (
        result.exit_code == 1
        and result.stderr.strip() == f"error: {tmp_path / 'missing'}: no metrics.jsonl (not a training run directory)"
    )
    bad = write_run(tmp_path / "bad", PPO_ROWS[:1])
    with open(bad / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss/policy": \n')
    result = cli("plot", write_run(tmp_path / "good", PPO_ROWS), bad, "--out", out)
    assert result.exit_code == 1 and result.stderr.strip().startswith(f"error: {bad / 'metrics.jsonl'}:2: not valid JSON")
    nothing = write_run(tmp_path / "nothing", [{"step": 1, "custom/thing": 1.0}])
    result = cli("plot", nothing, "--out", out)
    assert result.exit_code == 1 and "no metric that rlhfkit plot draws" in result.stderr
    assert not out.exists()


def test_write_curves_is_quiet_without_metrics(tmp_path):
    assert plot.write_curves(tmp_path, tmp_path / "curves.png") is None and not (tmp_path / "curves.png").exists()
    run = write_run(
        tmp_path / "rm",
        [{"step": 1, "loss/train": 0.7, "rm/train_accuracy": 0.5}, {"step": 2, "rm/accuracy": 0.75}],
        stage="train-rm",
    )
    assert plot.write_curves(run, run / "curves.png") == run / "curves.png"
    assert plot.figure([plot.load_run(run)]).panels == ["Loss", "Reward-model accuracy"]
