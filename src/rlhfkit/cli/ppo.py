"""``rlhfkit ppo``: options -> PPOConfig -> stages.ppo.run."""

from __future__ import annotations

from typing import Annotated, Optional

from rlhfkit import config as config_types
from rlhfkit.cli.common import (
    INPUT_PANEL,
    LORA_PANEL,
    RUN_PANEL,
    SAMPLING_PANEL,
    TRAINING_PANEL,
    ChatTemplateOption,
    CompileOption,
    ConfigOption,
    CpuOffloadOption,
    DeviceOption,
    DTypeOption,
    GradientCheckpointingOption,
    KeepCheckpointsOption,
    KLEstimator,
    LoraAlphaOption,
    LoraDropoutOption,
    LoraROption,
    LoraTargetModulesOption,
    MaxGradNormOption,
    ReportToOption,
    ResumeOption,
    SaveAdapterOption,
    Schedule,
    SeedOption,
    SkipInvalidOption,
    StrategyOption,
    TrustRemoteCodeOption,
    ValueHead,
    WeightDecayOption,
    build_config,
    choice_enum,
    command,
    option,
)
from rlhfkit.config import PPOConfig

D = PPOConfig()
ALGO, PPO, KL, PTX = "Algorithm", "PPO", "Reward and KL", "PPO-ptx"
JUDGE = "Judge monitor"
Algo = choice_enum("Algo", config_types.Algo)


