#!/usr/bin/env python3
"""Is the hard example learnable? Measurements on collected samples, without PPO.

Subcommands (each prints one JSON object on stdout; people read stderr):

  pairs SAMPLES...                 the annotator's verdicts: strict pairs, tied pairs, each aspect's
                                   spread, completions that stopped, per file
  probe --model M --train S --test S
                                   the reference point of issue 18: an L2-regularised logistic
                                   regression ("probe") on the FROZEN model's features, trained on
                                   the strict pairs of the train samples, its agreement with the
                                   annotator on the strict pairs of the test samples. Features:
                                   the last-token hidden state of prompt+completion (what a reward
                                   model's score head reads), the mean over the completion's
                                   tokens, both concatenated, and the last token of the middle
                                   layer, tokenised exactly as train-rm/ppo/eval do
                                   (rlhfkit.chat.encode_prompt + encode_completion). The L2
                                   strength is chosen by leave-one-family-out cross-validation on
                                   the train prompts (never by the test pairs); the whole grid is
                                   reported too. --oracle adds the rubric's own aspects as
                                   features (what a perfect feature extractor would give).
  rm --rm DIR... --test S          a trained reward model's agreement on the test strict pairs
                                   (scored with rlhfkit.reward.load_reward, the way ppo/eval
                                   score), with a 95% Wilson interval and the Pearson correlation
                                   of its scores with the rubric's

Agreement counts a pair the model scores equal as half. Samples are ``rlhfkit collect`` output;
the annotator is examples/hard/annotator.py (imported, so its rubric is the one measured).
Prompt families come from --prompts files (the "family" field written by make_data.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import annotator  # noqa: E402  (examples/hard/annotator.py)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# --- the annotator's verdicts -------------------------------------------------------------------


def scored(samples: list[dict]) -> list[dict]:
    """One row per completion: prompt_id, id, prompt, text, stopped, rubric score, aspects."""
    out = []
    for s in samples:
        question = annotator.prompt_text(s["prompt"])
        for c in s["completions"]:
            reason = c.get("finish_reason", "stop")
            out.append({
                "prompt_id": s["prompt_id"], "id": c["id"], "prompt": s["prompt"], "text": c["text"],
                "stopped": reason == "stop", "score": annotator.rubric(question, c["text"], reason),
                "aspects": annotator.aspects(question, c["text"], reason),
            })
    return out


def couples(rows: list[dict]) -> tuple[list[tuple[int, int]], int]:
    """(strict pairs as (better index, worse index), number of tied couples) within each prompt."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_prompt[r["prompt_id"]].append(i)
    strict, ties = [], 0
    for idx in by_prompt.values():
        for a, b in itertools.combinations(idx, 2):
            if rows[a]["score"] == rows[b]["score"]:
                ties += 1
            else:
                strict.append((a, b) if rows[a]["score"] > rows[b]["score"] else (b, a))
    return strict, ties


def cmd_pairs(args: argparse.Namespace) -> dict:
    result = {}
    for path in args.samples:
        rows = scored(read_jsonl(path))
        strict, ties = couples(rows)
        names = sorted({k for r in rows for k in r["aspects"]})
        spread = {k: {"mean": round(statistics.fmean(r["aspects"].get(k, 0.0) for r in rows), 3),
                      "std": round(statistics.pstdev(r["aspects"].get(k, 0.0) for r in rows), 3)} for k in names}
        # how much each aspect alone decides the strict pairs (share of pairs it orders the same way)
        decides = {}
        for k in names:
            agree = sum(1.0 if (rows[w]["aspects"].get(k, 0) > rows[lo]["aspects"].get(k, 0)) else
                        0.5 if rows[w]["aspects"].get(k, 0) == rows[lo]["aspects"].get(k, 0) else 0.0 for w, lo in strict)
            decides[k] = round(agree / max(1, len(strict)), 3)
        scores = [r["score"] for r in rows]
        result[path] = {
            "prompts": len({r["prompt_id"] for r in rows}), "completions": len(rows),
            "stopped": round(sum(r["stopped"] for r in rows) / max(1, len(rows)), 3),
            "strict_pairs": len(strict), "tied_pairs": ties, "tie_share": round(ties / max(1, ties + len(strict)), 3),
            "score": {"mean": round(statistics.fmean(scores), 3), "std": round(statistics.pstdev(scores), 3)},
            "aspects": spread, "aspect_agrees_with_ranking": decides,
        }
    return result


# --- features of the frozen model ---------------------------------------------------------------


