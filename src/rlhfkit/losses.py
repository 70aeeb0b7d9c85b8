"""The RLHF math: masked statistics, KL estimators, reward shaping, advantages (GAE, RLOO, GRPO), PPO, A2C and
GRPO losses, reward-model losses, DPO/IPO and ILQL.

Everything here is a pure function of tensors and floats (plus two small KL-coefficient
controllers). Nothing reads files, calls `.item()` or takes a config object, so the stages can
compose these pieces and the tests can check each one against numbers worked out by hand.

Conventions
-----------
- A response batch is `(B, T)`: valid tokens first, padding after. `mask` is `(B, T)`, bool or
  0/1 float; nonzero marks a real response token. Sequence scores are `(B,)`.
- Masked positions never influence a result and receive exactly zero gradient: inputs are
  replaced by 0 there with `torch.where` *before* any non-linear op, so even `nan`/`inf` padding
  is harmless.
- An empty mask gives 0 (not `nan`) for means, variances and losses.
- Losses return `(loss, stats)`; `stats` holds detached 0-d tensors, so logging decides when to
  pay for the device sync of `.item()`.

Sources: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
(lm-human-preferences, reproduced in lm-human-preference-details); Ouyang et al. 2022
(InstructGPT); Schulman et al. 2017 (PPO) and 2016 (GAE); Schulman 2020, "Approximating KL
Divergence" (http://joschu.net/blog/kl-approx.html). Beside PPO: Mnih et al. 2016 (A2C), Ahmadian
et al. 2024 (RLOO), Shao et al. 2024 (GRPO), Rafailov et al. 2023 (DPO), Azar et al. 2023 (IPO),
Snell et al. 2022 (ILQL) with Kostrikov et al. 2021 (expectile regression) and Kumar et al. 2020 (CQL).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rlhfkit.config import KLEstimator, choices

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "masked_sum",
    "logprobs_from_logits",
    "entropy_from_logits",
    "kl_estimate",
    "kl_penalized_rewards",
    "gae",
    "rloo_advantages",
    "group_advantages",
    "ppo_policy_loss",
    "ppo_value_loss",
    "policy_gradient_loss",
    "value_loss",
    "grpo_policy_loss",
    "bradley_terry_loss",
    "conservative_score",
    "expand_ranking",
    "ranking_loss",
    "AdaptiveKLController",
    "FixedKLController",
    "lm_loss",
    "nll_sum",
    "scale_logits",
    "dpo_loss",
    "expectile_loss",
    "ilql_loss",
    "advantage_shifted_logits",
]

KL_ESTIMATORS = choices(KLEstimator)  # ("k1", "k2", "k3")
WHITEN_EPS = 1e-8


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """Bool view of a bool or 0/1 float mask."""
    return mask if mask.dtype == torch.bool else mask != 0


# ---------------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is set.

    mean = Σ_t x_t·m_t / Σ_t m_t, over all elements (`dim=None`, a 0-d result) or along `dim`.
    An empty mask gives 0.

    Shapes: `x` and `mask` the same shape, e.g. `(B, T)`; the result is 0-d, or `x` without `dim`.
    """
    valid = _valid(mask)
    total = torch.where(valid, x, 0.0)
    if dim is None:
        return total.sum() / valid.sum().clamp_min(1)
    return total.sum(dim) / valid.sum(dim).clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the valid positions (all of them together), a 0-d tensor.

    var = Σ_t m_t (x_t − μ)² / n, times n/(n−1) when `unbiased` (Bessel's correction, as in
    lm-human-preferences and TRL), with μ = `masked_mean(x, mask)` and n = Σ_t m_t.
    Fewer than two valid positions give 0 instead of dividing by zero.
    """
    valid = _valid(mask)
    centered = torch.where(valid, x - masked_mean(x, valid), 0.0)  # (B, T), 0 where masked
    var = masked_mean(centered**2, valid)
    if unbiased:
        n = valid.sum()
        var = var * n / (n - 1).clamp_min(1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise `x` to mean 0 and variance 1 over the valid positions; 0 at masked positions.

    whiten(x) = (x − μ) / sqrt(σ² + 1e-8), plus μ again when `shift_mean=False` (the reward
    whitening of lm-human-preferences/TRL, which rescales without moving the mean). μ and the
    unbiased σ² come from `masked_mean`/`masked_var`; the 1e-8 keeps constant inputs finite.

    Shapes: `x`, `mask` and the result the same shape, e.g. `(B, T)`.
    """
    valid = _valid(mask)
    x = torch.where(valid, x, 0.0)
    mean, var = masked_mean(x, valid), masked_var(x, valid)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, 0.0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum of `x` over the valid positions along `dim`: Σ_t x_t·m_t (0 for an empty row).

    A sequence's log-probability is the masked sum of its token log-probabilities (DPO).
    Shapes: `x`, `mask` (B, T) → (B,) with the default `dim`. Example: x = [[1, 2, 3]], mask
    [[1, 1, 0]] → [3].
    """
    return torch.where(_valid(mask), x, 0.0).sum(dim)


# ---------------------------------------------------------------------------------------------
# log-probabilities, entropy, KL
# ---------------------------------------------------------------------------------------------


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(z / τ)[y] with a lean backward.

    Forward: log-softmax (one fused kernel) and a gather. Backward: ∂/∂z = (onehot(y) −
    softmax(z / τ)) · g / τ, built in place in one (B, T, V) tensor from the saved log-softmax,
    where autograd's gather − logsumexp allocates a zero tensor for the gather, a softmax for the
    logsumexp and their sum. On a large vocabulary these full-vocabulary tensors are a good part
    of a PPO update's time outside the matmuls (torch.profiler: ``fill_``, ``sub``, ``div``, ``add``).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        log_softmax = torch.log_softmax(scale_logits(logits, temperature), dim=-1)  # (B, T, V)
        ctx.save_for_backward(log_softmax, tokens)
        ctx.temperature = temperature
        return log_softmax.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        log_softmax, tokens = ctx.saved_tensors
        grad_logits = log_softmax.exp()  # softmax: the one (B, T, V) tensor of the backward
        grad_logits.mul_(-grad.unsqueeze(-1))
        grad_logits.scatter_add_(-1, tokens.unsqueeze(-1), grad.unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad_logits.div_(ctx.temperature)
        return grad_logits, None, None


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, the distribution sampling drew from; at temperature 1 the logits
    themselves (x / 1.0 == x: the full-size division is skipped). Shapes: any → the same."""
    return logits if temperature == 1.0 else logits / temperature


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each token under softmax(logits / temperature).

    log π(y_t) = log_softmax(z_t)[y_t] with z = logits / temperature. Sampling with a temperature
    must score with the same temperature, or the PPO ratio is off from the first step. With and
    without autograd the forward runs the same ops, so a rollout pass (no grad) and the first PPO
    epoch (grad) give bit-equal log-probs; the backward is `_TokenLogprobs`' lean one.

    Shapes: `logits` (B, T, V), `tokens` (B, T) int64 → (B, T). Any leading dims work.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenLogprobs.apply(logits, tokens, float(temperature))
    return torch.log_softmax(scale_logits(logits, temperature), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last dim.

    H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v with p = softmax(z). Logits must be finite
    (mask banned tokens with a large negative number, not −inf, or 0·−inf gives nan).

    Shapes: (..., V) → (...).
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π.

    With log r = log π(y) − log π_ref(y) at the sampled token y (Schulman 2020, "Approximating
    KL Divergence", whose r is our r⁻¹):

    - k1 = log r                  unbiased, high variance, can be negative (lm-human-preferences)
    - k2 = ½ (log r)²             biased, low variance, always ≥ 0
    - k3 = (r⁻¹ − 1) + log r      unbiased, low variance, always ≥ 0

    k3 uses `expm1` so small log r does not cancel; it overflows float32 only for log r < −88.

    Shapes: `logprobs`, `ref_logprobs` and the result (B, T) (any matching shape).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def _last_token(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True only at the highest valid index of each row (all False for an empty row)."""
    positions = torch.arange(valid.shape[-1], device=valid.device)  # (T,)
    last = torch.where(valid, positions, -1).amax(-1, keepdim=True)  # (B, 1), -1 if empty
    return positions == last


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token rewards: a KL penalty on every response token, the score on the last one.

    R_t = −β·kl_t·m_t + score·[t = last valid token], with kl_t = `kl_estimate(..., estimator)`
    and β = `kl_coef` (Ziegler et al. 2019, eq. 2; InstructGPT, eq. 2). "Last valid token" is the
    highest index with mask set; a row without valid tokens gets all zeros and no score.

    Shapes: `scores` (B,), `logprobs`/`ref_logprobs`/`mask` (B, T) → rewards (B, T).
    Example: logprobs [−1, −1], ref [−1.5, −1], β = 0.1, score 2 → [−0.05, 2.0].
    """
    valid = _valid(mask)
    kl = kl_estimate(
        torch.where(valid, logprobs, 0.0), torch.where(valid, ref_logprobs, 0.0), estimator
    )  # (B, T), 0 where masked
    rewards = -kl_coef * kl
    return rewards + torch.where(_last_token(valid), scores.unsqueeze(-1), 0.0)


# ---------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each response.

    δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   returns_t = A_t + V_t,

    run backwards over the valid tokens of each row, with V and A after the last valid token
    taken as 0 (the episode ends there), so nothing flows from padding. Masked positions are
    skipped, as if removed from the row: for the usual prefix mask this is exactly the loop of
    lm-human-preferences/OpenRLHF with rewards and values zeroed after the end; a hole inside a
    row is bridged (the token after it bootstraps the one before it). Advantages and returns are
    exactly 0 at masked positions. Call under `torch.no_grad()` in PPO.

    Shapes: `rewards`, `values`, `mask` (B, T) → `(advantages, returns)`, both (B, T).
    """
    valid = _valid(mask)
    rewards = torch.where(valid, rewards, 0.0)
    values = torch.where(valid, values, 0.0)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V of the next valid token, 0 past the end
    next_advantage = torch.zeros_like(values[:, 0])  # (B,) A of the next valid token
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        is_valid = valid[:, t]
        next_value = torch.where(is_valid, values[:, t], next_value)
        next_advantage = torch.where(is_valid, advantage, next_advantage)
        advantages.append(torch.where(is_valid, advantage, 0.0))
    advantages = torch.stack(advantages[::-1], dim=1)  # (B, T)
    return advantages, advantages + values


def rloo_advantages(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out baseline over the K samples of each prompt (Ahmadian et al. 2024,
    "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
    LLMs", eq. 6; Kool et al. 2019).

    b_i = (Σ_j r_j − r_i) / (K − 1),   A_i = r_i − b_i,

    the mean reward of the *other* K − 1 samples of the same prompt, so the baseline does not
    depend on the sample it corrects (the estimate stays unbiased) and no critic is needed. The
    rewards are whole-sequence rewards (in RLOO the KL-penalised score, r = score − β·Σ_t kl_t);
    every response token of sample i gets A_i.

    Example: K = 3 rewards [1, 2, 6] → baselines [4, 3.5, 1.5], advantages [−3, −1.5, 4.5].

    Shapes: `rewards` (G, K), one row per prompt → `(advantages, baselines)`, both (G, K). K ≥ 2.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"the leave-one-out baseline needs at least 2 samples per prompt, got {k}")
    baselines = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - baselines, baselines


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalised advantages (Shao et al. 2024, "DeepSeekMath", §4.1.2, outcome
    supervision): each sample's reward standardised within the K samples of its prompt.

    A_i = (r_i − mean_j r_j) / (std_j r_j + eps),

    with the unbiased std (Bessel's correction, as TRL's GRPOTrainer computes it) and eps = 1e-4
    keeping a group of equal rewards at A = 0 instead of 0/0. Every response token of sample i
    gets A_i.

    Example: K = 3 rewards [1, 2, 6]: mean 3, std √7 ≈ 2.64575 → A ≈ [−0.75593, −0.37796, 1.13389]
    (eps = 0); rewards [5, 5] → [0, 0].

    Shapes: `rewards` (G, K), one row per prompt → (G, K). K ≥ 2.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"group-normalised advantages need at least 2 samples per prompt, got {k}")
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)  # unbiased
    return (rewards - mean) / (std + eps)


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ρ_t = exp(log π_θ − log π_old),   L = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε)),
    the mean over valid tokens of the whole batch (lm-human-preferences). Example: ρ = 1.5,
    A = +1, ε = 0.2 gives −1.2.

    Stats (detached, as in lm-human-preferences):
    - `clipfrac`: fraction of tokens where the clipped term is the one used
    - `approxkl`: ½·mean_t (log π_θ − log π_old)², the estimator used by lm-human-preferences/TRL
    - `approxkl_k3`: mean_t (ρ_t − 1) − log ρ_t, the unbiased k3 estimate of KL(π_old ‖ π_θ)
      (cleanrl's `approx_kl`)
    - `ratio_mean`: mean_t ρ_t

    Shapes: `logprobs`, `old_logprobs`, `advantages`, `mask` (B, T) → 0-d loss.
    """
    valid = _valid(mask)
    log_ratio = torch.where(valid, logprobs - old_logprobs, 0.0)  # (B, T)
    advantages = torch.where(valid, advantages, 0.0)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), valid)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses2 > pg_losses).to(ratio.dtype), valid),
            "approxkl": 0.5 * masked_mean(log_ratio**2, valid),
            "approxkl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, valid),
            "ratio_mean": masked_mean(ratio, valid),
        }
    return pg_loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss of lm-human-preferences (and OpenAI baselines' PPO2).

    V^clip_t = V_old,t + clip(V_t − V_old,t, −ε_v, ε_v),
    L = ½·mean_t max((V_t − R_t)², (V^clip_t − R_t)²) over valid tokens, R = `returns`.
    Example: V = 1.5, V_old = 1, R = 2, ε_v = 0.2 gives ½·0.8² = 0.32.

    Stats (detached): `vf_clipfrac` (fraction of tokens where the clipped error is the one used),
    `value_mean` (mean_t V_t).

    Shapes: `values`, `old_values`, `returns`, `mask` (B, T) → 0-d loss.
    """
    valid = _valid(mask)
    values, old_values, returns = (torch.where(valid, x, 0.0) for x in (values, old_values, returns))
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), valid)

    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).to(values.dtype), valid),
            "value_mean": masked_mean(values, valid),
        }
    return vf_loss, stats


def policy_gradient_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The vanilla policy-gradient (actor) loss of A2C (Mnih et al. 2016, "Asynchronous Methods
    for Deep Reinforcement Learning", Algorithm S3; the synchronous variant Gopher's RL used,
    Rae et al. 2021, appendix), as a loss to minimise:

    L = −mean_t A_t·log π_θ(y_t),

    the mean over the valid tokens of the whole batch, A a constant (no gradient flows into it).
    A2C takes one gradient step per rollout batch, so π_θ = π_old at that step: there is no ratio
    to clip, and ∇L equals the gradient of PPO's clipped surrogate at ρ = 1.

    Example: log π = [−1, −2], A = [2, 1] → −(2·(−1) + 1·(−2)) / 2 = 2.

    Stats (detached): with `old_logprobs`, `approxkl`, `approxkl_k3` and `ratio_mean` as in
    `ppo_policy_loss` (0, 0 and 1 at A2C's single step); there is no `clipfrac`.

    Shapes: `logprobs`, `advantages`, `mask`, `old_logprobs` (B, T) → 0-d loss.
    """
    valid = _valid(mask)
    logprobs = torch.where(valid, logprobs, 0.0)  # (B, T)
    advantages = torch.where(valid, advantages, 0.0).detach()
    loss = masked_mean(-advantages * logprobs, valid)
    stats: dict[str, torch.Tensor] = {}
    if old_logprobs is not None:
        with torch.no_grad():
            log_ratio = torch.where(valid, logprobs - old_logprobs, 0.0)
            stats = {
                "approxkl": 0.5 * masked_mean(log_ratio**2, valid),
                "approxkl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, valid),
                "ratio_mean": masked_mean(torch.exp(log_ratio), valid),
            }
    return loss, stats


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The unclipped critic loss of A2C (Mnih et al. 2016): L = ½·mean_t (V_t − R_t)² over the
    valid tokens, R = `returns` (GAE advantages + old values).

    Example: V = [1.5, 1.1], R = [2, 2] → ½·(0.25 + 0.81) / 2 = 0.265.

    Stats (detached): `value_mean` (mean_t V_t). Shapes: `values`, `returns`, `mask` (B, T) → 0-d loss.
    """
    valid = _valid(mask)
    values, returns = torch.where(valid, values, 0.0), torch.where(valid, returns, 0.0)
    loss = 0.5 * masked_mean((values - returns) ** 2, valid)
    with torch.no_grad():
        stats = {"value_mean": masked_mean(values, valid)}
    return loss, stats


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    kl_coef: float = 0.04,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective (Shao et al. 2024, eq. 3), as a loss to minimise: PPO's clipped surrogate
    plus the KL to the reference as a loss term instead of a reward penalty,

    L = `ppo_policy_loss` + β·mean_t k3_t,   k3_t = π_ref/π_θ − log(π_ref/π_θ) − 1

    (`kl_estimate(..., "k3")`, Schulman's unbiased, always non-negative estimator, at the sampled
    tokens; its gradient reaches log π_θ). Both terms are means over the valid tokens of the batch
    (the token-level mean of DAPO and TRL's default; the paper averages per sequence first).

    Example: ρ = 1.5, A = +1, ε = 0.2 (surrogate −1.2) and log π_θ − log π_ref = 0.5 (k3 =
    e^−0.5 − 1 + 0.5 ≈ 0.106531) with β = 0.1 give −1.2 + 0.0106531 = −1.1893469.

    Stats (detached): those of `ppo_policy_loss`, plus `kl` = mean_t k3_t.

    Shapes: every tensor (B, T) → 0-d loss.
    """
    valid = _valid(mask)
    pg_loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange)
    kl = kl_estimate(torch.where(valid, logprobs, 0.0), torch.where(valid, ref_logprobs, 0.0), "k3")  # (B, T), 0 where masked
    kl_loss = masked_mean(kl, valid)
    stats["kl"] = kl_loss.detach()
    return pg_loss + kl_coef * kl_loss, stats


