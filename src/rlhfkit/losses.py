"""The RLHF math: masked statistics, KL estimators, reward shaping, GAE, PPO and reward-model losses.

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
Divergence" (http://joschu.net/blog/kl-approx.html).
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
    "logprobs_from_logits",
    "entropy_from_logits",
    "kl_estimate",
    "kl_penalized_rewards",
    "gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "bradley_terry_loss",
    "expand_ranking",
    "ranking_loss",
    "AdaptiveKLController",
    "FixedKLController",
    "lm_loss",
    "nll_sum",
    "scale_logits",
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
