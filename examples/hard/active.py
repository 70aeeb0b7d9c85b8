#!/usr/bin/env python3
"""How many comparisons does choosing prompts by ensemble disagreement save? (issue 18, "spend
labels where they teach most"), measured on the hard example's own files.

From a finished run of ``run.sh`` (the base model, K answers to every train prompt in
``RUN/samples.jsonl``, the base model's answers to the test prompts in ``RUN/test_samples.jsonl``):

1. a **seed set** of ``--seed-prompts`` train prompts (a seeded random draw) is labelled by the
   annotator, and ``train-rm --ensemble M`` fits M reward models on it;
2. ``collect --select N --select-by ENSEMBLE`` picks the ``--add`` unlabelled prompts whose answers
   the members disagree on most (the pool is the run's own samples of those prompts: collect
   resumes from them instead of sampling again, the samples are the same);
3. a reward model is trained on seed + selected, and, for comparison, on seed + ``--add`` prompts
   drawn at random (``--draws`` draws), on the seed alone and on every train prompt;
4. each one's agreement with the annotator on the strict pairs of the test answers is measured
   (`feasibility.py rm`: the prompts' topics were never labelled).

Every reward model uses the same train-rm options (``--rm-options``; by default the probe alone on
last + mean features, the hard example's choice), so the only difference is which prompts were labelled.

Usage: python examples/hard/active.py --run runs/hard [--out runs/hard/active]
Prints a Markdown table and writes OUT/active.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], stdout: Path | None = None, stdin: Path | None = None) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    with open(stdout, "w") if stdout else open(os.devnull, "w") as out, open(stdin) if stdin else open(os.devnull) as inp:
        code = subprocess.run(cmd, stdout=out, stdin=inp).returncode
    if code != 0:
        sys.exit(f"active: {cmd[0]} {cmd[1]} failed with exit code {code}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


class Lab:
    """Labels prompts with the annotator and trains/measures reward models under OUT."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.rlhfkit, self.python = args.rlhfkit, sys.executable
        self.samples = {line["prompt_id"]: line for line in read_jsonl(Path(args.run) / "samples.jsonl")}

    def comparisons(self, name: str, prompt_ids: list[str]) -> Path:
        """The annotator's rankings of these prompts' samples, imported as comparisons."""
        samples = write_jsonl(self.out / f"{name}.samples.jsonl", [self.samples[p] for p in prompt_ids])
        rankings = self.out / f"{name}.rankings.jsonl"
        run([self.python, str(HERE / "annotator.py")], stdout=rankings, stdin=samples)
        cmp = self.out / f"{name}.comparisons.jsonl"
        run([self.rlhfkit, "rank-import", str(rankings), "--samples", str(samples), "--out", str(cmp), "--seed", "0"])
        return cmp

    def reward_model(self, name: str, prompt_ids: list[str], *extra: str) -> Path:
        out = self.out / name
        if not (out / "rlhfkit.json").is_file():
            cmp = self.comparisons(name, prompt_ids)
            run([self.rlhfkit, "train-rm", "--model", str(Path(self.args.run) / "base"), "--data", str(cmp), "--out", str(out),
                 "--val-fraction", "0", "--seed", "0", *shlex.split(self.args.rm_options), *extra])  # fmt: skip
        return out

    def agreement(self, rm: Path) -> dict:
        result = self.out / f"{rm.name}.agreement.json"
        if not result.is_file():
            run([self.python, str(HERE / "feasibility.py"), "rm", "--rm", str(rm), "--test",
                 str(Path(self.args.run) / "test_samples.jsonl"), "--modes", "as_sampled"], stdout=result)  # fmt: skip
        measured = json.loads(result.read_text())
        return {**measured[str(rm)]["as_sampled"], "pairs": measured["test_strict_pairs"]}

    def pairs(self, name: str) -> int:
        path = self.out / f"{name}.comparisons.jsonl"
        return len(path.read_text().splitlines()) if path.is_file() else 0

    def select(self, ensemble: Path, pool_ids: list[str], n: int) -> list[str]:
        """collect --select over the pool prompts, resuming from the run's samples of them."""
        prompts = write_jsonl(self.out / "pool_prompts.jsonl", [
            {"id": p, ("messages" if isinstance(self.samples[p]["prompt"], list) else "prompt"): self.samples[p]["prompt"]}
            for p in pool_ids
        ])  # fmt: skip
        selected = self.out / "selected.jsonl"
        write_jsonl(self.out / "selected.pool.jsonl", [self.samples[p] for p in pool_ids])  # what collect would sample
        sampling = self.samples[pool_ids[0]].get("sampling") or {}
        cmd = [self.rlhfkit, "collect", "--policy", f"base={Path(self.args.run) / 'base'}", "--prompts", str(prompts),
               "--k", str(len(self.samples[pool_ids[0]]["completions"])), "--out", str(selected),
               "--select", str(n), "--select-by", str(ensemble)]  # fmt: skip
        for key in ("max_new_tokens", "temperature", "top_p", "seed"):
            if key in sampling:
                cmd += [f"--{key.replace('_', '-')}", str(sampling[key])]
        run(cmd, stdout=self.out / "select.json")
        return [line["prompt_id"] for line in read_jsonl(selected)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/hard", help="a finished run.sh directory")
    parser.add_argument("--out", default="", help="default RUN/active")
    parser.add_argument("--seed-prompts", type=int, default=16)
    parser.add_argument("--add", type=int, default=16, help="prompts added to the seed set")
    parser.add_argument("--members", type=int, default=5, help="ensemble size for the selection")
    parser.add_argument("--draws", type=int, default=3, help="random draws to compare with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rm-options", default="--pooling last+mean --trainable-layers 0")
    parser.add_argument("--rlhfkit", default="rlhfkit")
    args = parser.parse_args()
    args.out = args.out or str(Path(args.run) / "active")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    lab = Lab(args)
    started = time.time()

    ids = sorted(lab.samples)
    rng = random.Random(args.seed)
    rng.shuffle(ids)
    seed_ids, pool = ids[: args.seed_prompts], ids[args.seed_prompts :]
    ensemble = lab.reward_model("seed_ensemble", seed_ids, "--ensemble", str(args.members))
    chosen = lab.select(ensemble, pool, args.add)
    rows = [("seed only", "seed", seed_ids), ("seed + selected by disagreement", "selected", seed_ids + chosen)]
    for d in range(args.draws):
        drawn = random.Random(f"{args.seed}/{d}").sample(pool, args.add)
        rows.append((f"seed + random draw {d + 1}", f"random{d + 1}", seed_ids + drawn))
    rows.append(("every train prompt", "all", ids))

    results = []
    for label, name, prompt_ids in rows:
        rm = lab.reward_model(name, prompt_ids)
        measured = lab.agreement(rm)
        results.append({"set": label, "name": name, "prompts": len(prompt_ids), "comparisons": lab.pairs(name), **measured})
    print(f"\n| labelled prompts | comparisons | agreement on {results[0]['pairs']} unseen-topic test pairs [95% CI] |")
    print("|---|---|---|")
    for r in results:
        low, high = r["ci95"]
        print(f"| {r['set']} ({r['prompts']}) | {r['comparisons']} | {r['test_agreement']:.3f} [{low:.3f}, {high:.3f}] |")
    drawn = [r["test_agreement"] for r in results if r["name"].startswith("random")]
    summary = {"results": results, "random_mean": sum(drawn) / len(drawn) if drawn else None,
               "selected": chosen, "seconds": round(time.time() - started, 1)}  # fmt: skip
    (Path(args.out) / "active.json").write_text(json.dumps(summary, indent=1))
    if drawn:
        print(f"\nrandom draws: mean {summary['random_mean']:.3f}; {summary['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
