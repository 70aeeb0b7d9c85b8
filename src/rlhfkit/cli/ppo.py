"""``rlhfkit ppo``: options → PPOConfig → stages.ppo.run."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from rlhfkit.cli.common import (
    ConfigOption,
    DeviceOption,
    DTypeOption,
    KeepCheckpointsOption,
    LoraAlphaOption,
    LoraROption,
    LoraTargetModulesOption,
    ResumeOption,
    SaveAdapterOption,
    Schedule,
    SeedOption,
    SkipInvalidOption,
    TrustRemoteCodeOption,
    build_config,
    command,
)
from rlhfkit.config import PPOConfig as C

MODELS, GEN, PPO, KL, OPT, PTX, RUN, LORA = (
    "Models and data", "Generation", "PPO", "Reward and KL", "Optimisation", "PPO-ptx", "Run directory", "LoRA",
)  # fmt: skip


class ValueHead(str, Enum):
    separate = "separate"
    policy = "policy"


class KLEstimator(str, Enum):
    k1 = "k1"
    k2 = "k2"
    k3 = "k3"



@command
def command(
    policy: Annotated[str, typer.Option(help="Initial policy, usually the SFT model (directory, hub id or .gguf); a frozen copy is the KL reference.", rich_help_panel=MODELS)],
    rm: Annotated[str, typer.Option(help="Reward: a train-rm directory (normalised with its recorded gain/bias), any one-label sequence classifier, or python:MODULE:FUNCTION (f(prompts, completions) returning one float per completion).", rich_help_panel=MODELS)],
    prompts: Annotated[str, typer.Option(help="Prompts JSONL ({'prompt': ...} or {'messages': [...]}).", rich_help_panel=MODELS)],
    out: Annotated[Path, typer.Option(help="Output directory: the final policy (plain HF model + rlhfkit.json), metrics.jsonl, samples.jsonl, checkpoints/.", rich_help_panel=MODELS)],
    ref: Annotated[str, typer.Option(help="KL reference model when it is not --policy (iterated RLHF continues a PPO policy but stays close to the SFT model). Not with --lora.", rich_help_panel=MODELS)] = C.ref,
    value_head: Annotated[ValueHead, typer.Option(help="separate: a value model (initialised from --value-model); policy: a linear head on the policy's last hidden state.", rich_help_panel=MODELS)] = ValueHead(C.value_head),
    value_model: Annotated[str, typer.Option(help="Initial value model (default: the reward model; the policy, with a fresh head, for a scripted reward).", rich_help_panel=MODELS)] = C.value_model,
    max_prompt_length: Annotated[int, typer.Option(help="Keep only the last N tokens of longer prompts (0 = no limit).", rich_help_panel=MODELS)] = C.max_prompt_length,
    steps: Annotated[int, typer.Option(help="PPO steps (one rollout batch and its PPO epochs each).", rich_help_panel=PPO)] = C.steps,
    batch_size: Annotated[int, typer.Option(help="Rollouts per step (per process).", rich_help_panel=PPO)] = C.batch_size,
    mini_batch_size: Annotated[int, typer.Option(help="Rollouts per optimizer step (0 = --batch-size).", rich_help_panel=PPO)] = C.mini_batch_size,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per mini-batch (micro-batch = mini-batch / grad-accum).", rich_help_panel=PPO)] = C.grad_accum,
    ppo_epochs: Annotated[int, typer.Option(help="Passes over each rollout batch.", rich_help_panel=PPO)] = C.ppo_epochs,
    cliprange: Annotated[float, typer.Option(help="ε of the clipped policy surrogate.", rich_help_panel=PPO)] = C.cliprange,
    cliprange_value: Annotated[float, typer.Option(help="ε_v of the clipped value loss.", rich_help_panel=PPO)] = C.cliprange_value,
    vf_coef: Annotated[float, typer.Option(help="Weight of the value loss.", rich_help_panel=PPO)] = C.vf_coef,
    gamma: Annotated[float, typer.Option(help="Discount of GAE.", rich_help_panel=PPO)] = C.gamma,
    lam: Annotated[float, typer.Option(help="λ of GAE.", rich_help_panel=PPO)] = C.lam,
    early_stop_kl: Annotated[Optional[float], typer.Option(help="Stop a step's PPO epochs once a mini-batch's approx-KL exceeds this (default: off).", rich_help_panel=PPO)] = C.early_stop_kl,
    max_new_tokens: Annotated[int, typer.Option(help="Longest response, in tokens.", rich_help_panel=GEN)] = C.max_new_tokens,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; the policy and reference log-probs use the same one.", rich_help_panel=GEN)] = C.temperature,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling (1 = off).", rich_help_panel=GEN)] = C.top_p,
    top_k: Annotated[int, typer.Option(help="Top-k sampling (0 = off).", rich_help_panel=GEN)] = C.top_k,
    stop: Annotated[Optional[list[str]], typer.Option(help="A stop string besides EOS (repeatable).", rich_help_panel=GEN)] = None,
    generation_batch_size: Annotated[int, typer.Option(help="Prompts per generation call (0 = the whole batch).", rich_help_panel=GEN)] = C.generation_batch_size,
    kl_coef: Annotated[float, typer.Option(help="β of the per-token KL penalty (the initial β with --target-kl).", rich_help_panel=KL)] = C.kl_coef,
    target_kl: Annotated[Optional[float], typer.Option(help="Adaptive β: the per-sequence KL to aim at (Ziegler et al. 2019; default: β fixed).", rich_help_panel=KL)] = C.target_kl,
    kl_horizon: Annotated[int, typer.Option(help="Horizon of the adaptive β, in rollouts.", rich_help_panel=KL)] = C.kl_horizon,
    kl_estimator: Annotated[KLEstimator, typer.Option(help="Per-token KL estimator: k1 = log r, k2 = ½(log r)², k3 = (1/r − 1) + log r.", rich_help_panel=KL)] = KLEstimator(C.kl_estimator),
    reward_clip: Annotated[Optional[float], typer.Option(help="Clip the normalised score to [−c, c] (default: off).", rich_help_panel=KL)] = C.reward_clip,
    missing_eos_penalty: Annotated[Optional[float], typer.Option(help="Score given instead of the reward to a completion that never stopped (default: off).", rich_help_panel=KL)] = C.missing_eos_penalty,
    whiten_rewards: Annotated[bool, typer.Option(help="Whiten the per-token rewards (without a mean shift) before GAE.", rich_help_panel=KL)] = C.whiten_rewards,
    lr: Annotated[float, typer.Option(help="Peak learning rate of AdamW (policy and critic).", rich_help_panel=OPT)] = C.lr,
    schedule: Annotated[Schedule, typer.Option(help="Learning-rate decay over --steps (linear = annealed to 0).", rich_help_panel=OPT)] = Schedule(C.schedule),
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup, in PPO steps.", rich_help_panel=OPT)] = C.warmup_steps,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on biases and norms).", rich_help_panel=OPT)] = C.weight_decay,
    adam_eps: Annotated[float, typer.Option(help="AdamW ε (1e-5 as in lm-human-preferences).", rich_help_panel=OPT)] = C.adam_eps,
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm (0 = no clipping).", rich_help_panel=OPT)] = C.max_grad_norm,
    ptx_data: Annotated[str, typer.Option(help="Demonstrations or text records whose language-model loss is added to every update.", rich_help_panel=PTX)] = C.ptx_data,
    ptx_coef: Annotated[float, typer.Option(help="γ, the weight of the PPO-ptx loss (0 = off).", rich_help_panel=PTX)] = C.ptx_coef,
    ptx_batch_size: Annotated[int, typer.Option(help="PPO-ptx sequences per micro-batch (0 = the micro-batch size).", rich_help_panel=PTX)] = C.ptx_batch_size,
    ptx_max_length: Annotated[int, typer.Option(help="Cut PPO-ptx sequences to this many tokens.", rich_help_panel=PTX)] = C.ptx_max_length,
    resume: ResumeOption = C.resume,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N PPO steps (0 = only at the end).", rich_help_panel=RUN)] = C.save_every,
    keep_checkpoints: KeepCheckpointsOption = C.keep_checkpoints,
    sample_every: Annotated[int, typer.Option(help="Print a table of samples and append them to OUT/samples.jsonl every N steps (0 = never).", rich_help_panel=RUN)] = C.sample_every,
    num_samples: Annotated[int, typer.Option(help="Rows in each sample table.", rich_help_panel=RUN)] = C.num_samples,
    lora: Annotated[bool, typer.Option(help="Train LoRA adapters; the reference is the same backbone with the adapter off. The saved policy is merged.", rich_help_panel=LORA)] = C.lora,
    lora_r: LoraROption = C.lora_r,
    lora_alpha: LoraAlphaOption = C.lora_alpha,
    lora_target_modules: LoraTargetModulesOption = C.lora_target_modules,
    save_adapter: SaveAdapterOption = C.save_adapter,
    seed: SeedOption = C.seed,
    device: DeviceOption = C.device,
    dtype: DTypeOption = C.dtype,
    skip_invalid: SkipInvalidOption = C.skip_invalid,
    trust_remote_code: TrustRemoteCodeOption = C.trust_remote_code,
    config: ConfigOption = None,
) -> dict:
    """RLHF with PPO: sample responses, score them with the reward model, penalise the KL to the reference, update policy and critic; print a JSON summary.

    Every step logs objective/score, objective/kl, objective/rlhf_reward, policy/approxkl, loss/policy, loss/value, ... to OUT/metrics.jsonl; OUT loads with plain transformers at the end.
    """
    from rlhfkit.stages import ppo

    stop = list(stop or [])
    return ppo.run(build_config(C, locals()))
