#!/usr/bin/env python3
"""PPO, A2C, RLOO, GRPO, DPO and ILQL from the same SFT model, reward model and comparisons of a
finished demo run, then one ``rlhfkit eval`` of all six against the SFT model: a table of the
annotator's win-rate (with its 95% interval), the reward model's win-rate and score, the KL to the
SFT model, and each training run's wall time and peak memory.

Usage: python examples/compare.py --base runs/demo-tiny     (make -C examples compare)
       python examples/compare.py --base runs/demo          (the SmolLM2 demo run)

The online algorithms take the settings of the demo's own PPO run (``BASE/ppo/rlhfkit.json``:
steps, rollouts per step, response length, learning rate, β, critic, epochs), so they spend the
same number of rollouts; rloo and grpo sample ``--k`` per prompt out of the same rollouts per step.
DPO and ILQL read the demo's comparisons and validation split (``BASE/comparisons.jsonl``,
``BASE/comparisons.val.jsonl``) with the PPO run's learning rate unless told otherwise. The eval
uses the demo eval's sampling settings (``BASE/eval.json``). Everything lands in ``BASE/compare/``;
a finished run there is reused (delete it to train again), so the eval can be repeated cheaply.

Wall time and peak memory are the training command's own (``os.wait4``: the child's maximum
resident set size, CPU memory; on a GPU the accelerator's memory is not in it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ALGOS = ("ppo", "a2c", "rloo", "grpo", "dpo", "ilql")
# the demo's PPO options that every online algorithm copies (others keep their defaults)
ONLINE_OPTIONS = (
    "steps",
    "batch_size",
    "mini_batch_size",
    "grad_accum",
    "max_new_tokens",
    "lr",
    "kl_coef",
    "temperature",
    "seed",
    "schedule",
    "ppo_epochs",
    "value_head",
    "max_prompt_length",
)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` (stdout to ``log``, stderr through); return (wall seconds, peak RSS in MiB)."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"compare: {cmd[0]} {cmd[1]} failed with exit code {code}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="runs/demo-tiny", help="a finished demo run (sft/, rm/, ppo/, comparisons.jsonl)")
    parser.add_argument("--out", default="", help="where the runs go (default BASE/compare)")
    parser.add_argument("--algos", default=",".join(ALGOS), help="comma-separated subset of " + ",".join(ALGOS))
    parser.add_argument("--data", default="examples/data", help="prompts.jsonl and eval_prompts.jsonl")
    parser.add_argument("--k", type=int, default=4, help="rloo, grpo: samples per prompt")
    parser.add_argument("--offline-lr", type=float, default=None, help="dpo, ilql learning rate (default: the PPO run's)")
    parser.add_argument("--offline-epochs", type=int, default=1, help="dpo, ilql epochs over the comparisons")
    parser.add_argument("--dpo-beta", type=float, default=0.1)
    parser.add_argument("--ilql-beta", type=float, default=4.0, help="ILQL's sampling shift β·(Q − V)")
    parser.add_argument("--rlhfkit", default="rlhfkit", help="the rlhfkit command")
    args = parser.parse_args()

    base = Path(args.base)
    out = Path(args.out) if args.out else base / "compare"
    out.mkdir(parents=True, exist_ok=True)
    for needed in ("sft", "rm", "ppo/rlhfkit.json", "comparisons.jsonl", "eval.json"):
        if not (base / needed).exists():
            sys.exit(f"compare: {base / needed} is missing; run the demo first (make demo-tiny, or make demo)")
    ppo_config = json.loads((base / "ppo" / "rlhfkit.json").read_text())["config"]
    eval_settings = json.loads((base / "eval.json").read_text())
    offline_lr = args.offline_lr if args.offline_lr is not None else ppo_config["lr"]
    rlhfkit = shlex.split(args.rlhfkit)
    algos = [a for a in args.algos.split(",") if a]
    unknown = [a for a in algos if a not in ALGOS]
    if unknown:
        sys.exit(f"compare: unknown algorithm {unknown[0]!r} (choose from {', '.join(ALGOS)})")

    online = []
    for name in ONLINE_OPTIONS:
        value = ppo_config.get(name)
        if value not in (None, "", 0) or name == "seed":
            online += [flag(name), str(value)]
    val = base / "comparisons.val.jsonl"
    offline = [
        "--policy",
        str(base / "sft"),
        "--data",
        str(base / "comparisons.jsonl"),
        "--lr",
        str(offline_lr),
        "--epochs",
        str(args.offline_epochs),
        "--seed",
        str(ppo_config["seed"]),
        *(["--val-data", str(val)] if val.exists() else []),
    ]
    commands = {
        algo: [
            *rlhfkit,
            "ppo",
            "--algo",
            algo,
            "--policy",
            str(base / "sft"),
            "--rm",
            str(base / "rm"),
            "--prompts",
            f"{args.data}/prompts.jsonl",
            *online,
            *(["--k", str(args.k)] if algo in ("rloo", "grpo") else []),
            "--sample-every",
            "0",
            "--out",
            str(out / algo),
        ]
        for algo in ("ppo", "a2c", "rloo", "grpo")
    }
    commands["dpo"] = [*rlhfkit, "dpo", *offline, "--beta", str(args.dpo_beta), "--out", str(out / "dpo")]
    commands["ilql"] = [*rlhfkit, "ilql", *offline, "--beta", str(args.ilql_beta), "--out", str(out / "ilql")]

    # 1. train each algorithm (a finished run is reused, with the measurements it recorded)
    measured: dict[str, dict[str, float]] = {}
    for algo in algos:
        record = out / f"{algo}.run.json"
        if (out / algo / "rlhfkit.json").is_file() and record.is_file():
            measured[algo] = json.loads(record.read_text())
            print(f"compare: {out / algo} exists; reusing it", file=sys.stderr)
            continue
        if (out / algo).exists():
            sys.exit(f"compare: {out / algo} holds an unfinished run; remove it first")
        seconds, peak = run_measured(commands[algo], out / f"{algo}.json")
        measured[algo] = {"seconds": seconds, "peak_rss_mib": peak, "command": " ".join(shlex.quote(c) for c in commands[algo])}
        record.write_text(json.dumps(measured[algo], indent=2) + "\n")

    # 2. one eval of all of them against the SFT model
    sampling = eval_settings["sampling"]
    judge = eval_settings["inputs"].get("judge") or f"{sys.executable} examples/annotator.py"
    eval_cmd = [
        *rlhfkit,
        "eval",
        *[x for a in algos for x in ("--policy", f"{a}={out / a}")],
        "--baseline",
        f"sft={base / 'sft'}",
        "--rm",
        str(base / "rm"),
        "--judge",
        judge,
        "--prompts",
        f"{args.data}/eval_prompts.jsonl",
        "--n-samples",
        str(eval_settings["n_samples"]),
        "--max-new-tokens",
        str(sampling["max_new_tokens"]),
        "--temperature",
        str(sampling["temperature"]),
        "--seed",
        str(sampling["seed"]),
        "--out",
        str(out / "eval"),
    ]
    if (out / "eval").exists():
        import shutil

        shutil.rmtree(out / "eval")
    run_measured(eval_cmd, out / "eval.json")
    report = json.loads((out / "eval.json").read_text())

    # 3. the table
    rows = []
    base_score = report["baseline"]["score"]
    header = (
        "| algorithm | win-rate vs SFT (annotator, 95% CI) | win-rate vs SFT (reward model) | RM score | KL to SFT "
        "| train wall time | peak memory |\n|---|---|---|---|---|---|---|"
    )
    for policy in report["policies"]:
        judge_rate, rm_rate = policy["win_rate"].get("judge"), policy["win_rate"].get("rm")
        m = measured[policy["name"]]
        rows.append(
            f"| {policy['name']} | {judge_rate['rate']:.1%} [{judge_rate['ci_low']:.1%}, {judge_rate['ci_high']:.1%}] "
            f"| {rm_rate['rate']:.1%} [{rm_rate['ci_low']:.1%}, {rm_rate['ci_high']:.1%}] "
            f"| {policy['score']['mean']:+.3f} | {policy['kl']['mean']:.3f} "
            f"| {m['seconds']:.0f} s | {m['peak_rss_mib']:.0f} MiB |"
        )
    table = "\n".join([header, *rows])
    footer = (
        f"\nSFT: RM score {base_score['mean']:+.3f}; {report['prompts']} held-out prompts × {report['n_samples']} samples; "
        f"KL in nats per sequence; peak memory = the training process's maximum resident set size."
    )
    (out / "table.md").write_text(table + "\n" + footer + "\n")
    summary = {
        "base": str(base),
        "runs": measured,
        "eval": str(out / "eval"),
        "table": str(out / "table.md"),
        "plots": (report.get("files") or {}).get("plots"),
    }
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table + "\n" + footer)
    plot = (summary["plots"] or {}).get("reward_vs_kl")
    if plot:
        print(f"\nreward against KL, one point per algorithm: {plot}")


if __name__ == "__main__":
    main()
