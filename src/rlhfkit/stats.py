"""Statistics over preference judgements: inter-annotator agreement, Elo ratings, win rates.

Plain functions over plain Python values (no torch, no files), shared by ``rank-import`` and
``eval``:

* `pairwise_agreement` and `krippendorff_alpha` measure how consistently annotators judge the same
  couples of completions (InstructGPT reports the first: 72.6% between labelers);
* `win_matrix`, `win_rates`, `elo_ratings` and `elo_with_ci` rate players (policies) from a list of
  ``(winner, loser)`` outcomes, with bootstrap confidence intervals;
* eval's aggregation: `Match` (two models' completions of one row met), `outcome` (a match decided
  by scores), `player_outcomes`, `win_rate` (a proportion with a `wilson_interval` or a bootstrap
  over prompts), `elo_table` (`elo_with_ci` on matches), `rm_accuracy` (the reward model against a
  judge), `best_of_kl` and `best_of_curve` (best-of-n at its analytic KL), `mean_std`.

Elo here is the maximum-likelihood Bradley–Terry fit on the Elo scale (what Chatbot Arena reports),
not the online update: it does not depend on the order of the games, so the same judgements always
give the same ratings. ``P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400))``.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhfkit.config import Interval, choices
from rlhfkit.errors import ConfigError

ELO_SCALE = 400.0
ELO_BASE = 1000.0


# --- agreement ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """Observed agreement of annotators: ``rate`` over ``comparisons`` annotator-pair judgements."""

    rate: float | None
    comparisons: int


def pairwise_agreement(units: Iterable[Mapping[Hashable, Hashable]], annotator: Hashable | None = None) -> Agreement:
    """The share of annotator pairs that gave the same label to the same unit.

    ``units``: one mapping ``annotator -> label`` per unit (e.g. per couple of completions, label
    +1/0/-1 for first better/tie/second better). Every pair of distinct annotators of a unit is
    one comparison; with ``annotator`` only the pairs that include that annotator count.
    ``rate`` is None when there is no comparison (fewer than two annotators per unit).
    """
    agree = total = 0
    for unit in units:
        coders = list(unit)
        for i, a in enumerate(coders):
            for b in coders[i + 1 :]:
                if annotator is not None and annotator not in (a, b):
                    continue
                total += 1
                agree += unit[a] == unit[b]
    return Agreement(agree / total if total else None, total)


def _ordinal_delta2(values: Sequence[float], counts: Mapping[float, float]) -> dict[tuple[float, float], float]:
    """Krippendorff's ordinal metric: δ²(c, k) = (Σ_{g=c..k} n_g − (n_c + n_k)/2)² over sorted values."""
    order = sorted(values)
    cumulative = np.cumsum([counts[v] for v in order])
    delta = {}
    for i, c in enumerate(order):
        for j, k in enumerate(order):
            lo, hi = min(i, j), max(i, j)
            between = cumulative[hi] - (cumulative[lo - 1] if lo > 0 else 0.0)
            delta[c, k] = float(between - (counts[c] + counts[k]) / 2) ** 2
    return delta


