"""Where a harness-vs-bare difference comes from: round order and garbage collection, measured.

Runs the tiny fp32-sdpa pipeline through ``benchmark.pedantic`` with a bare ``perf_counter`` round beside
each harness round, as ``perf/test_harness_accuracy.py`` does, in three arrangements: the bare round
always first (that test's old design), random order, and random order with the collector off during
both rounds. A ``gc.callbacks`` hook charges each collection (its generation and seconds) to the side
whose round was running. Prints, per arrangement, the median paired ratio harness/bare and the GC
seconds and collections on each side.

    python benchmarks/harness_overhead.py [--pairs 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TEST = r'''
import gc, json, os, random, time
import numpy as np
import pytest
from diffperf.timing import synchronized

PAIRS = int(os.environ["HO_PAIRS"])
ARR = os.environ["HO_ARRANGEMENT"]
GC = {"side": None, "t0": 0.0, "log": []}

def _cb(phase, info):
    if phase == "start":
        GC["t0"] = time.perf_counter()
    elif GC["side"] is not None:
        GC["log"].append((GC["side"], info["generation"], time.perf_counter() - GC["t0"]))

def test_overhead(benchmark):
    from diffperf.api import build_pipeline
    runner = build_pipeline("fp32-sdpa", preset="tiny")
    rng = random.Random(0)
    order = ["bare" if ARR == "bare-first" else rng.choice(("bare", "harness")) for _ in range(PAIRS)]
    bare, it, done = [], iter(order), [0]
    def bare_round():
        if ARR == "no-gc":
            gc.disable()
        GC["side"] = "bare"
        runner.synchronize(); t = time.perf_counter(); runner.generate(); runner.synchronize()
        bare.append(time.perf_counter() - t)
        GC["side"] = None
        gc.enable()
    def setup():
        if len(bare) < done[0]:
            bare_round()
        done[0] += 1
        if next(it) == "bare":
            bare_round()
        runner.synchronize()
        GC["side"] = "harness"
        if ARR == "no-gc":
            gc.disable()
    target = synchronized(runner.generate, runner.synchronize)
    def timed():
        try:
            return target()
        finally:
            GC["side"] = None
            gc.enable()
    for _ in range(3):
        runner.generate()
    gc.callbacks.append(_cb)
    try:
        benchmark.pedantic(timed, setup=setup, rounds=PAIRS, warmup_rounds=0, iterations=1)
        if len(bare) < PAIRS:
            bare_round()
    finally:
        gc.callbacks.remove(_cb)
        runner.close()
    h = np.asarray(benchmark.stats.stats.data)
    out = {"ratio": float(np.exp(np.median(np.log(h / np.asarray(bare))))), "harness_median": float(np.median(h)),
           "bare_median": float(np.median(bare))}
    for side in ("bare", "harness"):
        ev = [e for e in GC["log"] if e[0] == side]
        out[side + "_gc_s"] = sum(e[2] for e in ev)
        out[side + "_gc_by_gen"] = [sum(1 for e in ev if e[1] == g) for g in range(3)]
    open(os.environ["HO_OUT"], "w").write(json.dumps(out))
'''


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=40, help="pairs per run. Default: 40.")
    p.add_argument("--repeats", type=int, default=3, help="runs per arrangement. Default: 3.")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        test = Path(tmp) / "test_overhead.py"
        test.write_text(TEST)
        print(f"{'arrangement':<12} {'ratio':>7} {'bare GC s':>10} {'harness GC s':>13}  collections gen0/1/2 bare | harness")
        for rep in range(args.repeats):
            for arr in ("bare-first", "random", "no-gc"):
                out = Path(tmp) / f"{arr}-{rep}.json"
                env = {"HO_PAIRS": str(args.pairs), "HO_ARRANGEMENT": arr, "HO_OUT": str(out)}
                subprocess.run([sys.executable, "-m", "pytest", str(test), "-q", "-p", "no:cacheprovider",
                                "--rootdir", str(REPO), "-p", "diffperf.plugin", "-c", "/dev/null"],
                               env={**__import__("os").environ, **env}, cwd=REPO, check=True,
                               stdout=subprocess.DEVNULL)
                r = json.loads(out.read_text())
                print(f"{arr:<12} {r['ratio']:>7.4f} {r['bare_gc_s']:>10.4f} {r['harness_gc_s']:>13.4f}  "
                      f"{r['bare_gc_by_gen']} | {r['harness_gc_by_gen']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
