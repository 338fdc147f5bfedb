"""rag.metrics: answer matching on tricky strings, Wilson intervals and McNemar against hand-computed values."""

from __future__ import annotations

import pytest

from rag.metrics import (
    best_subspan_em,
    brier_score,
    contains_answer,
    exact_match,
    expected_calibration_error,
    mcnemar,
    normalize_answer,
    rate,
    roc_auc,
    wilson_interval,
)


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  a   Tale of Two  Cities. ", "tale of two cities"),
    ("Anaheim, the Angels", "anaheim angels"),  # "an" inside a word stays
    ("“Hey Jude” — The Beatles", "hey jude beatles"),  # Unicode quotes and dashes are punctuation too
    ("Wilhelm Conrad Röntgen", "wilhelm conrad röntgen"),  # accented letters are kept
    ("U.S.A.", "usa"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("prediction, answers, expected", [
    ("The Eiffel Tower.", ["eiffel tower"], 1.0),
    ("It was Wilhelm Conrad Röntgen, in 1901.", ["Wilhelm Conrad Röntgen"], 1.0),
    ("Röntgen", ["Wilhelm Conrad Röntgen"], 0.0),  # the alias must be inside the output, not the reverse
    ("I am not sure.\nParis", ["Paris"], 0.0),  # only the first line counts
    ("\n\nParis is the capital.", ["Paris"], 1.0),  # leading blank lines are not the answer line
    ("In the 1901s", ["1901"], 1.0),  # a substring, as in the paper
    ("anything", ["", "  "], 0.0),  # aliases that normalise to nothing never match
    ("the answer is A Tale of Two Cities", ["tale of two cities"], 1.0),
    ("", ["Paris"], 0.0),
])
def test_best_subspan_em(prediction, answers, expected):
    assert best_subspan_em(prediction, answers) == expected


def test_exact_match_and_contains_answer():
    assert exact_match("Paris.", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("The Paris", ["paris"]) == 1.0
    assert contains_answer("Born in 1901 in Lennep.", ["1901"])
    assert not contains_answer("Code 19012.", ["1901"])  # whole words only, unlike best_subspan_em
    assert not contains_answer("Parisian cafes", ["Paris"])


def test_wilson_interval_hand_computed():
    # p = 0.8, n = 10, z = 1.96: center (0.8 + 0.19208) / 1.38416, half 1.96 * sqrt(0.016 + 0.009604) / 1.38416
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4)
    assert high == pytest.approx(0.94333, abs=1e-4)
    low, high = wilson_interval(0, 10)  # (0, z^2 / (n + z^2))
    assert low == 0.0 and high == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(10 / 13.8415, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_mcnemar_hand_computed():
    # b = 1 (first right only), c = 6: exact two-sided p = 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125
    first = [True] * 1 + [False] * 6 + [True] * 5 + [False] * 3
    second = [False] * 1 + [True] * 6 + [True] * 5 + [False] * 3
    result = mcnemar(first, second)
    assert (result["only_first"], result["only_second"]) == (1, 6)
    assert result["p_value"] == pytest.approx(0.125)
    assert result["statistic"] == pytest.approx(16 / 7)
    assert mcnemar([False] * 5, [True] * 5)["p_value"] == pytest.approx(0.0625)  # 2 / 2^5
    balanced = mcnemar([True, True, True, False, False, False], [False, False, False, True, True, True])
    assert balanced["p_value"] == 1.0  # 2 * 42/64 > 1 is capped
    assert mcnemar([True, False], [True, False]) == {"only_first": 0, "only_second": 0, "p_value": 1.0,
                                                     "statistic": 0.0}
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_probability_metrics():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.2, 0.3], [1, 1]) is None
    # two bins: [0.1, 0.2] with rate 0 -> |0.15 - 0| * 2/4; [0.9, 0.9] with rate 1/2 -> |0.9 - 0.5| * 2/4
    assert expected_calibration_error([0.1, 0.2, 0.9, 0.9], [0, 0, 1, 0]) == pytest.approx(0.075 + 0.2)
    assert brier_score([1.0, 0.0, 0.5], [1, 0, 1]) == pytest.approx(0.25 / 3)


def test_rate_keeps_undetermined_apart():
    result = rate([1.0, 0.0, None, True, None])
    assert result["rate"] == pytest.approx(2 / 3) and result["n"] == 3 and result["undetermined"] == 2
    assert result["ci95"] == list(wilson_interval(2, 3))
    empty = rate([None, None])
    assert empty["rate"] is None and empty["ci95"] == [0.0, 1.0] and empty["undetermined"] == 2
