"""``rlhfkit eval``'s models and their samples (phases 1-2 of `rlhfkit.stages.eval`).

* `Player` — one model under evaluation (the baseline, a ``--policy``, best-of-n, a checkpoint) and
  its completions, one per row (``NAME=PATH`` is read by `rlhfkit.config.named_path`);
* `find_checkpoints` / `load_checkpoint_policy` — the checkpoints of a ppo run (``--checkpoints``):
  the run's base policy with the checkpoint's weights (all of them, or LoRA adapters, merged);
* seeds: row (prompt p, sample j) samples from `rlhfkit.seeds.row_seed` (seed, p, j) (scheme
  ``sha63``), the same for every model; `completion_id` does not show which model wrote a
  completion (the judge is blind);
* `Sampler` — samples every row of one model in batches and measures each completion: the reward
  model's score, the per-sequence KL to the baseline (`rlhfkit.losses.kl_estimate`, k1, summed over
  the response, both log-probs of ``logits / temperature``), the length, whether it stopped;
  `Sampler.sample_best_of` keeps the reward model's favourite of N baseline samples per row;
* `perplexity` — exp(token-mean NLL) on ``--demos`` with `rlhfkit.losses.lm_loss`, over the tokens SFT
  trains on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.config import EvalConfig
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.seeds import digest, row_seed


@dataclass
class Player:
    name: str
    path: str
    kind: str = "policy"  # policy | baseline | best-of | checkpoint
    step: int | None = None
    completions: list[dict[str, Any]] = field(default_factory=list)  # one per row
    perplexity: float | None = None
    best_of_scores: list[list[float]] = field(default_factory=list)  # best-of-n: the n scores of each row


def completion_id(prompt_id: str, player: str, sample: int, seed: int) -> str:
    """A stable completion id that does not show which model wrote it (the judge is blind)."""
    return f"{prompt_id}-{digest(seed, player, prompt_id, sample, sep='/')[:8]}"


# --- the checkpoints of a ppo run ------------------------------------------------------------------


def find_checkpoints(run_dir: str) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every complete checkpoint of a ppo run that holds the policy's weights."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        raise ConfigError(f"--checkpoints {run_dir}: no checkpoints/ directory (expected a ppo run directory)")
    found = []
    for d in sorted(root.glob("step-*")):
        sharded = (d / ".metadata").is_file()  # --strategy fsdp: a DCP checkpoint (rlhfkit.sharding)
        if (d / "state.json").is_file() and ((d / "policy.safetensors").is_file() or sharded):
            try:
                found.append((int(d.name.split("-", 1)[1]), d))
            except ValueError:
                continue
    if not found:
        raise ConfigError(f"--checkpoints {run_dir}: no complete checkpoint with policy.safetensors in {root}")
    return found


def checkpoint_config(run_dir: str, checkpoint: Path) -> dict[str, Any]:
    """The ppo config that made a checkpoint (its input policy and LoRA settings)."""
    from rlhfkit.training import read_state

    state = read_state(checkpoint)
    config = state.get("config") or {}
    if not config.get("policy"):
        from rlhfkit.provenance import read_run_info

        config = read_run_info(run_dir).get("config") or {}
    if not config.get("policy"):
        raise ConfigError(f"--checkpoints {run_dir}: {checkpoint}/state.json does not name the policy it started from")
    return config


def load_checkpoint_policy(
    run_dir: str, checkpoint: Path, *, device: Any, dtype: Any, trust_remote_code: bool
) -> tuple[Any, Any]:
    """A ppo checkpoint's policy: its base policy with the checkpoint's weights on top (all of them,
    or only the trainable ones: LoRA adapters are applied with the run's settings, then merged)."""
    from safetensors.torch import load_file

    from rlhfkit.models import apply_lora, load_model, load_tokenizer, merged

    config = checkpoint_config(run_dir, checkpoint)
    spec = str(config["policy"])
    model = load_model(spec, "causal-lm", dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    if (checkpoint / ".metadata").is_file():  # written with --strategy fsdp: the policy's entries of the sharded checkpoint
        from rlhfkit import sharding

        if config.get("lora"):
            model = apply_lora(model, r=int(config.get("lora_r", 16)), alpha=int(config.get("lora_alpha", 32)),
                               target_modules=str(config.get("lora_target_modules", "all-linear")))  # fmt: skip
        try:
            sharding.load_module(checkpoint, "policy", model)
        except Exception as e:  # DCP reports a damaged or mismatching checkpoint with its own error types
            raise RlhfkitError(f"{checkpoint}: cannot read the policy from the sharded checkpoint ({str(e)[:200]})") from e
        return merged(model), tokenizer
    try:
        weights = load_file(str(checkpoint / "policy.safetensors"), device=str(device))
    except Exception as e:  # a damaged file: safetensors raises its own error type
        raise RlhfkitError(f"{checkpoint}/policy.safetensors: cannot read it ({type(e).__name__}: {str(e)[:200]})") from e
    if any("lora_" in k for k in weights):
        model = apply_lora(
            model,
            r=int(config.get("lora_r", 16)),
            alpha=int(config.get("lora_alpha", 32)),
            target_modules=str(config.get("lora_target_modules", "all-linear")),
        )
    _, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise RlhfkitError(
            f"{checkpoint}/policy.safetensors: weights that the policy {spec} does not have (e.g. {unexpected[0]!r})"
        )
    return merged(model), tokenizer


# --- sampling and measuring ------------------------------------------------------------------------


def _stop_ids(tokenizer: Any, model: Any) -> list[int]:
    from rlhfkit.chat import stop_token_ids

    ids = set(stop_token_ids(tokenizer, model.config))
    ids.update(stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    return sorted(ids)


class Sampler:
    """What every model's sampling shares: prompts, rows, device, the baseline and the reward; it
    counts the tokens sampled and the seconds spent (the throughput of the report)."""

    def __init__(self, config: EvalConfig, items: list, rows: list, device: Any, dtype: Any, kl_temperature: float, console: Any):
        self.config, self.items, self.rows = config, items, rows
        self.device, self.dtype, self.kl_temperature, self.console = device, dtype, kl_temperature, console
        self.reward: Any = None
        self.base_model: Any = None
        self.base_tok: Any = None
        self.tokens = 0
        self.sampling_seconds = 0.0

    def load(self, path: str) -> tuple[Any, Any]:
        from rlhfkit.ilql_heads import for_sampling
        from rlhfkit.models import disable_dropout, load_model, load_tokenizer

        model = load_model(
            path, "causal-lm", dtype=self.dtype, device=self.device, trust_remote_code=self.config.trust_remote_code
        )
        model = for_sampling(model, path)  # an ILQL model samples (and is scored) with logits + β·(Q − V)
        disable_dropout(model)
        model.eval()
        return model, load_tokenizer(path, trust_remote_code=self.config.trust_remote_code)

    def sample_player(self, player: Player, model: Any, tokenizer: Any) -> None:
        """Sample every row; score, measure KL to the baseline, and keep one dict per row."""
        seeds = [row_seed(self.config.seed, self.items[i].id, j, scheme="sha63") for i, j in self.rows]
        is_base = player.kind == "baseline"
        same_vocab = is_base or tokenizer.get_vocab() == self.base_tok.get_vocab()
        if not same_vocab:
            self.console.print(f"[yellow]warning:[/] {player.name}: its tokenizer differs from the baseline's; no KL reported")
        player.completions = self._generate(
            player.name, model, tokenizer, [i for i, _ in self.rows], seeds, kl=not is_base and same_vocab, same_vocab=same_vocab
        )

    def sample_served(self, player: Player, client: Any) -> None:
        """Every row from a served policy (`rlhfkit.served.Client`): the seeds a local model would use
        (so the rows match across models), scored by the reward model on the text (re-encoded with its
        own tokenizer); no log-prob, so no KL to the baseline."""
        import torch

        from rlhfkit.served import Request, Sampling

        config = self.config
        options = Sampling(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                           chat_template=config.chat_template)  # fmt: skip
        seeds = [row_seed(config.seed, self.items[i].id, j, scheme="sha63") for i, j in self.rows]  # as `sample_player`'s
        requests = [Request(self.items[i].prompt, seed) for (i, _), seed in zip(self.rows, seeds)]
        t0 = time.perf_counter()
        answers = client.sample(requests, options)
        self.sampling_seconds += time.perf_counter() - t0
        self.tokens += sum(a.num_tokens for a in answers)
        scores: list[float | None] = [None] * len(answers)
        if self.reward is not None:
            scores = []
            for start in range(0, len(answers), config.batch_size):
                chunk = list(range(start, min(start + config.batch_size, len(answers))))
                prompts = [self.items[self.rows[r][0]].prompt for r in chunk]
                stopped = torch.tensor([answers[r].finish_reason == "stop" for r in chunk])
                scores += self.reward.score(prompts, [answers[r].text for r in chunk], stopped=stopped).float().tolist()
            bad = next((v for v in scores if not math.isfinite(v)), None)
            if bad is not None:
                raise RlhfkitError(f"--rm {config.rm}: scored a completion of {player.name} {bad} (not a finite number)")
        player.completions = [
            {"text": a.text, "finish_reason": a.finish_reason, "num_tokens": a.num_tokens, "logprob": None, "score": score,
             "kl": None}
            for a, score in zip(answers, scores)  # fmt: skip
        ]

    def sample_best_of(self, player: Player, model: Any, tokenizer: Any) -> None:
        """N fresh baseline samples per row (seeds of their own); keep the RM's favourite."""
        n = self.config.best_of
        index = [i for i, _ in self.rows for _ in range(n)]
        seeds = [
            row_seed(self.config.seed, self.items[i].id, j, "best-of", k, scheme="sha63") for i, j in self.rows for k in range(n)
        ]
        # no log-prob forward: the base model's log-prob of an answer is not best-of-n's (which selects)
        samples = self._generate(player.name, model, tokenizer, index, seeds, kl=False, same_vocab=True, logprob=False)
        player.completions, player.best_of_scores = [], []
        for r in range(len(self.rows)):
            group = samples[r * n : (r + 1) * n]
            scores = [c["score"] for c in group]
            player.best_of_scores.append(scores)
            chosen = dict(group[max(range(n), key=lambda k: (scores[k], -k))])  # the first of equal best
            chosen["kl"] = None
            player.completions.append(chosen)

    def _generate(
        self, name: str, model: Any, tokenizer: Any, prompt_index: list[int], seeds: list[int], *, kl: bool, same_vocab: bool,
        logprob: bool = True,
    ) -> list[dict[str, Any]]:
        """Sample one completion per entry of ``prompt_index`` (with its seed) in batches; return
        ``{text, finish_reason, num_tokens, logprob, score, kl}`` per entry. ``same_vocab``: the
        token ids are the baseline's vocabulary (the reward model may score them directly).
        ``logprob=False`` skips the forward pass that measures each completion's log-prob (and KL):
        both are None then."""
        from rlhfkit.chat import encode_prompt
        from rlhfkit.console import progress_bar
        from rlhfkit.generation import policy_logprobs, sample
        from rlhfkit.losses import kl_estimate

        config = self.config
        encoded = {i: encode_prompt(tokenizer, self.items[i].prompt, config.chat_template) for i in set(prompt_index)}
        stop_ids = _stop_ids(tokenizer, model)
        pad = tokenizer.pad_token_id
        out: list[dict[str, Any]] = []
        with progress_bar(f"sampling {name}", total=len(prompt_index)) as bar:
            for start in range(0, len(prompt_index), config.batch_size):
                batch = prompt_index[start : start + config.batch_size]
                t0 = time.perf_counter()
                rollout = sample(
                    model,
                    [encoded[i] for i in batch],
                    max_new_tokens=config.max_new_tokens,
                    stop_token_ids=stop_ids,
                    pad_token_id=pad,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    seeds=seeds[start : start + len(batch)],
                )
                self.sampling_seconds += time.perf_counter() - t0
                lengths = rollout.response_lengths.tolist()
                self.tokens += sum(lengths)
                texts = [rollout.completion_text(b, tokenizer, stop_ids) for b in range(len(batch))]
                args = (rollout.query, rollout.query_mask, rollout.response, rollout.response_mask)
                sums: list[float | None] = [None] * len(batch)
                kls: list[float | None] = [None] * len(batch)
                if logprob:
                    logprobs = policy_logprobs(model, *args, self.kl_temperature)[0]  # (B, T)
                    sums = logprobs.sum(1).tolist()
                    if kl:
                        ref_logprobs = policy_logprobs(self.base_model, *args, self.kl_temperature)[0]
                        kls = (kl_estimate(logprobs, ref_logprobs, "k1") * rollout.response_mask).sum(1).tolist()  # (B,)
                    elif model is self.base_model:
                        kls = [0.0] * len(batch)
                scores: list[float | None] = [None] * len(batch)
                if self.reward is not None:
                    prompts = [self.items[i].prompt for i in batch]
                    ids = args if same_vocab else (None, None, None, None)  # else the reward re-encodes the texts
                    scores = self.reward.score(prompts, texts, *ids, stopped=rollout.stopped).float().tolist()
                    bad = next((v for v in scores if not math.isfinite(v)), None)
                    if bad is not None:  # a report holds numbers only
                        raise RlhfkitError(f"--rm {config.rm}: scored a completion of {name} {bad} (not a finite number)")
                stopped = rollout.stopped.tolist()
                for b in range(len(batch)):
                    out.append(
                        {
                            "text": texts[b],
                            "finish_reason": "stop" if stopped[b] else "length",
                            "num_tokens": int(lengths[b]),
                            "logprob": sums[b],
                            "score": scores[b],
                            "kl": kls[b],
                        }
                    )
                bar.update(len(batch), info=f"{self.tokens / max(1e-9, self.sampling_seconds):.0f} tok/s")
        return out


def perplexity(model: Any, tokenizer: Any, demos: Any, batch_size: int, source: str, chat_template: str = "auto") -> float:
    """Token-weighted perplexity ``exp(Σ NLL / Σ tokens)`` on held-out demonstrations, over the
    tokens SFT trains on (`rlhfkit.demonstrations`: the response of prompt/response pairs,
    the assistant turns of chats, every token of plain text) with SFT's loss (`rlhfkit.losses.lm_loss`),
    so it is comparable with SFT's own eval perplexity."""
    import torch

    from rlhfkit.demonstrations import collate, encode_dataset
    from rlhfkit.losses import lm_loss

    max_length = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    examples, _ = encode_dataset(tokenizer, demos, demos.lines, source=source, max_length=max_length, chat_template=chat_template)
    device = next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id).to(device)
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits  # (B, T, V)
        nll_sum, _ = lm_loss(logits, batch.labels, normalizer=1.0)  # Σ next-token NLL over the labelled tokens
        nll += nll_sum.double()
        count += batch.num_label_tokens
    return math.exp(nll.item() / max(1, count))
