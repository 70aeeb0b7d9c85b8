"""``rlhfkit dpo``: options -> DPOConfig -> stages.dpo.run."""

from __future__ import annotations

from typing import Annotated

from rlhfkit import config as config_types
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
    KeepCheckpointsOption,
    LogEveryOption,
    LoraAlphaOption,
    LoraDropoutOption,
    LoraROption,
    LoraTargetModulesOption,
    MaxGradNormOption,
    MaxStepsOption,
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
    choice_enum,
    command,
    option,
)
from rlhfkit.config import DPOConfig

D = DPOConfig()
DPO_PANEL = "DPO"
DPOLoss = choice_enum("DPOLoss", config_types.DPOLoss)


@command
def command(
    policy: Annotated[
        str,
        option(
            "Starting policy, usually the SFT model (directory, hub id or .gguf); also the frozen reference.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.policy,
    data: Annotated[
        str,
        option(
            "Comparisons, as train-rm reads them: rank-import output (rankings grouped by 'group') or public "
            "prompt/chosen/rejected data.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.data,
    out: Annotated[
        str,
        option(
            "Output directory: the policy (plain HF model + rlhfkit.json), metrics.jsonl, checkpoints/ (with the cached "
            "reference log-probs).",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.out,
    max_length: Annotated[
        int, option("Drop (and count) pairs whose prompt+completion is longer than this many tokens.", INPUT_PANEL)
    ] = D.max_length,
    loss: Annotated[
        DPOLoss, option("sigmoid: −log σ(β·h) (DPO, Rafailov et al. 2023); ipo: (h − 1/(2β))² (Azar et al. 2023).", DPO_PANEL)
    ] = D.loss,  # type: ignore[assignment]
    beta: Annotated[
        float, option("β: the scale of the implicit reward β·log(π/π_ref); smaller lets the policy move further.", DPO_PANEL)
    ] = D.beta,
    epochs: Annotated[int, option("Passes over the comparisons.", TRAINING_PANEL)] = D.epochs,
    max_steps: MaxStepsOption = D.max_steps,
    batch_size: Annotated[
        int,
        option("Batch elements per micro-batch and device: rankings (all pairs of one 'group') or single pairs.", TRAINING_PANEL),
    ] = D.batch_size,
    grad_accum: GradAccumOption = D.grad_accum,
    lr: Annotated[float, option("Peak learning rate of AdamW.", TRAINING_PANEL)] = D.lr,
    schedule: ScheduleOption = D.schedule,  # type: ignore[assignment]
    warmup_steps: WarmupStepsOption = D.warmup_steps,
    weight_decay: WeightDecayOption = D.weight_decay,
    max_grad_norm: MaxGradNormOption = D.max_grad_norm,
    val_data: Annotated[
        str,
        option(
            "Held-out comparisons (e.g. rank-import's validation file). Without it, --val-fraction of the prompts is "
            "held out, as train-rm holds them out.",
            EVAL_PANEL,
            show_default=False,
        ),
    ] = D.val_data,
    val_fraction: ValFractionOption = D.val_fraction,
    eval_every: Annotated[
        int, option("Held-out loss, accuracy and margin every N optimizer steps (0 = only at the end).", EVAL_PANEL)
    ] = D.eval_every,
    eval_batch_size: Annotated[
        int, option("Batch elements per forward pass in evaluation (and sequences when scoring the reference).", EVAL_PANEL)
    ] = D.eval_batch_size,
    save_every: SaveEveryOption = D.save_every,
    keep_checkpoints: KeepCheckpointsOption = D.keep_checkpoints,
    resume: ResumeOption = D.resume,
    log_every: LogEveryOption = D.log_every,
    lora: Annotated[
        bool,
        option(
            "Train LoRA adapters; the reference is the backbone with the adapter off. The saved policy is merged.", LORA_PANEL
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
    """Direct preference optimisation on comparisons (no reward model, no sampling); print a JSON summary.

    Reads the comparisons, ranking groups and validation split that train-rm reads; the reference is the starting policy,
    its log-probs computed once and cached in OUT.

    Logs loss/train, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins to OUT/metrics.jsonl.

    OUT loads with plain transformers at the end.
    """
    from rlhfkit.stages import dpo

    return dpo.run(build_config(DPOConfig, locals()))