# ---------------------------------------------------------------------------------------------
# reward model
# ---------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    ties: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley–Terry pairwise loss of a reward model (InstructGPT eq. 1; margin as in Llama 2).

    L = mean_i −log σ(r_c,i − r_r,i − margin_i). Examples: r_c = 1, r_r = 0 gives
    log(1 + e⁻¹) ≈ 0.31326; with margin 1 it gives log 2.

    ``ties`` (optional, (N,) bool) marks pairs judged equal (rank-import writes them with margin 0):
    their term is −½[log σ(d_i) + log σ(−d_i)] with d = r_c − r_r, the likelihood of either order
    at probability ½, smallest at d = 0 (log 2 there; 0.8133 at d = ±1); no margin applies to them.

    ``weights`` (optional, (N,) ≥ 0) make the mean a weighted one, Σ_i w_i·L_i / Σ_i w_i: a
    bootstrap resample of the pairs (a pair drawn twice has weight 2, one not drawn weight 0), as
    the members of a reward-model ensemble use. Example: losses log 2 and 0.31326 with weights
    (1, 3) give (0.69315 + 3·0.31326)/4 ≈ 0.40823.

    Stats (detached): `accuracy` = mean_i [r_c,i > r_r,i] (a tie counts as wrong),
    `margin_mean` = mean_i (r_c,i − r_r,i), both over the pairs that are not marked as ties
    (unweighted: they describe the data, not the resample).

    Shapes: `chosen_rewards`, `rejected_rewards` (N,); `margin` a float or (N,); `ties`, `weights`
    (N,) → 0-d loss.
    """
    diff = chosen_rewards - rejected_rewards  # (N,)
    logits = diff if margin is None else diff - margin
    losses = -F.logsigmoid(logits)  # (N,)
    if ties is not None:
        losses = torch.where(ties, -0.5 * (F.logsigmoid(diff) + F.logsigmoid(-diff)), losses)
    loss = losses.mean() if weights is None else (losses * weights).sum() / weights.sum().clamp_min(1e-12)
    with torch.no_grad():
        ordered = torch.ones_like(diff, dtype=torch.bool) if ties is None else ~ties
        stats = {
            "accuracy": masked_mean((diff > 0).to(diff.dtype), ordered),
            "margin_mean": masked_mean(diff, ordered),
        }
    return loss, stats


def conservative_score(member_scores: torch.Tensor, coef: float) -> torch.Tensor:
    """A pessimistic reward from an ensemble of reward models: mean − λ·std over the members.

    s = mean_m s_m − λ·std_m s_m (population std), the uncertainty-penalised reward of Coste et al.
    2023 ("Reward Model Ensembles Help Mitigate Overoptimization"; their UWO penalises the variance,
    here the std, which keeps the penalty in the reward's units). Where the members disagree — away
    from the prompts and answers they were trained on — the policy gains less, so PPO is steered
    away from what the reward model cannot judge. λ = 0 gives the ensemble mean.

    Example: members (1, 2, 3) → mean 2, std √(2/3) ≈ 0.8165; λ = 1 gives 1.1835.

    Shapes: `member_scores` (B, M) → (B,).
    """
    mean = member_scores.mean(-1)
    if coef == 0:
        return mean
    return mean - coef * member_scores.std(-1, unbiased=False)


def expand_ranking(tiers: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """All ordered (winner, loser) pairs of one ranking, given as tiers, best tier first.

    Every index in a tier beats every index in each later tier; indices in the same tier are
    tied and form no pair. Example: `[[0], [1, 2], [3]]` (0 best, 1 and 2 tied, 3 worst) →
    `[(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]`.
    """
    seen: set[int] = set()
    for tier in tiers:
        for index in tier:
            if index in seen:
                raise ValueError(f"index {index} appears more than once in the ranking {tiers}")
            seen.add(index)
    return [
        (winner, loser)
        for i, better in enumerate(tiers)
        for worse in tiers[i + 1 :]
        for winner in better
        for loser in worse
    ]


def ranking_loss(
    rewards: torch.Tensor, ranking_groups: Sequence[Sequence[Sequence[int]]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-model loss over rankings of K completions, the InstructGPT way (Ouyang et al. 2022).

    Each completion is scored once (`rewards`, flat over all rankings); each ranking is expanded
    into all its ordered pairs with `expand_ranking`, and the loss is `bradley_terry_loss` over
    all pairs of all rankings together:

        L = mean_{(w, l) ∈ pairs} −log σ(r_w − r_l).

    (InstructGPT averages over the C(K, 2) pairs of each prompt and then over prompts; the two
    agree when every ranking has the same number of pairs.)

    `ranking_groups`: one entry per ranking; a ranking is a list of tiers, best first; a tier is
    a list of indices into `rewards`; tied completions share a tier. Example: rewards for 5
    completions, prompt A ranked 0 > 1 = 2, prompt B ranked 4 > 3:

        ranking_loss(rewards, [[[0], [1, 2]], [[4], [3]]])   # pairs (0,1) (0,2) (4,3)

    Stats: those of `bradley_terry_loss`, over the pairs.

    Shapes: `rewards` (N,) → 0-d loss.
    """
    pairs = [pair for tiers in ranking_groups for pair in expand_ranking(tiers)]
    if not pairs:
        raise ValueError("the rankings contain no ordered pair (every completion tied or alone)")
    winners, losers = torch.tensor(pairs, dtype=torch.long, device=rewards.device).unbind(-1)
    return bradley_terry_loss(rewards[winners], rewards[losers])


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Adaptive KL coefficient β of Ziegler et al. 2019 (section 2.2).

    err = clip(KL / target − 1, −0.2, 0.2),   β ← β·(1 + err·n_steps / horizon),

    where KL is the measured KL(π ‖ π_ref) per sequence and n_steps the number of samples (or
    updates) since the last call. `value` is a plain float; `state_dict()` holds everything
    needed to resume exactly.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        # float() on a tensor is a device sync; update runs once per PPO step, at logging time
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


class FixedKLController:
    """Constant KL coefficient β; `update` does nothing. Same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"


# ---------------------------------------------------------------------------------------------
# language-model loss (sft; PPO-ptx)
# ---------------------------------------------------------------------------------------------


def nll_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Σ −log softmax(logits)[target] over the positions whose target is not ``ignore_index``, in
    float32 whatever the logits' dtype.

    Shapes: `logits` (..., V), `targets` (...) int64 → a scalar. Example: uniform logits over
    V = 4 and three targets give 3·log 4 ≈ 4.1589.
    """
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index, reduction="sum")


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, normalizer: torch.Tensor | float | None = None, ignore_index: int = -100
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy, summed over the labelled tokens and divided by ``normalizer``.

    loss = Σ_t −log p(labels[t+1] | tokens ≤ t) / normalizer over t with labels[t+1] ≠ ignore_index.
    ``normalizer`` defaults to the number of labelled tokens in this batch (the token mean). A
    training loop that accumulates gradients passes the labelled-token count of the whole optimizer
    step instead, so that the accumulated gradient is the token mean over the step, whatever the
    split into micro-batches. The cross-entropy runs in float32 whatever the logits' dtype.

    Shapes: `logits` (B, T, V), `labels` (B, T) int64 (the input ids, -100 where untrained; shifted
    here, as transformers does) → a scalar. ``stats``: ``nll_sum`` and ``tokens`` (detached).
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (B, T): position t predicts t+1
    total = nll_sum(logits, targets, ignore_index)
    tokens = (targets != ignore_index).sum()
    denominator = tokens.clamp(min=1) if normalizer is None else normalizer
    return total / denominator, {"nll_sum": total.detach(), "tokens": tokens.detach()}


