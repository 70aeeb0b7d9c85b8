"""The linear probe that initialises a reward model's head (LP-FT): objective, fit, λ by CV, bootstrap."""

from __future__ import annotations

import math

import torch

from rlhfkit.probe import PairFeatures, bootstrap_weights, choose_l2, fit_probe, pair_accuracy, probe_objective


def pairs_of(features, pairs, ties=None, groups=None):
    winners, losers = zip(*pairs, strict=True)
    n = len(pairs)
    return PairFeatures(
        torch.tensor(features, dtype=torch.float32),
        torch.tensor(winners),
        torch.tensor(losers),
        torch.tensor(ties if ties is not None else [False] * n),
        torch.tensor(groups if groups is not None else list(range(n))),
    )


def test_objective_by_hand():
    p = pairs_of([[1.0], [0.0]], [(0, 1)])
    x = p.features.double()
    close = lambda a, b: abs(float(a) - b) < 1e-9  # noqa: E731
    assert close(
        probe_objective(torch.tensor([1.0], dtype=torch.float64), x, p, torch.ones(1, dtype=torch.float64), 0.0),
        math.log(1 + math.exp(-1)),
    )
    # v = (1, 2), x = [[1, 0], [0, 0]]: the score difference is 1 again, plus ½·λ·‖v‖² = ½·2·5 = 5
    p2 = pairs_of([[1.0, 0.0], [0.0, 0.0]], [(0, 1)])
    value = probe_objective(
        torch.tensor([1.0, 2.0], dtype=torch.float64), p2.features.double(), p2, torch.ones(1, dtype=torch.float64), 2.0
    )
    assert close(value, math.log(1 + math.exp(-1)) + 5.0)


def test_fit_recovers_the_direction_and_the_optimum():
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([2.0, -1.0, 0.0, 0.5])
    feats = torch.randn(60, 4, generator=g) * torch.tensor([1.0, 10.0, 1.0, 0.1])  # very different scales
    scores = feats @ true
    pairs = [(i, i + 1) if scores[i] > scores[i + 1] else (i + 1, i) for i in range(0, 60, 2)]
    p = pairs_of(feats.tolist(), pairs)
    head = fit_probe(p, l2=1e-3)
    assert pair_accuracy(head, p) == 1.0
    cos = torch.nn.functional.cosine_similarity(head, true, dim=0)
    assert cos > 0.9
    # it is the optimum: the gradient of the objective (standardised coordinates) is ~0
    s = p.scale().double()
    v = (head.double() * s).requires_grad_(True)
    probe_objective(v, p.features.double() / s, p, torch.ones(p.num_pairs, dtype=torch.float64), 1e-3).backward()
    assert v.grad.abs().max() < 1e-4


def test_ties_pull_scores_together_and_weights_resample():
    # one tie between rows 0 and 1: the best head gives them equal scores
    p = pairs_of([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], [(0, 1), (0, 2)], ties=[True, False])
    head = fit_probe(p, l2=1e-4)
    scores = p.features @ head
    assert abs(float(scores[0] - scores[1])) < 0.05 * abs(float(scores[0] - scores[2]))
    # weight 0 drops a pair: with only the tie left the head stays at 0
    assert torch.allclose(fit_probe(p, l2=1e-2, weights=torch.tensor([1.0, 0.0])), torch.zeros(2), atol=1e-6)


def test_choose_l2_prefers_strong_penalty_on_noise_and_weak_on_signal():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(80, 20, generator=g)
    signal = feats[:, 0]
    ordered = [(i, i + 1) if signal[i] > signal[i + 1] else (i + 1, i) for i in range(0, 80, 2)]
    random = [(i, i + 1) if torch.rand(1, generator=g) > 0.5 else (i + 1, i) for i in range(0, 80, 2)]
    groups = [i // 2 for i in range(40)]  # two pairs per ranking
    l2_signal, losses = choose_l2(pairs_of(feats.tolist(), ordered, groups=groups))
    l2_noise, _ = choose_l2(pairs_of(feats.tolist(), random, groups=groups))
    assert set(losses) == {1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0}
    assert l2_noise > l2_signal


def test_bootstrap_weights_resample_whole_groups():
    groups = torch.tensor([0, 0, 0, 1, 2, 2])
    w = bootstrap_weights(groups, members=4, seed=3)
    assert w.shape == (4, 6)
    for row in w:
        assert row[0] == row[1] == row[2] and row[4] == row[5]  # a group's pairs share a count
        assert row[[0, 3, 4]].sum() == 3  # three groups drawn with replacement
    assert not torch.equal(w[0], w[1]) or not torch.equal(w[1], w[2])  # members differ
    assert torch.equal(w, bootstrap_weights(groups, members=4, seed=3))  # seeded
    assert torch.equal(bootstrap_weights(groups, members=1, seed=3), torch.ones(1, 6))
