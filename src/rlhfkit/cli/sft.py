"""``rlhfkit sft``: options -> SFTConfig -> stages.sft.run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rlhfkit.cli.common import (
    ConfigOption,
    DeviceOption,
    DTypeOption,
    KeepCheckpointsOption,
    LogEveryOption,
    LoraAlphaOption,
    LoraDropoutOption,
    LoraROption,
    LoraTargetModulesOption,
    ResumeOption,
    SaveAdapterOption,
    Schedule,
    SeedOption,
    SkipInvalidOption,
    TrustRemoteCodeOption,
    command,
)
from rlhfkit.config import SFTConfig

INPUT = "Input and output"
TRAINING = "Training"
DATA = "Data"
EVAL = "Held-out evaluation"
LORA = "LoRA"
RUN = "Checkpoints and logging"


@command
def command(
    model: Annotated[Optional[str], typer.Option(help="Base causal LM: a local Hugging Face directory, a hub id, or a .gguf file.", rich_help_panel=INPUT, show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option(help="Demonstrations (.jsonl, .jsonl.gz, .json, .parquet, saved dataset dir, or -): "
                                            "records with 'text', 'prompt'+'response', or 'messages'.", rich_help_panel=INPUT, show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run and model directory: metrics.jsonl, checkpoints/ during the run, "
                                           "the trained model (plain transformers) and rlhfkit.json at the end.", rich_help_panel=INPUT, show_default=False)] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training data.", rich_help_panel=TRAINING)] = SFTConfig.epochs,
    max_steps: Annotated[int, typer.Option(help="Stop after N optimizer steps; overrides --epochs (0 = use --epochs).", rich_help_panel=TRAINING)] = SFTConfig.max_steps,
    lr: Annotated[float, typer.Option(help="Peak learning rate of AdamW (LoRA usually wants ~1e-4 to 2e-4).", rich_help_panel=TRAINING)] = SFTConfig.lr,
    schedule: Annotated[Schedule, typer.Option(help="Learning-rate decay after warmup (cosine and linear end at 0).", rich_help_panel=TRAINING)] = SFTConfig.schedule,  # type: ignore[assignment]
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps (0 = use --warmup-ratio).", rich_help_panel=TRAINING)] = SFTConfig.warmup_steps,
    warmup_ratio: Annotated[float, typer.Option(help="Warmup as a share of the total steps, when --warmup-steps is 0.", rich_help_panel=TRAINING)] = SFTConfig.warmup_ratio,
    batch_size: Annotated[int, typer.Option(help="Rows per micro-batch and device.", rich_help_panel=TRAINING)] = SFTConfig.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step. The loss is the mean over every labelled token of the step, "
                                                 "so batch 4 × accum 1 and batch 2 × accum 2 give the same update.", rich_help_panel=TRAINING)] = SFTConfig.grad_accum,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not applied to biases and norms).", rich_help_panel=TRAINING)] = SFTConfig.weight_decay,
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this (0 = no clipping).", rich_help_panel=TRAINING)] = SFTConfig.max_grad_norm,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--no-bf16", help="bfloat16 autocast with float32 weights. Default: on with --dtype auto on a GPU "
                                                                          "that supports it, off elsewhere. (--dtype bfloat16 trains bfloat16 weights instead.)",
                                                 rich_help_panel=TRAINING, show_default=False)] = SFTConfig.bf16,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations during the backward pass: less memory, more compute.", rich_help_panel=TRAINING)] = SFTConfig.gradient_checkpointing,
    max_length: Annotated[int, typer.Option(help="Tokens per example; longer ones are cut (the start is kept) and counted in the log and rlhfkit.json.", rich_help_panel=DATA)] = SFTConfig.max_length,
    packing: Annotated[bool, typer.Option(help="Pack short examples into rows of --max-length tokens; position ids restart at every example "
                                               "and attention stays within it.", rich_help_panel=DATA)] = SFTConfig.packing,
    val_data: Annotated[Optional[Path], typer.Option(help="Held-out demonstrations for eval loss and perplexity.", rich_help_panel=EVAL, show_default=False)] = None,
    val_fraction: Annotated[float, typer.Option(help="Hold out this share of --data instead (chosen by --seed; 0 = no evaluation).", rich_help_panel=EVAL)] = SFTConfig.val_fraction,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N optimizer steps (0 = before and after training only).", rich_help_panel=EVAL)] = SFTConfig.eval_every,
    eval_batch_size: Annotated[int, typer.Option(help="Rows per evaluation batch.", rich_help_panel=EVAL)] = SFTConfig.eval_batch_size,
    lora: Annotated[bool, typer.Option(help="Train LoRA adapters (peft) instead of every weight; the merged model is saved.", rich_help_panel=LORA)] = SFTConfig.lora,
    lora_r: LoraROption = SFTConfig.lora_r,
    lora_alpha: LoraAlphaOption = SFTConfig.lora_alpha,
    lora_dropout: LoraDropoutOption = SFTConfig.lora_dropout,
    lora_target_modules: LoraTargetModulesOption = SFTConfig.lora_target_modules,
    save_adapter: SaveAdapterOption = SFTConfig.save_adapter,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N optimizer steps (0 = only at the end).", rich_help_panel=RUN)] = SFTConfig.save_every,
    keep_checkpoints: KeepCheckpointsOption = SFTConfig.keep_checkpoints,
    resume: ResumeOption = SFTConfig.resume,
    log_every: LogEveryOption = SFTConfig.log_every,
    seed: SeedOption = SFTConfig.seed,
    device: DeviceOption = SFTConfig.device,  # type: ignore[assignment]
    dtype: DTypeOption = SFTConfig.dtype,  # type: ignore[assignment]
    skip_invalid: SkipInvalidOption = SFTConfig.skip_invalid,
    trust_remote_code: TrustRemoteCodeOption = SFTConfig.trust_remote_code,
    config: ConfigOption = None,
) -> dict | None:
    """Supervised fine-tuning (and continued pretraining) of a causal LM on demonstrations, full or LoRA.

    Loss on every token of 'text' records, on the response (and EOS) of 'prompt'/'response' records, and on every assistant turn (content and end-of-turn token) of 'messages' records.
    """
    from rlhfkit.cli.common import build_config
    from rlhfkit.stages import sft

    return sft.run(build_config(SFTConfig, locals()))
