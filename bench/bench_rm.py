"""Reward-model training throughput: rlhfkit train-rm vs TRL's RewardTrainer, side by side.

Both train the same one-label sequence classifier (same initial weights) on the same pairs — the
very same token ids: prompt + completion + EOS, as rlhfkit encodes them, handed to TRL
pre-tokenised as ``chosen_ids``/``rejected_ids`` — with the same batch size, for one epoch, in the
same process, interleaved ``--repeats`` times. The model: a Llama built in-process, or a real
one with ``--model`` (a directory, .gguf, or ``smollm2``). Like for like:

* precision, per ``--dtypes`` entry: ``float32`` for both (TRL's RewardConfig defaults to
  ``bf16=True`` and is set to ``bf16=False``; rlhfkit ``--dtype float32``), or ``auto``, each
  tool's best: rlhfkit ``--dtype auto`` (bf16 autocast, float32 weights, where
  `rlhfkit.models.auto_dtype` says bf16 pays) plus ``--set KEY=VALUE`` TrainRMConfig overrides, TRL
  ``bf16=True`` when that auto resolves to bf16 here;
* no gradient checkpointing for either (RewardConfig defaults to ``gradient_checkpointing=True``);
* AdamW, linear decay, no warmup, gradient clipping at 1.0, dropout off, no evaluation, no
  checkpoint during training, ``lr`` equal.

Measured: each library's own training-loop throughput — rlhfkit's ``perf/pairs_per_s``
(time spent in optimizer steps) and TRL's ``train_samples_per_second`` (its ``train_runtime``;
a sample is a pair) — and the wall time of the whole call (``train_rm.run`` also loads the model,
tokenises, normalises the reward and saves; ``trainer.train()`` only trains). Reported: the median
and the best of the ``--repeats`` runs (on a shared machine the best run is the least disturbed
one), and the ratios rlhfkit / TRL of both.

``--grouped`` adds an rlhfkit run on the same pairs written as rankings of K completions (the
InstructGPT batching, each completion encoded once), with as many pairs per step (batch size in
rankings = pairs per step / pairs per ranking). TRL has no such mode, so that row does less work
for the same pairs: it is reported, not used for the ratio.

TRL is not an rlhfkit dependency: run this with an interpreter that has both, e.g.::

    python3 -m venv /tmp/venv-trl
    /tmp/venv-trl/bin/pip install torch==2.13.0 trl==1.12.0 transformers peft datasets typer rich pyyaml
    /tmp/venv-trl/bin/pip install -e . --no-deps
    /tmp/venv-trl/bin/python bench/bench_rm.py --pairs 256 --batch-size 8

Prints one JSON object on stdout and a summary on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_common import clean_up_on_sigterm, convert_model, machine, overrides, trl_bf16  # noqa: E402


def need_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit(
            "bench_rm.py compares with TRL's RewardTrainer, and TRL is not installed in this interpreter "
            f"({sys.executable}). Install it beside rlhfkit, e.g. `pip install trl==1.12.0`, or run this "
            "script with a virtual environment that has it (see the module docstring)."
        )


def make_pairs(n_pairs: int, k: int, seed: int) -> list[dict]:
    """Comparisons from rankings of k completions per prompt (every ordered pair), with 'group'.
    Completions that contain 'thanks' win — a learnable rule, so both trainers do real work."""
    from rlhfkit.testing import _WORDS

    rng = random.Random(seed)
    vocab = [w for w in _WORDS if w not in ("thanks", "thank")]
    rows: list[dict] = []
    p = 0
    while len(rows) < n_pairs:
        prompt = "Tell me about " + " ".join(rng.choice(vocab) for _ in range(rng.randint(4, 10))) + "."
        completions = []
        for i in range(k):
            words = [rng.choice(vocab) for _ in range(rng.randint(12, 30))]
            if i % 2 == 0:
                words.insert(rng.randint(0, len(words)), "thanks")
            completions.append((i % 2 == 0, " ".join(words) + "."))
        for a in range(k):
            for b in range(k):
                if a < b and completions[a][0] != completions[b][0]:
                    win, lose = (a, b) if completions[a][0] else (b, a)
                    rows.append(
                        {"prompt": prompt, "chosen": completions[win][1], "rejected": completions[lose][1], "group": f"p{p}"}
                    )
        p += 1
    return rows[:n_pairs]


def build_model(root: Path, args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model) if Path(args.model).is_dir() else convert_model(root, args.model)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhfkit.testing import make_tokenizer

    tokenizer = make_tokenizer()
    heads = max(1, args.hidden_size // 64)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    out = root / "model"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def run_rlhfkit(model_dir: Path, data: Path, out: Path, args: argparse.Namespace, batch_size: int, dtype: str) -> dict:
    from rlhfkit.config import TrainRMConfig
    from rlhfkit.stages import train_rm

    config = TrainRMConfig(
        model=str(model_dir), data=str(data), out=str(out), device=args.device, dtype=dtype, lr=args.lr,
        batch_size=batch_size, epochs=1, val_fraction=0.0, max_length=args.max_length, seed=args.seed,
    )  # fmt: skip
    if dtype != "float32":  # the best settings: --set on top of --dtype auto
        config = dataclasses.replace(config, **overrides(TrainRMConfig, args.set))
    start = time.perf_counter()
    result = train_rm.run(config)
    wall = time.perf_counter() - start
    return {"pairs_per_s": result["metrics"]["perf/pairs_per_s"], "wall_s": wall, "steps": result["steps"],
            "pairs": result["train"]["pairs"],
            "sequences_encoded": result["train"]["sequences"]}  # fmt: skip


def run_trl(model_dir: Path, token_pairs: list[dict], out: Path, args: argparse.Namespace, dtype: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(args.seed)  # the same fresh score head as rlhfkit's (seed_everything before loading)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    bf16 = trl_bf16(dtype, args.device)
    config = RewardConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, num_train_epochs=1, learning_rate=args.lr,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        bf16=bf16, fp16=False, gradient_checkpointing=False, disable_dropout=True, max_length=args.max_length,
        logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to="none", seed=args.seed,
        dataloader_num_workers=0, use_cpu=args.device == "cpu", disable_tqdm=True,
    )  # fmt: skip
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(token_pairs), processing_class=tokenizer)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs on stdout; stdout is for the result
        output = trainer.train()
    wall = time.perf_counter() - start
    return {"pairs_per_s": output.metrics["train_samples_per_second"], "wall_s": wall, "steps": output.global_step,
            "pairs": len(token_pairs),
            "sequences_encoded": 2 * len(token_pairs)}  # fmt: skip


def main() -> None:
    clean_up_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="a model (directory, .gguf, or smollm2; default: a Llama built in-process)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--k", type=int, default=4, help="completions per ranking in the generated data")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (both libraries)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each; the median is reported")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "auto"],
                        help="float32 = equal float32 settings; auto = each tool's best (see above)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="rlhfkit TrainRMConfig override for the auto (best-settings) runs")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--grouped", action="store_true", help="also time rlhfkit with the InstructGPT group batching")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    need_trl()

    import torch
    import transformers
    import trl

    from rlhfkit import models, rm_data
    from rlhfkit.config import TrainRMConfig
    from rlhfkit.data import records

    overrides(TrainRMConfig, args.set)  # a bad --set fails before any work
    if args.threads:
        torch.set_num_threads(args.threads)

    def summary(rs: list[dict]) -> dict:
        return {
            "pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs),
            "pairs_per_s_best": max(r["pairs_per_s"] for r in rs),
            "pairs_per_s_runs": [round(r["pairs_per_s"], 2) for r in rs],
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "steps": rs[0]["steps"],
            "pairs": rs[0]["pairs"],
            "sequences_encoded": rs[0]["sequences_encoded"],
        }

    with tempfile.TemporaryDirectory(prefix="bench-rm-") as tmp:
        root = Path(tmp)
        model_dir = build_model(root, args)
        rows = make_pairs(args.pairs, args.k, args.seed)
        pairs_file, grouped_file = root / "pairs.jsonl", root / "grouped.jsonl"
        pairs_file.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "group"}) + "\n" for r in rows))
        grouped_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        # TRL gets rlhfkit's own token ids, so both train on identical sequences
        tokenizer = models.load_tokenizer(str(model_dir))
        encode = rm_data.Encoder(tokenizer)
        token_pairs = [{"chosen_ids": list(encode(c.prompt, c.chosen)), "rejected_ids": list(encode(c.prompt, c.rejected))}
                       for c in records.load(pairs_file, records.parse_comparison)]  # fmt: skip
        n_params = sum(p.numel() for p in models.load_model(str(model_dir), kind="reward").parameters())
        tokens = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in token_pairs)
        result = {
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "threads": torch.get_num_threads(),
            "gradient_checkpointing": False,
            "model": {"path": args.model or f"in-process llama, hidden {args.hidden_size}, {args.layers} layers",
                      "parameters": n_params},
            "pairs": len(token_pairs),
            "tokens_per_epoch": tokens,
            "batch_size": args.batch_size,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
            "machine": machine(),
        }
        for dtype in args.dtypes:
            runs: dict[str, list[dict]] = {"rlhfkit": [], "trl": [], **({"rlhfkit_grouped": []} if args.grouped else {})}
            for i in range(args.repeats):
                print(f"[{dtype} {i + 1}/{args.repeats}] TRL RewardTrainer ...", file=sys.stderr)
                runs["trl"].append(run_trl(model_dir, token_pairs, root / f"trl-{dtype}-{i}", args, dtype))
                print(f"[{dtype} {i + 1}/{args.repeats}] rlhfkit train-rm ...", file=sys.stderr)
                out = root / f"rlhfkit-{dtype}-{i}"
                runs["rlhfkit"].append(run_rlhfkit(model_dir, pairs_file, out, args, args.batch_size, dtype))
                if args.grouped:
                    # the same pairs per step: a ranking of k completions (half of them with the rule word) holds (k/2)² pairs
                    per_group = (args.k // 2) * (args.k - args.k // 2)
                    runs["rlhfkit_grouped"].append(run_rlhfkit(model_dir, grouped_file, root / f"grouped-{dtype}-{i}", args,
                                                               max(1, args.batch_size // per_group), dtype))  # fmt: skip
            row = {"trl_bf16": trl_bf16(dtype, args.device), "rlhfkit_overrides": args.set if dtype != "float32" else [],
                   **{name: summary(rs) for name, rs in runs.items()}}  # fmt: skip
            row["ratio_rlhfkit_over_trl"] = row["rlhfkit"]["pairs_per_s"] / row["trl"]["pairs_per_s"]
            row["ratio_best_rlhfkit_over_trl"] = row["rlhfkit"]["pairs_per_s_best"] / row["trl"]["pairs_per_s_best"]
            if args.grouped:
                row["ratio_grouped_over_trl"] = row["rlhfkit_grouped"]["pairs_per_s"] / row["trl"]["pairs_per_s"]
            result[dtype] = row
            print(
                f"pairs/s ({dtype}, batch {args.batch_size}, {len(token_pairs)} pairs, {n_params / 1e6:.1f}M params): "
                f"rlhfkit {row['rlhfkit']['pairs_per_s']:.1f}, TRL {row['trl']['pairs_per_s']:.1f}, "
                f"ratio {row['ratio_rlhfkit_over_trl']:.2f} (medians; best runs: {row['ratio_best_rlhfkit_over_trl']:.2f})"
                + (f"; rlhfkit grouped {row['rlhfkit_grouped']['pairs_per_s']:.1f}" if args.grouped else ""),
                file=sys.stderr,
            )
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
