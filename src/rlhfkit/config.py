"""One dataclass per stage: the single home of every default. The CLI reads its defaults from here,
and the resolved config is recorded in every artifact's ``rlhfkit.json``."""

from __future__ import annotations

from dataclasses import dataclass, field  # noqa: F401  (field is used by stage configs)


@dataclass
class CommonConfig:
    """Options every command has."""

    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    skip_invalid: bool = False
    trust_remote_code: bool = False


@dataclass
class TrainConfig(CommonConfig):
    """Options every training stage has (sft, train-rm, ppo)."""

    out: str = ""
    resume: bool = False
    save_every: int = 0  # checkpoint every N optimizer steps (0 = only at the end)
    keep_checkpoints: int = 2
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    save_adapter: bool = False


# --- stage configs (each stage appends its own below) -------------------------------------------


@dataclass
class EvalConfig(CommonConfig):
    """``rlhfkit eval``: compare policies with a baseline on held-out prompts."""

    policy: list[str] = field(default_factory=list)  # NAME=PATH or PATH (name = directory name)
    baseline: str = ""
    rm: str = ""  # reward-model directory, one-label classifier, or python:MODULE:FUNCTION
    judge: str = ""  # shell command: samples JSONL on stdin -> rankings JSONL on stdout
    prompts: str = ""
    out: str = ""  # report.md, plots and samples.jsonl go here ("" = JSON on stdout only)
    max_prompts: int = 0  # 0 = every prompt
    max_new_tokens: int = 64
    n_samples: int = 1  # completions per prompt per policy
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 16
    best_of: int = 0  # best-of-n from the baseline by RM score (0 = off)
    demos: str = ""  # held-out demonstrations for perplexity
    checkpoints: str = ""  # a ppo run directory: evaluate RUN/checkpoints/step-*/
    interval: str = "wilson"  # win-rate interval: wilson or bootstrap (over prompts)
    confidence: float = 0.95
    bootstrap: int = 1000  # resamples for bootstrap intervals (Elo, and win-rates with --interval bootstrap)
    judge_timeout: float = 3600.0  # seconds


@dataclass
class TrainRMConfig(TrainConfig):
    """``rlhfkit train-rm``: a Bradley–Terry reward model on comparisons (prompt/chosen/rejected)."""

    model: str = ""  # the initial model, usually the SFT model (a fresh one-label score head is added)
    data: str = ""  # comparisons (rank-import output or public prompt/chosen/rejected data)
    val_data: str = ""  # held-out comparisons ("" = split --val-fraction of the prompts off --data)
    val_fraction: float = 0.05  # share of prompts held out when --val-data is not given (0 = none)
    max_length: int = 1024  # pairs whose prompt+completion is longer are dropped (and counted)
    epochs: int = 1  # reward models overfit after one epoch (InstructGPT, Ouyang et al. 2022)
    max_steps: int = 0  # stop after N optimizer steps (0 = run every epoch)
    batch_size: int = 8  # batch elements per micro-batch and device: groups (rankings), or pairs without 'group'
    grad_accum: int = 1
    lr: float = 1e-5
    schedule: str = "linear"  # linear, cosine or constant, after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    use_margin: bool = False  # subtract each pair's 'margin' inside the loss (Llama 2)
    center_rewards_coef: float = 0.0  # adds coef * mean(r^2) (Eisenstein et al. 2023; TRL)
    eval_every: int = 0  # held-out evaluation every N optimizer steps (0 = only at the end)
    eval_batch_size: int = 16
    log_every: int = 1
    norm_samples: str = ""  # samples or comparisons whose completions set the normalisation ("" = training completions)


@dataclass
class SFTConfig(TrainConfig):
    """``rlhfkit sft``: supervised fine-tuning (and continued pretraining) on demonstrations."""

    model: str = ""  # the pretrained causal LM (directory, hub id or .gguf file)
    data: str = ""  # demonstrations: text, prompt/response or messages records
    val_data: str = ""  # held-out demonstrations ("" = split --val-fraction off --data)
    val_fraction: float = 0.0  # share of --data held out when --val-data is not given (0 = no eval)
    epochs: int = 3
    max_steps: int = 0  # stop after N optimizer steps (0 = run every epoch); overrides --epochs
    lr: float = 2e-5
    schedule: str = "cosine"  # cosine, linear or constant, after warmup
    warmup_steps: int = 0  # linear warmup steps; when 0, --warmup-ratio of the total steps
    warmup_ratio: float = 0.0
    batch_size: int = 8  # rows per micro-batch and device
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 1024  # longer examples are cut (and counted); the start is kept
    packing: bool = False  # pack short examples into rows of --max-length tokens
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    bf16: bool | None = None  # bfloat16 autocast; None = on with --dtype auto on a GPU that supports it
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% more compute
    eval_every: int = 0  # held-out evaluation every N optimizer steps (0 = before and after training only)
    eval_batch_size: int = 16
    log_every: int = 10  # optimizer steps per metrics.jsonl line