def krippendorff_alpha(
    units: Iterable[Mapping[Hashable, float]], metric: str = "ordinal", annotator: Hashable | None = None
) -> float | None:
    """Krippendorff's alpha, ``1 − D_o / D_e``, for units rated by any subset of annotators.

    ``units``: one mapping ``annotator -> value`` per unit; units with fewer than two values are
    not pairable and are ignored. ``metric``: ``ordinal`` (only the order of values matters; the
    distance between two values grows with how many observed values lie between them),
    ``interval`` ((c − k)²) or ``nominal`` (0 if equal, else 1).

    The computation follows Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability":
    the coincidence matrix ``o_ck = Σ_u (number of c–k pairs of values from different annotators
    in u) / (m_u − 1)``, ``n_c = Σ_k o_ck``, ``n = Σ_c n_c``, and
    ``alpha = 1 − (n − 1) Σ o_ck δ²_ck / Σ n_c n_k δ²_ck``.

    With ``annotator``, the observed disagreement counts only the pairs of values that involve
    that annotator (normalised by their own weight), while the expected disagreement stays that
    of all the data: the annotator's own agreement with the others, on the common scale.
    Returns None when alpha is undefined (no pairable unit, or no variation at all).
    """
    coincidence: dict[tuple[float, float], float] = defaultdict(float)
    own: dict[tuple[float, float], float] = defaultdict(float)
    for unit in units:
        if len(unit) < 2:
            continue
        m = len(unit)
        items = list(unit.items())
        for i, (a, c) in enumerate(items):
            for j, (b, k) in enumerate(items):
                if i == j:
                    continue
                coincidence[c, k] += 1.0 / (m - 1)
                if annotator is not None and annotator in (a, b):
                    own[c, k] += 1.0 / (m - 1)
    if not coincidence:
        return None
    counts: dict[float, float] = defaultdict(float)
    for (c, _), o in coincidence.items():
        counts[c] += o
    n = sum(counts.values())
    values = list(counts)
    if metric == "ordinal":
        delta2 = _ordinal_delta2(values, counts)
    elif metric == "interval":
        delta2 = {(c, k): float(c - k) ** 2 for c in values for k in values}
    elif metric == "nominal":
        delta2 = {(c, k): float(c != k) for c in values for k in values}
    else:
        raise ValueError(f"unknown metric {metric!r} (ordinal, interval or nominal)")
    expected = sum(counts[c] * counts[k] * delta2[c, k] for c in values for k in values) / (n * (n - 1))
    if expected == 0:
        return None
    observed_pairs = coincidence if annotator is None else own
    weight = sum(observed_pairs.values())
    if weight == 0:
        return None
    observed = sum(o * delta2[ck] for ck, o in observed_pairs.items()) / weight
    return 1.0 - observed / expected


# --- win rates and Elo --------------------------------------------------------------------------

Outcome = tuple[Hashable, Hashable]  # (winner, loser)


def players_of(outcomes: Iterable[Outcome], ties: Iterable[Outcome] = ()) -> list:
    """Every player that appears in an outcome or a tie, sorted by name."""
    return sorted({p for pair in [*outcomes, *ties] for p in pair}, key=str)


def win_matrix(
    outcomes: Sequence[Outcome], ties: Sequence[Outcome] = (), players: Sequence | None = None
) -> tuple[list, np.ndarray, np.ndarray]:
    """``(players, wins, games)``: ``wins[i, j]`` = games i won against j (a tie counts ½ to each),
    ``games[i, j]`` = games between i and j."""
    players = list(players) if players is not None else players_of(outcomes, ties)
    index = {p: i for i, p in enumerate(players)}
    wins = np.zeros((len(players), len(players)))
    for winner, loser in outcomes:
        wins[index[winner], index[loser]] += 1.0
    for a, b in ties:
        wins[index[a], index[b]] += 0.5
        wins[index[b], index[a]] += 0.5
    return players, wins, wins + wins.T


def win_rates(outcomes: Sequence[Outcome], ties: Sequence[Outcome] = ()) -> dict[Any, dict[Any, dict[str, float]]]:
    """The win-rate matrix: ``rates[a][b] = {"win_rate": share of a's games against b that a won
    (ties ½), "games": n}``, for every pair of players that met."""
    players, wins, games = win_matrix(outcomes, ties)
    out: dict[Any, dict[Any, dict[str, float]]] = {}
    for i, a in enumerate(players):
        row = {}
        for j, b in enumerate(players):
            if i != j and games[i, j] > 0:
                row[b] = {"win_rate": float(wins[i, j] / games[i, j]), "games": float(games[i, j])}
        out[a] = row
    return out


