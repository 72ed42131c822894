"""Statistics for the regression gate: median-ratio bootstrap, Mann-Whitney U, noise and power, change points.

Everything here is pure (numbers in, numbers out) and seeded, so a verdict is reproducible from the samples.

Note: latency samples are right-skewed and carry outliers (a preempted round, a GC pause), so the effect
size is the ratio of *medians* and its confidence interval comes from a percentile bootstrap that
resamples both sides; significance comes from a one-sided Mann-Whitney U test, which assumes nothing
about the shape of the distributions. Noise and power use robust scales (MAD) for the same reason.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats as _st

DEFAULT_BOOT = 2000
DEFAULT_SEED = 20240229
_MAD_TO_SD = 1.4826  # MAD of a normal distribution times this is its standard deviation


def _arr(samples: Sequence[float]) -> np.ndarray:
    a = np.asarray(samples, dtype=float).ravel()
    if a.size == 0:
        raise ValueError("no samples")
    if not np.all(np.isfinite(a)):
        raise ValueError("samples must be finite numbers")
    return a


def cv(samples: Sequence[float]) -> float:
    """Coefficient of variation: sample standard deviation over mean (0 for fewer than two samples)."""
    a = _arr(samples)
    if a.size < 2 or a.mean() == 0:
        return 0.0
    return float(a.std(ddof=1) / a.mean())


def robust_cv(samples: Sequence[float]) -> float:
    """Noise that outliers do not dominate: scaled MAD over median (0 for fewer than two samples)."""
    a = _arr(samples)
    med = float(np.median(a))
    if a.size < 2 or med == 0:
        return 0.0
    return float(_MAD_TO_SD * np.median(np.abs(a - med)) / med)


def bootstrap_medians(samples: Sequence[float], n_boot: int = DEFAULT_BOOT, rng: np.random.Generator | None = None) -> np.ndarray:
    """``n_boot`` bootstrap replicates of the median (vectorized: one index matrix, one ``np.median``)."""
    a = _arr(samples)
    rng = rng if rng is not None else np.random.default_rng(DEFAULT_SEED)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    return np.median(a[idx], axis=1)


@dataclasses.dataclass(frozen=True)
class RatioCI:
    ratio: float  # median(head) / median(base)
    low: float
    high: float
    confidence: float


def median_ratio_ci(head: Sequence[float], base: Sequence[float], confidence: float = 0.95,
                    n_boot: int = DEFAULT_BOOT, seed: int = DEFAULT_SEED) -> RatioCI:
    """Median ratio head/base with a two-sided percentile bootstrap confidence interval (both sides resampled)."""
    h, b = _arr(head), _arr(base)
    rng = np.random.default_rng(seed)
    ratios = bootstrap_medians(h, n_boot, rng) / bootstrap_medians(b, n_boot, rng)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(ratios, [tail, 100.0 - tail])
    return RatioCI(float(np.median(h) / np.median(b)), float(low), float(high), confidence)


def mann_whitney_p(head: Sequence[float], base: Sequence[float], alternative: str = "greater") -> float:
    """One-sided Mann-Whitney U p-value; ``"greater"`` tests that head rounds are slower than base rounds."""
    h, b = _arr(head), _arr(base)
    if h.size < 2 or b.size < 2:
        return 1.0
    if np.ptp(np.concatenate([h, b])) == 0:
        return 1.0
    return float(_st.mannwhitneyu(h, b, alternative=alternative, method="auto").pvalue)


def _z(p: float) -> float:
    return float(_st.norm.ppf(p))


def log_median_se(samples: Sequence[float], n_boot: int = 500, seed: int = DEFAULT_SEED) -> float:
    """Bootstrap standard error of ``log(median(samples))``."""
    a = _arr(samples)
    if a.size < 2:
        return float("inf")
    return float(np.std(np.log(bootstrap_medians(a, n_boot, np.random.default_rng(seed))), ddof=1))


def min_detectable_slowdown(samples: Sequence[float], baseline_samples: Sequence[float] | None = None,
                            alpha: float = 0.05, power: float = 0.8, n_boot: int = 500,
                            seed: int = DEFAULT_SEED) -> float:
    """The smallest relative slowdown (0.07 = 7%) these rounds detect with probability ``power`` at ``alpha``.

    Method: the standard error of the log median ratio is ``sqrt(se_h**2 + se_b**2)``, each ``se`` the
    bootstrap standard error of a side's log median (a side without samples is assumed to look like
    ``samples``: same spread, same number of rounds). A one-sided test at level ``alpha`` then detects a
    shift ``d`` with probability ``power`` when ``log(1 + d) >= (z[1-alpha] + z[power]) * se``.
    """
    se_h = log_median_se(samples, n_boot, seed)
    se_b = se_h if baseline_samples is None else log_median_se(baseline_samples, n_boot, seed + 1)
    se = math.hypot(se_h, se_b)
    if not math.isfinite(se):
        return float("inf")
    return math.expm1((_z(1 - alpha) + _z(power)) * se)


def required_rounds(noise_cv: float, target_slowdown: float, alpha: float = 0.05, power: float = 0.8,
                    tolerance: float = 0.0, min_rounds: int = 5, max_rounds: int = 200,
                    round_seconds: float | None = None, budget_s: float | None = None) -> int:
    """Rounds per side so :func:`compare_samples` flags a ``target_slowdown`` with probability ``power``.

    Normal approximation for the median of each side (variance ``pi/2 * cv**2 / n``), two sides with equal
    rounds, so ``se(log ratio) = cv * sqrt(pi / n)``. Both conditions of the rule must hold: significance,
    ``(z[1-alpha] + z[power]) * se <= log(1 + target)``, and the estimate beyond the tolerance,
    ``z[power] * se <= log((1 + target) / (1 + tolerance / 2))``. Pass :func:`robust_cv` of the rounds seen so
    far. Clamped to ``[min_rounds, max_rounds]`` and, given ``round_seconds`` and ``budget_s``, to the
    rounds the time budget affords (never below ``min_rounds``).
    """
    if target_slowdown <= tolerance / 2 or target_slowdown <= 0:
        raise ValueError("target_slowdown must be positive and above half the tolerance")
    cv_ = max(noise_cv, 0.0)
    n_sig = math.pi * ((_z(1 - alpha) + _z(power)) * cv_ / math.log1p(target_slowdown)) ** 2
    n_tol = math.pi * (_z(power) * cv_ / math.log((1 + target_slowdown) / (1 + tolerance / 2))) ** 2
    n = max(min_rounds, min(max_rounds, math.ceil(max(n_sig, n_tol))))
    if round_seconds and budget_s is not None and round_seconds > 0:
        n = min(n, max(min_rounds, int(budget_s // round_seconds)))
    return int(n)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A head-vs-base verdict on round times."""

    verdict: str  # "regressed" | "improved" | "unchanged" | "inconclusive"
    base_median: float
    head_median: float
    ci: RatioCI
    p_slower: float
    p_faster: float
    tolerance: float
    alpha: float
    min_detectable: float

    @property
    def ratio(self) -> float:
        return self.ci.ratio

    @property
    def p_value(self) -> float:
        return self.p_faster if self.verdict == "improved" else self.p_slower

    def describe(self) -> str:
        return (f"{self.verdict}: base {fmt_seconds(self.base_median)}, head {fmt_seconds(self.head_median)}, "
                f"ratio {self.ratio:.3f} [{self.ci.low:.3f}, {self.ci.high:.3f}], "
                f"p={self.p_value:.3g}, tolerance {self.tolerance:.0%}")


