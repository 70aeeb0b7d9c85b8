"""rlhfkit ppo vs TRL's PPOTrainer (trl==1.12.0, trl.experimental.ppo): seconds per PPO update.

Both run in this one process on the same models (a Llama policy built from a config, or a real
model with ``--model``, e.g. ``smollm2``; its copy as the reference, a one-label classifier on the
same backbone as the reward model, the value model initialised from the reward model), the same
prompts (random words; with ``--model`` the chat prompts of examples/data/prompts.jsonl), rollouts
per update, response length, PPO epochs, mini-batches and precision, no gradient checkpointing
(TRL's config defaults to it; it is switched off), the same sampling (temperature 1, no top-k or
top-p, stop at EOS) and the same KL coefficient.

Precision, per ``--dtypes`` entry: ``float32`` = both in float32 (equal settings; rlhfkit
``--dtype float32``, TRL ``bf16=False``); ``auto`` = each tool's best: rlhfkit ``--dtype auto``
plus the ``--set KEY=VALUE`` config overrides, TRL ``bf16=True`` when rlhfkit's auto resolves to bf16
on this machine (both then train float32 weights under bf16 autocast). A PPO update is everything one batch costs:
generation, the reference/value/reward forward passes, and all PPO epochs. The first update of
each run is a warm-up and is not counted; runs alternate (rlhfkit, TRL, rlhfkit, TRL, ...) so
that a change in machine load hits both.

TRL is not a dependency of rlhfkit; run this with a Python that has both::

    python3 -m venv /tmp/venv-trl
    /tmp/venv-trl/bin/pip install torch==2.13.0 trl==1.12.0
    /tmp/venv-trl/bin/pip install -e . --no-deps   # + rlhfkit's dependencies if missing
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 /tmp/venv-trl/bin/python bench/bench_ppo.py --size small

Prints one JSON object on stdout (per-update seconds of each, their medians and the ratio) and
rlhfkit's own time split per phase. ``--profile DIR`` also writes a torch.profiler table of one
update of each to DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import clean_up_on_sigterm, convert_model, example_prompts, machine, overrides, trl_bf16  # noqa: E402

SIZES = {
    # hidden, intermediate, layers, heads, kv heads
    "tiny": (64, 128, 2, 4, 2),
    "small": (256, 688, 4, 8, 4),
    "medium": (512, 1376, 8, 8, 4),
}


def require_trl() -> None:
    try:
        import trl  # noqa: F401
        from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401
    except ImportError as e:
        sys.exit(
            f"bench_ppo: TRL's PPOTrainer is not importable here ({e}).\n"
            "Run this with a Python that has trl==1.12.0 (its PPO trainer lives in trl.experimental.ppo):\n"
            "  python3 -m venv /tmp/venv-trl && /tmp/venv-trl/bin/pip install torch==2.13.0 trl==1.12.0\n"
            "  /tmp/venv-trl/bin/pip install -e . --no-deps && /tmp/venv-trl/bin/python bench/bench_ppo.py"
        )


def build_models(work: Path, size: str, seed: int = 0, vocab: int = 0, model: str = "") -> tuple[Path, Path]:
    """A Llama policy and a reward model (same backbone, random one-label head), saved as plain
    Hugging Face directories with the rlhfkit test tokenizer. Dropout is 0 in the config (TRL
    trains in train mode, where transformers applies a config's attention dropout).

    ``vocab`` > 512 pads the embedding matrix beyond the tokenizer's 512 tokens (as real models pad
    theirs), to give the output layer the weight it has in real models (SmolLM2: 49152 x 576);
    ids past the tokenizer decode to nothing.

    ``model`` (a directory, .gguf or ``smollm2``) takes that model as the policy instead, and a
    one-label classifier on its backbone (seeded random head) as the reward model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    from rlhfkit.testing import make_tokenizer

    if model:
        policy_dir, rm_dir = convert_model(work, model), work / "rm"
        tokenizer = AutoTokenizer.from_pretrained(policy_dir)
        torch.manual_seed(seed + 1)
        rm = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
        rm.config.pad_token_id = tokenizer.pad_token_id
        rm.save_pretrained(rm_dir)
        tokenizer.save_pretrained(rm_dir)
        return policy_dir, rm_dir
    hidden, inter, layers, heads, kv = SIZES[size]
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024, attention_dropout=0.0,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    policy_dir, rm_dir = work / "policy", work / "rm"
    AutoModelForCausalLM.from_config(config).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    torch.manual_seed(seed + 1)
    rm = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    return policy_dir, rm_dir


