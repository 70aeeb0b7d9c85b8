"""Agreement, Krippendorff's alpha, Elo, win rates and eval's aggregation (Wilson and bootstrap
intervals, matches, best-of-n) against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from rlhfkit import stats


def test_pairwise_agreement_by_hand():
    # two units rated by A, B, C: in each, A and B agree and C disagrees with both.
    # comparisons per unit: AB (agree), AC, BC (disagree) -> 2 agreements out of 6 = 1/3;
    # for A only its pairs count: AB (agree), AC (disagree) per unit -> 2/4 = 1/2; for C: 0/4.
    units = [{"A": 1, "B": 1, "C": -1}, {"A": -1, "B": -1, "C": 1}]
    assert stats.pairwise_agreement(units).rate == pytest.approx(1 / 3)
    assert stats.pairwise_agreement(units).comparisons == 6
    assert stats.pairwise_agreement(units, annotator="A").rate == pytest.approx(1 / 2)
    assert stats.pairwise_agreement(units, annotator="C").rate == 0.0
    assert stats.pairwise_agreement([{"A": 1}]).rate is None  # nobody to agree with


def test_krippendorff_alpha_ordinal_by_hand():
    # Annotator A ranks x > y > z, B ranks x > z > y. Units are the couples, value +1 when the
    # first is better, −1 when the second is; each couple in both orientations:
    #   (x,y): [+1,+1]  (y,x): [−1,−1]  (x,z): [+1,+1]  (z,x): [−1,−1]  (y,z): [+1,−1]  (z,y): [−1,+1]
    # coincidences (each unit has m=2 values, weight 1/(m−1) = 1 per ordered pair):
    #   o(+1,+1) = 4, o(−1,−1) = 4, o(+1,−1) = o(−1,+1) = 2;  n_+1 = n_−1 = 6, n = 12
    # ordinal δ²(−1,+1) = (n_−1 + n_+1 − (n_−1 + n_+1)/2)² = (12 − 6)² = 36, δ² = 0 on the diagonal
    # alpha = 1 − (n − 1) Σ o δ² / Σ n_c n_k δ² = 1 − 11 · (4 · 36) / (2 · 6 · 6 · 36) = 1 − 11/18 = 7/18
    units = [{"A": 1, "B": 1}, {"A": -1, "B": -1}, {"A": 1, "B": 1}, {"A": -1, "B": -1}, {"A": 1, "B": -1}, {"A": -1, "B": 1}]
    assert stats.krippendorff_alpha(units, "ordinal") == pytest.approx(7 / 18)


def test_krippendorff_alpha_per_annotator_by_hand():
    # u1 = {A:+1, B:+1, C:−1}, u2 = {A:−1, B:−1, C:+1}; m = 3, so each ordered pair weighs 1/2.
    #   o(+1,+1) = o(−1,−1) = 1, o(+1,−1) = o(−1,+1) = 2; n_+1 = n_−1 = 3, n = 6; δ²(−1,+1) = (6 − 3)² = 9
    #   D_e = Σ n_c n_k δ² / (n (n − 1)) = 2 · 3 · 3 · 9 / 30 = 5.4
    #   overall D_o = Σ o δ² / n = 4 · 9 / 6 = 6          -> alpha = 1 − 6 / 5.4 = −1/9
    #   C: all 4 weight of its pairs disagree: D_o = 9     -> alpha_C = 1 − 9 / 5.4 = −2/3
    #   A: half of its pairs' weight disagrees: D_o = 4.5  -> alpha_A = 1 − 4.5 / 5.4 = 1/6
    units = [{"A": 1, "B": 1, "C": -1}, {"A": -1, "B": -1, "C": 1}]
    assert stats.krippendorff_alpha(units) == pytest.approx(-1 / 9)
    assert stats.krippendorff_alpha(units, annotator="C") == pytest.approx(-2 / 3)
    assert stats.krippendorff_alpha(units, annotator="A") == pytest.approx(1 / 6)


def test_krippendorff_alpha_matches_the_published_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 coders, 12 units with
    # missing values; nominal .743, ordinal .815, interval .849
    rows = {
        "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    }
    units = [{c: rows[c][u] for c in rows if rows[c][u] is not None} for u in range(12)]
    assert stats.krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert stats.krippendorff_alpha(units, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert stats.krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)


def test_krippendorff_alpha_undefined_cases():
    assert stats.krippendorff_alpha([{"A": 1}]) is None  # nothing pairable
    assert stats.krippendorff_alpha([{"A": 1, "B": 1}, {"A": 1, "B": 1}]) is None  # no variation
    assert stats.krippendorff_alpha([{"A": 1, "B": 1}, {"A": -1, "B": -1}]) == 1.0  # perfect agreement


def test_win_rates_by_hand():
    # A beat B 3 times, B beat A once, A and B tied once: A won 3.5 of 5 games
    outcomes = [("A", "B")] * 3 + [("B", "A")]
    rates = stats.win_rates(outcomes, ties=[("A", "B")])
    assert rates["A"]["B"] == {"win_rate": pytest.approx(0.7), "games": 5.0}
    assert rates["B"]["A"]["win_rate"] == pytest.approx(0.3)
    assert "C" not in rates["A"]


def test_elo_by_hand():
    # with one virtual tie between the two players: P(A beats B) = (3 + ½) / (4 + 1) = 0.7,
    # R_A − R_B = 400 · log10(0.7 / 0.3) = 147.19; mean 1000 -> 1073.60 and 926.40
    outcomes = [("A", "B")] * 3 + [("B", "A")]
    diff = 400 * math.log10(7 / 3)
    ratings = stats.elo_ratings(outcomes)
    assert ratings["A"] == pytest.approx(1000 + diff / 2)
    assert ratings["B"] == pytest.approx(1000 - diff / 2)
    assert stats.elo_ratings(outcomes, anchor="B") == pytest.approx({"A": 1000 + diff, "B": 1000.0})
    # a cycle A > B > C > A: everyone equal
    cycle = stats.elo_ratings([("A", "B"), ("B", "C"), ("C", "A")])
    assert cycle == pytest.approx({"A": 1000.0, "B": 1000.0, "C": 1000.0})
    # an unbeaten player stays finite
    assert math.isfinite(stats.elo_ratings([("A", "B")] * 50)["A"])


def test_elo_bootstrap_interval():
    outcomes = [("A", "B")] * 3 + [("B", "A")]
    # one cluster (one prompt): every resample is the whole data, so the interval is the point
    one = stats.elo_with_ci(outcomes, clusters=["p"] * 4, n_bootstrap=50)
    assert one["A"].low == pytest.approx(one["A"].rating) and one["A"].high == pytest.approx(one["A"].rating)
    assert one["A"].games == 4.0
    # games resampled one by one: a real interval around the point, the same for the same seed
    free = stats.elo_with_ci(outcomes, n_bootstrap=200, seed=1)
    assert free["A"].low < free["A"].rating < free["A"].high
    assert free == stats.elo_with_ci(outcomes, n_bootstrap=200, seed=1)
    with pytest.raises(ValueError, match="one key per outcome"):
        stats.elo_with_ci(outcomes, clusters=["p"])


# --- eval's aggregation ------------------------------------------------------------------------


def test_wilson_interval_hand_computed():
    # 7 of 10 at 95%: z = 1.959964, p = 0.7, center = (0.7 + z²/20) / (1 + z²/10) = 0.644499,
    # half = z / (1 + z²/10) · sqrt(0.021 + z²/400) = 0.247716
    low, high = stats.wilson_interval(7, 10, 0.95)
    assert low == pytest.approx(0.396783, abs=1e-5) and high == pytest.approx(0.892214, abs=1e-5)
    # 0 of 10: the lower bound is 0, the upper z² / (n + z²) = 3.841459 / 13.841459
    low, high = stats.wilson_interval(0, 10, 0.95)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.277533, abs=1e-5)


def test_win_rate_counts_ties_as_half():
    outcomes = [1, 1, 1, 0.5, 0, 0.5, 1, 0, 1, 1]  # 6 wins, 2 ties, 2 losses: (6 + 1) / 10
    w = stats.win_rate(outcomes)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (6, 2, 2, 10)
    assert w["rate"] == pytest.approx(0.7)
    assert (w["ci_low"], w["ci_high"]) == pytest.approx((0.396783, 0.892214), abs=1e-5)
    assert stats.win_rate([])["rate"] is None


def test_win_rate_bootstrap_resamples_whole_prompts():
    # prompt a: both matches won, prompt b: both lost. Resampling prompts gives 1, 0.5 or 0 with
    # probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 1]; Wilson on 4 matches is narrower.
    outcomes, clusters = [1, 1, 0, 0], ["a", "a", "b", "b"]
    w = stats.win_rate(outcomes, clusters, method="bootstrap", n_bootstrap=2000, seed=0)
    assert w["rate"] == 0.5 and (w["ci_low"], w["ci_high"]) == (0.0, 1.0)
    assert stats.wilson_interval(2, 4)[0] > 0.1
    same = stats.win_rate([1, 0, 1, 0], ["a", "a", "b", "b"], method="bootstrap", n_bootstrap=200)
    assert (same["ci_low"], same["ci_high"]) == (0.5, 0.5)  # every prompt at 50%: no spread


def test_outcomes_from_scores_and_matches():
    assert [stats.outcome(2, 1), stats.outcome(1, 1), stats.outcome(0, 1)] == [1.0, 0.5, 0.0]
    matches = [stats.Match("sft", "ppo", 0.0, "p1"), stats.Match("ppo", "sft", 0.5, "p2"), stats.Match("ppo", "other", 1.0, "p3")]
    assert stats.player_outcomes(matches, "ppo", "sft") == ([1.0, 0.5], ["p1", "p2"])
    assert stats.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": 1.0} and stats.mean_std([]) is None


def test_elo_from_matches_hand_computed():
    # A beats B 3 times, B beats A once; one virtual tie (the prior): P(A > B) = 3.5 / 5 = 0.7,
    # R_A − R_B = 400 log10(0.7 / 0.3) = 147.19; the baseline B is anchored at 1000
    matches = [stats.Match("A", "B", 1.0, f"p{i}") for i in range(3)] + [stats.Match("B", "A", 1.0, "p3")]
    elo = stats.elo_table(matches, anchor="B", n_bootstrap=50, confidence=0.95, seed=0)
    assert elo["ratings"]["B"]["rating"] == pytest.approx(1000.0)
    assert elo["ratings"]["A"]["rating"] == pytest.approx(1000 + 400 * math.log10(0.7 / 0.3), abs=0.01)
    assert elo["win_rates"]["A"]["B"] == {"win_rate": 0.75, "games": 4.0}
    # with a tie instead of one win: A 2.5 + 0.5, B 1.5 + 0.5 -> P = 0.6, 400 log10(1.5) = 70.44
    matches[2] = stats.Match("B", "A", 0.5, "p2")
    elo = stats.elo_table(matches, anchor="B", n_bootstrap=50, confidence=0.95, seed=0)
    assert elo["ratings"]["A"]["rating"] - elo["ratings"]["B"]["rating"] == pytest.approx(400 * math.log10(1.5), abs=0.01)
    low, high = elo["ratings"]["A"]["ci_low"], elo["ratings"]["A"]["ci_high"]
    assert low <= elo["ratings"]["A"]["rating"] <= high


def test_rm_accuracy_and_best_of():
    assert stats.rm_accuracy([(1, 0), (0, 1), (2, 2)]) == {"accuracy": 0.5, "pairs": 3}
    assert stats.rm_accuracy([]) == {"accuracy": None, "pairs": 0}
    assert stats.best_of_kl(1) == 0.0
    assert stats.best_of_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert stats.best_of_kl(4) == pytest.approx(1.386294 - 0.75, abs=1e-6)
    curve = stats.best_of_curve([[0, 2, 1], [3, 1, 0]])  # best of the first k: k=1 (0+3)/2, k=2 (2+3)/2, k=3 (2+3)/2
    assert [c["score"] for c in curve] == [1.5, 2.5, 2.5] and [c["n"] for c in curve] == [1, 2, 3]
