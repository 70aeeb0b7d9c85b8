"""``rlhfkit ppo``'s models: policy, reference, reward and critic, assembled for `rlhfkit.stages.ppo`.

* the policy (trained), in float32 with dropout off everywhere (SPEC §5 ppo 8);
* the reference (frozen): a copy of the starting policy, ``--ref`` (iterated RLHF measures the KL to
  the SFT model), or with ``--lora`` the policy's own backbone with the adapter switched off (one
  backbone in memory);
* the reward (`rlhfkit.reward.load_reward`): a reward-model directory or a ``python:`` script;
* the critic (ppo, a2c; rloo and grpo have none): a value model of its own (``--value-head
  separate``: ``--value-model``, else the reward model, else the policy with a fresh score head) or
  a linear head on the policy (``--value-head policy``); with ``--lora`` the value model gets
  adapters of its own;
* `Models` bundles them with the autocast used around every forward (bf16/fp16 with float32
  weights); `value.ActorCritic` joins policy and critic in one module, the one the optimizer
  trains and DDP wraps.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.errors import ConfigError
from rlhfkit.stages.ppo_options import sizes
from rlhfkit.training import Dist, unwrap


@dataclass
class Models:
    """Everything a PPO step runs: the trained actor-critic, the frozen reference and the reward."""

    actor_critic: Any  # value.ActorCritic (what the optimizer trains), DDP-wrapped under torchrun
    reference: Any  # the frozen reference policy; None with LoRA (the policy with its adapter off)
    reward: Any  # reward.Reward
    tokenizer: Any
    stop_token_ids: list[int]
    autocast_dtype: torch.dtype | None  # bf16/fp16 autocast around every forward, or None (float32)

    @property
    def core(self) -> Any:
        """The ActorCritic itself (without a DDP wrapper)."""
        return unwrap(self.actor_critic)

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

        if self.reference is not None:
            model, context = self.reference, nullcontext()
        else:
            model, context = self.policy, self.policy.disable_adapter()
        with context, self.autocast():
            return policy_logprobs(model, *args, temperature)[0]


def _dropout_off(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off everywhere (SPEC §5 ppo 8): the dropout modules, and eval mode for the attention
    dropout that transformers applies only while ``model.training``."""
    from rlhfkit.models import disable_dropout

    disable_dropout(model)
    return model.eval()


def build_models(config: PPOConfig, tokenizer: Any, device: torch.device, dtype: torch.dtype, dist: Dist = Dist()) -> Models:
    """Policy, reference, reward and critic, ready for `rlhfkit.stages.ppo.ppo_step`.

    Trainable models (policy, critic) and the reference keep float32 weights and run under
    autocast when ``dtype`` is bf16/fp16, so that the policy and the reference compute the same
    thing from the same weights; the reward model is loaded in ``dtype`` (inference only).
    """
    from rlhfkit import models
    from rlhfkit.chat import stop_token_ids
    from rlhfkit.reward import is_script, load_reward
    from rlhfkit.training import wrap_model
    from rlhfkit.value import ActorCritic, ValueHead, hidden_size

    micro = sizes(config).micro_batch

    def load(spec: str, kind: str) -> Any:  # trained and reference models keep float32 weights
        return models.load_model(spec, kind, dtype=torch.float32, device=device, trust_remote_code=config.trust_remote_code)

    reward = load_reward(config.rm, tokenizer, device, dtype, trust_remote_code=config.trust_remote_code, batch_size=micro,
                         chat_template=config.chat_template)  # fmt: skip
    if config.conservative_coef > 0 and reward.members < 2:
        raise ConfigError(
            f"--conservative-coef: the reward {config.rm} has one member (mean − λ·std needs an ensemble: train-rm --ensemble M)"
        )
    # --strategy fsdp shards the frozen reward model and reference too (no optimizer state; no DDP for them), each as soon
    # as it is loaded: every process holds one model at full size at a time, not all four
    if getattr(reward, "model", None) is not None:
        reward.model = wrap_model(reward.model, dist, device, config, trainable=False)
    policy = _dropout_off(load(config.policy, "causal-lm"))
    reference = None
    if config.ref:
        reference = _dropout_off(load(config.ref, "causal-lm")).requires_grad_(False)
    elif not config.lora:
        reference = _dropout_off(copy.deepcopy(policy)).requires_grad_(False)
    if reference is not None:
        reference = wrap_model(reference, dist, device, config, trainable=False)
    value_model = value_head = None
    if not config.has_critic:
        pass  # rloo, grpo: each sample's baseline is the other samples of its prompt
    elif config.value_head == "policy":
        value_head = ValueHead(hidden_size(policy)).to(device)
    else:
        spec = config.value_model or (config.policy if is_script(config.rm) else config.rm)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # a fresh score head (a value model from a plain LM) starts the same every time
            value_model = load(spec, "reward")
        value_model = _dropout_off(value_model)
    if config.lora:
        lora = {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout}
        lora["target_modules"] = config.lora_target_modules
        policy = _dropout_off(models.apply_lora(policy, kind="causal-lm", **lora))
        if value_model is not None:
            value_model = _dropout_off(models.apply_lora(value_model, kind="reward", **lora))
    # dropout is off everywhere; training mode only lets --gradient-checkpointing recompute (transformers applies it then)
    actor_critic = ActorCritic(policy, value_model=value_model, value_head=value_head).train(config.gradient_checkpointing)
    autocast = dtype if dtype in (torch.bfloat16, torch.float16) else None
    return Models(
        actor_critic=wrap_model(actor_critic, dist, device, config),
        reference=reference,
        reward=reward,
        tokenizer=tokenizer,
        stop_token_ids=stop_token_ids(tokenizer, policy.config),
        autocast_dtype=autocast,
    )
