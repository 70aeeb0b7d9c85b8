"""``rlhfkit ilql``: options -> ILQLConfig -> stages.ilql.run."""

from __future__ import annotations

from typing import Annotated

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
    command,
    option,
)
from rlhfkit.config import ILQLConfig

D = ILQLConfig()
ILQL_PANEL = "ILQL"


@command
def command(
    policy: Annotated[
        str,
        option(
            "Starting policy, usually the SFT model (directory, hub id or .gguf): the backbone of the Q and V heads.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.policy,
    data: Annotated[
        str,
        option(
            "Comparisons (as train-rm reads them; chosen +1, rejected −1, a ranking's completions by their mean outcome) or "
            "samples whose completions carry a 'score' or 'reward' (e.g. eval's samples.jsonl).",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.data,
    out: Annotated[
        str,
        option(
            "Output directory: the policy π_β (plain HF model + rlhfkit.json) with ilql_heads.safetensors, which collect and "
            "eval use to sample from logits + β·(Q − V); metrics.jsonl, checkpoints/.",
            INPUT_PANEL,
            show_default=False,
        ),
    ] = D.out,
    max_length: Annotated[
        int, option("Drop (and count) sequences whose prompt+completion is longer than this many tokens.", INPUT_PANEL)
    ] = D.max_length,
    beta: Annotated[
        float, option("Sampling: logits = log π_β + β·(Q − V), stored with the heads (0 = the behaviour-cloned π_β).", ILQL_PANEL)
    ] = D.beta,
    gamma: Annotated[float, option("Discount of the Q target r + γ·V(s').", ILQL_PANEL)] = D.gamma,
    tau: Annotated[
        float,
        option("Expectile of the value loss (0.5 = the mean of Q̂ over the data; nearer 1 = the best action seen).", ILQL_PANEL),
    ] = D.tau,
    cql_coef: Annotated[float, option("α of the conservative (CQL) term on Q.", ILQL_PANEL)] = D.cql_coef,
    bc_coef: Annotated[float, option("Weight of the behaviour-cloning (language-model) loss that trains π_β.", ILQL_PANEL)] = (
        D.bc_coef
    ),
    polyak: Annotated[
        float,
        option("The target Q̂ moves this fraction of the way to Q after each optimizer step (Polyak averaging).", ILQL_PANEL),
    ] = D.polyak,
    epochs: Annotated[int, option("Passes over the data.", TRAINING_PANEL)] = D.epochs,
    max_steps: MaxStepsOption = D.max_steps,
    batch_size: Annotated[int, option("Sequences per micro-batch and device.", TRAINING_PANEL)] = D.batch_size,
    grad_accum: GradAccumOption = D.grad_accum,
    lr: Annotated[float, option("Peak learning rate of AdamW (LM and heads).", TRAINING_PANEL)] = D.lr,
    schedule: ScheduleOption = D.schedule,  # type: ignore[assignment]
    warmup_steps: WarmupStepsOption = D.warmup_steps,
    weight_decay: WeightDecayOption = D.weight_decay,
    max_grad_norm: MaxGradNormOption = D.max_grad_norm,
    val_data: Annotated[
        str,
        option(
            "Held-out data of the same kind. Without it, --val-fraction of the prompts is held out (train-rm's split).",
            EVAL_PANEL,
            show_default=False,
        ),
    ] = D.val_data,
    val_fraction: ValFractionOption = D.val_fraction,
    eval_every: Annotated[
        int, option("Held-out loss every N optimizer steps (0 = only at the start and the end).", EVAL_PANEL)
    ] = (D.eval_every),
    eval_batch_size: Annotated[int, option("Sequences per forward pass in evaluation.", EVAL_PANEL)] = D.eval_batch_size,
    save_every: SaveEveryOption = D.save_every,
    keep_checkpoints: KeepCheckpointsOption = D.keep_checkpoints,
    resume: ResumeOption = D.resume,
    log_every: LogEveryOption = D.log_every,
    lora: Annotated[
        bool, option("Train LoRA adapters on the LM (the heads train fully); the saved policy is merged.", LORA_PANEL)
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
    """Implicit language Q-learning (offline RL) from scored samples or comparisons; print a JSON summary.

    Trains Q and V heads on the policy (expectile regression, CQL, a Polyak-averaged target Q) and the policy itself by
    behaviour cloning; collect and eval sample the result from logits + β·(Q − V).

    Logs loss/train, loss/q, loss/v, loss/cql, loss/bc, ilql/advantage to OUT/metrics.jsonl.
    """
    from rlhfkit.stages import ilql

    return ilql.run(build_config(ILQLConfig, locals()))
