"""Agreement, Krippendorff's alpha, Elo and win rates against values worked out by hand."""

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
