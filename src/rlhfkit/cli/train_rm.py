"""``rlhfkit train-rm``: options → TrainRMConfig → stages.train_rm.run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    build_config,
    command,
)
from rlhfkit.config import TrainRMConfig as C

DATA, TRAIN, EVAL, NORM, RUN, LORA = "Model and data", "Training", "Held-out evaluation", "Normalisation", "Run directory", "LoRA"



@command
def command(
    model: Annotated[
        str,
        typer.Option(
            help="Initial model (usually the SFT model): a directory, hub id or .gguf file. A fresh one-label score head is added.",
            rich_help_panel=DATA,
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            help="Comparisons: rank-import output, or public prompt/chosen/rejected data (strings or message lists, explicit or implicit prompt).",
            rich_help_panel=DATA,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Output directory: the reward model (plain HF sequence classifier + rlhfkit.json), metrics.jsonl and checkpoints/.",
            rich_help_panel=DATA,
        ),
    ],
    max_length: Annotated[
        int,
        typer.Option(
            help="Drop (and count) pairs whose prompt+completion is longer than this many tokens.", rich_help_panel=DATA
        ),
    ] = C.max_length,
    epochs: Annotated[
        int,
        typer.Option(
            help="Passes over the data. One by default: reward models overfit after one epoch (InstructGPT).",
            rich_help_panel=TRAIN,
        ),
    ] = C.epochs,
    max_steps: Annotated[
        int, typer.Option(help="Stop after this many optimizer steps (0 = every epoch).", rich_help_panel=TRAIN)
    ] = C.max_steps,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Batch elements per micro-batch and device: rankings (all pairs of one 'group') or single pairs.",
            rich_help_panel=TRAIN,
        ),
    ] = C.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.", rich_help_panel=TRAIN)] = C.grad_accum,
    lr: Annotated[
        float,
        typer.Option(
            help="Peak learning rate of AdamW (1e-5 suits full fine-tuning; raise it, e.g. 1e-4, with --lora).",
            rich_help_panel=TRAIN,
        ),
    ] = C.lr,
    schedule: Annotated[Schedule, typer.Option(help="Decay after warmup.", rich_help_panel=TRAIN)] = Schedule(C.schedule),
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.", rich_help_panel=TRAIN)] = C.warmup_steps,
    weight_decay: Annotated[
        float, typer.Option(help="AdamW weight decay (not on biases and norms).", rich_help_panel=TRAIN)
    ] = C.weight_decay,
    max_grad_norm: Annotated[
        float, typer.Option(help="Clip the gradient norm (0 = no clipping).", rich_help_panel=TRAIN)
    ] = C.max_grad_norm,
    use_margin: Annotated[
        bool,
        typer.Option(help="Use each pair's 'margin' in the loss: −log σ(r_w − r_l − margin) (Llama 2).", rich_help_panel=TRAIN),
    ] = C.use_margin,
    center_rewards_coef: Annotated[
        float,
        typer.Option(
            help="Add coef · mean (r_w + r_l)² to keep rewards centred at 0 (Eisenstein et al. 2023; 0.01 is typical; 0 = off).",
            rich_help_panel=TRAIN,
        ),
    ] = C.center_rewards_coef,
    val_data: Annotated[
        str,
        typer.Option(
            help="Held-out comparisons (e.g. rank-import's validation file). Without it, --val-fraction of the prompts is held out.",
            rich_help_panel=EVAL,
        ),
    ] = C.val_data,
    val_fraction: Annotated[
        float,
        typer.Option(
            help="Share of prompts held out of --data when --val-data is not given (split by prompt; 0 = no held-out set).",
            rich_help_panel=EVAL,
        ),
    ] = C.val_fraction,
    eval_every: Annotated[
        int,
        typer.Option(help="Held-out accuracy and margin every N optimizer steps (0 = only at the end).", rich_help_panel=EVAL),
    ] = C.eval_every,
    eval_batch_size: Annotated[
        int, typer.Option(help="Batch elements per forward pass in evaluation and normalisation.", rich_help_panel=EVAL)
    ] = C.eval_batch_size,
    norm_samples: Annotated[
        str,
        typer.Option(
            help="Samples (collect output) or comparisons whose completions set the reward's mean 0 / std 1 normalisation (default: the training completions).",
            rich_help_panel=NORM,
        ),
    ] = C.norm_samples,
    resume: ResumeOption = C.resume,
    save_every: Annotated[
        int, typer.Option(help="Checkpoint every N optimizer steps (0 = only at the end).", rich_help_panel=RUN)
    ] = C.save_every,
    keep_checkpoints: KeepCheckpointsOption = C.keep_checkpoints,
    log_every: LogEveryOption = C.log_every,
    lora: Annotated[
        bool,
        typer.Option(
            help="Train LoRA adapters (and the score head) instead of every weight; the saved model is merged.",
            rich_help_panel=LORA,
        ),
    ] = C.lora,
    lora_r: LoraROption = C.lora_r,
    lora_alpha: LoraAlphaOption = C.lora_alpha,
    lora_dropout: LoraDropoutOption = C.lora_dropout,
    lora_target_modules: LoraTargetModulesOption = C.lora_target_modules,
    save_adapter: SaveAdapterOption = C.save_adapter,
    seed: SeedOption = C.seed,
    device: DeviceOption = C.device,
    dtype: DTypeOption = C.dtype,
    skip_invalid: SkipInvalidOption = C.skip_invalid,
    trust_remote_code: TrustRemoteCodeOption = C.trust_remote_code,
    config: ConfigOption = None,
) -> dict:
    """Train a reward model (Bradley–Terry, InstructGPT ranking batches) on comparisons; print a JSON summary.

    Pairs that share a 'group' (one ranking) form one batch element: each completion is encoded once.

    After training the reward is normalised (mean 0, std 1 on reference completions) and its gain/bias recorded in OUT/rlhfkit.json. OUT loads with plain transformers as a sequence classifier.
    """
    from rlhfkit.stages import train_rm

    return train_rm.run(build_config(C, locals()))
