"""``rlhfkit ppo``: RLHF with PPO against a reward model and a KL penalty to the reference policy.

Every PPO step runs the numbered phases of lm-human-preferences (Ziegler et al. 2019) and
InstructGPT (Ouyang et al. 2022), as reproduced in lm-human-preference-details:

 1. sample a batch of prompts (a deterministic order from seed and epoch, sharded by rank);
 2. generate one response each (left-padded prompts, temperature/top-p, stop at EOS or a stop
    string; every row samples from its own seed (seed, step, row), so a resumed run is exact);
 3. log-probs of the responses under the policy and the reference, logits divided by the sampling
    temperature for both, and the values of the critic — in the very micro-batches and through the
    very function the first PPO epoch uses, so with equal weights the KL is exactly 0 and the
    first ratio exactly 1;
 4. scores from the reward at the last real token, normalised, optionally clipped; a completion
    that never stopped gets ``--missing-eos-penalty`` instead, if set;
 5. per-token rewards −β·kl_t with the score added on the last response token;
 6. optional reward whitening (without a mean shift);
 7. GAE over the response (values and rewards zero after its end), advantages whitened;
 8. ``--ppo-epochs`` passes over shuffled mini-batches: clipped policy loss, clipped value loss,
    gradient accumulation and clipping, optional early stop on approx-KL;
 9. PPO-ptx: the language-model loss on ``--ptx-data`` added to every update (γ = ``--ptx-coef``);
10. the KL controller update (fixed β, or adaptive towards ``--target-kl``).

Batch sizes are per process. Tokens after the end of a response (its stop token included in the
response, padding after it) are masked from every loss, mean and KL.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlhfkit.config import PPOConfig
from rlhfkit.errors import ConfigError
from rlhfkit.losses import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhfkit.training import Dist

SINGLE = Dist()  # one process (no torchrun)
VALUE_HEADS = ("separate", "policy")
SCHEDULES = ("linear", "cosine", "constant")
SAMPLES_FILE = "samples.jsonl"


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------


def exact_div(a: int, b: int, what: str) -> int:
    """a / b, refusing to round (lm-human-preferences' exact_div)."""
    if b <= 0 or a % b:
        raise ConfigError(f"{what}: {a} is not a multiple of {b}")
    return a // b


@dataclass(frozen=True)
class Sizes:
    batch: int  # rollouts per step (per process)
    mini_batch: int  # rollouts per optimizer step
    micro_batch: int  # rollouts per forward/backward
    mini_batches: int  # optimizer steps per PPO epoch


def sizes(config: PPOConfig) -> Sizes:
    mini = config.mini_batch_size or config.batch_size
    mini_batches = exact_div(config.batch_size, mini, "--batch-size must be a multiple of --mini-batch-size")
    micro = exact_div(mini, config.grad_accum, "--mini-batch-size must be a multiple of --grad-accum")
    return Sizes(config.batch_size, mini, micro, mini_batches)


def validate(config: PPOConfig) -> None:
    """Every option checked before anything is loaded."""
    from rlhfkit.reward import is_script, parse_script_spec

    for name in ("policy", "rm", "prompts", "out"):
        if not getattr(config, name):
            raise ConfigError(f"--{name} is required")
    positive = {"steps": config.steps, "batch-size": config.batch_size, "grad-accum": config.grad_accum,
                "ppo-epochs": config.ppo_epochs, "max-new-tokens": config.max_new_tokens}  # fmt: skip
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"--{name}: must be at least 1, got {value}")
    for name in ("mini_batch_size", "max_prompt_length", "generation_batch_size", "ptx_batch_size", "save_every", "sample_every", "warmup_steps", "top_k"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be 0 or more, got {getattr(config, name)}")
    sizes(config)
    if not config.temperature > 0:
        raise ConfigError(f"--temperature: must be > 0 (PPO scores the sampling distribution), got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise ConfigError(f"--top-p: must be in (0, 1], got {config.top_p}")
    if config.kl_estimator not in KL_ESTIMATORS:
        raise ConfigError(f"--kl-estimator: expected one of {', '.join(KL_ESTIMATORS)}, got {config.kl_estimator!r}")
    if config.value_head not in VALUE_HEADS:
        raise ConfigError(f"--value-head: expected separate or policy, got {config.value_head!r}")
    if config.ref and config.lora:
        raise ConfigError("--ref: not with --lora (the LoRA reference is the policy's own backbone with the adapter off)")
    if config.value_head == "policy" and config.value_model:
        raise ConfigError("--value-model: only with --value-head separate (a head on the policy has no model of its own)")
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"--schedule: expected linear, cosine or constant, got {config.schedule!r}")
    if config.kl_coef < 0:
        raise ConfigError(f"--kl-coef: must be >= 0, got {config.kl_coef}")
    if config.target_kl is not None and not config.target_kl > 0:
        raise ConfigError(f"--target-kl: must be > 0, got {config.target_kl}")
    if config.kl_horizon < 1:
        raise ConfigError(f"--kl-horizon: must be at least 1, got {config.kl_horizon}")
    if config.reward_clip is not None and not config.reward_clip > 0:
        raise ConfigError(f"--reward-clip: must be > 0, got {config.reward_clip}")
    if config.early_stop_kl is not None and not config.early_stop_kl > 0:
        raise ConfigError(f"--early-stop-kl: must be > 0, got {config.early_stop_kl}")
    for name in ("gamma", "lam"):
        if not 0 <= getattr(config, name) <= 1:
            raise ConfigError(f"--{name}: must be in [0, 1], got {getattr(config, name)}")
    for name in ("cliprange", "cliprange_value", "lr"):
        if not getattr(config, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(config, name)}")
    for name in ("vf_coef", "max_grad_norm", "weight_decay", "adam_eps"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(config, name)}")
    if config.ptx_coef < 0:
        raise ConfigError(f"--ptx-coef: must be >= 0, got {config.ptx_coef}")
    if config.ptx_coef > 0 and not config.ptx_data:
        raise ConfigError("--ptx-coef: needs --ptx-data (the demonstrations or text to keep modelling)")
    if config.ptx_max_length < 2:
        raise ConfigError(f"--ptx-max-length: must be at least 2, got {config.ptx_max_length}")
    if config.num_samples < 1:
        raise ConfigError(f"--num-samples: must be at least 1, got {config.num_samples}")
    if is_script(config.rm):
        parse_script_spec(config.rm)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if not config.resume and out.is_dir() and any((out / name).exists() for name in ("checkpoints", "metrics.jsonl")):
        raise ConfigError(f"--out {out}: already holds a run; pass --resume to continue it, or choose another --out")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: Any  # a string, or the conversation so far (a list of messages)
    ids: tuple[int, ...]  # encoded with chat.encode_prompt (left-truncated to --max-prompt-length)


def load_prompts(config: PPOConfig, tokenizer: Any) -> tuple[list[PromptItem], int]:
    """(prompts, number truncated). Every prompt is encoded once, up front."""
    from rlhfkit.chat import encode_prompt
    from rlhfkit.data import records
    from rlhfkit.errors import DataError

    loaded = records.load(config.prompts, records.parse_prompt, skip_invalid=config.skip_invalid)
    items, truncated = [], 0
    for record, line in zip(loaded, loaded.lines):
        ids = encode_prompt(tokenizer, record.prompt)
        if not ids:
            raise DataError(config.prompts, line, "prompt", "encodes to no tokens")
        if config.max_prompt_length and len(ids) > config.max_prompt_length:
            ids, truncated = ids[-config.max_prompt_length :], truncated + 1  # keep the end: the model continues it
        items.append(PromptItem(record.id, record.prompt, tuple(ids)))
    return items, truncated


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    from rlhfkit.training import epoch_order

    return tuple(epoch_order(n, seed, epoch))


def step_rows(n_prompts: int, seed: int, step: int, batch_size: int, dist: Dist) -> list[tuple[int, int]]:
    """This rank's rollouts of PPO step ``step`` (0-based): (global row, prompt index) pairs.

    The prompts form one endless stream, an independent shuffle per epoch; step s takes the next
    ``batch_size × world`` of them and rank r every world-th from r. A function of the step alone,
    so a resumed run draws exactly the prompts it would have drawn.
    """
    from rlhfkit.training import shard

    width = batch_size * dist.world_size
    rows = []
    for j in range(width):
        epoch, k = divmod(step * width + j, n_prompts)
        rows.append((j, _epoch_order(n_prompts, seed, epoch)[k]))
    return shard(rows, dist)


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of one rollout: a function of (seed, step, global row) only."""
    return ((seed * 1_000_003 + step) * 1_000_003 + row) % (2**63)


def minibatch_order(seed: int, step: int, epoch: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The shuffle of PPO epoch ``epoch`` of step ``step``: a permutation of the n rollouts."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 101 + epoch)
    return torch.randperm(n, generator=g).to(device)


class PtxFeed:
    """PPO-ptx batches: demonstrations or text, drawn in a deterministic order from a position.

    The examples form one endless stream, reshuffled every epoch; rank r of w takes stream items
    r, r + w, ... so that the ranks see different examples."""

    def __init__(self, examples: Sequence[Any], batch_size: int, seed: int, pad_token_id: int, dist: Dist = SINGLE):
        self.examples, self.batch_size, self.seed, self.pad_token_id, self.dist = list(examples), batch_size, seed, pad_token_id, dist
        self.position = 0  # examples consumed so far by each rank (checkpointed)

    def next(self, device: torch.device) -> Any:
        from rlhfkit.data.demonstrations import collate

        n = len(self.examples)
        picked = []
        for p in range(self.position, self.position + self.batch_size):
            epoch, k = divmod(p * self.dist.world_size + self.dist.rank, n)
            picked.append(self.examples[_epoch_order(n, self.seed + 1, epoch)[k]])
        self.position += self.batch_size
        return collate(picked, self.pad_token_id).to(device)


def load_ptx(config: PPOConfig, tokenizer: Any, micro_batch: int, dist: Dist = SINGLE) -> tuple[PtxFeed | None, dict[str, Any]]:
    if config.ptx_coef == 0 or not config.ptx_data:
        return None, {}  # γ = 0: no ptx forward at all, so the update is exactly PPO
    from rlhfkit.data import records
    from rlhfkit.data.demonstrations import encode_dataset

    loaded = records.load(config.ptx_data, records.parse_demonstration, skip_invalid=config.skip_invalid)
    examples, stats = encode_dataset(
        tokenizer, loaded, loaded.lines, source=config.ptx_data, max_length=config.ptx_max_length,
        skip_invalid=config.skip_invalid, skipped=loaded.skipped,
    )  # fmt: skip
    feed = PtxFeed(examples, config.ptx_batch_size or micro_batch, config.seed, tokenizer.pad_token_id, dist)
    return feed, stats.as_dict()


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


@dataclass
class Models:
    actor_critic: Any  # value.ActorCritic (what the optimizer trains), DDP-wrapped under torchrun
    reference: Any  # the frozen reference policy; None with LoRA (the policy with its adapter off)
    reward: Any  # reward.Reward
    tokenizer: Any
    stop_token_ids: list[int]
    autocast_dtype: torch.dtype | None  # bf16/fp16 autocast around every forward, or None (float32)

    @property
    def core(self) -> Any:
        """The ActorCritic itself (without a DDP wrapper)."""
        return getattr(self.actor_critic, "module", self.actor_critic)

    @property
    def policy(self) -> Any:
        return self.core.policy

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        device_type = next(self.core.parameters()).device.type
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def reference_logprobs(self, *args: torch.Tensor, temperature: float) -> torch.Tensor:
        """Log-probs (B, T) of the frozen reference: the copy, or with LoRA the policy's own
        backbone with the adapter switched off (one backbone in memory)."""
        from rlhfkit.generation import policy_logprobs

        model, context = (self.reference, nullcontext()) if self.reference is not None else (self.policy, self.policy.disable_adapter())
        with context, self.autocast():
            return policy_logprobs(model, *args, temperature)[0]


def _dropout_off(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off everywhere (SPEC §5 ppo 8): the dropout modules, and eval mode for the attention
    dropout that transformers applies only while ``model.training``."""
    from rlhfkit.models import disable_dropout

    disable_dropout(model)
    return model.eval()


def build_models(config: PPOConfig, tokenizer: Any, device: torch.device, dtype: torch.dtype, dist: Dist = SINGLE) -> Models:
    """Policy, reference, reward and critic, ready for `ppo_step`.

    Trainable models (policy, critic) and the reference keep float32 weights and run under
    autocast when ``dtype`` is bf16/fp16, so that the policy and the reference compute the same
    thing from the same weights; the reward model is loaded in ``dtype`` (inference only).
    """
    from rlhfkit import models
    from rlhfkit.chat import stop_token_ids
    from rlhfkit.reward import is_script, load_reward
    from rlhfkit.training import wrap_ddp
    from rlhfkit.value import ActorCritic, ValueHead, hidden_size

    micro = sizes(config).micro_batch
    reward = load_reward(config.rm, tokenizer, device, dtype, trust_remote_code=config.trust_remote_code, batch_size=micro)
    policy = _dropout_off(models.load_model(config.policy, "causal-lm", dtype=torch.float32, device=device, trust_remote_code=config.trust_remote_code))
    reference = None
    if config.ref:
        reference = models.load_model(config.ref, "causal-lm", dtype=torch.float32, device=device, trust_remote_code=config.trust_remote_code)
        reference = _dropout_off(reference).requires_grad_(False)
    elif not config.lora:
        reference = _dropout_off(copy.deepcopy(policy)).requires_grad_(False)
    value_model = value_head = None
    if config.value_head == "policy":
        value_head = ValueHead(hidden_size(policy)).to(device)
    else:
        spec = config.value_model or (config.policy if is_script(config.rm) else config.rm)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # a fresh score head (a value model from a plain LM) starts the same every time
            value_model = models.load_model(spec, "reward", dtype=torch.float32, device=device, trust_remote_code=config.trust_remote_code)
        value_model = _dropout_off(value_model)
    if config.lora:
        lora = {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout, "target_modules": config.lora_target_modules}
        policy = _dropout_off(models.apply_lora(policy, kind="causal-lm", **lora))
        if value_model is not None:
            value_model = _dropout_off(models.apply_lora(value_model, kind="reward", **lora))
    actor_critic = ActorCritic(policy, value_model=value_model, value_head=value_head).eval()
    autocast = dtype if dtype in (torch.bfloat16, torch.float16) else None
    return Models(
        actor_critic=wrap_ddp(actor_critic, dist, device),
        reference=reference,
        reward=reward,
        tokenizer=tokenizer,
        stop_token_ids=stop_token_ids(tokenizer, policy.config),
        autocast_dtype=autocast,
    )


# ---------------------------------------------------------------------------------------------
# a rollout batch
# ---------------------------------------------------------------------------------------------


@dataclass
class Experience:
    """One step's rollouts and everything PPO computes from them; (B, P) and (B, T) tensors."""

    query: torch.Tensor  # (B, P) left-padded prompt ids
    query_mask: torch.Tensor  # (B, P)
    response: torch.Tensor  # (B, T) right-padded response ids (stop token included)
    response_mask: torch.Tensor  # (B, T) 1 = response token, 0 after its end
    logprobs: torch.Tensor | None = None  # (B, T) policy log-probs at sampling time ("old")
    values: torch.Tensor | None = None  # (B, T) critic values at sampling time ("old")
    advantages: torch.Tensor | None = None  # (B, T) whitened
    returns: torch.Tensor | None = None  # (B, T)

    @functools.cached_property
    def lengths(self) -> tuple[list[int], list[int]]:
        """Prompt and response lengths on the host (one device sync), for trimming micro-batches."""
        return self.query_mask.sum(1).tolist(), self.response_mask.sum(1).tolist()

    def rows(self, idx: torch.Tensor) -> dict[str, Any]:
        """The rollouts ``idx`` with the columns that are padding in all of them cut off.

        Cutting depends only on which rows are taken, so the rollout pass and the first PPO epoch,
        which take the same rows, run on identical tensors.
        """
        q_len, r_len = self.lengths
        rows = idx.tolist()
        P = max(q_len[i] for i in rows)
        T = max(1, max(r_len[i] for i in rows))
        out = {
            "query": self.query[idx, self.query.size(1) - P :],
            "query_mask": self.query_mask[idx, self.query.size(1) - P :],
            "response": self.response[idx, :T],
            "response_mask": self.response_mask[idx, :T],
        }
        for name in ("logprobs", "values", "advantages", "returns"):
            tensor = getattr(self, name)
            if tensor is not None:
                out[name] = tensor[idx, :T]
        return out


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.size(1)))


