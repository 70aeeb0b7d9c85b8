"""A linear probe on frozen features: the reward model's score head fitted before fine-tuning.

Linear probing then fine-tuning (LP-FT, Kumar et al. 2022, "Fine-Tuning can Distort Pretrained
Features and Underperform Out-of-Distribution"): a fresh, random score head sends large, arbitrary
gradients into the backbone during the first steps of fine-tuning and distorts the features that
generalise to unseen prompts. Fitting the head first on the *frozen* features — a convex problem —
and fine-tuning from there keeps the features and starts from a head that already ranks the
training pairs. On a few hundred comparisons this is the difference between a reward model that
generalises and one that does not (README, "the hard example").

The probe is Bradley–Terry logistic regression on feature differences. For a pair (w, l) with
features h_w, h_l (the backbone's last hidden state at the last real token, what the head reads):

    minimise_v   Σ_i c_i·ℓ_i(v·(x_w,i − x_l,i)) / Σ_i c_i  +  ½·λ·‖v‖²,   x = h / s

with ℓ(d) = −log σ(d) for an ordered pair, −½[log σ(d) + log σ(−d)] for a tie
(`losses.bradley_terry_loss`), c_i ≥ 0 a pair's weight (1, or its bootstrap count for an ensemble
member), and s the per-dimension standard deviation of the features (transformer hidden states
have a few dimensions hundreds of times larger than the rest; standardising makes one λ fit all).
The head's weight is then v / s. There is no bias: it cancels in every pair, and the reward's
offset is set afterwards by the normalisation. λ is chosen by k-fold cross-validation over whole
rankings (`choose_l2`), never splitting the correlated pairs of one ranking across folds.

The objective is smooth and strictly convex; L-BFGS with a strong-Wolfe line search solves it to
tolerance in a few dozen iterations, on all pairs at once (P × H floats: trivial next to a forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhfkit.losses import bradley_terry_loss

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # λ candidates, on standardised features
FOLDS = 5


@dataclass(frozen=True)
class PairFeatures:
    """Features of every distinct sequence and the pairs among them.

    ``features`` (N, H) float32, one row per distinct sequence; ``winners``/``losers`` (P,) rows of
    each pair; ``ties`` (P,) bool; ``groups`` (P,) int, the ranking each pair came from (folds and
    bootstrap resamples take whole groups).
    """

    features: torch.Tensor
    winners: torch.Tensor
    losers: torch.Tensor
    ties: torch.Tensor
    groups: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.winners.numel())

    def scale(self) -> torch.Tensor:
        """(H,) per-dimension std of the features (1 where a dimension is constant)."""
        std = self.features.std(0, unbiased=False)
        return torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))


def probe_objective(v: torch.Tensor, x: torch.Tensor, pairs: PairFeatures, weights: torch.Tensor, l2: float) -> torch.Tensor:
    """The weighted Bradley–Terry loss of the linear scores ``x @ v`` plus ½·λ·‖v‖² (a 0-d tensor).

    Shapes: ``v`` (H,), ``x`` (N, H) standardised features, ``weights`` (P,).
    Example: x = [[1], [0]], one pair 0 ≻ 1, v = [1], λ = 0 gives log(1 + e⁻¹) ≈ 0.31326.
    """
    scores = x @ v  # (N,)
    loss, _ = bradley_terry_loss(scores[pairs.winners], scores[pairs.losers], ties=pairs.ties, weights=weights)
    return loss + 0.5 * l2 * (v * v).sum()


def fit_probe(
    pairs: PairFeatures, *, l2: float, weights: torch.Tensor | None = None, max_iter: int = 200, tol: float = 1e-7
) -> torch.Tensor:
    """The head weight (H,) that minimises `probe_objective`, in the units of the raw features.

    ``weights`` (P,) default to 1 for every pair. Solved in float64 with L-BFGS from v = 0.
    """
    x = (pairs.features / pairs.scale()).double()  # (N, H)
    w = torch.ones(pairs.num_pairs, dtype=torch.float64) if weights is None else weights.double()
    v = torch.zeros(x.size(1), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [v], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = probe_objective(v, x, pairs, w, l2)
        loss.backward()
        return loss

    optimizer.step(closure)
    return (v.detach() / pairs.scale().double()).float()


def subset(pairs: PairFeatures, keep: torch.Tensor) -> PairFeatures:
    """The pairs where ``keep`` (P,) bool is set (the features are shared, not copied)."""
    return PairFeatures(pairs.features, pairs.winners[keep], pairs.losers[keep], pairs.ties[keep], pairs.groups[keep])


def pair_accuracy(head: torch.Tensor, pairs: PairFeatures) -> float:
    """Share of the ordered (not tied) pairs that the linear scores rank correctly (0.5 if none)."""
    scores = pairs.features @ head
    ordered = ~pairs.ties
    if not bool(ordered.any()):
        return 0.5
    return float((scores[pairs.winners] > scores[pairs.losers])[ordered].float().mean())


def held_out_loss(head: torch.Tensor, pairs: PairFeatures) -> float:
    """Mean Bradley–Terry loss of the linear scores (no penalty) over ``pairs``."""
    scores = pairs.features.double() @ head.double()
    loss, _ = bradley_terry_loss(scores[pairs.winners], scores[pairs.losers], ties=pairs.ties)
    return float(loss)


def choose_l2(
    pairs: PairFeatures, *, grid: Sequence[float] = L2_GRID, folds: int = FOLDS, seed: int = 0
) -> tuple[float, dict[float, float]]:
    """λ with the lowest k-fold cross-validated loss, folds made of whole groups (rankings).

    Returns (λ, {λ: mean held-out loss}). With fewer than two groups there is nothing to hold out:
    the middle of the grid is returned.
    """
    group_ids = torch.unique(pairs.groups)
    k = min(folds, int(group_ids.numel()))
    if k < 2:
        middle = sorted(grid)[len(grid) // 2]
        return middle, {}
    order = group_ids[torch.randperm(group_ids.numel(), generator=torch.Generator().manual_seed(seed))]
    fold_of = {int(g): i % k for i, g in enumerate(order)}
    fold = torch.tensor([fold_of[int(g)] for g in pairs.groups])
    losses: dict[float, float] = {}
    for l2 in grid:
        total = 0.0
        for f in range(k):
            head = fit_probe(subset(pairs, fold != f), l2=l2)
            total += held_out_loss(head, subset(pairs, fold == f)) * int((fold == f).sum())
        losses[l2] = total / pairs.num_pairs
    best = min(losses, key=lambda l2: (losses[l2], -l2))  # ties go to the stronger penalty
    return best, losses


def bootstrap_weights(groups: torch.Tensor, members: int, seed: int) -> torch.Tensor:
    """(members, P) pair weights: member m resamples the groups with replacement (seeded by
    (seed, m)), and a pair's weight is how often its group was drawn. Member 0 of a one-member
    "ensemble" is the data itself (all weights 1), so ``--ensemble 1`` changes nothing."""
    if members == 1:
        return torch.ones(1, groups.numel())
    ids, index = torch.unique(groups, return_inverse=True)  # index (P,) in [0, G)
    out = torch.empty(members, groups.numel())
    for m in range(members):
        g = torch.Generator().manual_seed(seed * 1_000_003 + m)
        draws = torch.randint(0, ids.numel(), (ids.numel(),), generator=g)
        counts = torch.bincount(draws, minlength=ids.numel()).float()  # (G,)
        out[m] = counts[index]
    return out