def compare_samples(head: Sequence[float], base: Sequence[float], tolerance: float = 0.10, alpha: float = 0.05,
                    n_boot: int = DEFAULT_BOOT, seed: int = DEFAULT_SEED) -> Comparison:
    """The gate's decision rule on two sets of round times.

    Note: the tolerance is the smallest slowdown the gate must catch, so a rule "point estimate above
    ``1 + tolerance``" would miss half of the slowdowns of exactly that size. Instead:

    * ``regressed``: head is slower (one-sided Mann-Whitney ``p < alpha``), the median ratio's confidence
      interval reaches ``1 + tolerance`` (a slowdown beyond the tolerance cannot be ruled out) and the
      ratio itself is above ``1 + tolerance / 2`` (small, significant drifts do not fail);
    * ``improved``: the mirror image, faster;
    * ``inconclusive``: the ratio is beyond half the tolerance but not significant, or the rounds cannot
      detect a slowdown of the tolerance's size (minimum detectable slowdown above the tolerance);
    * ``unchanged``: otherwise.

    The interval only knows the noise *within* each run, not how the machine's speed drifted between the
    baseline's run and this one; that drift is what :mod:`diffperf.reference` measures, and what the gate
    reports (or, with ``--perf-reference rescale``, rescales away) next to this verdict.
    """
    h, b = _arr(head), _arr(base)
    ci = median_ratio_ci(h, b, 1 - alpha if alpha < 0.5 else 0.95, n_boot, seed)
    p_slow = mann_whitney_p(h, b, "greater")
    p_fast = mann_whitney_p(h, b, "less")
    mds = min_detectable_slowdown(h, b, alpha=alpha, seed=seed)
    half = tolerance / 2
    if p_slow < alpha and ci.high >= 1 + tolerance and ci.ratio > 1 + half:
        verdict = "regressed"
    elif p_fast < alpha and ci.low <= 1 - tolerance and ci.ratio < 1 - half:
        verdict = "improved"
    elif abs(ci.ratio - 1) > half or mds > tolerance:
        verdict = "inconclusive"
    else:
        verdict = "unchanged"
    return Comparison(verdict, float(np.median(b)), float(np.median(h)), ci, p_slow, p_fast, tolerance, alpha, mds)


