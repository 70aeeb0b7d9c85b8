"""``rlhfkit ppo``: RLHF with PPO against a reward model and a KL penalty to the reference policy.

Every PPO step (`ppo_step`) runs the numbered phases of lm-human-preferences (Ziegler et al. 2019)
and InstructGPT (Ouyang et al. 2022), as reproduced in lm-human-preference-details:

 1. sample a batch of prompts (a deterministic order from seed and epoch, sharded by rank);
 2. generate one response each (left-padded prompts, temperature/top-p, stop at EOS or a stop
    string; every row samples from its own seed (seed, step, row), so a resumed run is exact);
 3. log-probs of the responses under the policy and the reference, logits divided by the sampling
    temperature for both, and the values of the critic — in the very micro-batches and through the
    very function the first PPO epoch uses, so with equal weights the KL is exactly 0 and the
    first ratio exactly 1;
 4. scores from the reward at the last real token, normalised (a reward-model ensemble: mean −
    λ·std over its members, λ = ``--conservative-coef``), optionally clipped; a completion that
    never stopped gets ``--missing-eos-penalty`` instead, if set;
 5. per-token rewards −β·kl_t with the score added on the last response token;
 6. optional reward whitening (without a mean shift);
 7. GAE over the response (values and rewards zero after its end), advantages whitened;
 8. ``--ppo-epochs`` passes over shuffled mini-batches: clipped policy loss, clipped value loss,
    gradient accumulation and clipping, optional early stop on approx-KL;
 9. PPO-ptx: the language-model loss on ``--ptx-data`` added to every update (γ = ``--ptx-coef``);
10. the KL controller update (fixed β, or adaptive towards ``--target-kl``).

``--algo`` changes two phases and nothing else (rollout, reward, KL penalty, resume, torchrun,
metrics and samples are shared); each difference is one function, the math in `rlhfkit.losses`:

=====  =======================================================  ========================================
algo   5.-7. advantages (`estimate_advantages`)                  8. loss (`update_loss`)
=====  =======================================================  ========================================
ppo    GAE with the critic, per-token KL penalty in the reward  clipped surrogate + clipped value loss
a2c    the same                                                 −A·log π + unclipped value loss, one
                                                                gradient step per rollout batch
rloo   K samples per prompt; R = score − β·KL per sequence;     clipped surrogate (REINFORCE with the
       A = R − mean of the other K − 1 R's; no critic           leave-one-out baseline at ratio 1)
grpo   K samples per prompt; A = (score − group mean) / group   clipped surrogate + β·k3 KL to the
       std; no critic (``--kl-in-reward``: R as rloo's)         reference (not with --kl-in-reward)
=====  =======================================================  ========================================

For rloo and grpo, phase 1 draws ``--batch-size`` / K prompts and samples each K times (the K
rollouts of a prompt stay together, on one rank), and the advantage of a sequence sits on every
one of its tokens.

Batch sizes are per process. Tokens after the end of a response (its stop token included in the
response, padding after it) are masked from every loss, mean and KL.

This file is the algorithm: `run` (the loop: resume, one `ppo_step` per step, metrics, samples,
checkpoints, the final policy), `ppo_step` (the outline above, in order) and one function per
phase below it. Beside it: `rlhfkit.stages.ppo_options` (option checks, batch sizes),
`rlhfkit.stages.ppo_data` (prompts and their order, row seeds, the `Experience` batch, the PPO-ptx
feed), `rlhfkit.stages.ppo_models` (policy, reference, reward, critic, LoRA) and
`rlhfkit.stages.ppo_samples` (samples.jsonl and the sample table) and `rlhfkit.stages.ppo_judge`
(``--judge``: the judge's win-rate over the starting policy, the best policy kept). The losses, GAE,
whitening and KL controllers are in `rlhfkit.losses`; the actor-critic forward in `rlhfkit.value`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlhfkit.config import PPOConfig
from rlhfkit.losses import (
    AdaptiveKLController,
    FixedKLController,
    conservative_score,
    gae,
    group_advantages,
    grpo_policy_loss,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_gradient_loss,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    value_loss,
)
from rlhfkit.seeds import row_seed
from rlhfkit.stages.ppo_data import (
    Experience,
    PromptItem,
    PtxFeed,
    load_prompts,
    load_ptx,
    micro_batches,
    minibatch_order,
    step_rows,
)
from rlhfkit.stages.ppo_judge import JudgeMonitor
from rlhfkit.stages.ppo_models import Models, build_models
from rlhfkit.stages.ppo_options import Sizes, sizes
from rlhfkit.stages.ppo_samples import SAMPLES_FILE, SamplesLog
from rlhfkit.training import Dist

KLController = AdaptiveKLController | FixedKLController
# options that --resume may give other values besides training.RESUME_MAY_CHANGE
RESUME_MAY_CHANGE = ("sample_every", "num_samples", "judge_timeout")


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def run(config: PPOConfig) -> dict[str, Any] | None:
    """Train; write ``OUT`` (the final policy, metrics.jsonl, samples.jsonl, checkpoints/). Returns
    the result on rank 0 (None on the other ranks of a torchrun job)."""
    from rlhfkit.models import resolve_device, resolve_dtype
    from rlhfkit.training import distributed_run

    config.check()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    with distributed_run(device) as dist:  # the shared teardown: failures end every rank, leave no half run
        return _run(config, dist, device, dtype)


def _run(config: PPOConfig, dist: Dist, device: torch.device, dtype: torch.dtype) -> dict[str, Any] | None:
    from rlhfkit import models as model_io
    from rlhfkit.console import progress_bar
    from rlhfkit.errors import ConfigError
    from rlhfkit.provenance import RunInfo
    from rlhfkit.training import (
        MetricsLog,
        barrier,
        gather_model,
        load_checkpoint,
        make_optimizer,
        make_scheduler,
        prepare_run_dir,
        read_metrics,
        save_checkpoint,
        seed_everything,
    )

    out = Path(config.out)
    info = RunInfo("ppo", config, {"policy": config.policy, "ref": config.ref or None, "rm": config.rm, "prompts": config.prompts,
                                   "value_model": config.value_model or None, "ptx_data": config.ptx_data or None})  # fmt: skip
    config_dict = dataclasses.asdict(config)
    # --out first (an earlier run is resumed only with --resume and the same options), then the data:
    # a bad record fails before any model is loaded
    checkpoint = prepare_run_dir(out, config.resume, "ppo", config_dict, RESUME_MAY_CHANGE, dist)
    seed_everything(config.seed)
    tokenizer = model_io.load_tokenizer(config.policy, trust_remote_code=config.trust_remote_code)
    items, truncated = load_prompts(config, tokenizer)
    ptx, ptx_stats = load_ptx(config, tokenizer, sizes(config).micro_batch, dist)

    if config.judge and config.strategy == "fsdp" and dist.enabled:  # the judge samples on rank 0 alone
        raise ConfigError("--judge: not with --strategy fsdp on several processes yet (use --strategy ddp)")
    models = build_models(config, tokenizer, device, dtype, dist)  # --strategy: DDP, or every model sharded (FSDP)
    optimizer = make_optimizer(models.actor_critic, config.lr, config.weight_decay, eps=config.adam_eps)
    # one scheduler step per PPO step: LR annealed linearly to 0 over --steps (lm-human-preferences)
    scheduler = make_scheduler(optimizer, config.schedule, config.warmup_steps, config.steps)
    kl_ctl = make_kl_controller(config)
    trained = {"policy": models.policy, "value": models.core.critic}  # what a checkpoint holds
    if models.core.critic is None:
        del trained["value"]  # rloo, grpo: no critic

    start = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, modules=trained, optimizers={"ppo": optimizer}, schedulers={"ppo": scheduler})
        start = int(state["step"])
        kl_ctl.load_state_dict(state["kl_controller"])
        if ptx is not None:
            ptx.position = int(state.get("ptx_position", 0))
    resume_step = start if checkpoint is not None else None
    judge = JudgeMonitor(config, models, items, out, dist, checkpoint)  # --judge: samples the starting policy (step 0)
    # run, tables: --report-to
    metrics_log = MetricsLog(out, dist, resume_step=resume_step, run=info, tables={"samples": out / SAMPLES_FILE})
    samples_log = SamplesLog(out / SAMPLES_FILE, dist, resume_step=resume_step, enabled=config.sample_every > 0)

    def save(step: int) -> None:
        state = {"config": config_dict, "kl_controller": kl_ctl.state_dict(), "ptx_position": ptx.position if ptx else 0,
                 "judge": judge.state_dict()}  # fmt: skip
        save_checkpoint(  # rank 0 writes (DDP), or every rank its shard (FSDP)
            out,
            step,
            modules=trained,
            optimizers={"ppo": optimizer},
            schedulers={"ppo": scheduler},
            state=state,
            keep=config.keep_checkpoints,
            dist=dist,
        )
        barrier(dist)

    # a resumed run that is already complete still reports (and records) its last metrics
    last: dict[str, float] = (read_metrics(out) or [{}])[-1] if checkpoint is not None and dist.is_main else {}
    started = time.perf_counter()
    tokens_total = 0
    first_stopped: float | None = None  # the share of completions that ended at the first step (ending_warning)
    with progress_bar(config.algo, total=config.steps, completed=start, enabled=dist.is_main) as bar:
        for step in range(start, config.steps):
            t_step = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            result = ppo_step(models, optimizer, kl_ctl, items, config, step, ptx, dist)  # phases 1-10
            scheduler.step()

            seconds = time.perf_counter() - t_step
            tokens_total += result["tokens"] * dist.world_size
            metrics = {**result["metrics"], **result["timings"], "train/lr": lr, "perf/seconds_per_step": seconds,
                       "perf/tokens_per_s": result["tokens"] * dist.world_size / max(seconds, 1e-9)}  # fmt: skip
            metrics.update(judge.after_step(step + 1))  # --judge: judge/win_rate over the starting policy, at its steps
            last = metrics_log.log(step + 1, metrics)
            first_stopped = last["response/stopped"] if first_stopped is None else first_stopped
            warning = ending_warning(first_stopped, last["response/stopped"], step + 1, config)
            if warning and dist.is_main:
                from rlhfkit.console import console

                console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
                first_stopped = -math.inf  # once per run
            if config.sample_every and (step + 1) % config.sample_every == 0 and dist.is_main:
                samples_log.write(step + 1, result["items"], result, config.num_samples)
            if (config.save_every and (step + 1) % config.save_every == 0) or step + 1 == config.steps:
                save(step + 1)
            bar.update(1, info=f"score {last['objective/score']:.3f} | kl {last['objective/kl']:.3f} | "
                               f"β {last['objective/kl_coef']:.3g} | {last['perf/tokens_per_s']:.0f} tok/s | "
                               f"{seconds:.2f} s/step")  # fmt: skip

    summary = {k: v for k, v in last.items() if k.split("/")[0] in ("objective", "response", "val", "policy", "loss")}
    policy = gather_model(models.policy, dist)  # FSDP: the full weights on rank 0 (every rank takes part); else the policy
    if dist.is_main:
        judged = judge.finish()  # --judge --keep-best: the judge's best policy's weights are loaded into the policy
        final, keep = model_io.final_model(policy, out, lora=config.lora, adapter=config.save_adapter)  # merged; OUT/adapter/
        extra = {
            "ppo": {
                "steps": config.steps,
                "kl_coef": kl_ctl.value,
                "reward": models.reward.info(),
                "prompts_truncated": truncated,
                "ptx": ptx_stats,
                "judge": judged,
            }
        }
        model_io.save_model_dir(final, tokenizer, out, info, summary, extra=extra, keep=keep)
    barrier(dist)
    if not dist.is_main:
        return None  # one result on stdout, from rank 0
    return {
        "out": str(out),
        "steps": config.steps,
        "resumed_from": start,
        "kl_coef": kl_ctl.value,
        "metrics": summary,
        "tokens_per_s": tokens_total / max(time.perf_counter() - started, 1e-9),
        "judge": judged,
    }


def ending_warning(first: float, now: float, step: int, config: PPOConfig) -> str | None:
    """The warning when the policy learns not to end its answers, or None.

    A reward model that prefers what a cut-off answer holds (more content) pays the policy to run to
    ``--max-new-tokens``: the share of completions that stopped falls (issue 18's task: 0.70 → 0.22
    without a penalty; the hard example: 0.37 → 0.98 with ``--missing-eos-penalty -1``). It fires once the
    share is below half its first-step value and below 0.5, when no penalty is set.

    Example: first 0.70, now 0.30 → a warning; first 0.70, now 0.40 → None (above half);
    first 0.20, now 0.05 with ``--missing-eos-penalty -1`` → None.
    """
    if config.missing_eos_penalty is not None or not now < min(0.5, first / 2):
        return None
    return (
        f"step {step}: only {now:.0%} of the completions end by themselves ({first:.0%} at the first step): the policy is "
        f"learning to run to --max-new-tokens {config.max_new_tokens}; --missing-eos-penalty (e.g. -1) scores such answers"
    )


# ---------------------------------------------------------------------------------------------
# one PPO step
# ---------------------------------------------------------------------------------------------


def ppo_step(
    models: Models,
    optimizer: torch.optim.Optimizer,
    kl_ctl: KLController,
    items: Sequence[PromptItem],
    config: PPOConfig,
    step: int,
    ptx: PtxFeed | None = None,
    dist: Dist = Dist(),
) -> dict[str, Any]:
    """Phases 1-10 of PPO step ``step`` (0-based) on the prompts ``items``.

    Returns ``metrics`` (0-d tensors, averaged over the ranks), ``timings`` (seconds per phase),
    ``update`` (`ppo_update`'s result), this step's prompts (``items``), the tensors of the batch,
    the texts and ``tokens`` (response tokens on this rank).
    """
    from rlhfkit.training import all_reduce_mean, check_finite

    sz = sizes(config)
    kl_coef = kl_ctl.value
    timings = {}
    device = next(models.core.parameters()).device

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the work, not the kernel launches (a sync per phase)
        return time.perf_counter()

    # 1. this step's prompts (K rollouts of each for rloo/grpo, side by side), and a sampling seed per rollout
    K = config.samples_per_prompt
    rows = step_rows(len(items), config.seed, step, config.batch_size // K, dist)
    batch_items = [items[i] for _, i in rows for _ in range(K)]
    seeds = [row_seed(config.seed, step, j * K + r, scheme="poly") for j, _ in rows for r in range(K)]

    # 2. generate
    t0 = clock()
    rollout = generate(models, batch_items, seeds, config)
    texts = [rollout.completion_text(i, models.tokenizer, models.stop_token_ids) for i in range(len(batch_items))]
    exp = Experience(rollout.query, rollout.query_mask, rollout.response, rollout.response_mask)
    mask = exp.response_mask
    timings["time/generate"] = clock() - t0

    # 3. policy and reference log-probs (logits / temperature), values, in the first epoch's micro-batches
    t0 = clock()
    first_order = minibatch_order(config.seed, step, 0, sz.batch, mask.device)
    first = first_forward(models, exp, first_order, sz, config, ptx)  # the update's first forward, run now (or None)
    fwd = rollout_forward(models, exp, first_order, sz, config.temperature, first=first)
    timings["time/forward"] = clock() - t0

    # 4. scores at the last real token (normalised, clipped; missing-EOS penalty; an ensemble's mean − λ·std)
    t0 = clock()
    scores, raw_scores, score_std = score(models, batch_items, texts, rollout, config)
    timings["time/score"] = clock() - t0

    # 5.-7. rewards and advantages, by --algo: KL-penalised per-token rewards, optional reward whitening,
    # GAE, whitened advantages; or one reward per sequence and a baseline from the other samples of its prompt
    adv = estimate_advantages(config, scores, fwd, mask, kl_coef)
    check_finite(step + 1, dist, reward=scores, value=fwd["values"], kl=adv["kl"])  # before the update sees them
    exp.logprobs, exp.values, exp.advantages, exp.returns = fwd["logprobs"], adv["values"], adv["advantages"], adv["returns"]
    exp.ref_logprobs = fwd["ref_logprobs"]

    # 8.-9. PPO epochs over shuffled mini-batches (+ PPO-ptx), with the loss of --algo
    t0 = clock()
    update = ppo_update(models, optimizer, exp, config, step, ptx, dist, kl_coef=kl_coef, first=first)
    timings["time/update"] = clock() - t0

    # 10. KL controller update, on the mean per-sequence KL over every rank's rollouts
    metrics = step_metrics(scores, raw_scores, fwd, adv, update, rollout.stopped, mask, kl_coef)
    if score_std is not None:
        metrics["objective/score_std"] = score_std.mean()  # a reward ensemble's disagreement (std over its members)
    metrics = {k: all_reduce_mean(v, dist) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
    kl_ctl.update(metrics["objective/kl"], config.batch_size * dist.world_size)
    return {
        "metrics": metrics,
        "timings": timings,
        "update": update,
        "items": batch_items,
        "experience": exp,
        "rollout": rollout,
        "texts": texts,
        "scores": scores,
        "kl": adv["kl"],
        "advantages": adv,
        "forward": fwd,
        "tokens": int(mask.sum()),
    }


# ---------------------------------------------------------------------------------------------
# phases 2-4: generate, log-probs and values, scores
# ---------------------------------------------------------------------------------------------


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.size(1)))


def generate(models: Models, items: Sequence[PromptItem], seeds: Sequence[int], config: PPOConfig) -> Any:
    """2. One response per prompt (generation.sample), ``--generation-batch-size`` prompts at a time."""
    from rlhfkit.generation import Rollout, left_pad, right_pad, sample
    from rlhfkit.training import gathered

    chunk = config.generation_batch_size or len(items)
    parts = []
    # FSDP: the policy's weights gathered once for the whole call (rows stop at different steps on each rank)
    with models.autocast(), gathered(models.policy):
        for start in range(0, len(items), chunk):
            parts.append(
                sample(
                    models.policy, [it.ids for it in items[start : start + chunk]],
                    max_new_tokens=config.max_new_tokens, stop_token_ids=models.stop_token_ids,
                    pad_token_id=models.tokenizer.pad_token_id, temperature=config.temperature, top_p=config.top_p,
                    top_k=config.top_k, stop_strings=config.stop, tokenizer=models.tokenizer, seeds=seeds[start : start + chunk],
                )
            )  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    # several generation calls: pad all of them to one width again
    pad, device = models.tokenizer.pad_token_id, parts[0].query.device
    query, query_mask = left_pad([it.ids for it in items], pad, device)
    responses = [r.response_ids(i) for r in parts for i in range(r.response.size(0))]
    response, response_mask = right_pad(responses, pad, device)
    logprobs = torch.cat([_pad_to(r.logprobs, response.size(1)) for r in parts])
    stopped = torch.cat([r.stopped for r in parts])
    return Rollout(query, query_mask, response, response_mask, stopped, logprobs, [s for r in parts for s in r.stop_text])


FirstForward = tuple[torch.Tensor, dict[str, torch.Tensor]]  # (row indices, `ActorCritic.forward`'s outputs, with autograd)


def first_forward(
    models: Models, exp: Experience, order: torch.Tensor, sz: Sizes, config: PPOConfig, ptx: PtxFeed | None = None
) -> FirstForward | None:
    """3. and 8. The first PPO epoch's first forward, run before the scores: its log-probs, values
    and entropies are the rollout's (no weight has changed yet), and the update backpropagates
    through it instead of running it again, one policy and critic forward less per step (the whole
    batch's with the default one mini-batch of one micro-batch). The first ratio is then exactly 1
    by construction; the reference still runs on its own (KL exactly 0 needs bit-equal forwards,
    which `policy_logprobs` gives with and without autograd).

    Only when the first mini-batch is one micro-batch (``--grad-accum 1``): several would hold
    several graphs at once across the reference forward and the scoring. Returns None otherwise.
    """
    if sz.micro_batch != sz.mini_batch:
        return None
    idx = micro_batches(order, sz)[0][0]
    rows = exp.rows(idx)
    ptx_on = ptx is not None and config.ptx_coef > 0
    with models.autocast():  # the update's call (a DDP wrapper's forward: its backward all-reduces)
        out = models.actor_critic(
            rows["query"], rows["query_mask"], rows["response"], rows["response_mask"], temperature=config.temperature,
            with_entropy=True, ptx=ptx.next(exp.response.device) if ptx_on else None,
        )  # fmt: skip
    return idx, out


@torch.no_grad()
def rollout_forward(
    models: Models, exp: Experience, order: torch.Tensor, sz: Sizes, temperature: float, first: FirstForward | None = None
) -> dict[str, torch.Tensor]:
    """3. Policy log-probs, entropy and values, and reference log-probs, all (B, T).

    Computed in the micro-batches of the first PPO epoch (``order``) with the function that the
    update uses (`value.policy_logprobs` through `ActorCritic.forward`), so the first mini-batch's
    ratio is exactly 1 and, while the policy equals the reference, the KL is exactly 0. The first
    micro-batch's come from ``first`` (`first_forward`) when given.
    """
    B, T = exp.response.shape
    device = exp.response.device
    out = {name: torch.zeros(B, T, device=device) for name in ("logprobs", "ref_logprobs", "values", "entropy")}
    for m, mini in enumerate(micro_batches(order, sz)):
        for i, idx in enumerate(mini):
            rows = exp.rows(idx)
            args = (rows["query"], rows["query_mask"], rows["response"], rows["response_mask"])
            if first is not None and m == i == 0:
                policy_out = first[1]
            else:
                with models.autocast():
                    policy_out = models.core(*args, temperature=temperature, with_entropy=True)
            for name in ("logprobs", "values", "entropy"):
                if name in policy_out:  # no values without a critic (rloo, grpo): they stay 0
                    out[name][idx] = _pad_to(policy_out[name].detach().float(), T)
            out["ref_logprobs"][idx] = _pad_to(models.reference_logprobs(*args, temperature=temperature).float(), T)
    return out


def score(
    models: Models, items: Sequence[PromptItem], texts: Sequence[str], rollout: Any, config: PPOConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """4. (scores, normalised model scores, the ensemble's spread), each (B,): the reward's
    normalised score at the last real token, clipped to ±``--reward-clip``; a completion that never
    stopped gets ``--missing-eos-penalty`` instead when set.

    With a reward-model ensemble (M > 1 members) the model score is mean − λ·std over the members
    (`losses.conservative_score`, λ = ``--conservative-coef``, 0 = their mean) and the spread is
    their std (population), the ensemble's disagreement; for a single reward the spread is None.
    """
    tokens = (rollout.query, rollout.query_mask, rollout.response, rollout.response_mask)
    prompts, device = [it.prompt for it in items], rollout.response.device
    spread = None
    if models.reward.members > 1:
        members = models.reward.member_scores(prompts, texts, *tokens, stopped=rollout.stopped).to(device)  # (B, M)
        raw = conservative_score(members, config.conservative_coef)
        spread = members.std(-1, unbiased=False)
    else:
        raw = models.reward.score(prompts, texts, *tokens, stopped=rollout.stopped).to(device)
    scores = raw
    if config.reward_clip is not None:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
    if config.missing_eos_penalty is not None:
        scores = torch.where(rollout.stopped, scores, torch.full_like(scores, config.missing_eos_penalty))
    return scores, raw, spread


# ---------------------------------------------------------------------------------------------
# phases 5-7: rewards and advantages
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_rewards_and_advantages(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: str = "k1",
    whiten_rewards: bool = False,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> dict[str, torch.Tensor]:
    """Phases 5-7 on one rollout batch: (B,) scores and (B, T) tensors in, (B, T) tensors out.

    Returns ``kl`` (per token, the chosen estimator, 0 after the end), ``rewards`` (−β·kl_t, plus
    the score at the last response token), ``values`` (0 after the end), ``advantages`` (GAE,
    whitened over the valid tokens) and ``returns`` (advantages before whitening + values).
    Nothing at a masked position reaches any of them.
    """
    valid = mask.bool()
    # 5. per-token rewards: −β·kl_t on every response token, the score on the last one
    kl = kl_estimate(torch.where(valid, logprobs, 0.0), torch.where(valid, ref_logprobs, 0.0), kl_estimator)  # (B, T)
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, valid, kl_coef, kl_estimator)  # (B, T)
    # 6. optional reward whitening: rescale, keep the mean (lm-human-preferences, TRL)
    if whiten_rewards:
        rewards = masked_whiten(rewards, valid, shift_mean=False)
    # 7. advantages and returns; values and rewards are 0 after the end of the response
    values = torch.where(valid, values, 0.0)
    advantages, returns = gae(rewards, values, valid, gamma, lam)
    advantages = masked_whiten(advantages, valid)
    return {"kl": kl, "rewards": rewards, "values": values, "advantages": advantages, "returns": returns}


def estimate_advantages(
    config: PPOConfig, scores: torch.Tensor, fwd: dict[str, torch.Tensor], mask: torch.Tensor, kl_coef: float
) -> dict[str, torch.Tensor]:
    """5.-7. by ``--algo``: GAE with the critic for ppo and a2c (`compute_rewards_and_advantages`),
    a group baseline for rloo and grpo (`compute_group_advantages`); the same keys either way."""
    if config.has_critic:
        return compute_rewards_and_advantages(
            scores, fwd["logprobs"], fwd["ref_logprobs"], fwd["values"], mask, kl_coef=kl_coef,
            kl_estimator=config.kl_estimator, whiten_rewards=config.whiten_rewards, gamma=config.gamma, lam=config.lam,
        )  # fmt: skip
    return compute_group_advantages(
        scores, fwd["logprobs"], fwd["ref_logprobs"], mask, k=config.samples_per_prompt, algo=config.algo, kl_coef=kl_coef,
        kl_estimator=config.kl_estimator, kl_in_reward=config.algo == "rloo" or config.kl_in_reward,
    )  # fmt: skip


@torch.no_grad()
def compute_group_advantages(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    k: int,
    algo: str,
    kl_coef: float,
    kl_estimator: str = "k1",
    kl_in_reward: bool = True,
) -> dict[str, torch.Tensor]:
    """Phases 5-7 of the critic-free algorithms: one reward per sequence, a baseline from the other
    samples of its prompt, the sequence's advantage on every one of its response tokens.

    ``scores`` (B,) and (B, T) tensors in, B = prompts × K with the K samples of a prompt side by
    side; (B, T) tensors out, with the keys of `compute_rewards_and_advantages`:

    - ``kl`` and ``rewards`` as for ppo (−β·kl_t, plus the score on the last token), which the
      metrics report (``objective/rlhf_reward``);
    - the sequence reward R = score − β·Σ_t kl_t (the row sum of ``rewards``) with ``kl_in_reward``
      (rloo always; grpo with ``--kl-in-reward``), else the score alone (grpo: the KL is a loss term);
    - ``advantages``: rloo, R minus the mean of the other K − 1 R's (`losses.rloo_advantages`);
      grpo, R standardised within its group (`losses.group_advantages`); not whitened again;
    - ``values`` and ``returns``: 0 (no critic).
    """
    valid = mask.bool()
    kl = kl_estimate(torch.where(valid, logprobs, 0.0), torch.where(valid, ref_logprobs, 0.0), kl_estimator)  # (B, T)
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, valid, kl_coef, kl_estimator)  # (B, T)
    sequence_rewards = rewards.sum(1) if kl_in_reward else scores  # (B,)
    grouped = sequence_rewards.view(-1, k)  # (B / K, K), one row per prompt
    per_sequence = rloo_advantages(grouped)[0] if algo == "rloo" else group_advantages(grouped)
    advantages = torch.where(valid, per_sequence.reshape(-1, 1), 0.0)  # (B, T): the same on every token
    zeros = torch.zeros_like(advantages)
    return {"kl": kl, "rewards": rewards, "values": zeros, "advantages": advantages, "returns": zeros}


# ---------------------------------------------------------------------------------------------
# phase 8 (and 9): the PPO update
# ---------------------------------------------------------------------------------------------


def ppo_update(
    models: Models,
    optimizer: torch.optim.Optimizer,
    exp: Experience,
    config: PPOConfig,
    step: int,
    ptx: PtxFeed | None = None,
    dist: Dist = Dist(),
    kl_coef: float | None = None,
    first: FirstForward | None = None,
) -> dict[str, Any]:
    """8. ``--ppo-epochs`` passes over shuffled mini-batches of ``exp`` (one for a2c); one optimizer
    step per mini-batch, ``--grad-accum`` micro-batches each, with the loss of ``--algo``
    (`update_loss`; ``kl_coef``: grpo's β, default ``--kl-coef``); 9. the PPO-ptx loss added to each.
    ``first``: the first micro-batch's forward, already run (`first_forward`).

    Returns the mean of each statistic over the micro-batches (0-d tensors), ``updates`` (optimizer
    steps taken) and ``minibatches``: per mini-batch ``ratio_min``/``ratio_max`` (for checking the
    first ratio is 1) and ``approxkl``.
    """
    from rlhfkit.training import all_reduce_mean, check_finite, clip_grad_norm, no_sync

    sz = sizes(config)
    kl_coef = config.kl_coef if kl_coef is None else kl_coef
    device = exp.response.device
    params = [p for p in models.actor_critic.parameters() if p.requires_grad]
    ptx_on = ptx is not None and config.ptx_coef > 0
    stats: dict[str, list[torch.Tensor]] = {}
    minibatch_stats = []
    updates, stopped_early = 0, False
    for epoch in range(sz.epochs):
        for mini in micro_batches(minibatch_order(config.seed, step, epoch, sz.batch, device), sz):
            mb: dict[str, list[torch.Tensor]] = {"approxkl": [], "ratio_min": [], "ratio_max": []}
            for i, idx in enumerate(mini):
                rows = exp.rows(idx)
                mask = rows["response_mask"]
                with no_sync(models.actor_critic, skip=i < len(mini) - 1), models.autocast():
                    if first is not None:  # run in phase 3, on these very rows, before any weight changed
                        assert torch.equal(first[0], idx)
                        out, first = first[1], None
                    else:
                        out = models.actor_critic(
                            rows["query"], rows["query_mask"], rows["response"], mask,
                            temperature=config.temperature, ptx=ptx.next(device) if ptx_on else None,
                        )  # fmt: skip
                    # policy loss and value loss, by --algo
                    loss, micro_stats = update_loss(config, out, rows, mask, kl_coef)
                    if ptx_on:
                        # PPO-ptx (InstructGPT eq. 2): + γ·E_pretrain[log π], i.e. γ·(LM loss) to minimise
                        loss = loss + config.ptx_coef * out["ptx_loss"]
                    (loss / config.grad_accum).backward()
                with torch.no_grad():
                    valid = mask.bool()
                    log_ratio = torch.where(valid, out["logprobs"].float() - rows["logprobs"], 0.0)
                    mb["ratio_min"].append(torch.where(valid, log_ratio, math.inf).amin().exp())
                    mb["ratio_max"].append(torch.where(valid, log_ratio, -math.inf).amax().exp())
                    mb["approxkl"].append(micro_stats["approxkl"])
                    if ptx_on:
                        micro_stats["loss/ptx"] = out["ptx_loss"].detach()
                    for k, v in micro_stats.items():
                        stats.setdefault(k, []).append(v)
            grad_norm = clip_grad_norm(params, config.max_grad_norm)
            if config.max_grad_norm > 0:
                stats.setdefault("grad_norm", []).append(grad_norm)
            check_finite(step + 1, dist, loss=loss.detach(), grad_norm=grad_norm)  # before the weights see it
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            summary = {
                "approxkl": torch.stack(mb["approxkl"]).mean(),
                "ratio_min": torch.stack(mb["ratio_min"]).min(),
                "ratio_max": torch.stack(mb["ratio_max"]).max(),
            }
            minibatch_stats.append(summary)
            # a device sync per mini-batch, only when early stopping is asked for
            if config.early_stop_kl is not None and float(all_reduce_mean(summary["approxkl"], dist)) > config.early_stop_kl:
                stopped_early = True
                break
        if stopped_early:
            break
    result: dict[str, Any] = {k: torch.stack(v).float().mean() for k, v in stats.items()}
    result["updates"] = updates
    result["stopped_early"] = stopped_early
    result["minibatches"] = minibatch_stats
    return result


def update_loss(
    config: PPOConfig, out: dict[str, torch.Tensor], rows: dict[str, Any], mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """8. One micro-batch's loss by ``--algo`` (the formulas are `rlhfkit.losses`'), and its stats:

    - ppo: clipped surrogate + vf_coef · clipped value loss (`ppo_policy_loss`, `ppo_value_loss`);
    - a2c: −A·log π + vf_coef · ½(V − R)² (`policy_gradient_loss`, `value_loss`);
    - rloo: the clipped surrogate (at ratio 1, i.e. one epoch of one mini-batch: REINFORCE with the
      leave-one-out baseline, Ahmadian et al. 2024);
    - grpo: the clipped surrogate + β·k3 KL to the reference (`grpo_policy_loss`), or the
      surrogate alone with ``--kl-in-reward``.
    """
    logprobs = out["logprobs"].float()
    if config.algo == "a2c":
        pg_loss, pg_stats = policy_gradient_loss(logprobs, rows["advantages"], mask, old_logprobs=rows["logprobs"])
    elif config.algo == "grpo" and not config.kl_in_reward:
        pg_loss, pg_stats = grpo_policy_loss(
            logprobs, rows["logprobs"], rows["ref_logprobs"], rows["advantages"], mask, config.cliprange, kl_coef
        )
    else:
        pg_loss, pg_stats = ppo_policy_loss(logprobs, rows["logprobs"], rows["advantages"], mask, config.cliprange)
    if not config.has_critic:
        return pg_loss, {"loss/policy": pg_loss.detach(), **pg_stats}
    if config.algo == "a2c":
        vf_loss, vf_stats = value_loss(out["values"].float(), rows["returns"], mask)
    else:
        vf_loss, vf_stats = ppo_value_loss(out["values"].float(), rows["values"], rows["returns"], mask, config.cliprange_value)
    loss = pg_loss + config.vf_coef * vf_loss
    return loss, {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), **pg_stats, **vf_stats}


# ---------------------------------------------------------------------------------------------
# phase 10 and the metrics of a step
# ---------------------------------------------------------------------------------------------


def make_kl_controller(config: PPOConfig) -> KLController:
    """10. β fixed (``--kl-coef``), or adaptive towards ``--target-kl`` (Ziegler et al. 2019)."""
    if config.target_kl is not None:
        return AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
    return FixedKLController(config.kl_coef)


@torch.no_grad()
def step_metrics(
    scores: torch.Tensor,
    raw_scores: torch.Tensor,
    fwd: dict[str, torch.Tensor],
    adv: dict[str, torch.Tensor],
    update: dict[str, Any],
    stopped: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> dict[str, Any]:
    """The metrics of one step on this rank (0-d tensors; names as in lm-human-preference-details).
    Without a critic (rloo, grpo) there are no ``loss/value`` and critic ``val/`` metrics; a2c clips
    nothing (no ``policy/clipfrac``, ``val/clipfrac``); grpo adds its KL loss term, ``loss/kl``."""
    valid = mask.bool()
    critic = "loss/value" in update
    kl_per_seq = adv["kl"].sum(1)  # (B,)
    returns_var = masked_var(adv["returns"], valid).clamp_min(1e-12)
    explained_variance = 1 - masked_var(adv["returns"] - adv["values"], valid) / returns_var
    metrics = {
        "objective/score": scores.mean(),
        "objective/rm_score": raw_scores.mean(),  # before --reward-clip and the missing-EOS penalty
        "objective/kl": kl_per_seq.mean(),
        "objective/non_score_reward": (-kl_coef * kl_per_seq).mean(),
        "objective/rlhf_reward": adv["rewards"].sum(1).mean(),
        "objective/entropy": fwd["entropy"].sum(1).mean(),
        "objective/kl_coef": kl_coef,
        "policy/approxkl": update["approxkl"],
        "policy/approxkl_k3": update["approxkl_k3"],
        "policy/clipfrac": update.get("clipfrac"),
        "loss/policy": update["loss/policy"],
        "loss/value": update.get("loss/value"),
        "val/explained_variance": torch.where(masked_var(adv["returns"], valid) > 0, explained_variance, 0.0) if critic else None,
        "val/ratio": update["ratio_mean"],
        "val/clipfrac": update.get("vf_clipfrac"),
        "val/mean": masked_mean(adv["values"], valid) if critic else None,
        "val/returns": masked_mean(adv["returns"], valid) if critic else None,
        "response/length": mask.sum(1).float().mean(),
        "response/stopped": stopped.float().mean(),
        "ppo/updates": float(update["updates"]),
    }
    if "grad_norm" in update:
        metrics["train/grad_norm"] = update["grad_norm"]
    if "loss/ptx" in update:
        metrics["loss/ptx"] = update["loss/ptx"]
    if "kl" in update:
        metrics["loss/kl"] = update["kl"]  # grpo: the mean k3 KL of its loss term
    return {k: v for k, v in metrics.items() if v is not None}
