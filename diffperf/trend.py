"""``python -m diffperf trend``: change points over saved runs and over baseline histories.

A series is one test's medians in run order: the saved runs of one pytest-benchmark machine folder
(``--storage``), or the history of one baseline entry (``--baselines-dir``). Change points come from
``ruptures`` (PELT on the log medians, least-squares cost), each reported with the two runs, and their
commits, it falls between. Exit status: 1 when the newest segment of a series is slower than the one
before it by more than ``--tolerance``, 2 on bad input, else 0.

Note: PELT finds the segmentation minimizing the segments' squared deviations plus a penalty per change
point. The penalty is ``5 * sigma**2 * log(n)`` with ``sigma`` the series' own noise (RMS of first
differences, the largest left out so one level shift barely moves it, over sqrt 2), so a noisy series
needs a larger shift to show a change point than a quiet one; segments hold at least 3 points. On
simulated series (lognormal noise, 8-30 points) this setting put a change point in 4 % of level series and
found a 4-sigma shift at its exact place in 91 %; the BIC-like ``2 * sigma**2 * log(n)`` with segments of 2
put one in 29 % of level series. ``ruptures`` was chosen over Apache Otava and MongoDB's
``signal-processing-algorithms`` because it installs as a wheel that needs only numpy and scipy; Otava
pins numpy 2.2.0 and pulls in BigQuery, Postgres and Slack clients, and signal-processing-algorithms
requires numpy < 2 and Python 3.11 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

PENALTY_FACTOR = 5.0  # penalty = PENALTY_FACTOR * sigma**2 * log(n); see the module's Note


def noise_sigma(x: np.ndarray) -> float:
    """Point-to-point noise of a series: RMS of its first differences without the largest one, over sqrt 2."""
    d = np.sort(np.abs(np.diff(x)))[:-1]
    return float(math.sqrt(np.mean(d**2) / 2)) if d.size else 0.0


def change_points(values: Sequence[float], penalty: float | None = None, min_size: int = 3, log: bool = True) -> list[int]:
    """Indices where the level of ``values`` shifts (each starts a new segment), by ``ruptures``' PELT.

    ``log``: segment ``log(values)`` (relative changes). ``penalty`` defaults to
    ``PENALTY_FACTOR * sigma**2 * log(n)`` with ``sigma`` the series' own noise (:func:`noise_sigma`).
    """
    import ruptures

    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or not np.all(np.isfinite(x)) or (log and np.any(x <= 0)):
        raise ValueError("change points need a series of finite (positive, with log) numbers")
    if log:
        x = np.log(x)
    n = x.size
    if n < 2 * min_size:
        return []
    if penalty is None:
        sigma = max(noise_sigma(x), 1e-3 * max(float(np.std(x)), 1e-12), 1e-9)
        penalty = PENALTY_FACTOR * sigma**2 * math.log(n)
    algo = ruptures.Pelt(model="l2", min_size=min_size, jump=1).fit(x.reshape(-1, 1))
    return [int(b) for b in algo.predict(pen=penalty) if b < n]


@dataclasses.dataclass(frozen=True)
class Point:
    label: str  # run label (0007@abcdef12) or baseline history date
    commit: str | None
    value: float


@dataclasses.dataclass(frozen=True)
class ChangePoint:
    """A level shift between ``before`` (last point of the old segment) and ``after`` (first of the new)."""

    index: int
    before: Point
    after: Point
    median_before: float  # median of the segment that ends here
    median_after: float  # median of the segment that starts here

    @property
    def ratio(self) -> float:
        return self.median_after / self.median_before

    @property
    def commit_range(self) -> str:
        a, b = (self.before.commit or "?")[:8], (self.after.commit or "?")[:8]
        return f"{a}..{b}"

    def describe(self) -> str:
        return (f"between {self.before.label} and {self.after.label} (commits {self.commit_range}): median "
                f"{self.median_before:.4g} s -> {self.median_after:.4g} s ({self.ratio - 1:+.1%})")


@dataclasses.dataclass
class Series:
    source: str  # "saved runs <folder>" or "baseline <file>"
    test: str
    points: list[Point]

    def changes(self) -> list[ChangePoint]:
        """The change points of this series with the medians of the segments either side."""
        values = [p.value for p in self.points]
        cps = change_points(values)
        bounds = [0, *cps, len(values)]
        segs = [float(np.median(values[a:b])) for a, b in zip(bounds, bounds[1:])]
        return [ChangePoint(cp, self.points[cp - 1], self.points[cp], segs[i], segs[i + 1]) for i, cp in enumerate(cps)]

    def newest_slower(self, tolerance: float) -> ChangePoint | None:
        """The last change point when the newest segment is slower than the one before by more than ``tolerance``."""
        changes = self.changes()
        if changes and changes[-1].ratio > 1 + tolerance:
            return changes[-1]
        return None


def saved_run_series(storage: str | os.PathLike[str], last: int | None = None) -> list[Series]:
    """One series per (machine folder, test) over the saved runs under ``storage`` (unloadable runs: RunError)."""
    from diffperf.compare import load_run, median_of, saved_runs

    by_folder: dict[Path, list[Path]] = {}
    for p in saved_runs(storage):
        by_folder.setdefault(p.parent, []).append(p)
    out = []
    for folder, paths in by_folder.items():
        runs = [load_run(p) for p in (paths[-last:] if last else paths)]
        tests: dict[str, list[Point]] = {}
        for run in runs:
            for test, bench in run.benchmarks.items():
                tests.setdefault(test, []).append(Point(run.label, run.commit_info.get("id"), median_of(bench)))
        out += [Series(f"saved runs {folder}", t, pts) for t, pts in tests.items()]
    return out


def baseline_series(baselines_dir: str | os.PathLike[str], last: int | None = None) -> list[Series]:
    """One series per baseline entry: its history's medians (BaselineError for a file that does not load)."""
    from diffperf.baselines import BaselineStore

    out = []
    for path in sorted(Path(baselines_dir).glob("*.json")):
        store = BaselineStore.load(path)
        for test, entry in sorted(store.entries.items()):
            hist = entry["history"][-last:] if last else entry["history"]
            pts = [Point(f"{(h.get('recorded_at') or '?')[:16]}@{((h.get('commit') or {}).get('id') or '?')[:8]}",
                         (h.get("commit") or {}).get("id"), float(h["median_s"])) for h in hist]
            out.append(Series(f"baseline {path}", test, pts))
    return out