def micro_batches(order: torch.Tensor, sz: Sizes) -> list[list[torch.Tensor]]:
    """Mini-batches of micro-batches (row indices) for one PPO epoch's ``order``."""
    return [list(order[m : m + sz.mini_batch].split(sz.micro_batch)) for m in range(0, sz.batch, sz.mini_batch)]


# ---------------------------------------------------------------------------------------------
# phases 2-4: generate, log-probs and values, scores
# ---------------------------------------------------------------------------------------------


def generate(models: Models, items: Sequence[PromptItem], seeds: Sequence[int], config: PPOConfig) -> Any:
    """2. One response per prompt (generation.sample), ``--generation-batch-size`` prompts at a time."""
    from rlhfkit.generation import Rollout, left_pad, right_pad, sample

    chunk = config.generation_batch_size or len(items)
    parts = []
    with models.autocast():
        for start in range(0, len(items), chunk):
            parts.append(
                sample(
                    models.policy, [it.ids for it in items[start : start + chunk]],
                    max_new_tokens=config.max_new_tokens, stop_token_ids=models.stop_token_ids,
                    pad_token_id=models.tokenizer.pad_token_id, temperature=config.temperature, top_p=config.top_p,
                    top_k=config.top_k, stop_strings=config.stop, tokenizer=models.tokenizer, seeds=seeds[start : start + chunk],
                )
            )  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    # several generation calls: pad all of them to one width again
    pad, device = models.tokenizer.pad_token_id, parts[0].query.device
    query, query_mask = left_pad([it.ids for it in items], pad, device)
    responses = [r.response_ids(i) for r in parts for i in range(r.response.size(0))]
    response, response_mask = right_pad(responses, pad, device)
    logprobs = torch.cat([_pad_to(r.logprobs, response.size(1)) for r in parts])
    return Rollout(query, query_mask, response, response_mask, torch.cat([r.stopped for r in parts]), logprobs, [s for r in parts for s in r.stop_text])