def write_prompts(path: Path, n: int, seed: int = 0) -> list[str]:
    import random

    from rlhfkit.testing import _WORDS

    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 24))) for _ in range(n)]
    path.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return prompts


def bench_rlhfkit(
    args, policy_dir: Path, rm_dir: Path, prompts_file: Path, out: Path, dtype: str = "float32"
) -> tuple[list[float], dict[str, float]]:
    from rlhfkit.config import PPOConfig
    from rlhfkit.stages import ppo
    from rlhfkit.training import read_metrics

    shutil.rmtree(out, ignore_errors=True)
    config = PPOConfig(
        policy=str(policy_dir), rm=str(rm_dir), prompts=str(prompts_file), out=str(out), device=args.device, dtype=dtype,
        steps=args.updates + 1, batch_size=args.batch_size, mini_batch_size=args.batch_size // args.mini_batches,
        grad_accum=args.grad_accum, ppo_epochs=args.ppo_epochs, max_new_tokens=args.response_length, temperature=1.0,
        lr=args.lr, kl_coef=0.05, sample_every=0, seed=args.seed,
    )  # fmt: skip
    if dtype != "float32":  # the best settings: --set on top of --dtype auto
        config = dataclasses.replace(config, **overrides(PPOConfig, args.set))
    ppo.run(config)
    rows = read_metrics(out)[1:]  # the first update is a warm-up
    phases = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith("time/")}
    phases["response/length"] = statistics.mean(r["response/length"] for r in rows)
    return [r["perf/seconds_per_step"] for r in rows], phases


def bench_trl(
    args, policy_dir: Path, rm_dir: Path, prompts: list, out: Path, dtype: str = "float32"
) -> tuple[list[float], dict[str, float]]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhfkit.chat import encode_prompt

    shutil.rmtree(out, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    ids = [encode_prompt(tokenizer, p) for p in prompts]  # the very token ids rlhfkit samples from
    dataset = Dataset.from_dict({"input_ids": ids})
    per_device = args.batch_size // args.mini_batches // args.grad_accum
    config = PPOConfig(
        output_dir=str(out), per_device_train_batch_size=per_device, gradient_accumulation_steps=args.grad_accum,
        num_mini_batches=args.mini_batches, num_ppo_epochs=args.ppo_epochs, total_episodes=args.batch_size * (args.updates + 1),
        local_rollout_forward_batch_size=args.batch_size, response_length=args.response_length, temperature=1.0,
        stop_token="eos", learning_rate=args.lr, kl_coef=0.05, bf16=trl_bf16(dtype, args.device), fp16=False,
        gradient_checkpointing=False,
        use_cpu=args.device == "cpu", report_to="none", save_strategy="no", logging_steps=1, num_sample_generations=0,
        seed=args.seed, disable_tqdm=True,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)

    ends: list[float] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "val/num_eos_tokens" in logs:
                lengths.append(logs["val/num_eos_tokens"])

    # TRL's time split, for comparison with rlhfkit's time/* metrics: its module-level generation,
    # forward and reward functions, timed (no-grad calls = rollout phase; the rest = update)
    from trl.experimental.ppo import ppo_trainer

    split: dict[str, float] = {"generate": 0.0, "rollout_forward": 0.0}
    originals = {name: getattr(ppo_trainer, name) for name in ("batch_generation", "forward", "get_reward")}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if name == "batch_generation":
                    split["generate"] += time.perf_counter() - t0
                elif not torch.is_grad_enabled():
                    split["rollout_forward"] += time.perf_counter() - t0

        return wrapper

    for name, fn in originals.items():
        setattr(ppo_trainer, name, timed(name, fn))
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
        value_model=value, train_dataset=dataset, eval_dataset=dataset, callbacks=[Clock()],
    )  # fmt: skip
    try:
        with contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs on stdout; ours is the JSON result
            trainer.train()
    finally:
        for name, fn in originals.items():
            setattr(ppo_trainer, name, fn)
    seconds = [b - a for a, b in itertools.pairwise(ends)][1:]  # without the warm-up update
    updates = len(ends) - 1
    phases = {f"time/{k}": v / updates for k, v in split.items()}  # mean per update, warm-up included
    phases["time/update_and_rest"] = sum(b - a for a, b in itertools.pairwise(ends)) / updates - sum(phases.values())
    phases["val/num_eos_tokens"] = statistics.mean(lengths) if lengths else 0.0
    return seconds, phases


