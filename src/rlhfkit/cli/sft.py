"""``rlhfkit sft``: options -> SFTConfig -> stages.sft.run."""

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
    GradientCheckpointingOption,
    KeepCheckpointsOption,
    LogEveryOption,
    LoraAlphaOption,
    LoraDropoutOption,
    LoraROption,
    LoraTargetModulesOption,
    MaxGradNormOption,
    ReportToOption,
    ResumeOption,
    SaveAdapterOption,
    SaveEveryOption,
    Schedule,
    SeedOption,
    SkipInvalidOption,
    StrategyOption,
    TrustRemoteCodeOption,
    WeightDecayOption,
    build_config,
    command,
    option,
)
from rlhfkit.config import SFTConfig

D = SFTConfig()
DATA = "Data"


@command
def command(
    model: Annotated[
        str, option("Base causal LM: a local Hugging Face directory, a hub id, or a .gguf file.", INPUT_PANEL, show_default=False)
    ] = D.model,
    data: Annotated[
        str,
        option(
            "Demonstrations (.jsonl, .jsonl.gz, .json, .parquet, saved dataset dir, or -): records with 'text', "
            "'prompt'+'response', or 'messages'.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.data,
    out: Annotated[
        str,
        option(
            "Run and model directory: metrics.jsonl, checkpoints/ during the run, the trained model "
            "(plain transformers) and rlhfkit.json at the end.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.out,
    epochs: Annotated[int, option("Passes over the training data.", TRAINING_PANEL)] = D.epochs,
    max_steps: Annotated[
        int, option("Stop after N optimizer steps; overrides --epochs (0 = use --epochs).", TRAINING_PANEL)
    ] = D.max_steps,
    lr: Annotated[float, option("Peak learning rate of AdamW (LoRA usually wants ~1e-4 to 2e-4).", TRAINING_PANEL)] = D.lr,
    schedule: Annotated[
        Schedule, option("Learning-rate decay after warmup (cosine and linear end at 0).", TRAINING_PANEL)
    ] = D.schedule,  # type: ignore[assignment]
    warmup_steps: Annotated[int, option("Linear warmup steps (0 = use --warmup-ratio).", TRAINING_PANEL)] = D.warmup_steps,
    warmup_ratio: Annotated[
        float, option("Warmup as a share of the total steps, when --warmup-steps is 0.", TRAINING_PANEL)
    ] = D.warmup_ratio,
    batch_size: Annotated[int, option("Rows per micro-batch and device.", TRAINING_PANEL)] = D.batch_size,
    grad_accum: Annotated[
        int,
        option(
            "Micro-batches per optimizer step. The loss is the mean over every labelled token of the step, "
            "so batch 4 × accum 1 and batch 2 × accum 2 give the same update.",
            TRAINING_PANEL,
        ),
    ] = D.grad_accum,
    weight_decay: WeightDecayOption = D.weight_decay,
    max_grad_norm: MaxGradNormOption = D.max_grad_norm,
    bf16: Annotated[
        Optional[bool],
        option(
            "bfloat16 autocast with float32 weights. Default: on with --dtype auto on a GPU that supports "
            "it or a CPU with AMX or AVX512-BF16, off elsewhere. "
            "(--dtype bfloat16 trains bfloat16 weights instead.)",
            TRAINING_PANEL,
            "--bf16/--no-bf16",
            show_default=False,
        ),
    ] = D.bf16,
    max_length: Annotated[
        int, option("Tokens per example; longer ones are cut (the start is kept) and counted in the log and rlhfkit.json.", DATA)
    ] = D.max_length,
    packing: Annotated[
        bool,
        option(
            "Pack short examples into rows of --max-length tokens; position ids restart at every example "
            "and attention stays within it.",
            DATA,
        ),
    ] = D.packing,
    val_data: Annotated[
        str, option("Held-out demonstrations for eval loss and perplexity.", EVAL_PANEL, show_default=False)
    ] = D.val_data,
    val_fraction: Annotated[
        float, option("Hold out this share of --data instead (chosen by --seed; 0 = no evaluation).", EVAL_PANEL)
    ] = D.val_fraction,
    eval_every: Annotated[
        int, option("Evaluate every N optimizer steps (0 = before and after training only).", EVAL_PANEL)
    ] = D.eval_every,
    eval_batch_size: Annotated[int, option("Rows per evaluation batch.", EVAL_PANEL)] = D.eval_batch_size,
    save_every: SaveEveryOption = D.save_every,
    keep_checkpoints: KeepCheckpointsOption = D.keep_checkpoints,
    resume: ResumeOption = D.resume,
    log_every: LogEveryOption = D.log_every,
    lora: Annotated[
        bool, option("Train LoRA adapters (peft) instead of every weight; the merged model is saved.", LORA_PANEL)
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
    """Supervised fine-tuning (and continued pretraining) of a causal LM on demonstrations, full or LoRA.

    Loss on every token of 'text' records and on the response (and EOS) of 'prompt'/'response' records.

    In 'messages' records: on every assistant turn (content and end-of-turn token).
    """
    from rlhfkit.stages import sft

    return sft.run(build_config(SFTConfig, locals()))