@torch.no_grad()
def rollout_forward(models: Models, exp: Experience, order: torch.Tensor, sz: Sizes, temperature: float) -> dict[str, torch.Tensor]:
    """3. Policy log-probs, entropy and values, and reference log-probs, all (B, T).

    Computed in the micro-batches of the first PPO epoch (``order``) with the function that the
    update uses (`value.policy_logprobs` through `ActorCritic.forward`), so the first mini-batch's
    ratio is exactly 1 and, while the policy equals the reference, the KL is exactly 0.
    """
    B, T = exp.response.shape
    device = exp.response.device
    out = {name: torch.zeros(B, T, device=device) for name in ("logprobs", "ref_logprobs", "values", "entropy")}
    for mini in micro_batches(order, sz):
        for idx in mini:
            rows = exp.rows(idx)
            args = (rows["query"], rows["query_mask"], rows["response"], rows["response_mask"])
            with models.autocast():
                policy_out = models.core(*args, temperature=temperature, with_entropy=True)
            for name in ("logprobs", "values", "entropy"):
                out[name][idx] = _pad_to(policy_out[name].float(), T)
            out["ref_logprobs"][idx] = _pad_to(models.reference_logprobs(*args, temperature=temperature).float(), T)
    return out


def score(models: Models, items: Sequence[PromptItem], texts: Sequence[str], rollout: Any, config: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """4. (scores, normalised model scores), both (B,): the reward's normalised score at the last
    real token, clipped to ±``--reward-clip``; a completion that never stopped gets
    ``--missing-eos-penalty`` instead when set."""
    raw = models.reward.score(
        [it.prompt for it in items], texts, rollout.query, rollout.query_mask, rollout.response, rollout.response_mask, stopped=rollout.stopped
    ).to(rollout.response.device)
    scores = raw
    if config.reward_clip is not None:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
    if config.missing_eos_penalty is not None:
        scores = torch.where(rollout.stopped, scores, torch.full_like(scores, config.missing_eos_penalty))
    return scores, raw


# ---------------------------------------------------------------------------------------------
# phases 5-7: rewards and advantages
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_rewards_and_advantages(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: str = "k1",
    whiten_rewards: bool = False,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> dict[str, torch.Tensor]:
    """Phases 5-7 on one rollout batch: (B,) scores and (B, T) tensors in, (B, T) tensors out.

    Returns ``kl`` (per token, the chosen estimator, 0 after the end), ``rewards`` (−β·kl_t, plus
    the score at the last response token), ``values`` (0 after the end), ``advantages`` (GAE,
    whitened over the valid tokens) and ``returns`` (advantages before whitening + values).
    Nothing at a masked position reaches any of them.
    """
    valid = mask.bool()
    # 5. per-token rewards: −β·kl_t on every response token, the score on the last one
    kl = kl_estimate(torch.where(valid, logprobs, 0.0), torch.where(valid, ref_logprobs, 0.0), kl_estimator)  # (B, T)
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, valid, kl_coef, kl_estimator)  # (B, T)
    # 6. optional reward whitening: rescale, keep the mean (lm-human-preferences, TRL)
    if whiten_rewards:
        rewards = masked_whiten(rewards, valid, shift_mean=False)
    # 7. advantages and returns; values and rewards are 0 after the end of the response
    values = torch.where(valid, values, 0.0)
    advantages, returns = gae(rewards, values, valid, gamma, lam)
    advantages = masked_whiten(advantages, valid)
    return {"kl": kl, "rewards": rewards, "values": values, "advantages": advantages, "returns": returns}


# ---------------------------------------------------------------------------------------------
# phase 8 (and 9): the PPO update
# ---------------------------------------------------------------------------------------------


def ppo_update(
    models: Models,
    optimizer: torch.optim.Optimizer,
    exp: Experience,
    config: PPOConfig,
    step: int,
    ptx: PtxFeed | None = None,
    dist: Dist = SINGLE,
) -> dict[str, Any]:
    """8. ``--ppo-epochs`` passes over shuffled mini-batches of ``exp``; one optimizer step per
    mini-batch, ``--grad-accum`` micro-batches each; 9. the PPO-ptx loss added to each.

    Returns the mean of each statistic over the micro-batches (0-d tensors), ``updates`` (optimizer
    steps taken) and ``minibatches``: per mini-batch ``ratio_min``/``ratio_max`` (for checking the
    first ratio is 1) and ``approxkl``.
    """
    from rlhfkit.training import all_reduce_mean, no_sync

    sz = sizes(config)
    device = exp.response.device
    params = [p for p in models.actor_critic.parameters() if p.requires_grad]
    ptx_on = ptx is not None and config.ptx_coef > 0
    stats: dict[str, list[torch.Tensor]] = {}
    minibatch_stats = []
    updates, stopped_early = 0, False
    for epoch in range(config.ppo_epochs):
        for mini in micro_batches(minibatch_order(config.seed, step, epoch, sz.batch, device), sz):
            mb: dict[str, list[torch.Tensor]] = {"approxkl": [], "ratio_min": [], "ratio_max": []}
            for i, idx in enumerate(mini):
                rows = exp.rows(idx)
                mask = rows["response_mask"]
                with no_sync(models.actor_critic, skip=i < len(mini) - 1), models.autocast():
                    out = models.actor_critic(
                        rows["query"], rows["query_mask"], rows["response"], mask,
                        temperature=config.temperature, ptx=ptx.next(device) if ptx_on else None,
                    )  # fmt: skip
                    # policy loss
                    pg_loss, pg_stats = ppo_policy_loss(out["logprobs"].float(), rows["logprobs"], rows["advantages"], mask, config.cliprange)
                    # value loss
                    vf_loss, vf_stats = ppo_value_loss(out["values"].float(), rows["values"], rows["returns"], mask, config.cliprange_value)
                    loss = pg_loss + config.vf_coef * vf_loss
                    if ptx_on:
                        # PPO-ptx (InstructGPT eq. 2): + γ·E_pretrain[log π], i.e. γ·(LM loss) to minimise
                        loss = loss + config.ptx_coef * out["ptx_loss"]
                    (loss / config.grad_accum).backward()
                with torch.no_grad():
                    log_ratio = torch.where(mask.bool(), out["logprobs"].float() - rows["logprobs"], 0.0)
                    valid = mask.bool()
                    mb["ratio_min"].append(torch.where(valid, log_ratio, math.inf).amin().exp())
                    mb["ratio_max"].append(torch.where(valid, log_ratio, -math.inf).amax().exp())
                    mb["approxkl"].append(pg_stats["approxkl"])
                    micro_stats = {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), **pg_stats, **vf_stats}
                    if ptx_on:
                        micro_stats["loss/ptx"] = out["ptx_loss"].detach()
                    for k, v in micro_stats.items():
                        stats.setdefault(k, []).append(v)
            if config.max_grad_norm > 0:
                stats.setdefault("grad_norm", []).append(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            summary = {
                "approxkl": torch.stack(mb["approxkl"]).mean(),
                "ratio_min": torch.stack(mb["ratio_min"]).min(),
                "ratio_max": torch.stack(mb["ratio_max"]).max(),
            }
            minibatch_stats.append(summary)
            # a device sync per mini-batch, only when early stopping is asked for
            if config.early_stop_kl is not None and float(all_reduce_mean(summary["approxkl"], dist)) > config.early_stop_kl:
                stopped_early = True
                break
        if stopped_early:
            break
    result: dict[str, Any] = {k: torch.stack(v).float().mean() for k, v in stats.items()}
    result["updates"] = updates
    result["stopped_early"] = stopped_early
    result["minibatches"] = minibatch_stats
    return result


# ---------------------------------------------------------------------------------------------
# one PPO step
# ---------------------------------------------------------------------------------------------


def ppo_step(
    models: Models,
    optimizer: torch.optim.Optimizer,
    items: Sequence[PromptItem],
    seeds: Sequence[int],
    config: PPOConfig,
    step: int,
    kl_coef: float,
    ptx: PtxFeed | None = None,
    dist: Dist = SINGLE,
) -> dict[str, Any]:
    """Phases 2-9 on one batch of prompts. Returns ``metrics`` (0-d tensors, before the
    cross-rank mean), ``update`` (`ppo_update`'s result), the tensors of the batch and the texts."""
    sz = sizes(config)
    timings = {}
    device = next(models.core.parameters()).device

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the work, not the kernel launches (a sync per phase)
        return time.perf_counter()

    # 2. generate
    t0 = clock()
    rollout = generate(models, items, seeds, config)
    texts = [rollout.completion_text(i, models.tokenizer, models.stop_token_ids) for i in range(len(items))]
    exp = Experience(rollout.query, rollout.query_mask, rollout.response, rollout.response_mask)
    mask = exp.response_mask
    timings["time/generate"] = clock() - t0

    # 3. policy and reference log-probs (logits / temperature), values, in the first epoch's micro-batches
    t0 = clock()
    first_order = minibatch_order(config.seed, step, 0, sz.batch, mask.device)
    fwd = rollout_forward(models, exp, first_order, sz, config.temperature)
    timings["time/forward"] = clock() - t0

    # 4. scores at the last real token (normalised, clipped; missing-EOS penalty)
    t0 = clock()
    scores, raw_scores = score(models, items, texts, rollout, config)
    timings["time/score"] = clock() - t0

    # 5.-7. KL-penalised per-token rewards, optional reward whitening, GAE, whitened advantages
    adv = compute_rewards_and_advantages(
        scores, fwd["logprobs"], fwd["ref_logprobs"], fwd["values"], mask, kl_coef=kl_coef,
        kl_estimator=config.kl_estimator, whiten_rewards=config.whiten_rewards, gamma=config.gamma, lam=config.lam,
    )  # fmt: skip
    exp.logprobs, exp.values, exp.advantages, exp.returns = fwd["logprobs"], adv["values"], adv["advantages"], adv["returns"]

    # 8.-9. PPO epochs over shuffled mini-batches (+ PPO-ptx)
    t0 = clock()
    update = ppo_update(models, optimizer, exp, config, step, ptx, dist)
    timings["time/update"] = clock() - t0

    with torch.no_grad():
        valid = mask.bool()
        kl_per_seq = adv["kl"].sum(1)  # (B,)
        explained_variance = 1 - masked_var(adv["returns"] - adv["values"], valid) / masked_var(adv["returns"], valid).clamp_min(1e-12)
        metrics = {
            "objective/score": scores.mean(),
            "objective/rm_score": raw_scores.mean(),  # before --reward-clip and the missing-EOS penalty
            "objective/kl": kl_per_seq.mean(),
            "objective/non_score_reward": (-kl_coef * kl_per_seq).mean(),
            "objective/rlhf_reward": adv["rewards"].sum(1).mean(),
            "objective/entropy": fwd["entropy"].sum(1).mean(),
            "objective/kl_coef": kl_coef,
            "policy/approxkl": update["approxkl"],
            "policy/approxkl_k3": update["approxkl_k3"],
            "policy/clipfrac": update["clipfrac"],
            "loss/policy": update["loss/policy"],
            "loss/value": update["loss/value"],
            "val/explained_variance": torch.where(masked_var(adv["returns"], valid) > 0, explained_variance, 0.0),
            "val/ratio": update["ratio_mean"],
            "val/clipfrac": update["vf_clipfrac"],
            "val/mean": masked_mean(adv["values"], valid),
            "val/returns": masked_mean(adv["returns"], valid),
            "response/length": mask.sum(1).float().mean(),
            "response/stopped": rollout.stopped.float().mean(),
            "ppo/updates": float(update["updates"]),
        }
        if "grad_norm" in update:
            metrics["policy/grad_norm"] = update["grad_norm"]
        if "loss/ptx" in update:
            metrics["loss/ptx"] = update["loss/ptx"]
    return {
        "metrics": metrics,
        "timings": timings,
        "update": update,
        "experience": exp,
        "rollout": rollout,
        "texts": texts,
        "scores": scores,
        "kl": adv["kl"],
        "advantages": adv,
        "forward": fwd,
        "tokens": int(mask.sum()),
    }


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def make_kl_controller(config: PPOConfig) -> AdaptiveKLController | FixedKLController:
    """10. β fixed (``--kl-coef``), or adaptive towards ``--target-kl`` (Ziegler et al. 2019)."""
    if config.target_kl is not None:
        return AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
    return FixedKLController(config.kl_coef)


def run(config: PPOConfig) -> dict[str, Any] | None:
    """Train; write ``OUT`` (the final policy, metrics.jsonl, samples.jsonl, checkpoints/). Returns
    the result on rank 0 (None on the other ranks of a torchrun job)."""
    from rlhfkit.models import resolve_device, resolve_dtype
    from rlhfkit.training import init_distributed, shutdown_distributed

    validate(config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    dist = init_distributed(device)
    try:
        return _run(config, dist, device, dtype)
    finally:
        shutdown_distributed(dist)


def _run(config: PPOConfig, dist: Dist, device: torch.device, dtype: torch.dtype) -> dict[str, Any] | None:
    from rlhfkit import models as model_io
    from rlhfkit.console import console, progress_bar
    from rlhfkit.provenance import RunInfo
    from rlhfkit.training import (
        MetricsLog,
        all_reduce_mean,
        barrier,
        check_resume_config,
        latest_checkpoint,
        load_checkpoint,
        make_optimizer,
        make_scheduler,
        read_metrics,
        save_checkpoint,
        seed_everything,
    )

    out = Path(config.out)
    sz = sizes(config)
    info = RunInfo("ppo", config, {"policy": config.policy, "ref": config.ref or None, "rm": config.rm, "prompts": config.prompts,
                                   "value_model": config.value_model or None, "ptx_data": config.ptx_data or None})  # fmt: skip
    seed_everything(config.seed)

    # data first: a bad record fails before any model is loaded
    tokenizer = model_io.load_tokenizer(config.policy, trust_remote_code=config.trust_remote_code)
    items, truncated = load_prompts(config, tokenizer)
    ptx, ptx_stats = load_ptx(config, tokenizer, sz.micro_batch, dist)

    models = build_models(config, tokenizer, device, dtype, dist)
    optimizer = make_optimizer(models.actor_critic, config.lr, config.weight_decay, eps=config.adam_eps)
    # one scheduler step per PPO step: LR annealed linearly to 0 over --steps (lm-human-preferences)
    scheduler = make_scheduler(optimizer, config.schedule, config.warmup_steps, config.steps)
    kl_ctl = make_kl_controller(config)
    config_dict = dataclasses.asdict(config)

    start = 0
    checkpoint = latest_checkpoint(out) if config.resume else None
    if checkpoint is not None:
        check_resume_config(checkpoint, config_dict, ignore=("resume", "save_every", "sample_every", "num_samples", "keep_checkpoints", "save_adapter", "device"))
        state = load_checkpoint(checkpoint, modules={"policy": models.policy, "value": models.core.critic}, optimizers={"ppo": optimizer}, schedulers={"ppo": scheduler})
        start = int(state["step"])
        kl_ctl.load_state_dict(state["kl_controller"])
        if ptx is not None:
            ptx.position = int(state.get("ptx_position", 0))
    elif config.resume and dist.is_main:
        console.print(f"[yellow]--resume: no checkpoint in {out}; starting from the beginning[/]")
    metrics_log = MetricsLog(out, dist, resume_step=start if checkpoint is not None else None)
    samples_log = SamplesLog(out / SAMPLES_FILE, dist, resume_step=start if checkpoint is not None else None, enabled=config.sample_every > 0)

    def save(step: int) -> None:
        if dist.is_main:
            state = {"config": config_dict, "kl_controller": kl_ctl.state_dict(), "ptx_position": ptx.position if ptx else 0}
            save_checkpoint(out, step, modules={"policy": models.policy, "value": models.core.critic}, optimizers={"ppo": optimizer},
                            schedulers={"ppo": scheduler}, state=state, keep=config.keep_checkpoints)  # fmt: skip
        barrier(dist)

    # a resumed run that is already complete still reports (and records) its last metrics
    last: dict[str, float] = (read_metrics(out) or [{}])[-1] if checkpoint is not None and dist.is_main else {}
    started = time.perf_counter()
    tokens_total = 0
    with progress_bar("ppo", total=config.steps, completed=start, enabled=dist.is_main) as bar:
        for step in range(start, config.steps):
            t_step = time.perf_counter()
            # 1. this step's prompts, and a sampling seed per rollout
            rows = step_rows(len(items), config.seed, step, config.batch_size, dist)
            batch_items = [items[i] for _, i in rows]
            seeds = [row_seed(config.seed, step, j) for j, _ in rows]
            kl_coef = kl_ctl.value
            lr = scheduler.get_last_lr()[0]

            result = ppo_step(models, optimizer, batch_items, seeds, config, step, kl_coef, ptx, dist)
            scheduler.step()

            # 10. KL controller update, on the mean per-sequence KL over every rank's rollouts
            metrics = {k: all_reduce_mean(v, dist) if isinstance(v, torch.Tensor) else v for k, v in result["metrics"].items()}
            kl_ctl.update(metrics["objective/kl"], config.batch_size * dist.world_size)

            seconds = time.perf_counter() - t_step
            tokens_total += result["tokens"] * dist.world_size
            metrics.update({k: v for k, v in result["timings"].items()})
            metrics["lr"] = lr
            metrics["perf/seconds_per_step"] = seconds
            metrics["perf/tokens_per_s"] = result["tokens"] * dist.world_size / max(seconds, 1e-9)
            last = metrics_log.log(step + 1, metrics)
            if config.sample_every and (step + 1) % config.sample_every == 0 and dist.is_main:
                samples_log.write(step + 1, batch_items, result, config.num_samples)
            if (config.save_every and (step + 1) % config.save_every == 0) or step + 1 == config.steps:
                save(step + 1)
            bar.update(1, info=f"score {last['objective/score']:.3f} | kl {last['objective/kl']:.3f} | β {kl_coef:.3g} | "
                               f"{last['perf/tokens_per_s']:.0f} tok/s | {seconds:.2f} s/step")  # fmt: skip

    summary = {k: v for k, v in last.items() if k.split("/")[0] in ("objective", "response", "val", "policy", "loss")}
    if dist.is_main:
        final = model_io.merged(models.policy) if config.lora else models.policy
        extra = {"ppo": {"steps": config.steps, "kl_coef": kl_ctl.value, "reward": models.reward.info(), "prompts_truncated": truncated, "ptx": ptx_stats}}
        model_io.save_model_dir(final, tokenizer, out, info, summary, extra=extra)
        if config.lora and config.save_adapter:
            _save_adapter(models.policy, out / "adapter")
    barrier(dist)
    if not dist.is_main:
        return None  # one result on stdout, from rank 0
    return {
        "out": str(out),
        "steps": config.steps,
        "resumed_from": start,
        "kl_coef": kl_ctl.value,
        "metrics": summary,
        "tokens_per_s": tokens_total / max(time.perf_counter() - started, 1e-9),
    }


def _save_adapter(policy: Any, target: Path) -> None:
    import shutil
    import tempfile

    from rlhfkit.models import replace_dir

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        policy.save_pretrained(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# the sample table
# ---------------------------------------------------------------------------------------------


class SamplesLog:
    """``OUT/samples.jsonl`` and the table on stderr: a few prompt/response/score/KL rows every
    ``--sample-every`` steps. On resume, rows after the checkpoint are dropped (as in metrics.jsonl)."""

    def __init__(self, path: Path, dist: Dist, resume_step: int | None, enabled: bool = True):
        import json

        from rlhfkit.data.files import atomic_open

        self.path, self.enabled = path, dist.is_main and enabled
        if not self.enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        with atomic_open(path) as f:
            f.writelines(line + "\n" for line in kept)

    def write(self, step: int, items: Sequence[PromptItem], result: dict[str, Any], n: int) -> None:
        from rich.table import Table

        from rlhfkit.console import console
        from rlhfkit.data.files import dumps

        n = min(n, len(items))
        kl = result["kl"].sum(1)[:n].tolist()
        scores = result["scores"][:n].tolist()
        stopped = result["rollout"].stopped[:n].tolist()
        lengths = result["experience"].response_mask.sum(1)[:n].tolist()
        rows = [
            {"step": step, "prompt_id": items[i].id, "prompt": items[i].prompt, "response": result["texts"][i],
             "score": scores[i], "kl": kl[i], "stopped": bool(stopped[i]), "num_tokens": int(lengths[i])}
            for i in range(n)
        ]  # fmt: skip
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(dumps(r) + "\n" for r in rows)
        table = Table(title=f"ppo samples, step {step}", show_lines=True)
        for column, justify in (("prompt", "left"), ("response", "left"), ("score", "right"), ("kl", "right")):
            table.add_column(column, justify=justify, overflow="fold")
        for r in rows:
            table.add_row(_short(_prompt_text(r["prompt"]), 120), _short(r["response"], 240), f"{r['score']:.3f}", f"{r['kl']:.3f}")
        console.print(table)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return prompt[-1]["content"] if prompt else ""


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]
