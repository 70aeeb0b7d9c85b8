"""``rlhfkit train-rm``: options -> TrainRMConfig -> stages.train_rm.run."""

from __future__ import annotations

from typing import Annotated, Optional

from rlhfkit.cli.common import (
    EVAL_PANEL,
    INPUT_PANEL,
    LORA_PANEL,
    TRAINING_PANEL,
    ChatTemplateOption,
    CompileOption,
    ConfigOption,
    CpuOffloadOption,
    DeviceOption,
    DTypeOption,
    GradAccumOption,
    GradientCheckpointingOption,
    HeadInit,
    KeepCheckpointsOption,
    LogEveryOption,
    LoraAlphaOption,
    LoraDropoutOption,
    LoraROption,
    LoraTargetModulesOption,
    MaxGradNormOption,
    MaxStepsOption,
    Pooling,
    ReportToOption,
    ResumeOption,
    SaveAdapterOption,
    SaveEveryOption,
    ScheduleOption,
    SeedOption,
    SkipInvalidOption,
    StrategyOption,
    TrustRemoteCodeOption,
    ValFractionOption,
    WarmupStepsOption,
    WeightDecayOption,
    build_config,
    command,
    option,
)
from rlhfkit.config import TrainRMConfig

D = TrainRMConfig()
NORM = "Normalisation"
HEAD_PANEL = "Score head"


