"""Statistics for the regression gate: median-ratio bootstrap, Mann-Whitney U, noise and power, between-run spread.

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


MIN_HISTORY = 3  # runs a baseline history needs before the gate uses its between-run spread


def between_run_cv(medians: Sequence[float]) -> float | None:
    """Run-to-run noise of a history: sample standard deviation of ``log(median)`` (``None`` under 2 runs)."""
    a = _arr(medians)
    if a.size < 2:
        return None
    return float(np.std(np.log(a), ddof=1))


@dataclasses.dataclass(frozen=True)
class HistoryComparison:
    """A run's rounds judged against the medians of the baseline's last runs."""

    verdict: str  # "regressed" | "improved" | "unchanged" | "inconclusive"
    center: float  # geometric mean of the history medians
    head_median: float
    runs: int
    between_run_cv: float
    within_se: float  # bootstrap standard error of log(head median)
    margin: float  # log half-width of the one-sided prediction bound (drift the history explains at alpha)
    tolerance: float
    alpha: float

    @property
    def ratio(self) -> float:
        return self.head_median / self.center

    @property
    def explained(self) -> float:
        """The largest ratio the history's run-to-run spread explains at ``alpha`` (upper prediction bound)."""
        return math.exp(self.margin)

    @property
    def min_flaggable(self) -> float:
        """The smallest slowdown (0.3 = 30 %) whose median this rule flags: the prediction bound or the tolerance, the larger."""
        return math.exp(max(self.margin, math.log1p(self.tolerance))) - 1

    def describe(self) -> str:
        return (f"{self.verdict}: history of {self.runs} runs centred on {fmt_seconds(self.center)}, head "
                f"{fmt_seconds(self.head_median)}, ratio {self.ratio:.3f}; run-to-run drift explains up to "
                f"{self.explained:.3f} at alpha {self.alpha:g} (between-run CV {self.between_run_cv:.1%}), "
                f"tolerance {self.tolerance:.0%}; flags from {self.min_flaggable:+.0%}")


def compare_to_history(head: Sequence[float], medians: Sequence[float], tolerance: float = 0.10,
                       alpha: float = 0.01, n_boot: int = 500, seed: int = DEFAULT_SEED) -> HistoryComparison:
    """The gate's rule when the baseline holds the medians of ``MIN_HISTORY`` or more earlier runs.

    Note: a run's median differs from the baseline's by the noise inside the run (1-5 % here) *and* by
    how the machine's speed drifted between runs (5-35 % on a shared VM), which the rounds of two runs
    cannot tell from a regression. The history's medians show that drift. On log medians
    ``m_1..m_n`` (mean ``m``, standard deviation ``s``, ``n - 1`` degrees of freedom), a new unchanged run's
    log median falls below ``m + t[1-alpha, n-1] * s * sqrt(1 + 1/n)`` with probability ``1 - alpha``
    (the one-sided prediction bound of a normal sample). The head run's own noise enters as the bootstrap
    standard error ``se`` of its log median, combined in quadrature: ``margin = sqrt((t s sqrt(1+1/n))**2
    + (z[1-alpha] se)**2)`` (conservative: ``s`` already holds some within-run noise). Then, with
    ``d = log(head median) - m``:

    * ``regressed``: ``d > margin`` and ``d > log(1 + tolerance)``: slower than the drift explains (a false
      alarm at most ``alpha`` of the time) and slower than the tolerance (a significant 3 % drift does not
      fail a 10 % gate); the smallest slowdown flagged is ``exp(max(margin, log(1 + tolerance))) - 1``
      (``min_flaggable``);
    * ``improved``: the mirror image, ``d < -margin`` and ``d < -log(1 + tolerance)``;
    * ``inconclusive``: beyond the tolerance but inside what the drift explains;
    * ``unchanged``: otherwise.
    """
    h, m = _arr(head), _arr(medians)
    if m.size < MIN_HISTORY:
        raise ValueError(f"a history of {m.size} run(s); the between-run rule needs at least {MIN_HISTORY}")
    logs = np.log(m)
    n = logs.size
    s = float(np.std(logs, ddof=1))
    se = log_median_se(h, n_boot, seed) if h.size >= 2 else 0.0
    t = float(_st.t.ppf(1 - alpha, n - 1))
    margin = math.hypot(t * s * math.sqrt(1 + 1 / n), _z(1 - alpha) * se)
    center = float(np.exp(logs.mean()))
    head_med = float(np.median(h))
    d = math.log(head_med / center)
    tol = math.log1p(tolerance)
    if d > max(margin, tol):
        verdict = "regressed"
    elif d < -max(margin, tol):
        verdict = "improved"
    elif abs(d) > tol:
        verdict = "inconclusive"
    else:
        verdict = "unchanged"
    return HistoryComparison(verdict, center, head_med, n, s, se, margin, tolerance, alpha)


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
