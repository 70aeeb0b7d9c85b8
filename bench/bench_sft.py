"""Throughput of ``rlhfkit sft`` against TRL's ``SFTTrainer`` on the same work, side by side.

Same model (a Llama built from a config, random weights, or a real one with ``--model``, e.g.
``smollm2``), same tokenizer, same prompt/completion data (loss on the completion and its EOS in
both), same batch size, steps, learning rate and schedule, no gradient checkpointing, no packing,
one epoch (so both see the same examples). Where the tokenizer has a chat template (SmolLM2), both
render the prompt as a user turn and the completion as the assistant's (rlhfkit's ``--chat-template
auto``; TRL's conversational prompt/completion rows), so both train on the same token sequences.

Precision, per ``--dtypes`` entry: ``float32`` = both in float32 (equal settings); ``auto`` = each
tool's best: rlhfkit ``--dtype auto`` (bf16 autocast with float32 weights where
`rlhfkit.models.auto_dtype` says bf16 pays) plus ``--set KEY=VALUE`` SFTConfig overrides, TRL
``bf16=True`` when that auto resolves to bf16 here.

Each tool keeps its own defaults for everything else (TRL: chunked NLL loss, fused AdamW,
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
    /tmp/venv-trl/bin/python bench/bench_sft.py --model smollm2 --steps 4 --batch-size 4 --dtypes float32 auto

Without TRL the script runs rlhfkit alone and says how to install TRL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_common import clean_up_on_sigterm, convert_model, machine, overrides, trl_bf16  # noqa: E402

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


def run_rlhfkit(model_dir: Path, data_path: Path, out: Path, args: argparse.Namespace, dtype: str) -> dict[str, float]:
    from rlhfkit.config import SFTConfig
    from rlhfkit.stages import sft

    shutil.rmtree(out, ignore_errors=True)
    config = SFTConfig(
        model=str(model_dir), data=str(data_path), out=str(out), max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        schedule="constant", max_length=args.max_length, log_every=args.steps, device="cpu", dtype=dtype, seed=args.seed,
        bf16=False if dtype == "float32" else None,  # None: autocast as --dtype auto decides
    )  # fmt: skip
    if dtype != "float32":  # the best settings: --set on top of --dtype auto
        config = dataclasses.replace(config, **overrides(SFTConfig, args.set))
    start = time.perf_counter()
    result = sft.run(config)
    wall = time.perf_counter() - start
    return {"tokens": result["train/tokens"], "train_seconds": result["train/seconds"],
            "tokens_per_s": result["perf/tokens_per_s"],
            "wall_seconds": wall, "loss": result["loss/train"]}  # fmt: skip


def run_trl(model_dir: Path, rows: list[dict[str, str]], out: Path, args: argparse.Namespace, dtype: str) -> dict[str, float]:
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
        max_length=args.max_length, packing=False, gradient_checkpointing=False, bf16=trl_bf16(dtype), fp16=False, use_cpu=True,
        logging_steps=args.steps, save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0,
        seed=args.seed, disable_tqdm=True,
    )  # fmt: skip
    if tokenizer.chat_template:  # the chat template on both sides, as rlhfkit's --chat-template auto renders a string prompt
        rows = [
            {"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}]}
            for r in rows
        ]  # fmt: skip
    trainer = SFTTrainer(model=str(model_dir), args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[Clock()])  # fmt: skip
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
    return {"tokens": counted["tokens"], "train_seconds": seconds, "tokens_per_s": counted["tokens"] / seconds,
            "wall_seconds": wall,
            "loss": float(output.training_loss)}  # fmt: skip


def main() -> None:
    clean_up_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="a Llama built from a config (random weights)")
    parser.add_argument("--model", help="a real model instead (directory, .gguf, or smollm2: SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each tool; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both tools")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "auto"],
                        help="float32 = equal float32 settings; auto = each tool's best (see above)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="rlhfkit SFTConfig override for the auto (best-settings) runs")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    import torch
    import transformers

    from rlhfkit.config import SFTConfig

    overrides(SFTConfig, args.set)  # a bad --set fails before any work
    torch.set_num_threads(args.threads)
    try:
        import trl
    except ImportError:
        trl = None
        print("TRL is not installed in this environment: measuring rlhfkit alone. For the comparison, run this script from a "
              "separate virtual environment with `pip install torch==2.13.0 trl==1.12.0 -e .`", file=sys.stderr)  # fmt: skip

    name = args.model or f"{args.size} Llama"
    report = {"model": name, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
              "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
              "transformers": transformers.__version__,
              "trl": getattr(trl, "__version__", None), "machine": machine()}  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    try:
        model_dir = convert_model(root, args.model) if args.model else make_model_dir(root, args.size)
        n_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        report["parameters"] = n_params
        rows = make_data(root / "data.jsonl", args.steps * args.batch_size, seed=args.seed)
        for dtype in args.dtypes:
            tools = {"rlhfkit": lambda a, d=dtype: run_rlhfkit(model_dir, root / "data.jsonl", root / "out-rlhfkit", a, d)}
            if trl is not None:
                tools["trl"] = lambda a, d=dtype: run_trl(model_dir, rows, root / "out-trl", a, d)
            warmup = argparse.Namespace(**{**vars(args), "steps": min(2, args.steps)})
            for run in tools.values():  # first-call costs (lazy imports, allocator, kernel selection) are not what is measured
                run(warmup)
            runs: dict[str, list[dict[str, float]]] = {tool: [] for tool in tools}
            for r in range(args.rounds):
                for tool in sorted(tools, reverse=r % 2 == 1):  # alternate which tool goes first
                    runs[tool].append(tools[tool](args))
                print(f"{dtype} round {r + 1}: " + "  ".join(f"{k} {v[-1]['tokens_per_s']:,.0f} tok/s" for k, v in runs.items()),
                      file=sys.stderr)  # fmt: skip
            row: dict = {"trl_bf16": trl_bf16(dtype), "rlhfkit_overrides": args.set if dtype != "float32" else []}
            print(f"SFT, {name} ({n_params / 1e6:.1f}M parameters), {args.steps} steps × batch {args.batch_size}, {dtype}, "
                  f"{args.threads} CPU thread(s), median of {args.rounds}")  # fmt: skip
            print(f"{'':10}{'tokens':>10}{'train s':>10}{'tokens/s':>12}{'end-to-end s':>14}{'final loss':>12}")
            for tool, results in runs.items():
                median = {k: statistics.median(r[k] for r in results) for k in results[0]}
                row[tool] = {**median, "runs": results}
                print(f"{tool:10}{median['tokens']:>10,.0f}{median['train_seconds']:>10.2f}{median['tokens_per_s']:>12,.0f}"
                      f"{median['wall_seconds']:>14.2f}{median['loss']:>12.4f}")  # fmt: skip
            if runs.get("trl"):
                row["ratio"] = row["rlhfkit"]["tokens_per_s"] / row["trl"]["tokens_per_s"]
                print(f"ratio rlhfkit / TRL (training-loop tokens/s): {row['ratio']:.2f}x; end to end: "
                      f"{row['trl']['wall_seconds'] / row['rlhfkit']['wall_seconds']:.2f}x")  # fmt: skip
            report[dtype] = row
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