@command
def command(
    model: Annotated[
        str,
        option(
            "Initial model (usually the SFT model): a directory, hub id or .gguf file. A fresh one-label score head is added.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.model,
    data: Annotated[
        str,
        option(
            "Comparisons: rank-import output, or public prompt/chosen/rejected data (strings or message lists, "
            "explicit or implicit prompt).",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.data,
    out: Annotated[
        str,
        option(
            "Output directory: the reward model (plain HF sequence classifier + rlhfkit.json), metrics.jsonl and checkpoints/.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.out,
    max_length: Annotated[
        int, option("Drop (and count) pairs whose prompt+completion is longer than this many tokens.", INPUT_PANEL)
    ] = D.max_length,
    epochs: Annotated[
        Optional[int],
        option(
            "Passes over the data (default: from the data size, enough for --min-steps optimizer steps; "
            "with few comparisons one epoch is a handful of steps).",
            TRAINING_PANEL,
            show_default=False,
        ),
    ] = D.epochs,
    min_steps: Annotated[
        int,
        option(
            "Without --epochs: at least this many optimizer steps (epochs = ceil(min-steps / steps per epoch)).", TRAINING_PANEL
        ),
    ] = D.min_steps,
    max_steps: MaxStepsOption = D.max_steps,
    batch_size: Annotated[
        int,
        option("Batch elements per micro-batch and device: rankings (all pairs of one 'group') or single pairs.", TRAINING_PANEL),
    ] = D.batch_size,
    grad_accum: GradAccumOption = D.grad_accum,
    lr: Annotated[
        float,
        option("Peak learning rate of AdamW (1e-5 suits full fine-tuning; raise it, e.g. 1e-4, with --lora).", TRAINING_PANEL),
    ] = D.lr,
    schedule: ScheduleOption = D.schedule,  # type: ignore[assignment]
    pooling: Annotated[
        Pooling,
        option(
            "What the score head reads: last, the hidden state at the last token (the format plain transformers reads); "
            "last+mean, also the mean hidden state over the completion's tokens (a second head in mean_head.safetensors).",
            HEAD_PANEL,
        ),
    ] = D.pooling,  # type: ignore[assignment]
    feature_layers: Annotated[
        int,
        option(
            "With --pooling last+mean: the head reads the features of K layers, the last and K−1 lower ones evenly "
            "spaced (5 of 30: 6, 12, 18, 24, 30), each through the final norm; 1 = the last layer only.",
            HEAD_PANEL,
        ),
    ] = D.feature_layers,
    depth: Annotated[
        str,
        option(
            "How many of the model's decoder layers the reward model keeps (the head reads the hidden state after the "
            "last kept one): all; a number N; or auto, the N whose probe has the lowest cross-validated loss on the "
            "training comparisons (fewer layers also score faster in ppo and eval).",
            HEAD_PANEL,
        ),
    ] = D.depth,
    head_init: Annotated[
        HeadInit,
        option(
            "probe: fit the score head on the frozen model's features first (Bradley–Terry logistic regression, "
            "LP-FT, Kumar et al. 2022), then fine-tune; random: a fresh random head.",
            HEAD_PANEL,
        ),
    ] = D.head_init,  # type: ignore[assignment]
    probe_l2: Annotated[
        Optional[float],
        option("The probe's L2 penalty on standardised features (default: chosen by 5-fold cross-validation over rankings).",
               HEAD_PANEL, show_default=False),
    ] = D.probe_l2,  # fmt: skip
    head_lr: Annotated[
        Optional[float], option("Learning rate of the score head (default: --lr).", HEAD_PANEL, show_default=False)
    ] = D.head_lr,
    trainable_layers: Annotated[
        int,
        option("Train only the top N decoder layers, the final norm and the head (0 = the probe alone, -1 = every layer).",
               HEAD_PANEL),
    ] = D.trainable_layers,  # fmt: skip
    ensemble: Annotated[
        int,
        option(
            "Train M heads on one backbone, each on a bootstrap resample of the rankings; their spread is exported as "
            "uncertainty (ensemble.safetensors) for ppo --conservative-coef and collect --select-by.",
            HEAD_PANEL,
        ),
    ] = D.ensemble,
    warmup_steps: WarmupStepsOption = D.warmup_steps,
    weight_decay: WeightDecayOption = D.weight_decay,
    max_grad_norm: MaxGradNormOption = D.max_grad_norm,
    use_margin: Annotated[
        bool, option("Use each pair's 'margin' in the loss: −log σ(r_w − r_l − margin) (Llama 2).", TRAINING_PANEL)
    ] = D.use_margin,
    center_rewards_coef: Annotated[
        float,
        option(
            "Add coef · mean (r_w + r_l)² to keep rewards centred at 0 (Eisenstein et al. 2023; 0.01 is typical; 0 = off).",
            TRAINING_PANEL,
        ),
    ] = D.center_rewards_coef,
    val_data: Annotated[
        str,
        option(
            "Held-out comparisons (e.g. rank-import's validation file). Without it, --val-fraction of the prompts is held out.",
            EVAL_PANEL,
            show_default=False,
        ),
    ] = D.val_data,
    val_fraction: ValFractionOption = D.val_fraction,
    eval_every: Annotated[
        int, option("Held-out accuracy and margin every N optimizer steps (0 = only at the end).", EVAL_PANEL)
    ] = D.eval_every,
    early_stopping: Annotated[
        bool,
        option("Keep the weights with the lowest held-out loss, evaluated every --eval-every steps (default: twice an epoch).",
               EVAL_PANEL),
    ] = D.early_stopping,
    patience: Annotated[
        int, option("With --early-stopping: stop after N evaluations without improvement (0 = train every step).", EVAL_PANEL)
    ] = D.patience,
    eval_batch_size: Annotated[
        int, option("Batch elements per forward pass in evaluation and normalisation.", EVAL_PANEL)
    ] = D.eval_batch_size,
    norm_samples: Annotated[
        str,
        option(
            "Samples (collect output) or comparisons whose completions set the reward's mean 0 / std 1 "
            "normalisation (default: the training completions).",
            NORM,
            show_default=False,
        ),
    ] = D.norm_samples,
    save_every: SaveEveryOption = D.save_every,
    keep_checkpoints: KeepCheckpointsOption = D.keep_checkpoints,
    resume: ResumeOption = D.resume,
    log_every: LogEveryOption = D.log_every,
    lora: Annotated[
        bool, option("Train LoRA adapters (and the score head) instead of every weight; the saved model is merged.", LORA_PANEL)
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
    """Train a reward model (Bradley–Terry, InstructGPT ranking batches) on comparisons; print a JSON summary.

    Pairs that share a 'group' (one ranking) form one batch element: each completion is encoded once.

    After training, the reward is normalised (mean 0, std 1 on reference completions): gain and bias go to OUT/rlhfkit.json.

    OUT loads with plain transformers as a sequence classifier.
    """
    from rlhfkit.stages import train_rm

    return train_rm.run(build_config(TrainRMConfig, locals()))