@command
def command(
    policy: Annotated[
        str,
        option(
            "Initial policy, usually the SFT model (directory, hub id or .gguf); a frozen copy is the KL reference.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.policy,
    rm: Annotated[
        str,
        option(
            "Reward: a train-rm directory (normalised with its recorded gain/bias), any one-label sequence "
            "classifier, or python:MODULE:FUNCTION (f(prompts, completions) returning one float per completion).",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.rm,
    prompts: Annotated[
        str, option("Prompts JSONL ({'prompt': ...} or {'messages': [...]}).", INPUT_PANEL, show_default=False)
    ] = D.prompts,
    out: Annotated[
        str,
        option(
            "Output directory: the final policy (plain HF model + rlhfkit.json), metrics.jsonl, samples.jsonl, checkpoints/.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.out,
    ref: Annotated[
        str,
        option(
            "KL reference model when it is not --policy (iterated RLHF continues a PPO policy but stays close to "
            "the SFT model). Not with --lora.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.ref,
    value_head: Annotated[
        ValueHead,
        option(
            "separate: a value model (initialised from --value-model); policy: a linear head on the policy's last hidden state.",
            INPUT_PANEL,
        ),
    ] = D.value_head,  # type: ignore[assignment]
    value_model: Annotated[
        str,
        option(
            "Initial value model (default: the reward model; the policy, with a fresh head, for a scripted reward).",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.value_model,
    max_prompt_length: Annotated[
        int, option("Keep only the last N tokens of longer prompts (0 = no limit).", INPUT_PANEL)
    ] = D.max_prompt_length,
    algo: Annotated[
        Algo,
        option(
            "ppo: clipped surrogate, critic with GAE. a2c: one gradient step per rollout batch, no clipping, critic "
            "with GAE (--ppo-epochs and --mini-batch-size do not apply). rloo: K samples per prompt, leave-one-out "
            "baseline, no critic. grpo: K samples per prompt, group-normalised advantages, KL as a k3 loss term, no critic.",
            ALGO,
        ),
    ] = D.algo,  # type: ignore[assignment]
    k: Annotated[
        int, option("rloo, grpo: samples per prompt; --batch-size counts rollouts = prompts x K (0 = 4).", ALGO, "--k")
    ] = D.k,
    kl_in_reward: Annotated[
        bool, option("grpo: penalise the KL in the reward (as ppo does) instead of adding β·k3 to the loss.", ALGO)
    ] = D.kl_in_reward,
    steps: Annotated[int, option("PPO steps (one rollout batch and its PPO epochs each).", PPO)] = D.steps,
    batch_size: Annotated[int, option("Rollouts per step (per process).", PPO)] = D.batch_size,
    mini_batch_size: Annotated[int, option("Rollouts per optimizer step (0 = --batch-size).", PPO)] = D.mini_batch_size,
    grad_accum: Annotated[
        int, option("Micro-batches per mini-batch (micro-batch = mini-batch / grad-accum).", PPO)
    ] = D.grad_accum,
    ppo_epochs: Annotated[int, option("Passes over each rollout batch.", PPO)] = D.ppo_epochs,
    cliprange: Annotated[float, option("ε of the clipped policy surrogate.", PPO)] = D.cliprange,
    cliprange_value: Annotated[float, option("ε_v of the clipped value loss.", PPO)] = D.cliprange_value,
    vf_coef: Annotated[float, option("Weight of the value loss.", PPO)] = D.vf_coef,
    gamma: Annotated[float, option("Discount of GAE.", PPO)] = D.gamma,
    lam: Annotated[float, option("λ of GAE.", PPO)] = D.lam,
    early_stop_kl: Annotated[
        Optional[float], option("Stop a step's PPO epochs once a mini-batch's approx-KL exceeds this (default: off).", PPO)
    ] = D.early_stop_kl,
    max_new_tokens: Annotated[int, option("Longest response, in tokens.", SAMPLING_PANEL)] = D.max_new_tokens,
    temperature: Annotated[
        float, option("Sampling temperature; the policy and reference log-probs use the same one.", SAMPLING_PANEL)
    ] = D.temperature,
    top_p: Annotated[float, option("Nucleus sampling (1 = off).", SAMPLING_PANEL)] = D.top_p,
    top_k: Annotated[int, option("Top-k sampling (0 = off).", SAMPLING_PANEL)] = D.top_k,
    stop: Annotated[list[str], option("A stop string besides EOS (repeatable).", SAMPLING_PANEL, show_default=False)] = D.stop,
    generation_batch_size: Annotated[
        int, option("Prompts per generation call (0 = the whole batch).", SAMPLING_PANEL)
    ] = D.generation_batch_size,
    kl_coef: Annotated[float, option("β of the per-token KL penalty (the initial β with --target-kl).", KL)] = D.kl_coef,
    target_kl: Annotated[
        Optional[float], option("Adaptive β: the per-sequence KL to aim at (Ziegler et al. 2019; default: β fixed).", KL)
    ] = D.target_kl,
    kl_horizon: Annotated[int, option("Horizon of the adaptive β, in rollouts.", KL)] = D.kl_horizon,
    kl_estimator: Annotated[
        KLEstimator, option("Per-token KL estimator: k1 = log r, k2 = ½(log r)², k3 = (1/r − 1) + log r.", KL)
    ] = D.kl_estimator,  # type: ignore[assignment]
    reward_clip: Annotated[Optional[float], option("Clip the normalised score to [−c, c] (default: off).", KL)] = D.reward_clip,
    missing_eos_penalty: Annotated[
        Optional[float], option("Score given instead of the reward to a completion that never stopped (default: off).", KL)
    ] = D.missing_eos_penalty,
    whiten_rewards: Annotated[
        bool, option("Whiten the per-token rewards (without a mean shift) before GAE.", KL)
    ] = D.whiten_rewards,
    conservative_coef: Annotated[
        float,
        option(
            "λ: score = mean − λ·std of the reward ensemble's members (train-rm --ensemble M; Coste et al. 2023). 0 = off.",
            KL,
        ),
    ] = D.conservative_coef,
    lr: Annotated[float, option("Peak learning rate of AdamW (policy and critic).", TRAINING_PANEL)] = D.lr,
    schedule: Annotated[
        Schedule, option("Learning-rate decay over --steps (linear = annealed to 0).", TRAINING_PANEL)
    ] = D.schedule,  # type: ignore[assignment]
    warmup_steps: Annotated[int, option("Linear warmup, in PPO steps.", TRAINING_PANEL)] = D.warmup_steps,
    weight_decay: WeightDecayOption = D.weight_decay,
    adam_eps: Annotated[float, option("AdamW ε (1e-5 as in lm-human-preferences).", TRAINING_PANEL)] = D.adam_eps,
    max_grad_norm: MaxGradNormOption = D.max_grad_norm,
    ptx_data: Annotated[
        str, option("Demonstrations or text records whose language-model loss is added to every update.", PTX, show_default=False)
    ] = D.ptx_data,
    ptx_coef: Annotated[float, option("γ, the weight of the PPO-ptx loss (0 = off).", PTX)] = D.ptx_coef,
    ptx_batch_size: Annotated[
        int, option("PPO-ptx sequences per micro-batch (0 = the micro-batch size).", PTX)
    ] = D.ptx_batch_size,
    ptx_max_length: Annotated[int, option("Cut PPO-ptx sequences to this many tokens.", PTX)] = D.ptx_max_length,
    judge: Annotated[
        str,
        option(
            "Judge command (eval --judge's protocol: samples JSONL on stdin, rankings on stdout): the policy's win-rate over "
            "the starting policy is logged as judge/win_rate (95% Wilson interval).",
            JUDGE,
            show_default=False,
        ),
    ] = D.judge,
    judge_every: Annotated[
        int, option("Judge every N steps, and after the last (0 = after the last only).", JUDGE)
    ] = D.judge_every,
    judge_prompts: Annotated[
        str, option("The judge's prompts (default: --prompts; held-out ones measure generalisation).", JUDGE, show_default=False)
    ] = D.judge_prompts,
    judge_samples: Annotated[
        int, option("Prompts judged each time: the first N distinct ones, one completion each from policy and start.", JUDGE)
    ] = D.judge_samples,
    judge_timeout: Annotated[float, option("Seconds one judge call may take.", JUDGE)] = D.judge_timeout,
    keep_best: Annotated[
        bool,
        option(
            "OUT holds the policy of the judged step with the best win-rate (the starting policy if none beat it); "
            "--no-keep-best: the last one.",
            JUDGE,
        ),
    ] = D.keep_best,
    save_every: Annotated[int, option("Checkpoint every N PPO steps (0 = only at the end).", RUN_PANEL)] = D.save_every,
    keep_checkpoints: KeepCheckpointsOption = D.keep_checkpoints,
    resume: ResumeOption = D.resume,
    sample_every: Annotated[
        int, option("Print a table of samples and append them to OUT/samples.jsonl every N steps (0 = never).", RUN_PANEL)
    ] = D.sample_every,
    num_samples: Annotated[int, option("Rows in each sample table.", RUN_PANEL)] = D.num_samples,
    lora: Annotated[
        bool,
        option(
            "Train LoRA adapters; the reference is the same backbone with the adapter off. The saved policy is merged.",
            LORA_PANEL,
        ),
    ] = D.lora,
    lora_r: LoraROption = D.lora_r,
    lora_alpha: LoraAlphaOption = D.lora_alpha,
    lora_dropout: LoraDropoutOption = D.lora_dropout,
    lora_target_modules: LoraTargetModulesOption = D.lora_target_modules,
    save_adapter: SaveAdapterOption = D.save_adapter,
    report_to: ReportToOption = D.report_to,
    strategy: StrategyOption = D.strategy,  # type: ignore[assignment]
    gradient_checkpointing: GradientCheckpointingOption = D.gradient_checkpointing,
    cpu_offload: CpuOffloadOption = D.cpu_offload,
    compile: CompileOption = D.compile,
    seed: SeedOption = D.seed,
    device: DeviceOption = D.device,  # type: ignore[assignment]
    dtype: DTypeOption = D.dtype,  # type: ignore[assignment]
    skip_invalid: SkipInvalidOption = D.skip_invalid,
    trust_remote_code: TrustRemoteCodeOption = D.trust_remote_code,
    chat_template: ChatTemplateOption = D.chat_template,  # type: ignore[assignment]
    config: ConfigOption = None,
) -> dict | None:
    """RLHF with PPO (or A2C, RLOO, GRPO: --algo) against a reward model and a KL penalty to the reference; print a JSON summary.

    Each step samples responses, scores them, penalises the KL to the reference and updates policy and critic.

    Every step logs objective/score, objective/kl, loss/policy, ... to OUT/metrics.jsonl (README: "metric keys").

    OUT loads with plain transformers at the end.
    """
    from rlhfkit.stages import ppo

    return ppo.run(build_config(PPOConfig, locals()))
