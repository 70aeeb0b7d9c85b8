"""``ppo --judge CMD``: the judge's win-rate of the policy over the starting policy during training,
and the best policy by it.

The reward model is a proxy for what the judge (a scripted rubric, an LLM, people) prefers; past a
point PPO raises the proxy while the judge's verdict falls (Gao et al. 2022, "Scaling Laws for Reward
Model Overoptimization"). The monitor watches the judge's verdict and keeps the policy it liked best:

1. step 0: the starting policy samples one completion per judge prompt — the first
   ``--judge-samples`` (32) distinct prompts of ``--judge-prompts`` (default ``--prompts``; pass
   held-out prompts to measure generalisation) — row i from its own seed
   ``row_seed(seed, "ppo-judge", prompt id)`` (scheme ``sha63``), with ppo's sampling options;
2. after every ``--judge-every`` N steps and after the last one, the current policy samples the
   same prompts with the same seeds (an unchanged policy writes the same completions);
3. the judge gets, per prompt, the two completions (the start's and the policy's) in one samples
   record, blind (ids do not show which is which) and shuffled, through `rlhfkit.judge.run_judge`:
   the protocol of ``eval --judge``;
4. the policy's win-rate over the start (ties ½) with its 95% Wilson interval (`stats.win_rate`)
   goes into metrics.jsonl at that step: ``judge/win_rate``, ``judge/win_rate_low``,
   ``judge/win_rate_high``, ``judge/matches``;
5. ``--keep-best`` (the default): the candidates are the starting policy (win-rate ½ by
   definition) and every judged step; the best has the highest win-rate, the earliest of equal
   ones (the one nearer the start). OUT holds the best policy — the starting policy itself when no
   judged step beat it, which rlhfkit says loudly. The best's trainable weights are kept in
   ``OUT/judge/best-step-NNNNNN.safetensors`` until the end (the checkpoints keep training's state).

Each judged step also leaves ``OUT/judge/step-NNNNNN.jsonl`` (per prompt: both completions, unblinded,
and the outcome) and the judge's raw answer ``OUT/judge/step-NNNNNN.rankings.jsonl``.

Exact resume: the monitor's state (the start's completions, every judged step's result, the best
step) is part of each checkpoint, and sampling uses per-row generators (never the global RNG), so a
resumed run judges what an uninterrupted one would. The judge runs on rank 0 only.

A best picked as the highest of several noisy win-rates is optimistic (the winner's curse): measure
it again with ``rlhfkit eval --judge`` on held-out prompts.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.errors import RlhfkitError
from rlhfkit.seeds import digest, row_seed
from rlhfkit.stages.ppo_data import PromptItem
from rlhfkit.stages.ppo_models import Models
from rlhfkit.training import Dist

JUDGE_DIR = "judge"  # OUT/judge/: per judged step, what was judged and the answer; the best policy's weights


def judged_steps(steps: int, every: int) -> list[int]:
    """The steps after which the policy is judged: every ``every``-th and the last (``every`` 0: the last only).

    Example: ``judged_steps(10, 4) == [4, 8, 10]``, ``judged_steps(10, 0) == [10]``.
    """
    return sorted({s for s in range(every, steps + 1, every)} | {steps}) if every else [steps]


def judge_prompts(config: PPOConfig, items: Sequence[PromptItem], tokenizer: Any) -> list[PromptItem]:
    """The first ``--judge-samples`` distinct prompts of ``--judge-prompts`` (default: ppo's own prompts)."""
    if config.judge_prompts:
        from rlhfkit.stages.ppo_data import load_prompts

        items, _ = load_prompts(dataclasses.replace(config, prompts=config.judge_prompts), tokenizer)
    picked: dict[str, PromptItem] = {}
    for item in items:
        if len(picked) == config.judge_samples:
            break
        picked.setdefault(item.id, item)
    return list(picked.values())


class JudgeMonitor:
    """The monitor of one ppo run (a no-op without ``--judge`` and on ranks other than 0).

    `after_step` (in the loop, before the step's metrics are logged) returns the ``judge/*``
    metrics of a judged step; `state_dict` goes into every checkpoint; `finish` loads the best
    policy's weights (``--keep-best``) and returns what rlhfkit.json records.
    """

    def __init__(self, config: PPOConfig, models: Models, items: Sequence[PromptItem], out: Path, dist: Dist = Dist(),
                 checkpoint: Path | None = None):  # fmt: skip
        self.config, self.models, self.dir = config, models, Path(out) / JUDGE_DIR
        self.enabled = bool(config.judge) and dist.is_main
        self.steps = set(judged_steps(config.steps, config.judge_every)) if config.judge else set()
        self.history: list[dict[str, Any]] = []  # one entry per judged step
        self.best = {"step": 0, "win_rate": 0.5}  # the starting policy wins half its matches against itself
        self._persisted_best = 0  # the best step recorded by the newest checkpoint: its weights file stays
        if not self.enabled:
            return
        self.items = judge_prompts(config, items, models.tokenizer)
        saved = json.loads((checkpoint / "state.json").read_text()).get("judge") if checkpoint is not None else None
        if saved:  # resumed: the start's completions and the results so far come from the checkpoint
            self.start = saved["start"]
            self.history = saved["history"]
            self.best = saved["best"]
            self._persisted_best = self.best["step"]
            return
        # 1. the starting policy's completions (step 0); its weights are the first best
        self.start = self._sample()
        if config.keep_best:
            self._save_best(0)

    # --- the loop's hooks ---------------------------------------------------------------------

    def after_step(self, step: int) -> dict[str, float]:
        """2.-5. at a judged step (1-based, after its update): sample, judge, compare, keep the best."""
        if not self.enabled or step not in self.steps:
            return {}
        from rlhfkit.console import console
        from rlhfkit.judge import judged_outcome, positions, run_judge
        from rlhfkit.stats import win_rate

        current = self._sample()
        records, who = self._judge_input(step, current)
        console.print(
            f"judge step {step}: {self.config.judge} ({len(records)} prompts)", highlight=False, soft_wrap=True, markup=False
        )
        judgements = run_judge(
            self.config.judge, records, self.dir / f"step-{step:06d}.rankings.jsonl", timeout=self.config.judge_timeout
        )
        # 4. outcomes of the policy against the start, every ranking of a prompt counting
        outcomes: dict[str, list[float]] = {}
        for judgement in judgements:
            ranks = positions(judgement)
            policy_id, start_id = who[judgement.prompt_id]
            result = judged_outcome(ranks, policy_id, start_id)
            if result is not None:
                outcomes.setdefault(judgement.prompt_id, []).append(result)
        flat = [o for item in self.items for o in outcomes.get(item.id, [])]
        rate = win_rate(flat, method="wilson", confidence=0.95)
        self._write_rows(step, current, outcomes)
        entry = {"step": step, "win_rate": rate["rate"], "low": rate["ci_low"], "high": rate["ci_high"], "matches": rate["n"],
                 "wins": rate["wins"], "ties": rate["ties"], "losses": rate["losses"]}  # fmt: skip
        self.history.append(entry)
        metrics: dict[str, float] = {"judge/matches": float(rate["n"])}
        if rate["rate"] is None:
            console.print(f"[yellow]warning:[/] judge step {step}: the judge compared no pair; no win-rate", highlight=False)
            return metrics
        metrics.update(
            {"judge/win_rate": rate["rate"], "judge/win_rate_low": rate["ci_low"], "judge/win_rate_high": rate["ci_high"]}
        )
        console.print(
            f"judge step {step}: win-rate over the starting policy {rate['rate']:.3f} "
            f"[{rate['ci_low']:.3f}, {rate['ci_high']:.3f}] on {rate['n']} matches",
            highlight=False,
            soft_wrap=True,
        )
        # 5. a strictly better win-rate is the new best (the earliest of equal ones stays)
        if rate["rate"] > self.best["win_rate"]:
            self.best = {"step": step, "win_rate": rate["rate"]}
            if self.config.keep_best:
                self._save_best(step)
        return metrics

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint keeps (JSON): the start's completions, the results, the best step."""
        if not self.enabled:
            return None
        self._persisted_best = self.best["step"]
        return {"start": self.start, "history": self.history, "best": self.best}

    def finish(self) -> dict[str, Any] | None:
        """At the end, on rank 0: with ``--keep-best``, the best policy's weights into the policy
        (the caller saves it as OUT); returns what rlhfkit.json and the result record."""
        if not self.enabled:
            return None
        from rlhfkit.console import console

        best = self.best["step"]
        summary = {"command": self.config.judge, "prompts": len(self.items), "steps": self.history, "best": dict(self.best),
                   "kept": "last"}  # fmt: skip
        if not self.config.keep_best:
            return summary
        from safetensors.torch import load_file

        from rlhfkit.training import trainable_state_dict

        path = self._best_path(best)
        weights = load_file(str(path), device=str(next(self.models.policy.parameters()).device))
        _, unexpected = self.models.policy.load_state_dict(weights, strict=False)
        if unexpected or set(trainable_state_dict(self.models.policy)) - set(weights):
            raise RlhfkitError(f"{path}: does not hold the policy's trainable weights")
        self._prune(keep={best})
        summary["kept"] = "start" if best == 0 else f"step {best}"
        if best == 0:
            highest = max((h["win_rate"] or 0.0 for h in self.history), default=0.5)
            console.print(
                f"[bold yellow]warning:[/] no judged step beat the starting policy (best win-rate {highest:.3f}): "
                "OUT holds the starting policy (--no-keep-best keeps the last one)",
                highlight=False,
                soft_wrap=True,
            )
        elif best != self.config.steps:
            console.print(f"judge: OUT holds the policy of step {best} (win-rate {self.best['win_rate']:.3f}), the judge's best",
                          highlight=False, soft_wrap=True)  # fmt: skip
        return summary

    # --- sampling, the judge's input, files -------------------------------------------------------

    @torch.no_grad()
    def _sample(self) -> list[dict[str, Any]]:
        """One completion per judge prompt from the current policy, each row from its own seed."""
        from rlhfkit.generation import sample

        config, models = self.config, self.models
        seeds = [row_seed(config.seed, "ppo-judge", item.id, scheme="sha63") for item in self.items]
        chunk = config.generation_batch_size or config.batch_size
        out = []
        with models.autocast():
            for start in range(0, len(self.items), chunk):
                part = self.items[start : start + chunk]
                rollout = sample(
                    models.policy, [it.ids for it in part], max_new_tokens=config.max_new_tokens,
                    stop_token_ids=models.stop_token_ids, pad_token_id=models.tokenizer.pad_token_id,
                    temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, stop_strings=config.stop,
                    tokenizer=models.tokenizer, seeds=seeds[start : start + chunk],
                )  # fmt: skip
                lengths, stopped = rollout.response_lengths.tolist(), rollout.stopped.tolist()
                for i in range(len(part)):
                    text = rollout.completion_text(i, models.tokenizer, models.stop_token_ids)
                    out.append({"text": text, "finish_reason": "stop" if stopped[i] else "length", "num_tokens": int(lengths[i])})
        return out

    def _judge_input(self, step: int, current: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, tuple[str, str]]]:
        """3. One blind, shuffled samples record per prompt; and per prompt id, (policy's id, start's id)."""
        config = self.config
        sampling = {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
                    "max_new_tokens": config.max_new_tokens, "seed": config.seed}  # fmt: skip
        records, who = [], {}
        for item, start, now in zip(self.items, self.start, current):
            ids = {name: f"{item.id}-{digest(config.seed, step, name, item.id)[:8]}" for name in ("policy", "start")}
            completions = [{"id": ids["policy"], **now}, {"id": ids["start"], **start}]
            random.Random(row_seed(config.seed, "ppo-judge", step, item.id, scheme="sha63")).shuffle(completions)
            records.append({"prompt_id": item.id, "prompt": item.prompt, "completions": completions, "sampling": sampling})
            who[item.id] = (ids["policy"], ids["start"])
        return records, who

    def _write_rows(self, step: int, current: list[dict[str, Any]], outcomes: dict[str, list[float]]) -> None:
        from rlhfkit.data.files import write_jsonl

        rows = (
            {
                "prompt_id": item.id,
                "prompt": item.prompt,
                "start": start["text"],
                "policy": now["text"],
                "outcomes": outcomes.get(item.id, []),
            }  # fmt: skip
            for item, start, now in zip(self.items, self.start, current)
        )
        write_jsonl(self.dir / f"step-{step:06d}.jsonl", rows)

    def _best_path(self, step: int) -> Path:
        return self.dir / f"best-step-{step:06d}.safetensors"

    def _save_best(self, step: int) -> None:
        """The policy's trainable weights (all of them, or the LoRA adapters), written atomically; then
        every older best file that no checkpoint still refers to is removed."""
        from safetensors.torch import save

        from rlhfkit.data.files import atomic_open
        from rlhfkit.training import trainable_state_dict

        weights = {k: v.detach().contiguous().clone().cpu() for k, v in trainable_state_dict(self.models.policy).items()}
        with atomic_open(self._best_path(step), "wb") as f:
            f.write(save(weights))
        self._prune(keep={step, self._persisted_best})

    def _prune(self, keep: set[int]) -> None:
        for path in self.dir.glob("best-step-*.safetensors"):
            if int(path.name[len("best-step-") : -len(".safetensors")]) not in keep:
                path.unlink(missing_ok=True)
