"""``rlhfkit train-rm``: a Bradley–Terry reward model, the InstructGPT way.

Model
    ``models.load_model(M, kind="reward")``: a one-label ``AutoModelForSequenceClassification``
    initialised from M (usually the SFT model) with a fresh linear score head, dropout off. With
    ``--lora`` only LoRA adapters and the score head train; the saved model is merged.

What is scored
    ``chat.encode_prompt(prompt) + chat.encode_completion(completion, stopped=True)``: a chat
    prompt is rendered with the chat template and the generation prompt, the completion ends with
    EOS — exactly the ids that ppo and eval score. The reward is the head's output at the last real
    token (`scoring.last_token_scores`: found from the attention mask, never from the pad id).

Loss (`losses.bradley_terry_loss`)
    L = mean over the pairs of a batch of −log σ(r_w − r_l − m), with m the pair's ``margin``
    under ``--use-margin`` (Llama 2) and 0 otherwise, plus ``--center-rewards-coef`` η times
    mean (r_w + r_l)² (Eisenstein et al. 2023, "Helping or Herding", eq. 2; the same term as TRL's
    ``center_rewards_coefficient``), which pins the reward's offset near zero. A pair with margin
    exactly 0 is a tie (rank-import ``--tie-pairs``): its term is −½[log σ(d) + log σ(−d)], which
    pulls the two rewards together, and it is left out of accuracy and mean margin.

Batching (`rlhfkit.rm_data`)
    Comparisons that share ``group`` (one ranking by one annotator, as rank-import writes them)
    form *one* batch element: each distinct completion is encoded once and all pairs among them are
    scored from those rewards (InstructGPT §3.5: K forward passes per ranking instead of K(K−1)).
    A comparison without ``group`` is an element of its own. ``--batch-size`` counts elements per
    micro-batch per device (rankings, or pairs), so the number of pairs per step varies with K.

Defaults
    One epoch (InstructGPT: a reward model overfits after one epoch over the correlated pairs of
    rankings) and ``--lr 1e-5`` (full fine-tuning of the whole network; InstructGPT's 6B RM used
    9e-6, and TRL's 1e-4 default is tuned for LoRA — raise it with ``--lora``). AdamW, linear
    decay, gradient clipping at 1.0. Weights stay float32; ``--dtype bfloat16/float16`` trains
    under autocast (float16 with a gradient scaler).

Held-out evaluation
    ``--val-data FILE``, or ``--val-fraction`` of the prompts split off ``--data`` (by prompt: no
    prompt on both sides). Pairwise accuracy ``rm/accuracy``, mean reward difference
    ``rm/margin`` and ``loss/eval`` every ``--eval-every`` steps and at the end.

Normalisation
    After training, raw rewards r on reference completions — the distinct training completions,
    or ``--norm-samples FILE`` (collect's samples, e.g. fresh SFT samples, or comparisons) — give
    gain = 1/std and bias = −mean/std (population std), so gain·r + bias has mean 0 and std 1
    there. Recorded in ``rlhfkit.json`` as ``{"reward": {"gain", "bias", "raw_mean", "raw_std",
    "n", "source"}}``; `scoring.normalization` reads it for ppo and eval.

Interchange with plain transformers
    The output directory is an ordinary sequence classifier. Hugging Face's pooling reads the
    last token that is *not* ``config.pad_token_id``; when the pad id is also a stop token (pad ==
    EOS, as in SmolLM2) it would skip the final EOS and read the token before. So when the
    tokenizer's pad id is a stop token, the saved ``config.pad_token_id`` is None: transformers
    then reads the last token, which gives exactly rlhfkit's score for an unpadded sequence (batch
    size 1; batches need rlhfkit's mask-based `scoring.last_token_scores`). rlhfkit itself never
    uses that field.

Training machinery (`rlhfkit.training`): torchrun/DDP with rank-sharded elements, checkpoints
every ``--save-every`` steps and at the end, ``--resume`` continues exactly (the data order is a
function of seed and epoch; the position is the step), ``OUT/metrics.jsonl``, a progress bar.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from rlhfkit import chat, models, rm_data, training
from rlhfkit.config import TrainRMConfig
from rlhfkit.console import progress_bar
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.losses import bradley_terry_loss
from rlhfkit.probe import bootstrap_weights
from rlhfkit.provenance import RunInfo
from rlhfkit.scoring import add_mean_head, classifier_parts, last_token_scores, mean_head, pop_mean_head, save_mean_head
from rlhfkit.stages import preference_data, rm_head
from rlhfkit.stats import wilson_interval

STAGE = "train-rm"
BEST_FILE = "best.safetensors"  # OUT/checkpoints/: the weights of the lowest held-out loss (--early-stopping)
TOO_FEW_TO_TELL = 0.3  # a held-out accuracy whose 95% interval is wider than this says little
# an option --resume may change besides training.RESUME_MAY_CHANGE (it does not change what is computed)
RESUME_MAY_CHANGE = ("norm_samples",)


class RewardScorer(torch.nn.Module):
    """The reward computation as one module, so that DDP wraps it.

    `scoring.last_token_scores` calls the backbone and the head directly; under DDP the gradient
    all-reduce only happens for a forward that goes through the DDP wrapper, so the wrapper must
    sit around this module rather than around the sequence classifier.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        return last_token_scores(self.model, input_ids, attention_mask, starts)  # (N,)


