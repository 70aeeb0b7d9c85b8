"""Tests for rlhfkit.losses: hand-worked values, reference loops, Monte Carlo checks, properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.losses import (
    AdaptiveKLController,
    FixedKLController,
    bradley_terry_loss,
    conservative_score,
    entropy_from_logits,
    expand_ranking,
    gae,
    kl_estimate,
    kl_penalized_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    ranking_loss,
)

t = torch.tensor


def close(actual, expected, tol=1e-5):
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# hand-worked values
# ---------------------------------------------------------------------------------------------


def test_masked_mean_by_hand():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 7 / 3)
    close(masked_mean(x, mask.bool()), 7 / 3)
    close(masked_mean(x, mask.float(), dim=1), [1.5, 4.0])
    close(masked_mean(x, torch.zeros(2, 3)), 0.0)  # empty mask: 0, not nan


def test_masked_var_by_hand():
    x = t([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0]])
    mask = t([[True, True, False], [True, True, False]])
    close(masked_var(x, mask), 5 / 3)  # Σ(x−2.5)² = 5, over n−1 = 3
    close(masked_var(x, mask, unbiased=False), 1.25)
    close(masked_var(x, t([[True, False, False], [False] * 3])), 0.0)  # one value: 0


def test_masked_whiten_by_hand():
    x = t([[0.0, 2.0, 4.0, 100.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])  # mean 2, unbiased var 4
    close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])
    constant = masked_whiten(torch.full((2, 3), 7.0), torch.ones(2, 3))
    assert torch.equal(constant, torch.zeros(2, 3))


def test_logprobs_from_logits_by_hand():
    logits = t([[[0.0, 0.0, math.log(2.0)]]])  # softmax = [1/4, 1/4, 1/2]
    close(logprobs_from_logits(logits, t([[2]])), [[math.log(0.5)]])
    close(logprobs_from_logits(logits, t([[0]])), [[math.log(0.25)]])
    # temperature 2: logits [0, 0, log √2] → p_2 = √2 / (2 + √2) = √2 − 1
    close(logprobs_from_logits(logits, t([[2]]), temperature=2.0), [[math.log(math.sqrt(2) - 1)]])
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, t([[2]]), temperature=0.0)


def test_logprobs_from_logits_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    for temperature in (1.0, 0.7):
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None])[..., 0]
        close(logprobs_from_logits(logits, tokens, temperature), expected)


def test_entropy_from_logits_by_hand():
    close(entropy_from_logits(torch.zeros(4)), math.log(4))
    close(entropy_from_logits(t([0.0, math.log(3.0)])), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(1)) * 4
    close(entropy_from_logits(logits), torch.distributions.Categorical(logits=logits).entropy())


def test_kl_estimate_by_hand():
    logprobs, ref = t([-1.0]), t([-1.5])  # log r = 0.5
    close(kl_estimate(logprobs, ref, "k1"), [0.5])
    close(kl_estimate(logprobs, ref, "k2"), [0.125])
    close(kl_estimate(logprobs, ref, "k3"), [math.exp(-0.5) - 1 + 0.5])  # 0.106531
    close(kl_estimate(ref, ref, "k3"), [0.0])
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logprobs, ref, "k4")


def test_kl_estimators_match_exact_kl_on_samples():
    p = t([0.5, 0.3, 0.2], dtype=torch.float64)  # the policy π, which is sampled
    q = t([0.2, 0.3, 0.5], dtype=torch.float64)  # the reference π_ref
    exact = (p * (p / q).log()).sum()  # KL(π ‖ π_ref) ≈ 0.27489
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logprobs, ref_logprobs = p.log()[samples], q.log()[samples]
    # standard errors are ≈ 0.0016 (k1) and ≈ 0.001 (k3); 0.01 is over 6 of them
    close(kl_estimate(logprobs, ref_logprobs, "k1").mean(), exact, tol=0.01)
    close(kl_estimate(logprobs, ref_logprobs, "k3").mean(), exact, tol=0.01)
    assert (kl_estimate(logprobs, ref_logprobs, "k3") >= 0).all()
    assert (kl_estimate(logprobs, ref_logprobs, "k2") >= 0).all()


def test_kl_penalized_rewards_by_hand():
    rewards = kl_penalized_rewards(t([2.0]), t([[-1.0, -1.0]]), t([[-1.5, -1.0]]), t([[1, 1]]), 0.1)
    close(rewards, [[-0.05, 2.0]])


def test_kl_penalized_rewards_ragged_rows():
    logprobs = t([[-1.0, -1.0, -1.0], [-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = t([[-1.5, -1.0, -1.0], [-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    mask = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]]).bool()
    rewards = kl_penalized_rewards(t([2.0, 3.0, 4.0]), logprobs, ref, mask, kl_coef=0.1)
    close(rewards, [[-0.05, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # empty row: no score
    k3 = kl_penalized_rewards(t([0.0]), t([[-1.0]]), t([[-1.5]]), t([[1.0]]), 0.5, estimator="k3")
    close(k3, [[-0.5 * (math.exp(-0.5) - 0.5)]])


def test_gae_by_hand():
    rewards, values, mask = t([[0.0, 1.0]]), t([[0.5, 0.25]]), t([[1, 1]])
    # γ = λ = 1: A_1 = 1 − 0.25, A_0 = (0 + 0.25 − 0.5) + 0.75 = 0.5 = Monte Carlo return − V
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.75]])
    close(returns, [[1.0, 1.0]])
    # γ = 0.9, λ = 0.5: δ_0 = 0.9·0.25 − 0.5 = −0.275, A_0 = −0.275 + 0.45·0.75 = 0.0625
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(advantages, [[0.0625, 0.75]])
    close(returns, [[0.5625, 1.0]])


def test_ppo_policy_loss_by_hand():
    ratio = t([[1.5, 0.5, 1.5, 0.5]])
    advantages = t([[1.0, 1.0, -1.0, -1.0]])
    # per token: max(−Aρ, −A·clip(ρ)) = −1.2 (clipped), −0.5, 1.5, 0.8 (clipped)
    loss, stats = ppo_policy_loss(ratio.log(), torch.zeros(1, 4), advantages, torch.ones(1, 4))
    close(loss, (-1.2 - 0.5 + 1.5 + 0.8) / 4)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio_mean"], 1.0)
    close(stats["approxkl"], 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)
    close(stats["approxkl_k3"], (0.5 - math.log(1.5) + -0.5 - math.log(0.5)) / 2)
    single, _ = ppo_policy_loss(t([[math.log(1.5)]]), t([[0.0]]), t([[1.0]]), t([[1.0]]), cliprange=0.2)
    close(single, -1.2)


def test_ppo_stats_are_detached_tensors():
    logprobs = torch.zeros(2, 3, requires_grad=True)
    loss, stats = ppo_policy_loss(logprobs, torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3))
    values = torch.zeros(2, 3, requires_grad=True)
    vf_loss, vf_stats = ppo_value_loss(values, torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3))
    bt_loss, bt_stats = bradley_terry_loss(logprobs[0], logprobs[1])
    for some_loss, some_stats in ((loss, stats), (vf_loss, vf_stats), (bt_loss, bt_stats)):
        assert some_loss.requires_grad and some_loss.dim() == 0
        assert all(isinstance(v, torch.Tensor) and not v.requires_grad and v.dim() == 0
                   for v in some_stats.values())
    assert set(stats) >= {"clipfrac", "approxkl", "ratio_mean"}
    assert set(vf_stats) >= {"vf_clipfrac"}
    assert set(bt_stats) == {"accuracy", "margin_mean"}


def test_ppo_value_loss_by_hand():
    values, old_values, returns = t([[1.5, 1.1]]), t([[1.0, 1.0]]), t([[2.0, 2.0]])
    # token 0: clipped to 1.2, max(0.25, 0.64) = 0.64; token 1: unclipped, 0.81
    loss, stats = ppo_value_loss(values, old_values, returns, t([[1, 1]]), cliprange_value=0.2)
    close(loss, 0.5 * (0.64 + 0.81) / 2)
    close(stats["vf_clipfrac"], 0.5)
    close(stats["value_mean"], 1.3)
    single, _ = ppo_value_loss(values[:, :1], old_values[:, :1], returns[:, :1], t([[1]]))
    close(single, 0.32)


def test_bradley_terry_by_hand():
    loss, stats = bradley_terry_loss(t([1.0]), t([0.0]))
    close(loss, math.log(1 + math.exp(-1)))
    close(loss, 0.31326, tol=1e-5)
    close(bradley_terry_loss(t([1.0]), t([0.0]), margin=1.0)[0], math.log(2))
    close(bradley_terry_loss(t([1.0, 3.0]), t([0.0, 0.0]), margin=t([1.0, 3.0]))[0], math.log(2))
    loss, stats = bradley_terry_loss(t([1.0, 0.0, 2.0]), t([0.0, 1.0, 2.0]))
    close(stats["accuracy"], 1 / 3)  # a tie is not a win
    close(stats["margin_mean"], 0.0)


def test_bradley_terry_weighted_is_a_weighted_mean():
    # pair losses log 2 (d = 0) and log(1 + e^-1) (d = 1), weights 1 and 3
    loss, _ = bradley_terry_loss(t([0.0, 1.0]), t([0.0, 0.0]), weights=t([1.0, 3.0]))
    close(loss, (math.log(2) + 3 * math.log(1 + math.exp(-1))) / 4)
    close(loss, 0.40823, tol=1e-5)
    # integer weights equal repeating pairs; weight 0 drops a pair (and its gradient)
    chosen = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 0.0])
    loss, _ = bradley_terry_loss(chosen, rejected, weights=t([2.0, 0.0, 1.0]))
    close(loss, bradley_terry_loss(t([0.5, 0.5, 2.0]), t([0.0, 0.0, 0.0]))[0])
    loss.backward()
    assert chosen.grad[1] == 0


def test_conservative_score_is_mean_minus_std():
    members = t([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    close(conservative_score(members, 1.0), t([2.0 - math.sqrt(2 / 3), 0.5]))
    close(conservative_score(members, 1.0)[0], 1.18350, tol=1e-5)
    close(conservative_score(members, 0.0), t([2.0, 0.5]))  # λ = 0: the mean
    close(conservative_score(t([[4.0]]), 2.0), t([4.0]))  # one member: no spread


def test_expand_ranking():
    assert expand_ranking([[0], [1, 2], [3]]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert expand_ranking([[0, 1, 2]]) == []  # all tied
    assert expand_ranking([[5], [3], [4]]) == [(5, 3), (5, 4), (3, 4)]
    with pytest.raises(ValueError, match="more than once"):
        expand_ranking([[0], [1, 0]])


def test_ranking_loss_by_hand_and_equals_bt_over_pairs():
    close(ranking_loss(t([1.0, 0.0]), [[[0], [1]]])[0], math.log(1 + math.exp(-1)))
    rewards = torch.randn(7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    groups = [[[0], [1, 2], [3]], [[6], [4]], [[5]]]
    pairs = [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3), (6, 4)]
    loss, stats = ranking_loss(rewards, groups)
    expected, expected_stats = bradley_terry_loss(*rewards[t(pairs)].unbind(-1))
    close(loss, expected)
    close(stats["accuracy"], expected_stats["accuracy"])
    close(stats["margin_mean"], expected_stats["margin_mean"])
    loss.backward()
    assert rewards.grad[5] == 0  # a ranking of one gives no pair
    with pytest.raises(ValueError, match="no ordered pair"):
        ranking_loss(rewards, [[[0, 1]], [[2]]])


# ---------------------------------------------------------------------------------------------
# reference implementations
# ---------------------------------------------------------------------------------------------


def gae_loop(rewards, values, gamma, lam):
    """GAE for one response given as Python lists of its valid tokens only."""
    advantages, next_value, next_advantage = [0.0] * len(rewards), 0.0, 0.0
    for i in reversed(range(len(rewards))):
        delta = rewards[i] + gamma * next_value - values[i]
        next_advantage = delta + gamma * lam * next_advantage
        next_value = values[i]
        advantages[i] = next_advantage
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_python_loop_on_ragged_batches(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [0, 1, 4, 9, 6]
    B, T = len(lengths), 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.arange(T) < t(lengths)[:, None]
    rewards[~mask], values[~mask] = 1e6, float("nan")  # garbage after the end must not leak
    advantages, returns = gae(rewards, values, mask.double(), gamma, lam)
    for b, n in enumerate(lengths):
        expected = gae_loop(rewards[b, :n].tolist(), values[b, :n].tolist(), gamma, lam)
        close(advantages[b, :n], t(expected, dtype=torch.float64), tol=1e-10)
        close(returns[b, :n], t(expected, dtype=torch.float64) + values[b, :n], tol=1e-10)
    assert torch.equal(advantages[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    assert torch.equal(returns[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))


def test_gae_skips_holes_in_the_mask():
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)
    mask = t([[1, 0, 1, 1, 0, 0]]).bool()
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = gae_loop(rewards[mask].tolist(), values[mask].tolist(), 0.9, 0.8)
    close(advantages[mask], expected)
    assert advantages[0, 1] == 0


# ---------------------------------------------------------------------------------------------
# gradients at masked positions
# ---------------------------------------------------------------------------------------------


def test_masked_positions_get_exactly_zero_gradient():
    g = torch.Generator().manual_seed(0)
    mask = t([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).float()
    masked = mask == 0

    def leaf(garbage=float("nan")):
        x = torch.randn(2, 5, generator=g) - 1
        x[masked] = garbage  # nan / huge values at padding must not reach any gradient
        return x.requires_grad_()

    a, b, c = leaf(), leaf(1e4), leaf(float("inf"))
    losses = {
        "masked_mean": lambda: masked_mean(a, mask),
        "masked_var": lambda: masked_var(a, mask),
        "masked_whiten": lambda: (masked_whiten(a, mask) * torch.arange(5.0)).sum(),
        "kl_penalized_rewards": lambda: kl_penalized_rewards(b[:, 0], a, b, mask, 0.1, "k3").sum(),
        "gae": lambda: sum(x.sum() for x in gae(a, b, mask, 0.9, 0.9)),
        "ppo_policy_loss": lambda: ppo_policy_loss(a, b, c, mask)[0],
        "ppo_value_loss": lambda: ppo_value_loss(a, b, c, mask)[0],
    }
    for name, loss_fn in losses.items():
        for x in (a, b, c):
            x.grad = None
        loss = loss_fn()
        assert torch.isfinite(loss), name
        loss.backward()
        for x in (a, b, c):
            if x.grad is not None:
                assert torch.isfinite(x.grad).all(), name
                assert torch.equal(x.grad[masked], torch.zeros(int(masked.sum()))), name
        assert a.grad is not None and a.grad[~masked].abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_follows_the_formula():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    controller.update(12.0, 100)  # err clipped to +0.2: β = 0.1·(1 + 0.2·100/10000)
    close(controller.value, 0.1002, tol=1e-12)
    expected = controller.value
    for kl, n in [(6.0, 64), (0.0, 64), (6.6, 256), (5.7, 32), (t(100.0), 512)]:
        controller.update(kl, n)
        err = min(max(float(kl) / 6.0 - 1, -0.2), 0.2)
        expected *= 1 + err * n / 10_000
        assert controller.value == pytest.approx(expected, rel=1e-12)
    assert isinstance(controller.value, float)


def test_kl_controllers_round_trip_through_state_dict():
    controller = AdaptiveKLController(0.2, target=3.0, horizon=1000)
    for kl in (1.0, 5.0, 3.3):
        controller.update(kl, 50)
    state = controller.state_dict()
    assert all(type(v) is float for v in state.values())
    resumed = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    resumed.load_state_dict(state)
    for kl in (0.5, 9.0, 2.9):
        controller.update(kl, 50)
        resumed.update(kl, 50)
        assert resumed.value == controller.value  # exact

    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=100)


# ---------------------------------------------------------------------------------------------
# properties over random shapes and masks
# ---------------------------------------------------------------------------------------------


@st.composite
def batches(draw):
    """(x, y, z, other, mask): three (B, T) float tensors, a fourth for masked positions, a mask."""
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    mask = t(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).view(B, T)
    if draw(st.booleans()):
        mask = mask.float()
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    x, y, z, other = (torch.randn(B, T, generator=g) * scale for _ in range(4))
    return x, y, z, other, mask


def masked_functions(x, y, z, mask, scores):
    """Every masked function, evaluated on the same inputs: name -> tensor."""
    out = {
        "masked_mean": masked_mean(x, mask),
        "masked_mean_dim": masked_mean(x, mask, dim=1),
        "masked_var": masked_var(x, mask),
        "masked_whiten": masked_whiten(x, mask),
        "masked_whiten_no_shift": masked_whiten(x, mask, shift_mean=False),
        "rewards_k1": kl_penalized_rewards(scores, x, y, mask, 0.1),
        "rewards_k3": kl_penalized_rewards(scores, x, y, mask, 0.1, "k3"),
        "ppo_policy_loss": ppo_policy_loss(x, y, z, mask)[0],
        "ppo_value_loss": ppo_value_loss(x, y, z, mask)[0],
    }
    out["advantages"], out["returns"] = gae(x, y, mask, 0.99, 0.95)
    out.update({f"policy/{k}": v for k, v in ppo_policy_loss(x, y, z, mask)[1].items()})
    out.update({f"value/{k}": v for k, v in ppo_value_loss(x, y, z, mask)[1].items()})
    return out


@settings(max_examples=60, deadline=None)
@given(batches())
def test_outputs_are_finite(batch):
    x, y, z, _, mask = batch
    for name, value in masked_functions(x, y, z, mask, z[:, 0]).items():
        assert torch.isfinite(value).all(), name


@settings(max_examples=60, deadline=None)
@given(batches())
def test_results_ignore_values_at_masked_positions(batch):
    x, y, z, other, mask = batch
    masked = ~mask.bool()
    x2, y2, z2 = (torch.where(masked, other * 1e3, v) for v in (x, y, z))
    x2[masked.nonzero()[:1].unbind(-1)] = float("nan")
    first, second = masked_functions(x, y, z, mask, z[:, 0]), masked_functions(x2, y2, z2, mask, z[:, 0])
    for name in first:
        assert torch.equal(first[name], second[name]), name


@settings(max_examples=60, deadline=None)
@given(batches())
def test_masked_whiten_gives_mean_0_and_variance_1(batch):
    x, _, _, _, mask = batch
    valid = mask.bool()
    x = x.double()
    whitened = masked_whiten(x, mask)
    assert torch.equal(whitened[~valid], torch.zeros(int((~valid).sum()), dtype=x.dtype))
    close(masked_mean(whitened, mask), 0.0, tol=1e-9)
    if valid.sum() >= 2 and masked_var(x, mask) > 1e-4:  # else the 1e-8 eps dominates
        close(masked_var(whitened, mask), 1.0, tol=1e-3)
        close(masked_mean(masked_whiten(x, mask, shift_mean=False), mask), masked_mean(x, mask), tol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=3), min_size=1, max_size=4),
       st.integers(0, 2**31 - 1))
def test_ranking_loss_equals_bt_over_expanded_pairs(tier_sizes, seed):
    groups, n = [], 0
    for sizes in tier_sizes:  # consecutive indices, some tiers empty
        groups.append([list(range(n + sum(sizes[:i]), n + sum(sizes[: i + 1]))) for i in range(len(sizes))])
        n += sum(sizes)
    pairs = [p for tiers in groups for p in expand_ranking(tiers)]
    rewards = torch.randn(max(n, 1), generator=torch.Generator().manual_seed(seed))
    if not pairs:
        with pytest.raises(ValueError):
            ranking_loss(rewards, groups)
        return
    loss, stats = ranking_loss(rewards, groups)
    expected, _ = bradley_terry_loss(*rewards[t(pairs)].unbind(-1))
    close(loss, expected, tol=1e-6)
    assert torch.isfinite(loss) and 0 <= stats["accuracy"] <= 1


def test_nll_sum_worked_example_and_ignored_positions():
    from rlhfkit.losses import nll_sum

    total = nll_sum(torch.zeros(3, 4), torch.tensor([0, 1, 2]))  # uniform over V = 4
    assert total.item() == pytest.approx(3 * math.log(4), abs=1e-6)  # 4.1589
    assert nll_sum(torch.zeros(2, 4), torch.tensor([-100, 3])).item() == pytest.approx(math.log(4), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# beside PPO: A2C, RLOO, GRPO, DPO/IPO, ILQL
# ---------------------------------------------------------------------------------------------


def test_masked_sum_by_hand():
    from rlhfkit.losses import masked_sum

    close(masked_sum(t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), t([[1, 1, 0], [0, 0, 0]])), [3.0, 0.0])


def test_rloo_baseline_for_three_rewards():
    from rlhfkit.losses import rloo_advantages

    advantages, baselines = rloo_advantages(t([[1.0, 2.0, 6.0]]))
    close(baselines, [[4.0, 3.5, 1.5]])  # the mean of the other two
    close(advantages, [[-3.0, -1.5, 4.5]])
    advantages, _ = rloo_advantages(t([[1.0, 2.0, 6.0], [3.0, 3.0, 3.0]]))  # groups are independent
    close(advantages[1], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(t([[1.0]]))


def test_group_advantages_by_hand():
    from rlhfkit.losses import group_advantages

    # mean 3, unbiased std √((4 + 1 + 9) / 2) = √7
    close(group_advantages(t([[1.0, 2.0, 6.0]]), eps=0.0), [[-2 / math.sqrt(7), -1 / math.sqrt(7), 3 / math.sqrt(7)]])
    close(group_advantages(t([[1.0, 2.0, 6.0]]), eps=0.0), [[-0.75593, -0.37796, 1.13389]], tol=1e-5)
    assert torch.equal(group_advantages(t([[5.0, 5.0]])), torch.zeros(1, 2))  # equal rewards: 0, not nan
    close(group_advantages(t([[0.0, 2.0]])), [[-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)]])
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(t([[1.0]]))


def test_policy_gradient_loss_by_hand_and_equals_the_surrogate_gradient_at_ratio_one():
    from rlhfkit.losses import policy_gradient_loss

    loss, stats = policy_gradient_loss(t([[-1.0, -2.0]]), t([[2.0, 1.0]]), t([[1, 1]]), old_logprobs=t([[-1.0, -2.0]]))
    close(loss, 2.0)
    close(stats["approxkl"], 0.0)
    close(stats["ratio_mean"], 1.0)
    assert "clipfrac" not in stats
    # A2C's single step: π_θ = π_old, so its gradient is PPO's clipped surrogate's at ρ = 1
    g = torch.Generator().manual_seed(0)
    logprobs = (torch.randn(3, 4, generator=g) - 2).requires_grad_()
    advantages, mask = torch.randn(3, 4, generator=g), t([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    (pg_grad,) = torch.autograd.grad(policy_gradient_loss(logprobs, advantages, mask)[0], logprobs)
    (ppo_grad,) = torch.autograd.grad(ppo_policy_loss(logprobs, logprobs.detach(), advantages, mask)[0], logprobs)
    close(pg_grad, ppo_grad)


def test_unclipped_value_loss_by_hand():
    from rlhfkit.losses import value_loss

    loss, stats = value_loss(t([[1.5, 1.1]]), t([[2.0, 2.0]]), t([[1, 1]]))
    close(loss, 0.265)  # ½·(0.25 + 0.81)/2: no clipping, unlike ppo_value_loss's 0.3625 here
    close(stats["value_mean"], 1.3)


def test_grpo_policy_loss_by_hand():
    from rlhfkit.losses import grpo_policy_loss

    logprobs = t([[math.log(1.5)]])
    loss, stats = grpo_policy_loss(logprobs, t([[0.0]]), logprobs - 0.5, t([[1.0]]), t([[1.0]]), cliprange=0.2, kl_coef=0.1)
    k3 = math.exp(-0.5) - 1 + 0.5
    close(stats["kl"], k3)
    close(loss, -1.2 + 0.1 * k3)
    close(loss, -1.1893469, tol=1e-6)
    # the KL term's gradient pulls log π towards the reference: d/dlogπ β·k3 = β(1 − e^{ref − logπ}) > 0 here
    x = torch.zeros(1, 1, requires_grad=True)
    kl_only, _ = grpo_policy_loss(x, x.detach(), t([[-0.5]]), t([[0.0]]), t([[1.0]]), kl_coef=0.1)
    kl_only.backward()
    close(x.grad, [[0.1 * (1 - math.exp(-0.5))]])


def test_dpo_loss_by_hand():
    from rlhfkit.losses import dpo_loss

    args = (t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]))  # h = (−1 + 2) − (−3 + 2) = 2
    loss, stats = dpo_loss(*args, beta=0.1)
    close(loss, math.log(1 + math.exp(-0.2)))
    close(loss, 0.598139, tol=1e-6)
    close(stats["rewards_chosen"], 0.1)
    close(stats["rewards_rejected"], -0.1)
    close(stats["margin"], 0.2)
    close(stats["accuracy"], 1.0)
    close(dpo_loss(*args, beta=0.1, loss_type="ipo")[0], 9.0)  # (2 − 1/(2·0.1))²
    close(dpo_loss(*args, beta=0.25, loss_type="ipo")[0], 0.0)  # h already at the target 1/(2β) = 2
    # policy = reference: h = 0, the loss is log 2 and the implicit rewards are 0
    zero, stats = dpo_loss(t([-1.0, -5.0]), t([-2.0, -1.0]), t([-1.0, -5.0]), t([-2.0, -1.0]))
    close(zero, math.log(2))
    close(stats["accuracy"], 0.0)  # equal implicit rewards: not counted as right
    with pytest.raises(ValueError, match="sigmoid or ipo"):
        dpo_loss(*args, loss_type="hinge")


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected():
    from rlhfkit.losses import dpo_loss

    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    for loss_type in ("sigmoid", "ipo"):
        chosen.grad = rejected.grad = None
        dpo_loss(chosen, rejected, t([-2.0]), t([-2.0]), beta=0.1, loss_type=loss_type)[0].backward()
        assert chosen.grad < 0 < rejected.grad, loss_type  # descending the loss raises log π(y_w)
        close(chosen.grad, -rejected.grad)
    close(chosen.grad, [2 * (0 - 5.0)])  # ipo at h = 0: d/dh (h − 5)² = −10, and dh/dchosen = 1


def test_expectile_loss_at_tau_0_7():
    from rlhfkit.losses import expectile_loss

    close(expectile_loss(t([[1.0]]), t([[1]]), tau=0.7), 0.7)
    close(expectile_loss(t([[-1.0]]), t([[1]]), tau=0.7), 0.3)
    close(expectile_loss(t([[2.0]]), t([[1]]), tau=0.7), 2.8)
    close(expectile_loss(t([[1.0, -1.0, 100.0]]), t([[1, 1, 0]]), tau=0.7), 0.5)  # the masked 100 counts for nothing
    close(expectile_loss(t([[1.0, -3.0]]), t([[1, 1]]), tau=0.5), 0.5 * (1 + 9) / 2)  # τ = ½: half the squared error
    # the minimiser over a constant V is the τ-expectile: for targets {0, 1} at τ = 0.7, v = 0.7
    v = torch.tensor(0.2, requires_grad=True)
    optimizer = torch.optim.SGD([v], lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        expectile_loss(t([[0.0, 1.0]]) - v, t([[1, 1]]), tau=0.7).backward()
        optimizer.step()
    close(v.detach(), 0.7, tol=1e-4)


def test_ilql_loss_by_hand():
    from rlhfkit.losses import ilql_loss

    q_values = t([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])  # the third position is padding
    loss, stats = ilql_loss(
        q_values, target_q=t([[1.0, 2.0, 5.0]]), values=t([[0.5, 1.0, 7.0]]), actions=t([[0, 1, 1]]),
        rewards=t([[0.0, 1.0, 3.0]]), mask=t([[1, 1, 0]]), gamma=1.0, tau=0.7, cql_coef=1.0,
    )  # fmt: skip
    close(stats["loss_q"], 0.5)  # targets [0 + V_1, 1 + 0] = [1, 1] against Q(s, a) = [1, 2]
    close(stats["loss_v"], 0.7 * (0.25 + 1.0) / 2)  # u = Q̂ − V = [0.5, 1]
    close(stats["loss_cql"], (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2)
    close(loss, 0.5 + 0.4375 + 0.220095, tol=1e-5)
    close(stats["advantage_mean"], 0.75)
    # γ discounts the bootstrapped value; the behaviour-cloning term adds bc·mean(−log π)
    discounted, _ = ilql_loss(q_values, t([[1.0, 2.0, 5.0]]), t([[0.5, 1.0, 7.0]]), t([[0, 1, 1]]), t([[0.0, 1.0, 3.0]]),
                              t([[1, 1, 0]]), gamma=0.5, tau=0.7, cql_coef=0.0,
                              logprobs=t([[-1.0, -3.0, -50.0]]), bc_coef=2.0)  # fmt: skip
    close(discounted, ((1 - 0.5) ** 2 + 1.0) / 2 + 0.4375 + 2.0 * 2.0)


def test_advantage_shifted_logits_by_hand():
    from rlhfkit.losses import advantage_shifted_logits

    shifted = advantage_shifted_logits(t([[0.0, 0.0]]), t([[1.0, 0.0]]), t([0.5]), beta=2.0)
    close(shifted, [[math.log(0.5) + 1.0, math.log(0.5) - 1.0]])
    close(shifted.softmax(-1), [[0.880797, 0.119203]], tol=1e-6)
    logits = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    close(advantage_shifted_logits(logits, torch.randn(2, 5), torch.randn(2, 1), beta=0.0).softmax(-1), logits.softmax(-1))


def test_new_losses_give_masked_positions_exactly_zero_gradient():
    from rlhfkit.losses import (
        dpo_loss,
        expectile_loss,
        grpo_policy_loss,
        ilql_loss,
        masked_sum,
        policy_gradient_loss,
        value_loss,
    )

    g = torch.Generator().manual_seed(0)
    mask = t([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).float()
    masked = mask == 0

    def leaf(garbage=float("nan"), *shape):
        x = torch.randn(2, 5, *shape, generator=g) - 1
        x[masked] = garbage
        return x.requires_grad_()

    a, b, c, q = leaf(), leaf(1e4), leaf(float("inf")), leaf(float("nan"), 7)
    actions = torch.randint(0, 7, (2, 5), generator=g)
    actions[masked] = 10_000  # out of range at padding: must not be gathered
    losses = {
        "policy_gradient_loss": lambda: policy_gradient_loss(a, c, mask, old_logprobs=b)[0],
        "value_loss": lambda: value_loss(a, c, mask)[0],
        "grpo_policy_loss": lambda: grpo_policy_loss(a, b, b, c, mask, kl_coef=0.1)[0],
        "dpo_loss": lambda: dpo_loss(masked_sum(a, mask), masked_sum(b, mask), masked_sum(c, mask), masked_sum(b, mask))[0],
        "dpo_loss_ipo": lambda: dpo_loss(
            masked_sum(a, mask), masked_sum(b, mask), masked_sum(c, mask), masked_sum(b, mask), loss_type="ipo"
        )[0],
        "expectile_loss": lambda: expectile_loss(a - b, mask, 0.7),
        "ilql_loss": lambda: ilql_loss(q, b, a, actions, c, mask, cql_coef=0.1, logprobs=a, bc_coef=1.0)[0],
    }
    for name, loss_fn in losses.items():
        for x in (a, b, c, q):
            x.grad = None
        loss = loss_fn()
        assert torch.isfinite(loss), name
        loss.backward()
        for x in (a, b, c, q):
            if x.grad is not None:
                assert torch.isfinite(x.grad).all(), name
                assert torch.equal(x.grad[masked], torch.zeros_like(x.grad[masked])), name
        assert a.grad is not None and a.grad[~masked].abs().sum() > 0, name
    assert q.grad[~masked].abs().sum() > 0  # ilql: Q itself learns