def features(model_path: str, rows: list[dict], batch_size: int = 16) -> dict:
    """(N, H) last-token and completion-mean hidden states (last layer), and the last token of a middle layer."""
    import torch

    from rlhfkit import models
    from rlhfkit.chat import encode_completion, encode_prompt

    tok = models.load_tokenizer(model_path)
    model = models.load_model(model_path).eval()
    seqs = []
    for r in rows:
        p = encode_prompt(tok, r["prompt"])
        c = encode_completion(tok, r["text"], stopped=r["stopped"])
        seqs.append((p, c))
    last, mean, mid_last = [], [], []
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            length = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), length), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for i, (p, c) in enumerate(chunk):
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                mask[i, : len(p) + len(c)] = 1
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[-1]  # (B, L, H), after the final norm
            middle = out.hidden_states[len(out.hidden_states) // 2]
            for i, (p, c) in enumerate(chunk):
                end = len(p) + len(c) - 1
                last.append(hidden[i, end])
                mid_last.append(middle[i, end])
                mean.append(hidden[i, len(p) : end + 1].mean(0) if c else hidden[i, end])
    return {"last": torch.stack(last).float(), "mean": torch.stack(mean).float(), "mid_last": torch.stack(mid_last).float()}


def cached_features(model_path: str, rows: list[dict], batch_size: int, cache_dir: str | None) -> dict:
    """`features`, kept in CACHE_DIR/features-<hash of model path and token sequences>.safetensors."""
    import hashlib

    from safetensors.torch import load_file, save_file

    if not cache_dir:
        return features(model_path, rows, batch_size)
    what = [os.path.abspath(model_path)] + [[r["prompt"], r["text"], r["stopped"]] for r in rows]
    key = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"features-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))
    feats = features(model_path, rows, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in feats.items()}, str(path))
    return feats


def fit_probe(x, pairs, l2: float):
    """w minimising mean log(1 + exp(-w·(x_w - x_l))) + l2·|w|², by L-BFGS (no bias: a difference)."""
    import torch

    d = x[[w for w, _ in pairs]] - x[[lo for _, lo in pairs]]
    w = torch.zeros(x.size(1), requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(d @ w)).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def agreement(values, pairs) -> float:
    if not pairs:
        return float("nan")
    hits = sum(1.0 if values[w] > values[lo] else 0.5 if values[w] == values[lo] else 0.0 for w, lo in pairs)
    return hits / len(pairs)


def pearson(a, b) -> float:
    if len(a) < 2 or statistics.pstdev(a) == 0 or statistics.pstdev(b) == 0:
        return float("nan")
    return statistics.correlation(a, b)


def family_of(prompt_files: list[str]) -> dict[str, str]:
    fam = {}
    for path in prompt_files:
        for r in read_jsonl(path):
            fam[str(r["id"])] = r.get("family", "all")
    return fam