def report(series: Iterable[Series], tolerance: float) -> tuple[list[str], int]:
    """(lines to print, number of series whose newest segment is slower by more than ``tolerance``)."""
    lines, slower = [], 0
    for s in series:
        changes = s.changes()
        flag = s.newest_slower(tolerance)
        slower += flag is not None
        head = f"{s.test} [{s.source}, {len(s.points)} points]: "
        if not changes:
            lines.append(head + ("no change point" if len(s.points) >= 6 else "too few points for change points (6 needed)"))
            continue
        lines.append(head + f"{len(changes)} change point(s)")
        lines += [f"  {c.describe()}" for c in changes]
        if flag is not None:
            lines.append(f"  SLOWER: the newest segment is {flag.ratio - 1:+.1%} against the one before "
                         f"(tolerance {tolerance:.0%}); look at commits {flag.commit_range}")
    return lines, slower


def main(argv: Sequence[str] | None = None) -> int:
    """``trend [--storage DIR] [--baselines-dir DIR] [--tolerance F] [--last N]``."""
    from diffperf.baselines import BaselineError
    from diffperf.compare import RunError

    def fraction(value: str) -> float:
        try:
            f = float(value.rstrip("%")) / (100.0 if value.endswith("%") else 1.0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--tolerance must be a number like 0.1 or 10%, got {value!r}") from None
        if not 0 <= f <= 10:
            raise argparse.ArgumentTypeError(f"--tolerance must be between 0 and 10, got {value!r}")
        return f

    def last_type(value: str) -> int:
        if not value.isdigit() or int(value) < 6:
            raise argparse.ArgumentTypeError(f"--last must be an integer >= 6, got {value!r}")
        return int(value)

    p = argparse.ArgumentParser(prog="python -m diffperf trend", description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", default=".benchmarks", help="pytest-benchmark storage folder. Default: .benchmarks.")
    p.add_argument("--baselines-dir", default="baselines", help="baseline files. Default: baselines.")
    p.add_argument("--tolerance", type=fraction, default=0.10,
                   help="newest segment slower than the one before by more than this fails (exit 1). Default: 10%%.")
    p.add_argument("--last", type=last_type, default=None, help="only the last N points of each series. Default: all.")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        series = saved_run_series(a.storage, a.last) + baseline_series(a.baselines_dir, a.last)
    except (RunError, BaselineError) as exc:
        print(f"diffperf trend: error: {exc}", file=sys.stderr)
        return 2
    if not series:
        print(f"diffperf trend: nothing to analyse (no saved run under {a.storage}, no baseline under {a.baselines_dir})")
        return 0
    lines, slower = report(series, a.tolerance)
    print("\n".join(lines))
    print(f"\n{len(series)} series, {slower} with a slower newest segment")
    return 1 if slower else 0


if __name__ == "__main__":
    raise SystemExit(main())