def change_points(values: Sequence[float], penalty: float | None = None, min_size: int = 2, log: bool = True) -> list[int]:
    """Indices where the level of a series shifts (each index starts a new segment), by optimal partitioning.

    Exact penalized segmentation (the PELT objective, with PELT's pruning): the cost of a segment is its
    sum of squared deviations from its mean, computed on ``log(values)`` when ``log`` (relative changes);
    each extra segment costs ``penalty``, by default ``2 * sigma**2 * log(n)`` (BIC-like), with ``sigma``
    the robust noise of the series (MAD of first differences over sqrt 2).
    """
    x = np.asarray(values, dtype=float)
    if log:
        x = np.log(x)
    n = x.size
    if n < 2 * min_size:
        return []
    if penalty is None:
        d = np.diff(x)
        sigma = _MAD_TO_SD * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2)
        sigma = max(sigma, 1e-3 * max(float(np.std(x)), 1e-12), 1e-9)
        penalty = 2.0 * sigma**2 * math.log(n)
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])

    def cost(i: int, j: int) -> float:  # segment x[i:j]
        m = j - i
        return float(s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / m)

    best = np.full(n + 1, np.inf)
    best[0] = -penalty
    last = np.zeros(n + 1, dtype=int)
    candidates = [0]
    for j in range(min_size, n + 1):
        scored = [(best[i] + cost(i, j), i) for i in candidates if j - i >= min_size]
        if not scored:
            continue
        value, i_best = min(scored)
        best[j], last[j] = value + penalty, i_best
        keep = {i for v, i in scored if v <= best[j]}  # PELT pruning
        candidates = [i for i in candidates if j - i < min_size or i in keep] + [j]
    cps, j = [], n
    while j > 0:
        i = int(last[j])
        if i > 0:
            cps.append(i)
        j = i
    return sorted(cps)


def fmt_seconds(s: float | None) -> str:
    """``0.123 s`` / ``12.3 ms`` / ``45.6 us`` with three significant digits."""
    if s is None or not math.isfinite(s):
        return "n/a"
    for unit, f in (("s", 1.0), ("ms", 1e3), ("us", 1e6)):
        if abs(s) * f >= 1 or unit == "us":
            return f"{s * f:.3g} {unit}"
    return f"{s:.3g} s"  # pragma: no cover


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024.0
    return f"{b:.1f} GiB"  # pragma: no cover
