"""rlhfkit collect vs Hugging Face ``generate``: sampled tokens per second, side by side.

Both sample the same model (a real one with ``--model``, e.g. ``smollm2``; default the tiny test
Llama) on the same chat prompts (examples/data/prompts.jsonl), K completions per prompt, in batches
of the same ``--batch-size`` sequences taken in the same order (prompt by prompt, K rows each), with
the same sampling (temperature 1, no top-k or top-p, at most ``--max-new-tokens``, stop at the
model's EOS ids), in this one process, alternating ``--repeats`` times.

rlhfkit: the ``collect`` stage itself (`rlhfkit.stages.collect.run`), its own tokens/s (sampled
tokens, the stop token included, over the time spent sampling). Hugging Face: ``model.generate``
(``do_sample=True, top_k=0, top_p=1.0``) on each left-padded batch, the tokens each row produced up
to and including its first EOS, over the time spent in ``generate``.

Precision, per ``--dtypes`` entry: ``float32`` for both, or ``auto``: rlhfkit ``--dtype auto``
(bf16 weights on a GPU or CPU with native bf16, see README "Precision") and the model loaded in the
dtype that resolves to for ``generate``.

    .venv-trl/bin/python bench/bench_collect.py --model smollm2 --prompts 16 --k 4 --batch-size 64

Prints one JSON object on stdout and a summary on stderr. No TRL needed.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_common import clean_up_on_sigterm, convert_model, example_prompts, machine  # noqa: E402


def run_rlhfkit(model_dir: Path, prompts_file: Path, out: Path, args: argparse.Namespace, dtype: str) -> dict:
    from rlhfkit.config import CollectConfig
    from rlhfkit.stages import collect

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = CollectConfig(
        policy=[str(model_dir)], prompts=str(prompts_file), out=str(out / "samples.jsonl"), k=args.k,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=1.0, top_p=1.0, top_k=0,
        device="cpu", dtype=dtype, seed=args.seed,
    )  # fmt: skip
    result = collect.run(config)  # its meter: sampled tokens (stop token included) over the seconds spent sampling
    return {"tokens": result["tokens"], "tokens_per_s": result["tokens"] / result["seconds"], "seconds": result["seconds"]}


def run_hf(model, tokenizer, prompt_ids: list[list[int]], stops: list[int], args: argparse.Namespace) -> dict:
    import torch

    rows = [ids for ids in prompt_ids for _ in range(args.k)]
    tokens, seconds = 0, 0.0
    torch.manual_seed(args.seed)
    for i in range(0, len(rows), args.batch_size):
        batch = rows[i : i + args.batch_size]
        width = max(map(len, batch))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in batch])
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch])
        start = time.perf_counter()
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=args.max_new_tokens, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        seconds += time.perf_counter() - start
        new = out[:, width:]
        is_stop = torch.isin(new, torch.tensor(stops))
        ended = is_stop.cumsum(1) > 0  # at or after the first stop token
        produced = (~ended).sum(1) + is_stop.any(1).long()  # tokens before the first stop, plus the stop token
        tokens += int(produced.sum())
    return {"tokens": tokens, "tokens_per_s": tokens / seconds, "seconds": seconds}


def main() -> None:
    clean_up_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="directory, .gguf, or smollm2 (default: the tiny test Llama)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generation batch (rlhfkit collect's default)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the median is reported")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "auto"])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from rlhfkit import models
    from rlhfkit.chat import encode_prompt, stop_token_ids
    from rlhfkit.testing import save_tiny_model

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    try:
        model_dir = convert_model(work, args.model) if args.model else save_tiny_model(work / "model")
        rows = example_prompts(args.prompts)
        prompts_file = work / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tokenizer = models.load_tokenizer(str(model_dir))
        prompt_ids = [encode_prompt(tokenizer, r["messages"]) for r in rows]
        result: dict = {"model": args.model or "tiny test Llama", "settings": vars(args), "machine": machine()}
        for dtype in args.dtypes:
            torch_dtype = models.resolve_dtype(dtype, torch.device("cpu"))
            model = models.load_model(str(model_dir), "causal-lm", dtype=torch_dtype).eval()
            stops = stop_token_ids(tokenizer, model.config)
            run_hf(model, tokenizer, prompt_ids[:1], stops, argparse.Namespace(**{**vars(args), "max_new_tokens": 2}))  # warm-up
            runs: dict[str, list[dict]] = {"rlhfkit": [], "hf_generate": []}
            for r in range(args.repeats):
                runs["rlhfkit"].append(run_rlhfkit(model_dir, prompts_file, work / "out", args, dtype))
                runs["hf_generate"].append(run_hf(model, tokenizer, prompt_ids, stops, args))
                print(f"{dtype} run {r + 1}: " + ", ".join(f"{k} {v[-1]['tokens_per_s']:.1f} tokens/s" for k, v in runs.items()),
                      file=sys.stderr)  # fmt: skip
            row = {"weights": str(torch_dtype).removeprefix("torch.")}
            for name, rs in runs.items():
                row[name] = {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rs), 1),
                             "runs": [{k: round(v, 2) for k, v in r.items()} for r in rs]}  # fmt: skip
            row["ratio_rlhfkit_over_hf"] = round(row["rlhfkit"]["tokens_per_s"] / row["hf_generate"]["tokens_per_s"], 3)
            print(f"collect {result['model']} {dtype}: rlhfkit {row['rlhfkit']['tokens_per_s']:.1f} tokens/s, HF generate "
                  f"{row['hf_generate']['tokens_per_s']:.1f} tokens/s, {row['ratio_rlhfkit_over_hf']:.2f}x",
                  file=sys.stderr)  # fmt: skip
            result[dtype] = row
            del model
        result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