def _bradley_terry_strengths(wins: np.ndarray, prior_games: float, tol: float = 1e-10, max_iter: int = 10_000) -> np.ndarray:
    """Maximum-likelihood Bradley–Terry strengths by the MM algorithm (Hunter 2004).

    ``prior_games`` virtual games, half won by each side, are added between every two players:
    they keep the ratings finite for a player who never lost (or never won) and join players who
    never met, and they shrink ratings from little data towards the mean.
    """
    k = wins.shape[0]
    wins = wins + (prior_games / 2.0) * (1.0 - np.eye(k))
    games = wins + wins.T
    total_wins = wins.sum(1)
    p = np.ones(k)
    for _ in range(max_iter):
        denominator = (games / (p[:, None] + p[None, :])).sum(1)
        new = total_wins / denominator
        new /= np.exp(np.log(new).mean())  # fix the scale: geometric mean 1
        if np.max(np.abs(new - p)) < tol:
            return new
        p = new
    return p


def _to_elo(strengths: np.ndarray, anchor_index: int | None) -> np.ndarray:
    ratings = ELO_SCALE * np.log10(strengths)
    shift = ratings[anchor_index] if anchor_index is not None else ratings.mean()
    return ratings - shift + ELO_BASE


def elo_ratings(
    outcomes: Sequence[Outcome], ties: Sequence[Outcome] = (), *, prior_games: float = 1.0, anchor: Hashable | None = None
) -> dict[Any, float]:
    """Elo ratings from ``(winner, loser)`` outcomes (and ties), by maximum likelihood.

    The mean rating is 1000, or the ``anchor`` player's rating is 1000. Two players, A winning 3
    games and B 1, with the default prior (one virtual tie): P(A beats B) = 3.5 / 5 = 0.7, so
    R_A − R_B = 400·log10(0.7 / 0.3) ≈ 147.2, i.e. 1073.6 and 926.4.
    """
    players, wins, _ = win_matrix(outcomes, ties)
    if not players:
        return {}
    ratings = _to_elo(_bradley_terry_strengths(wins, prior_games), players.index(anchor) if anchor is not None else None)
    return {p: float(r) for p, r in zip(players, ratings)}


@dataclass(frozen=True)
class EloRating:
    rating: float
    low: float  # the bootstrap confidence interval
    high: float
    games: float

    def as_dict(self) -> dict[str, float]:
        return {"rating": self.rating, "ci_low": self.low, "ci_high": self.high, "games": self.games}


def elo_with_ci(
    outcomes: Sequence[Outcome],
    ties: Sequence[Outcome] = (),
    *,
    clusters: Sequence[Hashable] | None = None,
    tie_clusters: Sequence[Hashable] | None = None,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    prior_games: float = 1.0,
    anchor: Hashable | None = None,
) -> dict[Any, EloRating]:
    """Elo ratings with percentile bootstrap confidence intervals.

    Without ``clusters`` every outcome is resampled on its own. With ``clusters`` (one key per
    outcome, and ``tie_clusters`` per tie, e.g. the prompt id), whole clusters are resampled: the
    K·(K−1)/2 pairs of one ranking are not independent games, and resampling them one by one would
    make the interval too narrow. Deterministic for a given ``seed``.
    """
    players, wins, games = win_matrix(outcomes, ties)
    if not players:
        return {}
    anchor_index = players.index(anchor) if anchor is not None else None
    point = _to_elo(_bradley_terry_strengths(wins, prior_games), anchor_index)

    # one win matrix per resampling unit, so that a bootstrap sample is a weighted sum of them
    index = {p: i for i, p in enumerate(players)}
    keys = list(clusters) if clusters is not None else list(range(len(outcomes)))
    tie_keys = list(tie_clusters) if tie_clusters is not None else [("tie", i) for i in range(len(ties))]
    if len(keys) != len(outcomes) or len(tie_keys) != len(ties):
        raise ValueError("clusters must give one key per outcome (and tie_clusters one per tie)")
    unit_of: dict[Hashable, int] = {}
    for key in [*keys, *tie_keys]:
        unit_of.setdefault(key, len(unit_of))
    per_unit = np.zeros((len(unit_of), len(players), len(players)))
    for key, (winner, loser) in zip(keys, outcomes):
        per_unit[unit_of[key], index[winner], index[loser]] += 1.0
    for key, (a, b) in zip(tie_keys, ties):
        per_unit[unit_of[key], index[a], index[b]] += 0.5
        per_unit[unit_of[key], index[b], index[a]] += 0.5

    rng = np.random.default_rng(seed)
    samples = np.empty((n_bootstrap, len(players)))
    n_units = len(unit_of)
    for s in range(n_bootstrap):
        weights = np.bincount(rng.integers(0, n_units, n_units), minlength=n_units).astype(float)
        resampled = np.tensordot(weights, per_unit, axes=1)
        samples[s] = _to_elo(_bradley_terry_strengths(resampled, prior_games), anchor_index)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail], axis=0) if n_bootstrap else (point, point)
    played = games.sum(1)
    return {p: EloRating(float(point[i]), float(low[i]), float(high[i]), float(played[i])) for i, p in enumerate(players)}