# ---------------------------------------------------------------------------------------------
# direct preference optimisation (DPO, IPO)
# ---------------------------------------------------------------------------------------------


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The preference loss of DPO (Rafailov et al. 2023, eq. 7) or IPO (Azar et al. 2023, eq. 17),
    from sequence log-probabilities under the policy and the frozen reference.

    h = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l)),

    - sigmoid (DPO): L = mean_i −log σ(β·h_i), Bradley–Terry on the implicit reward β·log(π_θ/π_ref);
    - ipo:           L = mean_i (h_i − 1/(2β))², which regresses the log-ratio gap to a finite
      target instead of pushing it to infinity on deterministic preferences.

    Log-probabilities are sums over the completion's tokens (`masked_sum`), as in both papers.
    (TRL's IPO averages them over tokens instead.)

    Example: log π_θ(y_w) = −1, log π_ref(y_w) = −2, log π_θ(y_l) = −3, log π_ref(y_l) = −2, so
    h = 2; β = 0.1: sigmoid log(1 + e^−0.2) ≈ 0.598139, ipo (2 − 5)² = 9.

    Stats (detached, TRL's names): `rewards_chosen` = mean β(log π_θ(y_w) − log π_ref(y_w)),
    `rewards_rejected`, `accuracy` = mean [reward_w > reward_l], `margin` = mean of their difference.

    Shapes: all four (N,) → 0-d loss.
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)  # (N,)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose sigmoid or ipo")
    with torch.no_grad():
        stats = {
            "rewards_chosen": chosen_rewards.mean(),
            "rewards_rejected": rejected_rewards.mean(),
            "accuracy": (chosen_rewards > rejected_rewards).to(h.dtype).mean(),
            "margin": (chosen_rewards - rejected_rewards).mean(),
        }
    return losses.mean(), stats


# ---------------------------------------------------------------------------------------------
# offline RL: implicit language Q-learning (ILQL)
# ---------------------------------------------------------------------------------------------


def expectile_loss(diff: torch.Tensor, mask: torch.Tensor, tau: float = 0.7) -> torch.Tensor:
    """Expectile regression (IQL, Kostrikov et al. 2021, eq. 5; ILQL's value loss, Snell et al.
    2022, eq. 2): L = mean_t |τ − 1(u_t < 0)|·u_t², with u = target − prediction (for ILQL:
    Q̂(s, a) − V(s)).

    For τ > ½ an error with the target above the prediction weighs more, so V settles above the
    mean of Q̂ over the data's actions: towards the best action seen, without querying unseen ones.
    τ = ½ is half the squared error.

    Example, τ = 0.7: u = +1 → 0.7, u = −1 → 0.3, u = 2 → 2.8; u = [1, −1] gives 0.5.

    Shapes: `diff`, `mask` (B, T) → 0-d (the mean over valid positions).
    """
    valid = _valid(mask)
    diff = torch.where(valid, diff, 0.0)
    weight = torch.where(diff < 0, 1.0 - tau, tau)
    return masked_mean(weight * diff**2, valid)


def ilql_loss(
    q_values: torch.Tensor,
    target_q: torch.Tensor,
    values: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 0.99,
    tau: float = 0.7,
    cql_coef: float = 0.1,
    logprobs: torch.Tensor | None = None,
    bc_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ILQL objective (Snell et al. 2022, "Offline RL for Natural Language Generation with
    Implicit Language Q Learning", eqs. 1-3; the form of trlx's ILQL), token by token over each
    response, state s_t = prompt + y_<t, action a_t = y_t:

    - Q:   mean_t (Q(s_t, a_t) − [r_t + γ·V(s_{t+1})])², V(s_{t+1}) without gradient and 0 after
           the last token (the episode ends there);
    - V:   `expectile_loss`(Q̂(s_t, a_t) − V(s_t), τ), Q̂ the target network (Polyak-averaged Q);
    - CQL: mean_t [logsumexp_a Q(s_t, a) − Q(s_t, a_t)] (CQL(H), Kumar et al. 2020): the
           cross-entropy of softmax(Q) at the data's token, which pushes down Q on tokens the data
           never took, so that the advantage shift does not chase over-estimated unseen tokens;
    - BC:  mean_t −log π(a_t|s_t), the behaviour cloning of π_β that sampling shifts;

    L = L_Q + L_V + α·L_CQL + bc·L_BC (α = `cql_coef`, bc = `bc_coef`; L_BC needs `logprobs`).
    Rewards sit where they are given (a sequence's reward on its last token). Masks are prefix
    masks (valid tokens first), as every response batch here.

    Example (one response of 2 tokens, vocabulary of 2, γ = 1, τ = 0.7, α = 1): Q(s_0, ·) = [1, 0],
    Q(s_1, ·) = [0, 2], actions [0, 1], rewards [0, 1], V = [0.5, 1], Q̂ = [1, 2]. Then
    Q(s_t, a_t) = [1, 2] and the targets are [0 + V_1, 1 + 0] = [1, 1]: L_Q = (0 + 1)/2 = 0.5;
    u = Q̂ − V = [0.5, 1]: L_V = 0.7·(0.25 + 1)/2 = 0.4375; L_CQL = (log(1 + e^−1) + log(1 + e^−2))/2
    ≈ (0.313262 + 0.126928)/2 = 0.220095; L ≈ 1.157595.

    Stats (detached): `loss_q`, `loss_v`, `loss_cql`, `loss_bc` (when given), `q_mean`, `v_mean`,
    `advantage_mean` = mean_t (Q̂(s_t, a_t) − V(s_t)).

    Shapes: `q_values` (B, T, V); `target_q`, `values`, `rewards`, `logprobs`, `mask` (B, T);
    `actions` (B, T) int64 → 0-d loss.
    """
    valid = _valid(mask)
    actions = torch.where(valid, actions, 0)
    q_values = torch.where(valid.unsqueeze(-1), q_values, 0.0)  # (B, T, V)
    values = torch.where(valid, values, 0.0)
    target_q = torch.where(valid, target_q, 0.0).detach()
    rewards = torch.where(valid, rewards, 0.0)
    q_taken = q_values.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (B, T) Q(s_t, a_t)
    # V(s_{t+1}): the next valid position's value, 0 after the last token (terminal)
    next_valid = F.pad(valid[:, 1:], (0, 1), value=False)
    next_values = torch.where(next_valid, F.pad(values[:, 1:], (0, 1)), 0.0).detach()
    loss_q = masked_mean((q_taken - (rewards + gamma * next_values)) ** 2, valid)
    loss_v = expectile_loss(target_q - values, valid, tau)
    loss_cql = masked_mean(torch.logsumexp(q_values, -1) - q_taken, valid)
    loss = loss_q + loss_v + cql_coef * loss_cql
    stats = {"loss_q": loss_q, "loss_v": loss_v, "loss_cql": loss_cql}
    if logprobs is not None:
        loss_bc = masked_mean(-torch.where(valid, logprobs, 0.0), valid)
        loss = loss + bc_coef * loss_bc
        stats["loss_bc"] = loss_bc
    with torch.no_grad():
        stats = {k: v.detach() for k, v in stats.items()}
        stats.update({
            "q_mean": masked_mean(q_taken, valid),
            "v_mean": masked_mean(values, valid),
            "advantage_mean": masked_mean(target_q - values, valid),
        })  # fmt: skip
    return loss, stats


def advantage_shifted_logits(logits: torch.Tensor, q_values: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """ILQL's policy (Snell et al. 2022, eq. 4): π(a|s) ∝ π_β(a|s)·exp(β·(Q(s, a) − V(s))), as logits

    z = log_softmax(logits) + β·(Q − V),

    which sampling then treats like any logits (temperature, top-k, top-p). β = 0 is the behaviour
    policy π_β itself. V(s) shifts every token alike, so it changes no probability; it is kept so
    that z − log_softmax(logits) is β times the advantage.

    Example: logits [0, 0], Q = [1, 0], V = 0.5, β = 2 → log ½ + [1, −1]; softmax ≈ [0.880797, 0.119203].

    Shapes: `logits`, `q_values` (..., V); `values` (..., 1) or (...,) → (..., V), float32.
    """
    if values.dim() == q_values.dim() - 1:
        values = values.unsqueeze(-1)
    return torch.log_softmax(logits.float(), -1) + beta * (q_values.float() - values.float())
