"""The alignment report's statistics, checked against hand-computed values and known synthetic effects."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from align.rlhf.alignment_stats import (
    best_of_n_expected,
    best_of_n_kl,
    bootstrap_interval,
    kl_estimate,
    length_controlled,
    length_controlled_win_rate,
    mean_with_interval,
    preferences,
    sign_test,
    win_rate,
)


def test_win_rate_counts_ties_half_and_matches_hand_computation():
    policy = [1.0, 2.0, 0.5, 3.0, 1.0, 0.0]
    baseline = [0.0, 2.0, 1.0, 1.0, 0.2, 0.0]
    # wins: rows 0, 3, 4; ties: rows 1, 5; loss: row 2 -> (3 + 0.5 * 2) / 6
    assert preferences(policy, baseline) == [1.0, 0.5, 0.0, 1.0, 1.0, 0.5]
    result = win_rate(policy, baseline)
    assert result["win_rate"] == pytest.approx(4 / 6)
    assert (result["wins"], result["ties"], result["losses"], result["prompts"]) == (3, 2, 1, 6)
    # two-sided sign test on 3 wins vs 1 loss: 2 * P(X <= 1 | n=4, p=1/2) = 2 * 5/16
    assert result["sign_test_p"] == pytest.approx(10 / 16)
    low, high = result["interval"]
    assert low <= 4 / 6 <= high and 0 <= low and high <= 1


def test_sign_test_matches_the_binomial_tails():
    assert sign_test(10, 0) == pytest.approx(2 / 2 ** 10)
    assert sign_test(0, 10) == pytest.approx(2 / 2 ** 10)
    assert sign_test(5, 5) == 1.0
    assert sign_test(8, 2) == pytest.approx(2 * sum(math.comb(10, i) for i in range(3)) / 2 ** 10)
    assert sign_test(0, 0) is None


def test_bootstrap_interval_of_a_mean_covers_it_and_narrows_with_more_prompts():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.3, 1, 20), rng.normal(0.3, 1, 400)
    lo_s, hi_s = bootstrap_interval([small], np.mean)
    lo_l, hi_l = bootstrap_interval([large], np.mean)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2  # ~ 1/sqrt(n): 20x the prompts, ~4.5x narrower
    # the normal-theory half-width for n = 400 is 1.96 / 20 ~ 0.098
    assert (hi_l - lo_l) / 2 == pytest.approx(1.96 * large.std() / math.sqrt(400), rel=0.15)
    assert bootstrap_interval([[1.0]], np.mean) is None
    assert mean_with_interval([]) == {"mean": None, "interval": None}


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    """A judge that only likes length: the policy writes longer answers and wins 0.8 of the time, but at equal
    length it would win half — the length-controlled estimate must say about 0.5."""
    rng = np.random.default_rng(0)
    diff = rng.normal(40, 30, 2000)  # the policy is ~40 words longer
    p_win = 1 / (1 + np.exp(-(0.0 + 3.0 * np.tanh(diff / diff.std()))))
    prefs = (rng.random(2000) < p_win).astype(float)
    assert prefs.mean() > 0.75
    assert length_controlled_win_rate(prefs, diff) == pytest.approx(0.5, abs=0.05)
    result = length_controlled(prefs, diff)
    assert result["length_slope"] == pytest.approx(3.0, rel=0.2)
    assert result["interval"][0] < 0.5 < result["interval"][1]


def test_length_controlled_win_rate_keeps_a_real_quality_effect():
    """Better at equal length (true intercept log 3: 0.75) and also longer: the estimate recovers 0.75."""
    rng = np.random.default_rng(2)
    diff = rng.normal(20, 30, 3000)
    p_win = 1 / (1 + np.exp(-(math.log(3) + 1.0 * np.tanh(diff / diff.std()))))
    prefs = (rng.random(3000) < p_win).astype(float)
    assert length_controlled_win_rate(prefs, diff) == pytest.approx(0.75, abs=0.04)


def test_length_controlled_win_rate_without_length_differences_is_the_win_rate():
    prefs = [1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 1.0]
    assert length_controlled_win_rate(prefs, [0.0] * 8) == pytest.approx(np.mean(prefs), abs=0.01)
    assert length_controlled_win_rate([], []) is None
    assert 0.9 < length_controlled_win_rate([1.0] * 10, list(range(10))) <= 1.0  # all wins: finite, near 1


def test_best_of_n_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    assert all(best_of_n_kl(2 * n) > best_of_n_kl(n) for n in (1, 2, 4, 8))


def test_best_of_n_expectation_equals_the_average_over_every_subset():
    rng = np.random.default_rng(3)
    proxy, gold = rng.normal(size=7).tolist(), rng.normal(size=7).tolist()
    for n in range(1, 8):
        subsets = list(itertools.combinations(range(7), n))
        brute = np.mean([gold[max(s, key=lambda i: proxy[i])] for s in subsets])
        assert best_of_n_expected(proxy, gold, n) == pytest.approx(brute)
    assert best_of_n_expected(proxy, gold, 1) == pytest.approx(np.mean(gold))
    assert best_of_n_expected(proxy, gold, 7) == pytest.approx(gold[int(np.argmax(proxy))])
    with pytest.raises(ValueError):
        best_of_n_expected(proxy, gold, 8)


def test_kl_estimate_is_the_mean_log_ratio():
    policy = [[-1.0, -2.0], [-3.0, -1.0]]
    reference = [[-2.0, -2.5], [-3.0, -2.0]]
    # per prompt: mean(1, 0.5) = 0.75, mean(0, 1) = 0.5 -> 0.625
    assert kl_estimate(policy, reference)["mean"] == pytest.approx(0.625)
    assert kl_estimate([[-1.0], []], [[-1.5], []])["mean"] == pytest.approx(0.5)  # prompts without samples drop