def rounded(value: float | None, digits: int = 4) -> float | None:
    """A float for JSON output, rounded; None and NaN stay None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), digits)


# --- eval: matches, win-rates with intervals, best-of-n ----------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, float] | None:
    """``{"mean", "std"}`` (population std, ddof 0) or None for no values."""
    if not values:
        return None
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / len(values)
    return {"mean": mean, "std": math.sqrt(var)}


def z_value(confidence: float) -> float:
    """The two-sided normal quantile: 1.95996... for 0.95."""
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (Wilson 1927).

    ``center = (p + z²/2n) / (1 + z²/n)``, ``half = z / (1 + z²/n) · sqrt(p(1−p)/n + z²/4n²)``.
    Unlike the normal approximation it stays inside [0, 1] and is sensible at p = 0 or 1 and small n.
    With ties counted ½ the true variance is below p(1−p)/n, so the interval is conservative.
    Example: 7 of 10 at 95% gives [0.3968, 0.8922].
    """
    if n <= 0:
        return (0.0, 1.0)
    z = z_value(confidence)
    p = successes / n
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n)))
    return (max(0.0, center - half), min(1.0, center + half))


def outcome(score_a: float, score_b: float) -> float:
    """A match decided by scores: 1.0 if a wins, 0.5 for a tie, 0.0 if b wins."""
    return 1.0 if score_a > score_b else 0.5 if score_a == score_b else 0.0