def pair_loss(
    rewards: torch.Tensor,
    batch: rm_data.Batch,
    *,
    use_margin: bool = False,
    center_rewards_coef: float = 0.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley–Terry over the pairs of a batch, from one reward per distinct sequence.

    ``rewards`` (N,) one per row of ``batch.input_ids``; pairs gather (P,) winner and loser rewards.
    An ensemble gives ``rewards`` (N, M): the loss is the mean over the members of each member's
    loss, weighted by its bootstrap ``weights`` (M, P) (`losses.bradley_terry_loss`).
    Stats: those of `bradley_terry_loss` (of the members' mean reward) plus
    ``reward_mean``/``reward_std`` over the N rewards.
    """
    if rewards.ndim == 2:
        members = [
            pair_loss(r, batch, use_margin=use_margin, center_rewards_coef=center_rewards_coef,
                      weights=None if weights is None else weights[m])[0]
            for m, r in enumerate(rewards.unbind(-1))
        ]  # fmt: skip
        _, stats = pair_loss(rewards.detach().mean(-1), batch, use_margin=use_margin)
        return torch.stack(members).mean(), stats
    chosen, rejected = rewards[batch.winners], rewards[batch.losers]  # (P,), (P,)
    loss, stats = bradley_terry_loss(chosen, rejected, batch.margins if use_margin else None, ties=batch.ties, weights=weights)
    if center_rewards_coef > 0:
        loss = loss + center_rewards_coef * ((chosen + rejected) ** 2).mean()
    with torch.no_grad():
        stats["reward_mean"] = rewards.mean()
        stats["reward_std"] = rewards.std(unbiased=False)
    return loss, stats


# --- the stage -------------------------------------------------------------------------------------


def run(config: TrainRMConfig) -> dict[str, Any]:
    config.check()
    device = models.resolve_device(config.device)
    dtype = models.resolve_dtype(config.dtype, device)
    with training.distributed_run(device) as dist:  # the shared teardown: failures end every rank, leave no half run
        return _run(config, device, dtype, dist)


def _run(config: TrainRMConfig, device: torch.device, dtype: torch.dtype, dist: training.Dist) -> dict[str, Any]:
    from rlhfkit.console import console

    def say(text: str) -> None:
        if dist.is_main:  # people read stderr; long paths stay on one line
            console.print(text, highlight=False, soft_wrap=True)

    out = Path(config.out)
    resume_from = training.prepare_run_dir(out, config.resume, STAGE, dataclasses.asdict(config), RESUME_MAY_CHANGE, dist)
    info = RunInfo(
        STAGE,
        config,
        {
            "model": config.model,
            "data": config.data,
            "val_data": config.val_data or None,
            "norm_samples": config.norm_samples or None,
        },
    )
    data_sha = info.inputs["data"][0]["sha256"] if info.inputs["data"] else None

    # 1. data: parse, split by prompt, tokenise, group (all before the model is loaded)
    tokenizer = models.load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    train_cmp, val_cmp, skipped = preference_data.load_comparisons(config.data, config.val_data, config.val_fraction, config.seed,
                                                                   skip_invalid=config.skip_invalid)  # fmt: skip
    if config.val_data:
        overlap = {rm_data.content_key(c.prompt) for c in train_cmp} & {rm_data.content_key(c.prompt) for c in val_cmp}
        if overlap:
            say(f"[yellow]warning:[/] {len(overlap)} prompt(s) of --val-data also occur in --data")
    if config.use_margin and not any(c.margin is not None for c in train_cmp):
        raise DataError(config.data, None, "margin", "--use-margin is set but no comparison has a margin")
    reference = rm_data.load_reference(config.norm_samples, skip_invalid=config.skip_invalid) if config.norm_samples else None

    encode = rm_data.Encoder(tokenizer, config.chat_template)  # string prompts rendered as ppo and eval will render them
    train, train_stats = rm_data.build_elements(train_cmp, encode, config.max_length)
    val, val_stats = rm_data.build_elements(val_cmp, encode, config.max_length)
    if not train:
        raise DataError(
            config.data,
            None,
            None,
            f"no training pair left ({train_stats.dropped_too_long} longer than --max-length {config.max_length})",
        )
    # the completions that set the normalisation: --norm-samples, or the distinct training ones
    # (ids, first completion position) of each, the position for --pooling last+mean
    if reference is not None:
        norm_rows = [(encode(p, c, stopped=s), encode.start(p)) for p, c, s in reference]
    else:
        norm_rows = list(dict.fromkeys(row for e in train for row in zip(e.sequences, e.starts)))
    norm_too_long = sum(len(s) > config.max_length for s, _ in norm_rows)
    norm_rows = [(s, start) for s, start in norm_rows if len(s) <= config.max_length]
    if not norm_rows:
        raise DataError(config.norm_samples, None, None, f"no completion within --max-length {config.max_length} to normalise on")
    dropped = train_stats.dropped_too_long + val_stats.dropped_too_long
    if dropped:
        say(f"[yellow]warning:[/] dropped {dropped} pair(s) longer than --max-length {config.max_length} tokens")
    if val_cmp and not val:
        say("[yellow]warning:[/] every held-out pair is longer than --max-length; no held-out evaluation")
    say(
        f"train-rm: {train_stats.pairs} training pairs in {train_stats.elements} batch elements "
        f"({train_stats.sequences} sequences to encode per epoch instead of {train_stats.sequences_if_expanded}); "
        f"{val_stats.pairs} held-out pairs"
    )

    # 2. model (the score head's initialisation depends on the seed)
    training.seed_everything(config.seed)
    model = models.load_model(
        config.model, kind="reward", dtype=torch.float32, device=device, trust_remote_code=config.trust_remote_code,
        num_labels=config.ensemble,
    )  # fmt: skip
    models.disable_dropout(model)
    amp_dtype = None if dtype == torch.float32 else dtype
    autocast: Callable[[], AbstractContextManager] = (
        (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    )

    # 3. the head (`rm_head`): fitted on frozen features (LP-FT), one per ensemble member, lower layers frozen
    element_weights = bootstrap_weights(torch.arange(len(train)), config.ensemble, config.seed)  # (M, E)
    head_fit: dict[str, Any] = {}
    depth = resolve_depth(config, model, resume_from)  # None: --depth auto, chosen by the probe below
    read = {"batch_size": config.eval_batch_size, "pad_token_id": tokenizer.pad_token_id, "device": device, "autocast": autocast}
    started = time.perf_counter()
    by_depth, l2 = None, config.probe_l2
    if depth is None:  # every depth's features from one forward pass; the probe's CV loss picks one
        by_depth = rm_head.depth_features(model, train, mean=config.pooling == "last+mean", **read)
        depth, l2, depth_cv = rm_head.choose_depth(by_depth, l2=config.probe_l2, seed=config.seed)
        say(f"depth: {depth} of {len(by_depth)} layers by the probe's cross-validated loss "
            f"({depth_cv[depth]:.4f}; {depth_cv[len(by_depth)]:.4f} with every layer)")  # fmt: skip
    rm_head.truncate(model, depth)
    if config.feature_layers > depth:
        raise ConfigError(f"--feature-layers {config.feature_layers}: the reward model has {depth} decoder layers")
    lower = rm_head.read_layers(model, config.feature_layers)
    if config.pooling == "last+mean":
        add_mean_head(model)  # zeros until the probe fits it
    if config.head_init == "probe" and resume_from is None:  # a resumed run loads its head from the checkpoint
        if by_depth is not None and not lower:
            features = by_depth[depth - 1]  # what the cut model reads
        else:
            features = rm_head.pair_features(model, train, **read)
        head_fit = rm_head.init_heads_by_probe(model, features, element_weights, l2=l2, seed=config.seed)
        accuracy = f", training-pair accuracy {head_fit['train_accuracy']:.3f}" if head_fit["train_accuracy"] is not None else ""
        layers = f" of layers {', '.join(map(str, lower))} and {depth}" if lower else ""
        say(f"probe: head fitted on frozen features{layers} (λ = {head_fit['l2']:g}{accuracy}) in "
            f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    trainable = rm_head.freeze_lower_layers(model, config.trainable_layers)
    if config.trainable_layers > 0:
        say(f"training the top {config.trainable_layers} layer(s), the final norm and the head: {trainable:,} parameters")
    if config.lora:
        mean_weight = pop_mean_head(model)  # kept out of peft's reach ("all-linear" would wrap it), added back trainable
        model = models.apply_lora(
            model,
            r=config.lora_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            kind="reward",
        )
        if mean_weight is not None:
            add_mean_head(model, mean_weight)
    model.train()
    if config.early_stopping and config.strategy == "fsdp" and dist.enabled:
        raise ConfigError("--early-stopping: not with --strategy fsdp on several processes yet (use --strategy ddp)")
    scorer = training.wrap_model(RewardScorer(model), dist, device, config)  # --strategy, --gradient-checkpointing
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    # 4. schedule: micro-batches per epoch are the same on every rank (see `preference_data.epoch_batches`);
    # without --epochs, as many epochs as --min-steps optimizer steps need (a few hundred pairs are a handful of steps)
    steps_per_epoch = preference_data.steps_per_epoch(len(train), dist, config.batch_size, config.grad_accum)
    epochs = config.epochs or math.ceil(config.min_steps / steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    if config.epochs is None and epochs > 1 and config.trainable_layers != 0:
        say(f"{steps_per_epoch} optimizer step(s) per epoch: {epochs} epochs for at least --min-steps {config.min_steps}")
    eval_every = config.eval_every or (max(1, steps_per_epoch // 2) if config.early_stopping else 0)
    if config.trainable_layers == 0:  # the probe alone: there is nothing left to train
        total_steps = 0
    plain = training.unwrap(model) if not config.lora else model
    _, head = classifier_parts(plain)
    heads = [*head.parameters(), *(mean_head(plain).parameters() if mean_head(plain) is not None else ())]
    lr_of = {id(p): config.head_lr for p in heads} if config.head_lr else None
    optimizer = training.make_optimizer(model, config.lr, config.weight_decay, lr_of=lr_of)
    scheduler = training.make_scheduler(optimizer, config.schedule, config.warmup_steps, total_steps)
    schedulers: dict[str, Any] = {"model": scheduler, **({"grad_scaler": scaler} if scaler else {})}

    step = 0
    # --early-stopping: the lowest held-out loss so far, its step, and evaluations since (weights in BEST_FILE)
    best: dict[str, Any] = {"loss": None, "step": None, "stale": 0}
    if resume_from is not None:
        state = training.load_checkpoint(
            resume_from, modules={"model": model}, optimizers={"model": optimizer}, schedulers=schedulers
        )
        if data_sha is not None and state.get("data_sha256") not in (None, data_sha):
            raise ConfigError(f"--resume: {config.data} changed since {resume_from} was written; resume with the same data")
        step = int(state["step"])
        best = state.get("best", best)
        say(f"resuming from {resume_from} (step {step} of {total_steps})")
    metrics_log = training.MetricsLog(
        out, dist, resume_step=step if resume_from is not None else None, run=info
    )  # run: --report-to

    def checkpoint(at: int) -> None:
        training.save_checkpoint(  # rank 0 writes (DDP), or every rank its shard (FSDP)
            out, at, modules={"model": model}, optimizers={"model": optimizer}, schedulers=schedulers,
            state={"epoch": at // steps_per_epoch, "config": dataclasses.asdict(config), "data_sha256": data_sha,
                   "best": best, "depth": depth},
            keep=config.keep_checkpoints, dist=dist,
        )  # fmt: skip
        training.barrier(dist)

    def held_out(at: int) -> dict[str, float]:
        if not val:
            return {}
        with training.gathered(model):  # FSDP: uneven shards of the held-out set take different numbers of batches
            result = evaluate(model, val, batch_size=config.eval_batch_size, pad_token_id=tokenizer.pad_token_id,
                              device=device, autocast=autocast, use_margin=config.use_margin, dist=dist)  # fmt: skip
        logged = {k: v for k, v in metrics_log.log(at, result).items() if k != "step"}
        if config.early_stopping:
            if best["loss"] is None or logged["loss/eval"] < best["loss"]:
                best.update(loss=logged["loss/eval"], step=at, stale=0)
                if dist.is_main:
                    rm_head.save_weights(training.unwrap(model), out / training.CHECKPOINTS / BEST_FILE)
                training.barrier(dist)
            else:
                best["stale"] += 1
        return logged

    # 5. train
    pairs_done, tokens_done, train_seconds = 0, 0, 0.0
    last = training.last_metrics(out) if resume_from is not None else {}  # the newest training metrics line
    window: list[dict[str, torch.Tensor]] = []  # the steps since the last metrics line
    step_batches = preference_data.StepBatches(len(train), dist, config.batch_size, config.grad_accum, config.seed)
    saved_at = step if resume_from is not None else -1
    with progress_bar(STAGE, total=total_steps, completed=step, enabled=dist.is_main and total_steps > 0) as bar:
        while step < total_steps:
            micro = step_batches(step)
            started = time.perf_counter()
            sums: dict[str, torch.Tensor] = {}
            for j, chunk in enumerate(micro):
                elements = [train[i] for i in chunk]
                batch = rm_data.collate(elements, tokenizer.pad_token_id).to(device)
                with training.no_sync(scorer, skip=j < len(micro) - 1):
                    with autocast():
                        rewards = scorer(batch.input_ids, batch.attention_mask, batch.starts)  # (N,)
                    weights = rm_head.pair_weights(element_weights, chunk, elements).to(device) if config.ensemble > 1 else None
                    loss, stats = pair_loss(rewards.float(), batch, use_margin=config.use_margin,
                                            center_rewards_coef=config.center_rewards_coef, weights=weights)  # fmt: skip
                    scaled = loss / len(micro)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                for k, v in {"loss": loss.detach(), **stats}.items():
                    sums[k] = sums.get(k, 0) + v / len(micro)
                pairs_done += sum(e.num_pairs for e in elements)  # counted on the host: no device sync
                tokens_done += sum(e.num_tokens for e in elements)
            grad_norm, lr = training.optimizer_step(model, optimizer, scheduler, scaler, config.max_grad_norm,
                                                    step=step + 1, dist=dist, device=device,
                                                    reward=sums["reward_mean"], loss=sums["loss"])  # fmt: skip
            train_seconds += time.perf_counter() - started
            step += 1
            window.append({**sums, "grad_norm": grad_norm.detach()})

            if step % config.log_every == 0 or step == total_steps:
                mean = training.window_means(window, dist, device, pairs=pairs_done, tokens=tokens_done)
                # ranks step in lockstep: every rank's count over this rank's time is the global rate
                pairs_per_s = mean["pairs"] * dist.world_size / max(train_seconds, 1e-9)
                last = metrics_log.log(step, {
                    "loss/train": mean["loss"],
                    "rm/train_accuracy": mean["accuracy"],
                    "rm/train_margin": mean["margin_mean"],
                    "rm/reward_mean": mean["reward_mean"],
                    "rm/reward_std": mean["reward_std"],
                    "train/lr": lr,
                    "train/grad_norm": mean["grad_norm"],
                    "perf/pairs_per_s": pairs_per_s,
                    "perf/tokens_per_s": mean["tokens"] * dist.world_size / max(train_seconds, 1e-9),
                    "train/epoch": step / steps_per_epoch,
                })  # fmt: skip
                window = []
                bar.update(
                    advance=0,
                    info=f"loss {last['loss/train']:.4f} | acc {last['rm/train_accuracy']:.2f} | "
                    f"{last['perf/pairs_per_s']:.1f} pairs/s",
                )
            bar.update(advance=1)
            if training.periodic(step, total_steps, eval_every, config.save_every, held_out, checkpoint):
                saved_at = step
            if config.patience and best["stale"] >= config.patience:
                say(f"early stop at step {step}: no better held-out loss in {config.patience} evaluations")
                break
    if saved_at != step:
        checkpoint(step)

    # 6. held-out evaluation (the best weights with --early-stopping), normalisation, the model directory
    model.eval()
    evaluation = held_out(step)
    if config.early_stopping and evaluation and best["step"] is not None and evaluation["loss/eval"] > best["loss"]:
        rm_head.load_weights(training.unwrap(model), out / training.CHECKPOINTS / BEST_FILE)
        evaluation = held_out(step)
        say(f"early stopping: kept the weights of step {best['step']} (held-out loss {best['loss']:.4f})")
    if evaluation:
        evaluation.update(accuracy_interval(evaluation))
    with training.gathered(model):
        norm = reward_normalization(
            model,
            [s for s, _ in norm_rows],
            [start for _, start in norm_rows],
            batch_size=config.eval_batch_size,
            pad_token_id=tokenizer.pad_token_id,
            device=device,
            autocast=autocast,
            dist=dist,
        )
    norm["source"] = config.norm_samples or "train"
    if norm_too_long:
        norm["skipped_too_long"] = norm_too_long
    if dist.is_main:
        metrics_log.log(
            step,
            {
                "reward/raw_mean": norm["raw_mean"],
                "reward/raw_std": norm["raw_std"],
                "reward/gain": norm["gain"],
                "reward/bias": norm["bias"],
            },
        )

    summary = {
        **{k: v for k, v in last.items() if k != "step"},
        **evaluation,
        **({"probe/l2": head_fit["l2"]} if head_fit else {}),
        "rm/depth": depth,
        **({"rm/best_step": best["step"]} if config.early_stopping else {}),
        "steps": step,
        "train_pairs": train_stats.pairs,
        "val_pairs": val_stats.pairs,
    }
    saved = training.gather_model(training.unwrap(model), dist)  # FSDP: the full weights on rank 0 (every rank takes part)
    if dist.is_main:
        final, keep = models.final_model(saved, out, lora=config.lora, adapter=config.save_adapter)
        final.config.pad_token_id = export_pad_token_id(tokenizer, final.config)
        ensemble, mean_weight = None, None
        if config.ensemble > 1:  # members' gain/bias -> one mean head; the members beside it
            gains, biases = torch.tensor(norm.pop("member_gain")), torch.tensor(norm.pop("member_bias"))
            ensemble, norm["bias"] = rm_head.single_head(final, gains, biases)
            norm.update(gain=1.0, members=config.ensemble)
        mean_weight = pop_mean_head(final)  # beside the interchange model, not in it
        if mean_weight is not None:
            norm["pooling"] = config.pooling

        def write_extra(directory: Path) -> None:
            if ensemble is not None:
                ensemble.save(directory)
            if mean_weight is not None:
                save_mean_head(mean_weight, directory)

        models.save_model_dir(final, tokenizer, out, info, summary, extra={"reward": norm}, keep=keep, write_extra=write_extra)
        accuracy = f"held-out {describe_accuracy(evaluation)}, " if evaluation else "no held-out set, "
        say(f"reward model saved to {out}: {accuracy}reward normalised with gain {norm['gain']:.4g}, bias {norm['bias']:.4g}")
    training.barrier(dist)
    return {
        "out": str(out),
        "steps": step,
        "epochs": epochs,
        "depth": depth,
        "train": dataclasses.asdict(train_stats),
        "val": dataclasses.asdict(val_stats),
        "skipped_invalid": skipped,
        "metrics": summary,
        "reward": norm,
    }


def resolve_depth(config: TrainRMConfig, model: Any, resume_from: Path | None) -> int | None:
    """--depth as a number of decoder layers: every layer for ``all``; for ``auto``, None (the probe
    chooses) or, when resuming, the depth the run chose (its checkpoint's state)."""
    layers = len(rm_head.decoder_layers(model))
    if config.depth == "all":
        return layers
    if config.depth == "auto":
        return None if resume_from is None else int(training.read_state(resume_from).get("depth") or layers)
    if int(config.depth) > layers:
        raise ConfigError(f"--depth {config.depth}: {config.model} has {layers} decoder layers")
    return int(config.depth)


# --- evaluation and normalisation --------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: Any,
    elements: Sequence[rm_data.Element],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    use_margin: bool = False,
    dist: training.Dist = training.Dist(),
) -> dict[str, torch.Tensor]:
    """Pairwise accuracy and mean reward difference (chosen − rejected) over the held-out pairs that
    are not ties, and the loss over all of them.

    Each rank scores its shard of the elements; the sums are added across ranks.
    """
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # pairs, ordered pairs, correct, margin, loss
    mine = training.shard(elements, dist)
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        batch = rm_data.collate(chunk, pad_token_id).to(device)
        with autocast():
            rewards = last_token_scores(model, batch.input_ids, batch.attention_mask, batch.starts).float()  # (N,)
        loss, stats = pair_loss(rewards, batch, use_margin=use_margin)
        p = sum(e.num_pairs for e in chunk)  # counted on the host
        o = p - sum(sum(e.ties) for e in chunk)
        counts = torch.tensor([p, o], dtype=torch.float64, device=device)
        sums += torch.cat([counts, torch.stack([stats["accuracy"] * o, stats["margin_mean"] * o, loss * p]).double()])
    if dist.enabled:
        tdist.all_reduce(sums)
    pairs, ordered = sums[0].clamp_min(1), sums[1].clamp_min(1)
    return {"rm/accuracy": sums[2] / ordered, "rm/margin": sums[3] / ordered, "loss/eval": sums[4] / pairs, "rm/pairs": sums[1]}


@torch.no_grad()
def raw_rewards(
    model: Any,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """Raw rewards of token sequences, (N,) float32 on the CPU ((N, M) for an ensemble), in the given
    order; ``starts`` (N) are their completions' first positions. Batches are formed by length to
    waste little on padding."""
    from rlhfkit.generation import right_pad

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: torch.Tensor | None = None
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        ids, mask = right_pad([sequences[r] for r in rows], pad_token_id, device)
        first = torch.tensor([starts[r] for r in rows], device=device)
        with autocast():
            scores = last_token_scores(model, ids, mask, first).float().cpu()  # (b,) or (b, M)
        if out is None:
            out = torch.empty(len(sequences), *scores.shape[1:], dtype=torch.float32)
        out[rows] = scores
    return out if out is not None else torch.empty(0)


def reward_normalization(
    model: Any,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    dist: training.Dist = training.Dist(),
) -> dict[str, Any]:
    """Gain and bias that map the raw rewards of ``sequences`` to mean 0 and (population) std 1.

    normalised = gain·raw + bias with gain = 1/std and bias = −mean/std. Under torchrun each rank
    scores its shard and the per-rank (count, mean, M2) are combined exactly (Chan et al.). A
    constant reward (std below 1e-6 of its scale) gets gain 1: normalisation only removes the mean.

    An ensemble's members are normalised one by one (``member_gain``, ``member_bias``); the other
    keys then describe the mean head Σ_m gain_m·raw_m / M that `rm_head.single_head` saves.
    """
    rows = training.shard(list(zip(sequences, starts)), dist)
    rewards = raw_rewards(
        model, [seq for seq, _ in rows], [start for _, start in rows], batch_size=batch_size, pad_token_id=pad_token_id,
        device=device, autocast=autocast,
    ).double()  # fmt: skip
    if rewards.ndim == 1:
        return _gain_bias(rewards, device, dist)
    members = [_gain_bias(column, device, dist) for column in rewards.unbind(-1)]
    gains = torch.tensor([m["gain"] for m in members], dtype=torch.float64)
    result = _gain_bias((rewards * gains).mean(-1), device, dist)
    return {**result, "member_gain": gains.tolist(), "member_bias": [m["bias"] for m in members]}


def _gain_bias(rewards: torch.Tensor, device: torch.device, dist: training.Dist) -> dict[str, Any]:
    """`reward_normalization` of one column of rewards (this rank's shard), combined across ranks."""
    n = float(rewards.numel())
    mean = rewards.mean().item() if n else 0.0
    m2 = ((rewards - mean) ** 2).sum().item() if n else 0.0
    if dist.enabled:
        parts = [torch.zeros(3, dtype=torch.float64, device=device) for _ in range(dist.world_size)]
        tdist.all_gather(parts, torch.tensor([n, mean, m2], dtype=torch.float64, device=device))
        n, mean, m2 = 0.0, 0.0, 0.0
        for part in parts:
            nb, mb, m2b = part.tolist()
            if nb == 0:
                continue
            total = n + nb
            delta = mb - mean
            mean, m2, n = mean + delta * nb / total, m2 + m2b + delta**2 * n * nb / total, total
    std = math.sqrt(m2 / n) if n else 0.0
    # a constant reward (up to float32 rounding) cannot be rescaled to std 1: only centre it
    gain = 1.0 / std if std > 1e-6 * max(1.0, abs(mean)) else 1.0
    return {"gain": gain, "bias": -mean * gain, "raw_mean": mean, "raw_std": std, "n": int(n)}


def accuracy_interval(evaluation: dict[str, Any], confidence: float = 0.95) -> dict[str, float]:
    """The Wilson interval of the held-out accuracy over its ordered pairs (pairs of one ranking are
    correlated, so the true uncertainty is somewhat larger: read it as a lower bound on the spread)."""
    n = float(evaluation["rm/pairs"])
    low, high = wilson_interval(float(evaluation["rm/accuracy"]) * n, n, confidence) if n else (0.0, 1.0)
    return {"rm/accuracy_low": low, "rm/accuracy_high": high}


def describe_accuracy(evaluation: dict[str, Any]) -> str:
    """"accuracy 0.712 [0.601, 0.803] on 73 pairs", and says so when the set is too small to tell."""
    low, high = evaluation["rm/accuracy_low"], evaluation["rm/accuracy_high"]
    text = f"accuracy {evaluation['rm/accuracy']:.3f} [{low:.3f}, {high:.3f}] 95% CI on {int(evaluation['rm/pairs'])} pairs"
    if high - low > TOO_FEW_TO_TELL:
        text += " [yellow](too few held-out pairs to tell: raise --val-fraction or give --val-data)[/]"
    return text


# --- saving ------------------------------------------------------------------------------------------


def export_pad_token_id(tokenizer: Any, model_config: Any) -> int | None:
    """The ``pad_token_id`` to save in config.json (see "Interchange" in the module docstring):
    None when the pad id is a stop token, so that plain transformers reads the final EOS."""
    pad = tokenizer.pad_token_id
    if pad is None or pad in chat.stop_token_ids(tokenizer, model_config):
        return None
    return int(pad)