def profile_both(args, policy_dir, rm_dir, prompts_file, prompts, work: Path, dtype: str) -> None:
    """One profiled update of each (after a warm-up): the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    target = Path(args.profile)
    target.mkdir(parents=True, exist_ok=True)
    one = argparse.Namespace(**{**vars(args), "updates": 1})
    for name, fn in (
        ("rlhfkit", lambda: bench_rlhfkit(one, policy_dir, rm_dir, prompts_file, work / "prof-rlhfkit", dtype)),
        ("trl", lambda: bench_trl(one, policy_dir, rm_dir, prompts, work / "prof-trl", dtype)),
    ):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            fn()
        path = target / f"{name}-{dtype}.txt"
        path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        print(f"profile of {name} written to {path}", file=sys.stderr)


def main() -> None:
    clean_up_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (all Llama, vocabulary 512)")
    parser.add_argument("--model", default="", help="a real model instead of --size: directory, .gguf, or smollm2")
    parser.add_argument("--vocab", type=int, default=0, help="pad the model's vocabulary to this size (0 = the tokenizer's 512)")
    parser.add_argument("--batch-size", type=int, default=16, help="rollouts per update")
    parser.add_argument("--mini-batches", type=int, default=1, help="mini-batches (optimizer steps) per PPO epoch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--updates", type=int, default=4, help="timed updates per run (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")), help="torch intra-op threads")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "auto"],
                        help="float32 = equal float32 settings; auto = each tool's best (see above)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="rlhfkit PPOConfig override for the auto (best-settings) runs, e.g. --set ppo_epochs=4")  # fmt: skip
    parser.add_argument("--profile", default="", help="also write a torch.profiler table of one update of each to this directory")
    parser.add_argument("--only", choices=["rlhfkit", "trl"], default=None, help="run one side only")
    args = parser.parse_args()
    if args.only != "rlhfkit":
        require_trl()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from rlhfkit.config import PPOConfig

    overrides(PPOConfig, args.set)  # a bad --set fails before any work
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    try:
        policy_dir, rm_dir = build_models(work, args.size, args.seed, args.vocab, args.model)
        prompts_file = work / "prompts.jsonl"
        if args.model:
            rows = example_prompts(8 * args.batch_size)
            prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
            prompts = [r["messages"] for r in rows]
        else:
            prompts = write_prompts(prompts_file, 8 * args.batch_size, args.seed)
        result: dict = {
            "model": args.model or f"{args.size} Llama" + (f", vocabulary {args.vocab}" if args.vocab else ""),
            "settings": {k: v for k, v in vars(args).items() if k not in ("profile", "only")},
            "machine": machine(),
        }
        for dtype in args.dtypes:
            times: dict[str, list[float]] = {"rlhfkit": [], "trl": []}
            phases: dict[str, dict[str, float]] = {}
            for r in range(args.repeats):
                if args.only != "trl":
                    seconds, phases["rlhfkit"] = bench_rlhfkit(args, policy_dir, rm_dir, prompts_file, work / "rlhfkit", dtype)
                    times["rlhfkit"] += seconds
                    print(f"{dtype} run {r + 1}: rlhfkit {statistics.median(seconds):.3f} s/update", file=sys.stderr)
                if args.only != "rlhfkit":
                    seconds, phases["trl"] = bench_trl(args, policy_dir, rm_dir, prompts, work / "trl", dtype)
                    times["trl"] += seconds
                    print(f"{dtype} run {r + 1}: trl     {statistics.median(seconds):.3f} s/update", file=sys.stderr)
            if args.profile:
                profile_both(args, policy_dir, rm_dir, prompts_file, prompts, work, dtype)
            row = {
                "trl_bf16": trl_bf16(dtype, args.device),
                "rlhfkit_overrides": args.set if dtype != "float32" else [],
                "seconds_per_update": {k: [round(s, 4) for s in v] for k, v in times.items() if v},
                "median_seconds_per_update": {k: round(statistics.median(v), 4) for k, v in times.items() if v},
                "rlhfkit_phases_median_seconds": phases.get("rlhfkit", {}),
                "trl_phases_mean_seconds": phases.get("trl", {}),
            }
            if times["rlhfkit"] and times["trl"]:
                row["speedup_rlhfkit_over_trl"] = round(statistics.median(times["trl"]) / statistics.median(times["rlhfkit"]), 3)
                print(f"ppo {result['model']} {dtype}: rlhfkit {row['median_seconds_per_update']['rlhfkit']:.2f} s/update, "
                      f"TRL {row['median_seconds_per_update']['trl']:.2f} s/update, {row['speedup_rlhfkit_over_trl']:.2f}x",
                      file=sys.stderr)  # fmt: skip
            result[dtype] = row
        result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
