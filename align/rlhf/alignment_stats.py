"""The statistics of an alignment report: win rates paired by prompt, the sign test, the length-controlled
win rate, best-of-n, KL estimates — each with a 95% interval from a bootstrap over prompts.

Per prompt, a judge scores the policy's response and the baseline's: the policy wins (1), ties (0.5) or
loses (0). The win rate is the mean over prompts; its interval resamples prompts; the sign test asks how
likely so many wins among the untied prompts would be if either side won each with probability 1/2.

Judges that learned from human rankings often prefer longer responses (on OASST, "the longer reply wins"
ranks 0.70 of pairs right), so a policy can "win" by writing more. The length-controlled win rate fits
P(win) = sigmoid(a + b * tanh(Δlength / s)) by maximum likelihood (logistic regression with the ties'
half-wins as targets; s = the standard deviation of Δlength) and reports sigmoid(a): the win rate the
judge would give at equal length (the idea of AlpacaEval 2's length-controlled win rate, without its
per-instruction terms, which need many models per prompt).

Best-of-n (Gao et al. 2022, "Scaling laws for reward model overoptimization"): draw n samples, keep the
one the proxy judge scores highest. Its KL from the sampling policy is log n - (n - 1)/n (the x-axis of
their plots, as its square root), and its expected score under any judge is estimated without bias from
m >= n samples per prompt (every n-subset counted once). Pure Python and numpy: no model in here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

TIE = 1e-6  # scores closer than this are a tie (the same response scores the same)
RESAMPLES = 2000


def bootstrap_interval(columns: Sequence[Sequence[float]], statistic: Callable[..., float], seed: int = 0,
                       resamples: int = RESAMPLES, level: float = 0.95) -> list[float] | None:
    """Percentile interval of `statistic(*columns)` resampling rows (prompts) with replacement: the columns
    are per-prompt values, resampled together. None with fewer than 2 prompts."""
    arrays = [np.asarray(c, dtype=float) for c in columns]
    n = len(arrays[0])
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        index = rng.integers(0, n, n)
        value = statistic(*(a[index] for a in arrays))
        if value is not None and math.isfinite(value):
            draws.append(value)
    if not draws:
        return None
    tail = (1 - level) / 2
    return [float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))]


def mean_with_interval(values: Sequence[float], seed: int = 0) -> dict:
    """{mean, interval}; the mean is None for no values."""
    if len(values) == 0:
        return {"mean": None, "interval": None}
    return {"mean": float(np.mean(values)), "interval": bootstrap_interval([values], np.mean, seed)}


def preferences(policy: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per prompt: 1 when the policy's score is higher, 0.5 for a tie, 0 when the baseline's is."""
    return [0.5 if abs(p - b) <= TIE else float(p > b) for p, b in zip(policy, baseline, strict=True)]


def sign_test(wins: int, losses: int) -> float | None:
    """Two-sided exact sign test: P(a split at least this uneven | each untied prompt is a coin flip). None
    without untied prompts."""
    n = wins + losses
    if n == 0:
        return None
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def win_rate(policy: Sequence[float], baseline: Sequence[float], seed: int = 0) -> dict:
    """Win rate of the policy over the baseline, paired by prompt (ties count half), with its interval, the
    counts and the sign test's p-value."""
    prefs = preferences(policy, baseline)
    wins, losses = prefs.count(1.0), prefs.count(0.0)
    return {"win_rate": float(np.mean(prefs)) if prefs else None,
            "interval": bootstrap_interval([prefs], np.mean, seed),
            "wins": wins, "ties": len(prefs) - wins - losses, "losses": losses, "prompts": len(prefs),
            "sign_test_p": sign_test(wins, losses)}


def _fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, steps: int = 50) -> tuple[float, float]:
    """(a, b) maximising sum y log p + (1 - y) log(1 - p), p = sigmoid(a + b x), minus ridge * (a² + b²) / 2
    (a small ridge keeps the fit finite when every prompt is won). Newton's method."""
    design = np.stack([np.ones_like(x), x], axis=1)
    theta = np.zeros(2)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(design @ theta)))
        gradient = design.T @ (y - p) - ridge * theta
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def length_controlled_win_rate(prefs: Sequence[float], length_diff: Sequence[float]) -> float | None:
    """sigmoid(a) of the fit P(win) = sigmoid(a + b tanh(Δlength / std(Δlength))): the win rate at equal length.
    With no spread in Δlength the length term is dropped (the plain win rate's log-odds, ridge aside)."""
    y = np.asarray(prefs, dtype=float)
    if len(y) == 0:
        return None
    d = np.asarray(length_diff, dtype=float)
    spread = float(d.std())
    x = np.tanh(d / spread) if spread > 0 else np.zeros_like(d)
    a, _ = _fit_logistic(x, y)
    return 1 / (1 + math.exp(-a))


def length_controlled(prefs: Sequence[float], length_diff: Sequence[float], seed: int = 0) -> dict:
    """{lc_win_rate, interval, length_slope}: the length-controlled win rate with its bootstrap interval, and b
    of the fit (how much the judge's preference follows length; 0 = not at all)."""
    if len(prefs) == 0:
        return {"lc_win_rate": None, "interval": None, "length_slope": None}
    d = np.asarray(length_diff, dtype=float)
    spread = float(d.std())
    slope = _fit_logistic(np.tanh(d / spread), np.asarray(prefs, dtype=float))[1] if spread > 0 else None
    return {"lc_win_rate": length_controlled_win_rate(prefs, length_diff),
            "interval": bootstrap_interval([prefs, length_diff], length_controlled_win_rate, seed),
            "length_slope": slope}


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || sampling policy) in nats: log n - (n - 1)/n."""
    return math.log(n) - (n - 1) / n


def best_of_n_expected(proxy: Sequence[float], other: Sequence[float], n: int) -> float:
    """E[other score of the sample the proxy ranks best among n drawn without replacement from these m], exact:
    the sample at rank i (1 = lowest proxy score) is the best of a random n-subset with probability
    C(i-1, n-1) / C(m, n)."""
    m = len(proxy)
    if not 1 <= n <= m:
        raise ValueError(f"best-of-{n} needs at least {n} samples, got {m}")
    order = np.argsort(np.asarray(proxy, dtype=float), kind="stable")
    total = math.comb(m, n)
    weights = [math.comb(i, n - 1) / total for i in range(m)]  # i = rank - 1 samples below
    return float(sum(w * other[j] for w, j in zip(weights, order, strict=True)))


def kl_estimate(policy_logp: Sequence[Sequence[float]], reference_logp: Sequence[Sequence[float]],
                seed: int = 0) -> dict:
    """KL(policy || reference) per response: the mean over prompts of the mean over the policy's own samples of
    log pi(y|x) - log pi_ref(y|x) (unbiased, but a single estimate can be negative), with its interval."""
    per_prompt = [float(np.mean(np.subtract(p, r))) for p, r in zip(policy_logp, reference_logp, strict=True) if p]
    return mean_with_interval(per_prompt, seed)