def win_rate(
    outcomes: Sequence[float],
    clusters: Sequence[Hashable] | None = None,
    *,
    method: str = "wilson",
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Win-rate of a player from its match outcomes (1 win, 0.5 tie, 0 loss), with an interval.

    ``wilson``: the Wilson score interval with ``successes = wins + ties/2`` over ``n`` matches.
    ``bootstrap``: the percentile interval of the win-rate over resamples of whole ``clusters``
    (the prompts: the matches of one prompt are not independent), ``n_bootstrap`` times.
    """
    n = len(outcomes)
    wins = sum(1 for o in outcomes if o == 1.0)
    ties = sum(1 for o in outcomes if o == 0.5)
    losses = n - wins - ties
    result: dict[str, Any] = {"rate": None, "ci_low": None, "ci_high": None, "wins": wins, "ties": ties, "losses": losses, "n": n}
    if n == 0:
        return result
    rate = (wins + 0.5 * ties) / n
    if method == "wilson":
        low, high = wilson_interval(wins + 0.5 * ties, n, confidence)
    elif method == "bootstrap":
        low, high = _bootstrap_rate(outcomes, clusters, confidence, n_bootstrap, seed)
    else:
        raise ConfigError(f"--interval: expected one of {', '.join(choices(Interval))}, got {method!r}")
    result.update(rate=rate, ci_low=low, ci_high=high)
    return result


def _bootstrap_rate(
    outcomes: Sequence[float], clusters: Sequence[Hashable] | None, confidence: float, n_bootstrap: int, seed: int
) -> tuple[float, float]:
    """The percentile interval of the win-rate over ``n_bootstrap`` resamples of whole clusters."""
    keys = list(clusters) if clusters is not None else list(range(len(outcomes)))
    unit: dict[Hashable, int] = {}
    for k in keys:
        unit.setdefault(k, len(unit))
    total = np.zeros(len(unit))
    count = np.zeros(len(unit))
    for k, o in zip(keys, outcomes):
        total[unit[k]] += o
        count[unit[k]] += 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(unit), size=(n_bootstrap, len(unit)))
    rates = total[draws].sum(1) / count[draws].sum(1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(rates, [tail, 100.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Match:
    """``a`` met ``b`` on one row; ``result`` 1.0 = a won, 0.5 = tie, 0.0 = b won. ``cluster`` is
    the prompt (the bootstrap resamples prompts)."""

    a: str
    b: str
    result: float
    cluster: Hashable


def player_outcomes(matches: Sequence[Match], player: str, opponent: str) -> tuple[list[float], list[Hashable]]:
    """``player``'s outcomes (1/0.5/0) against ``opponent`` and their clusters."""
    outcomes, clusters = [], []
    for m in matches:
        if (m.a, m.b) == (player, opponent):
            outcomes.append(m.result)
        elif (m.a, m.b) == (opponent, player):
            outcomes.append(1.0 - m.result)
        else:
            continue
        clusters.append(m.cluster)
    return outcomes, clusters


def elo_table(matches: Sequence[Match], *, anchor: str | None, n_bootstrap: int, confidence: float, seed: int) -> dict[str, Any]:
    """Elo ratings with bootstrap intervals (whole prompts resampled) and the win-rate matrix, from
    `elo_with_ci` and `win_rates` (maximum-likelihood Bradley–Terry on the Elo scale)."""
    outcomes, clusters, ties, tie_clusters = [], [], [], []
    for m in matches:
        if m.result == 0.5:
            ties.append((m.a, m.b))
            tie_clusters.append(m.cluster)
        else:
            outcomes.append((m.a, m.b) if m.result == 1.0 else (m.b, m.a))
            clusters.append(m.cluster)
    if not outcomes and not ties:
        return {"ratings": {}, "win_rates": {}, "matches": 0}
    ratings = elo_with_ci(
        outcomes,
        ties,
        clusters=clusters,
        tie_clusters=tie_clusters,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        seed=seed,
        anchor=anchor,
    )
    return {
        "ratings": {str(p): r.as_dict() for p, r in ratings.items()},
        "win_rates": {str(a): {str(b): v for b, v in row.items()} for a, row in win_rates(outcomes, ties).items()},
        "matches": len(matches),
    }


def rm_accuracy(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Pairwise accuracy of the reward model on a judge's strict preferences: ``pairs`` holds
    ``(RM score of the judge's winner, RM score of its loser)``; an RM tie counts ½."""
    if not pairs:
        return {"accuracy": None, "pairs": 0}
    return {"accuracy": sum(outcome(winner, loser) for winner, loser in pairs) / len(pairs), "pairs": len(pairs)}


def best_of_kl(n: int) -> float:
    """KL(best-of-n ‖ base) = log n − (n−1)/n, in nats (Stiennon et al. 2020, Gao et al. 2022; an
    upper bound, exact for distinct samples, Beirami et al. 2024). Example: n = 4 gives 0.6363."""
    return math.log(n) - (n - 1) / n


def best_of_curve(scores: Sequence[Sequence[float]]) -> list[dict[str, float]]:
    """Mean best score of the first k samples of every row, for k = 1..n, at the analytic KL."""
    n = min(len(s) for s in scores)
    return [{"n": k, "kl": best_of_kl(k), "score": math.fsum(max(s[:k]) for s in scores) / len(scores)} for k in range(1, n + 1)]