def cmd_probe(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    train_rows, test_rows = scored(read_jsonl(args.train)), scored(read_jsonl(args.test))
    rows = train_rows + test_rows
    if args.all_stopped:  # featurise every completion with a final EOS, as train-rm encodes comparisons
        rows = [{**r, "stopped": True} for r in rows]
    n_train = len(train_rows)
    train_pairs, _ = couples(train_rows)
    test_pairs = [(w + n_train, lo + n_train) for w, lo in couples(test_rows)[0]]
    families = family_of(args.prompts)
    start = time.time()
    feats = cached_features(args.model, rows, args.batch_size, args.cache)
    log(f"features of {len(rows)} completions in {time.time() - start:.0f}s")
    feats["last+mean"] = torch.cat([feats["last"], feats["mean"]], 1)  # what a score head reads + what the text holds overall
    if args.oracle:  # references: the rubric's own aspects as features (all of them; only ended and length)
        names = ["ended", "length", "readability", "direct", "tone", "concrete", "repetition", "degenerate"]
        table = torch.tensor([[r["aspects"].get(k, 0.0) for k in names] for r in rows])
        feats["oracle:all-aspects"] = table
        feats["oracle:ended+length"] = table[:, :2]
    grid = [float(v) for v in args.l2.split(",")]
    result = {"train_strict_pairs": len(train_pairs), "test_strict_pairs": len(test_pairs), "features": {}}
    for name, x in feats.items():
        mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6  # standardised on the train completions only
        x = (x - mu) / sd
        cv = {}
        fams = sorted({families.get(train_rows[w]["prompt_id"], "all") for w, _ in train_pairs})
        for l2 in grid:
            hits, n = 0.0, 0
            for fam in fams:  # leave one train family out
                fit = [p for p in train_pairs if families.get(train_rows[p[0]]["prompt_id"], "all") != fam]
                held = [p for p in train_pairs if families.get(train_rows[p[0]]["prompt_id"], "all") == fam]
                if not fit or not held:
                    continue
                w = fit_probe(x, fit, l2)
                hits += agreement((x @ w).tolist(), held) * len(held)
                n += len(held)
            cv[l2] = hits / max(1, n)
        best = max(grid, key=lambda v: (cv[v], v))
        by_l2 = {}
        for l2 in grid:
            w = fit_probe(x, train_pairs, l2)
            values = (x @ w).tolist()
            by_l2[l2] = {"train": round(agreement(values, train_pairs), 3), "cv": round(cv[l2], 3),
                         "test": round(agreement(values, test_pairs), 3)}
        w = fit_probe(x, train_pairs, best)
        values = (x @ w).tolist()
        acc = agreement(values, test_pairs)
        lo, hi = wilson(acc * len(test_pairs), len(test_pairs))
        test_scores = [r["score"] for r in test_rows]
        result["features"][name] = {
            "l2_chosen_by_cv": best, "test_agreement": round(acc, 3), "ci95": [round(lo, 3), round(hi, 3)],
            "test_pearson_with_rubric": round(pearson(values[n_train:], test_scores), 3), "grid": by_l2,
        }
        log(f"probe[{name}] l2={best}: test agreement {acc:.3f} [{lo:.3f}, {hi:.3f}] on {len(test_pairs)} strict pairs")
    result["seconds"] = round(time.time() - start, 1)
    return result


# --- trained reward models ----------------------------------------------------------------------


def cmd_rm(args: argparse.Namespace) -> dict:
    from rlhfkit import models
    from rlhfkit.reward import load_reward

    rows = scored(read_jsonl(args.test))
    pairs, _ = couples(rows)
    out = {"test_strict_pairs": len(pairs)}
    for spec in args.rm:
        start = time.time()
        tok = models.load_tokenizer(spec)
        reward = load_reward(spec, tok, "cpu", batch_size=args.batch_size)
        out[spec] = {}
        # "as sampled": a cut-off completion has no EOS, as ppo and eval score it; "all stopped": every
        # completion ends with EOS, as train-rm encoded comparisons before they carried finish_reason
        for mode in args.modes:
            values = []
            for i in range(0, len(rows), args.batch_size):
                chunk = rows[i : i + args.batch_size]
                stopped = [r["stopped"] or mode == "all_stopped" for r in chunk]
                values += reward.score([r["prompt"] for r in chunk], [r["text"] for r in chunk], stopped=stopped).tolist()
            acc = agreement(values, pairs)
            lo, hi = wilson(acc * len(pairs), len(pairs))
            out[spec][mode] = {"test_agreement": round(acc, 3), "ci95": [round(lo, 3), round(hi, 3)],
                               "test_pearson_with_rubric": round(pearson(values, [r["score"] for r in rows]), 3)}
            log(f"rm {spec} ({mode}): test agreement {acc:.3f} [{lo:.3f}, {hi:.3f}] on {len(pairs)} strict pairs")
        out[spec]["seconds"] = round(time.time() - start, 1)
    return out


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pairs")
    p.add_argument("samples", nargs="+")
    p = sub.add_parser("probe")
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    data = Path(__file__).resolve().parent / "data"
    p.add_argument("--prompts", nargs="+", default=[str(data / "train_prompts.jsonl"), str(data / "test_prompts.jsonl")])
    p.add_argument("--l2", default="0.001,0.01,0.1,1,3,10")
    p.add_argument("--oracle", action="store_true", help="also fit the probe on the rubric's aspects themselves (references)")
    p.add_argument("--all-stopped", action="store_true", help="append EOS to every completion (train-rm before 4c0b262)")
    p.add_argument("--cache", default=None, help="folder to keep the features in (reused when the samples are the same)")
    p.add_argument("--batch-size", type=int, default=16)
    p = sub.add_parser("rm")
    p.add_argument("--rm", nargs="+", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["as_sampled", "all_stopped"], choices=["as_sampled", "all_stopped"],
                   help="encodings to measure: as_sampled (as ppo and eval score), all_stopped (EOS on every answer)")
    for p in sub.choices.values():
        p.add_argument("--round-to", type=float, default=annotator.ROUND_TO, help="the annotator's rounding (ties)")
    args = parser.parse_args()
    annotator.ROUND_TO = args.round_to
    result = {"pairs": cmd_pairs, "probe": cmd_probe, "rm": cmd_rm}[args.cmd](args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
