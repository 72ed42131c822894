"""Project issue 11's bar for A/B across process pairs from measured single-pair A/B runs.

Rerun with::

    python benchmarks/ab_replicate_projection.py benchmarks/data/ab_calibration_9b2ff74.json

``benchmarks/ab_calibration.py`` with one process pair a side (``--perf-ab-processes 1``, or a report from
before process pairs existed) gives, for each run and case, the ratio of one head process against one base
process: the change plus that pair's offset, measured; a replicated report gives one such ratio per
process pair (``block_ratios``). This script draws such ratios at random (with
replacement, per case and condition) as the process pairs of a replicated A/B and runs them through the
suite's own rule (:func:`diffperf.ab_replicate.combine`, at least 2 pairs for "unchanged" and 3 for a
change, at most ``--processes``), each pair with the standard error a pair stops at
(:func:`diffperf.ab_replicate.pair_done`: ``--pair-se``). It prints, per case, the share of A/A verdicts
"regressed", of A/B verdicts "regressed", and the mean number of process pairs. It is a projection from
measured offsets, not a measurement of the replicated runs (``ab_calibration.py`` is that).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffperf import ab, ab_replicate  # noqa: E402


def _pair(ratio: float, se: float, tolerance: float, alpha: float, process_cv: float) -> ab.PairedComparison:
    return ab.PairedComparison("inconclusive", ratio, ratio * math.exp(-2.6 * se), ratio * math.exp(2.6 * se),
                               1 - alpha, 0.5, 0.5, 30, 0.0, tolerance, alpha, process_cv, se)


def project(pool: list[float], rng: np.random.Generator, *, trials: int, most: int, pair_se: float, tolerance: float,
            alpha: float, process_cv: float) -> tuple[float, float]:
    """(share "regressed", mean process pairs) over ``trials`` replicated A/Bs drawn from ``pool``."""
    regressed, pairs = 0, 0
    for _ in range(trials):
        blocks = []
        while True:
            blocks.append(_pair(float(rng.choice(pool)), pair_se, tolerance, alpha, process_cv))
            cmp = ab_replicate.combine(blocks, tolerance=tolerance, alpha=alpha, process_cv=process_cv)
            if len(blocks) >= most or (len(blocks) >= ab_replicate.MIN_PROCESSES and cmp.decided):
                break
        regressed += cmp.verdict == "regressed"
        pairs += len(blocks)
    return regressed / trials, pairs / trials


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="an ab_calibration.py report (JSON)")
    p.add_argument("--processes", type=int, default=ab_replicate.DEFAULT_PROCESSES,
                   help=f"most process pairs (default {ab_replicate.DEFAULT_PROCESSES})")
    p.add_argument("--pair-se", type=float, default=ab.PROCESS_CV,
                   help=f"standard error of one pair's log-ratio (default {ab.PROCESS_CV}, where pair_done stops at a 3%% tolerance)")
    p.add_argument("--process-cv", type=float, default=ab.PROCESS_CV, help=f"--perf-ab-process-cv (default {ab.PROCESS_CV})")
    p.add_argument("--alpha", type=float, default=0.01, help="--perf-alpha (default 0.01)")
    p.add_argument("--trials", type=int, default=2000, help="replicated A/Bs drawn per case and condition (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    a = p.parse_args(argv)
    try:
        report = json.loads(Path(a.report).read_text())
        tolerance = float(report["tolerance"])
        pools: dict[tuple[str, str], list[float]] = defaultdict(list)
        for run in report["runs"]:
            for case, v in run["cases"].items():
                if v.get("block_ratios"):  # a replicated run: each of its process pairs is one measured pair
                    pools[(case, run["condition"])] += [float(r) for r in v["block_ratios"]]
                elif v.get("ab_ratio") and (v.get("processes") or 1) == 1:
                    pools[(case, run["condition"])].append(float(v["ab_ratio"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        p.error(f"{a.report}: not an ab_calibration.py report ({type(exc).__name__}: {exc})")
    if not pools:
        p.error(f"{a.report}: no A/B ratios in it")
    rng = np.random.default_rng(a.seed)
    print(f"report {a.report}: commit {str(report.get('commit_a'))[:12]}, tolerance {tolerance:.0%}, "
          f"at most {a.processes} process pairs, pair se {a.pair_se:.1%}, alpha {a.alpha}")
    print(f"{'case':32} {'condition':9} {'runs':>4} {'offset sd':>9} {'regressed':>9} {'pairs':>5}")
    for (case, cond), pool in sorted(pools.items()):
        share, mean_pairs = project(pool, rng, trials=a.trials, most=a.processes, pair_se=a.pair_se,
                                    tolerance=tolerance, alpha=a.alpha, process_cv=a.process_cv)
        sd = float(np.std(np.log(pool), ddof=1)) if len(pool) > 1 else float("nan")
        print(f"{case:32} {cond:9} {len(pool):>4} {sd:>9.2%} {share:>9.1%} {mean_pairs:>5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