@dataclass
class CollectConfig(CommonConfig):
    """``rlhfkit collect``: K completions per prompt from one or more policies, for labelers."""

    policy: list[str] = field(default_factory=list)  # NAME=PATH or PATH (name = directory or file name)
    prompts: str = ""
    k: int = 4  # completions per prompt and policy
    out: str = ""  # samples JSONL, or - for stdout
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)  # stop strings (EOS always stops)
    batch_size: int = 64  # sequences per generation batch (decoding is memory-bound: wide batches amortise the weights)
    dedup: bool = False  # drop a completion whose text repeats one already kept for the prompt
    max_prompts: int = 0  # 0 = every prompt


@dataclass
class RankImportConfig(CommonConfig):
    """``rlhfkit rank-import``: labelers' rankings -> validated comparison pairs, agreement, Elo."""

    rankings: str = ""  # rankings file, or - for stdin
    samples: str = ""  # the samples the rankings refer to (collect output)
    out: str = ""  # comparisons JSONL, or - for stdout
    format: str = "auto"  # auto, native, scores, best-of-k, pairwise, label-studio, argilla, csv
    val_fraction: float = 0.0  # share of prompts (by hash of the prompt id) written to --val-out
    val_out: str = ""  # "" = OUT with ".val" before its extension (pairs.jsonl -> pairs.val.jsonl)
    stats: str = ""  # write the statistics as JSON here too
    tie_pairs: bool = False  # a tie gives a margin-0 pair (else no pair)
    score_margin: bool = False  # scores format: margin = score difference
    aggregate: str = "none"  # none (every annotator's pairs) or majority
    bootstrap: int = 200  # resamples of prompts for the Elo confidence intervals


@dataclass
class PPOConfig(TrainConfig):
    """``rlhfkit ppo``: RLHF with PPO against a reward model and a KL penalty to the reference.

    Batch sizes are per process (under torchrun each rank samples its own ``batch_size`` rollouts).
    One PPO step = one rollout batch and its ``ppo_epochs`` passes of updates; ``steps``,
    ``save_every`` and ``sample_every`` count PPO steps.
    """

    policy: str = ""  # the initial policy, usually the SFT model; also the frozen reference
    ref: str = ""  # the KL reference when it is not --policy (iterated RLHF: continue from a PPO policy, stay close to SFT)
    rm: str = ""  # reward-model directory, one-label classifier, or python:MODULE:FUNCTION
    prompts: str = ""
    value_head: str = "separate"  # separate (a value model) or policy (a linear head on the policy)
    value_model: str = ""  # "" = initialise the value model from --rm (from --policy for a scripted reward)
    steps: int = 100  # PPO steps (rollout + update)
    batch_size: int = 16  # rollouts per step (per process)
    mini_batch_size: int = 0  # rollouts per optimizer step (0 = batch_size: one mini-batch per epoch)
    grad_accum: int = 1  # micro-batches per mini-batch (micro-batch = mini_batch_size / grad_accum)
    ppo_epochs: int = 4
    max_new_tokens: int = 64
    max_prompt_length: int = 0  # keep only the last N prompt tokens (0 = no limit)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings (besides EOS)
    generation_batch_size: int = 0  # prompts per generation call (0 = the whole batch)
    lr: float = 1e-5
    schedule: str = "linear"  # linear (annealed to 0 over --steps), cosine or constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_eps: float = 1e-5  # lm-human-preferences; PyTorch's 1e-8 differs
    max_grad_norm: float = 1.0  # 0 = no clipping
    kl_coef: float = 0.05  # β, the initial β when --target-kl is set
    target_kl: float | None = None  # adaptive β (Ziegler et al. 2019): per-sequence KL to aim at
    kl_horizon: int = 10000  # adaptive β horizon, in rollouts
    kl_estimator: str = "k1"  # k1, k2 or k3
    reward_clip: float | None = None  # clip normalised scores to [-c, c]
    missing_eos_penalty: float | None = None  # score given to a completion that never stopped
    whiten_rewards: bool = False
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    early_stop_kl: float | None = None  # stop this step's PPO epochs once approx-KL exceeds it
    ptx_data: str = ""  # demonstrations or text records for PPO-ptx
    ptx_coef: float = 0.0  # γ of InstructGPT's PPO-ptx (0 = off)
    ptx_batch_size: int = 0  # ptx sequences per micro-batch (0 = the micro-batch size)
    ptx_max_length: int = 512
    sample_every: int = 10  # print and record a few samples every N steps (0 = never)
    num_samples: int = 4  # rows in each sample table
