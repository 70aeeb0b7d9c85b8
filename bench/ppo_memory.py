"""Peak memory per process and seconds per step of ``rlhfkit ppo`` under ``--strategy ddp`` and
``--strategy fsdp``: two processes on the CPU (gloo), the same model, prompts and settings.

Each rank runs rlhfkit's CLI inside this script (``--worker``), which records the process's peak
resident set size (``getrusage``, the high-water mark of its whole life: loading included) in
OUT/rss-RANK.json when it exits; seconds per step are rlhfkit's own ``perf/seconds_per_step`` from
metrics.jsonl (the first step, which pays one-time costs, is left out of the median).

    python bench/ppo_memory.py --model MODEL_DIR_OR_GGUF [--steps 4] [--batch-size 2] [--max-new-tokens 16]

MODEL may be a .gguf file (converted once to a safetensors directory first, so that the ranks'
peaks do not include dequantising it). The reward is scripted (examples/scripted_rewards.py), the
critic a value head on the policy: the models in memory are the policy (trained: weights, gradients,
AdamW state) and its frozen reference. Prints one JSON object.

The environment passes through to the ranks: ``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc return freed
large blocks to the system (README, "Scale"), ``RSS_TRACE=1`` writes each rank's resident set every
0.2 s to trace-RANK.tsv beside its rss-RANK.json (kept only while the script runs: set ``RSS_DIR`` by
running the worker under torchrun yourself to keep them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worker(argv: list[str]) -> None:
    """A torchrun rank: rlhfkit's CLI, then this process's peak RSS into $RSS_DIR/rss-RANK.json."""
    import atexit

    def record() -> None:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        path = Path(os.environ["RSS_DIR"]) / f"rss-{os.environ.get('RANK', '0')}.json"
        path.write_text(json.dumps({"rank": int(os.environ.get("RANK", "0")), "peak_rss_mib": peak_kib / 1024}))

    atexit.register(record)
    if os.environ.get("RSS_TRACE"):  # a timeline of the resident set, every 0.2 s: where the peak happens
        import threading

        trace = Path(os.environ["RSS_DIR"]) / f"trace-{os.environ.get('RANK', '0')}.tsv"
        start = time.perf_counter()

        def sample() -> None:
            with open(trace, "w") as f:
                while True:
                    rss = next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]
                    f.write(f"{time.perf_counter() - start:.1f}\t{int(rss) // 1024}\n")
                    f.flush()
                    time.sleep(0.2)

        threading.Thread(target=sample, daemon=True).start()
    sys.argv = ["rlhfkit", *argv]
    from rlhfkit.cli import main

    main()


def as_directory(model: str, work: Path) -> str:
    if not model.endswith(".gguf"):
        return model
    from rlhfkit.models import load_model, load_tokenizer

    out = work / "model"
    load_model(model).save_pretrained(out, safe_serialization=True)
    load_tokenizer(model).save_pretrained(out)
    return str(out)


def run(strategy: str, model: str, prompts: Path, work: Path, args: argparse.Namespace) -> dict:
    out, rss = work / f"ppo-{strategy}", work / f"rss-{strategy}"
    rss.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(Path(__file__).resolve()),
           "--worker", "ppo", "--policy", model, "--rm", f"python:{REPO / 'examples' / 'scripted_rewards.py'}:letter_e_count",
           "--prompts", str(prompts), "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens), "--value-head", "policy", "--device", "cpu", "--dtype", "float32",
           "--sample-every", "0", "--strategy", strategy, "--save-every", "0"]  # fmt: skip
    env = {**os.environ, "RSS_DIR": str(rss), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy}: ppo failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["perf/seconds_per_step"] for r in rows]
    peaks = sorted((json.loads(p.read_text()) for p in rss.glob("rss-*.json")), key=lambda r: r["rank"])
    return {
        "peak_rss_mib_per_rank": [round(p["peak_rss_mib"]) for p in peaks],
        "seconds_per_step": [round(s, 2) for s in seconds],
        "median_seconds_per_step_after_first": round(statistics.median(seconds[1:] or seconds), 2),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2, help="rollouts per process and step")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rlhfkit-ppo-memory-") as tmp:
        work = Path(tmp)
        model = as_directory(args.model, work)
        prompts = work / "prompts.jsonl"
        texts = ["Tell me about the sea.", "Write a poem about trees.", "What is the capital of France?",
                 "Name three colours.", "Describe a cat.", "How do birds fly?", "Say something kind.", "Count to 5."]  # fmt: skip
        prompts.write_text("".join(json.dumps({"id": str(i), "prompt": t}) + "\n" for i, t in enumerate(texts)))
        result = {"model": args.model, "processes": 2, "device": "cpu", "steps": args.steps, "batch_size": args.batch_size,
                  "max_new_tokens": args.max_new_tokens}  # fmt: skip
        for strategy in ("ddp", "fsdp"):
            result[strategy] = run(strategy, model, prompts, work, args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
