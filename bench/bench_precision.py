"""Precision on the CPU: a training step and decoding of one model in float32, bf16 autocast
(float32 weights) and bf16 weights, at each thread count — the measurements behind ``--dtype auto``.

Training step (what a PPO/SFT update does per mini-batch): a forward over B rows of P prompt + T
response tokens, the output layer at the T response positions only (as rlhfkit computes it), float32
log-softmax and the mean NLL of the response tokens, the backward, and a fused AdamW step.
Modes:

* ``float32``: float32 weights, no autocast;
* ``autocast``: float32 weights under ``torch.autocast(dtype=bfloat16)`` (what ``--dtype auto``
  picks on a bf16 CPU): matmuls in bf16, weights, gradients, optimizer and losses float32;
* ``autocast-fp32-head``: the same with the output layer kept in float32 (logits not rounded to bf16);
* ``bfloat16``: bf16 weights, gradients and optimizer state (pure bf16; not what any stage trains with).

Decoding: `rlhfkit.generation.sample` of R rows (K samples of R/K prompts) for N new tokens with no
stop token (every row runs the full N), in float32, under autocast, and with bf16 weights (what
collect/eval load under a bf16 ``--dtype``).

Precision: the response log-probs of each mode against float32's, on the same batch (max and mean
absolute difference), and the float32-vs-mode agreement of the decoded tokens.

    flock /work/notes/cpu.lock nice -n 5 .venv/bin/python bench/bench_precision.py --model smollm2 --threads 1 2

Prints one JSON object on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_common import machine, median_time, model_spec  # noqa: E402

TRAIN_MODES = ("float32", "autocast", "autocast-fp32-head", "bfloat16")
DECODE_MODES = ("float32", "autocast", "bfloat16")


class Fp32Head(torch.nn.Module):
    """An output layer that stays float32 under autocast (wraps the model's Linear)."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.linear(x.float())


def train_step_fn(model, batch, response_len: int, autocast: bool):
    import torch

    from rlhfkit.training import make_optimizer

    optimizer = make_optimizer(model, 1e-7, fused=True)  # a tiny lr: the weights stay (nearly) where they were
    ids, targets = batch
    L = ids.size(1)
    keep = torch.arange(L - response_len - 1, L - 1)

    def logprobs():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            logits = model(input_ids=ids, logits_to_keep=keep).logits
        return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def step():
        loss = -logprobs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, logprobs


def matmul_rates(rows: int, hidden: int, inter: int, repeats: int) -> dict:
    """GFLOP/s of the MLP's up-projection shapes, forward and both backward products (x·Wᵀ, g·W,
    gᵀ·x), in float32 and bfloat16: what the whole-step numbers come from."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, hidden, generator=g).to(dtype)
        w = torch.randn(inter, hidden, generator=g).to(dtype)
        grad = torch.randn(rows, inter, generator=g).to(dtype)
        for name, a, b in (("forward x@W.T", x, w.T), ("backward g@W", grad, w), ("backward g.T@x", grad.T, x)):
            seconds, _ = median_time(lambda a=a, b=b: a @ b, repeats, warmup=2)
            out[f"{name} {str(dtype).removeprefix('torch.')}"] = round(2 * rows * hidden * inter / seconds / 1e9, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="model (directory, .gguf, hub id, or smollm2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8, help="training rows")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=40)
    parser.add_argument("--decode-prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=4, help="samples per prompt when decoding")
    parser.add_argument("--decode-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-modes", nargs="*", default=list(TRAIN_MODES), choices=TRAIN_MODES)
    parser.add_argument("--decode-modes", nargs="*", default=list(DECODE_MODES), choices=DECODE_MODES)
    parser.add_argument("--matmul-only", action="store_true", help="only the GFLOP/s of SmolLM2-shaped matmuls (no model)")
    args = parser.parse_args()
    if args.matmul_only:
        rates = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            rates[threads] = matmul_rates(args.batch * (args.prompt_len + args.response_len), 576, 1536, 20)
        print(json.dumps({"matmul_gflops": rates, "shape": "SmolLM2 MLP 576x1536", "machine": machine()}, indent=2))
        return

    from rlhfkit import models
    from rlhfkit.chat import encode_prompt
    from rlhfkit.generation import sample

    spec = model_spec(args.model)
    tokenizer = models.load_tokenizer(spec)
    base = models.load_model(spec, "causal-lm", dtype=torch.float32).eval()
    models.disable_dropout(base)
    n_params = sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    ids = torch.randint(0, vocab, (args.batch, args.prompt_len + args.response_len), generator=g)
    targets = ids[:, -args.response_len :]
    prompts_file = Path(__file__).resolve().parent.parent / "examples" / "data" / "prompts.jsonl"
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()][: args.decode_prompts]
    prompt_ids = [encode_prompt(tokenizer, r["messages"]) for r in rows for _ in range(args.k)]
    seeds = list(range(len(prompt_ids)))

    def variant(mode: str):
        model = copy.deepcopy(base)
        if mode == "bfloat16":
            model = model.to(torch.bfloat16)
        if mode == "autocast-fp32-head":
            model.lm_head = Fp32Head(model.lm_head)
        return model

    result: dict = {"model": args.model, "parameters": n_params, "settings": vars(args), "machine": machine()}
    result.update(train={}, decode={})
    reference_logprobs = None
    reference_tokens = None
    for threads in args.threads:
        torch.set_num_threads(threads)
        for mode in args.train_modes:
            model = variant(mode).train(False)
            step, logprobs = train_step_fn(model, (ids, targets), args.response_len, autocast=mode.startswith("autocast"))
            with torch.no_grad():
                lp = logprobs().float()
            if mode == "float32" and reference_logprobs is None:
                reference_logprobs = lp
            seconds, times = median_time(step, args.repeats)
            entry = {"seconds": round(seconds, 4), "runs": [round(t, 4) for t in times],
                     "tokens_per_s": round(ids.numel() / seconds, 1)}  # fmt: skip
            if reference_logprobs is not None:
                diff = (lp - reference_logprobs).abs()
                entry["logprob_abs_diff_vs_fp32"] = {"max": round(float(diff.max()), 5), "mean": round(float(diff.mean()), 6)}
            result["train"][f"{mode}/{threads}"] = entry
            print(f"train  {mode:20} {threads} thread(s): {seconds:7.3f} s/step", file=sys.stderr)
            del model, step, logprobs
        for mode in args.decode_modes:
            model = variant(mode).eval()
            ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "autocast" else contextlib.nullcontext
            out = {}

            def decode(model=model, ctx=ctx, out=out):
                with ctx():
                    out["r"] = sample(model, prompt_ids, max_new_tokens=args.decode_tokens, stop_token_ids=[],
                                      pad_token_id=tokenizer.pad_token_id, temperature=1.0, seeds=seeds)  # fmt: skip

            seconds, times = median_time(decode, args.repeats)
            tokens = int(out["r"].response_mask.sum())
            entry = {"seconds": round(seconds, 4), "runs": [round(t, 4) for t in times], "tokens": tokens,
                     "tokens_per_s": round(tokens / seconds, 1)}  # fmt: skip
            response = out["r"].response
            if mode == "float32" and reference_tokens is None:
                reference_tokens = response
            if reference_tokens is not None:
                entry["tokens_equal_to_fp32"] = round(float((response == reference_tokens).float().mean()), 4)
            result["decode"][f"{mode}/{threads}"] = entry
            print(f"decode {mode:20} {threads} thread(s): {tokens / seconds:7.1f} tokens/s", file=sys.stderr)
            del model
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
