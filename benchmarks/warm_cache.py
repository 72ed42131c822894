"""Bar: ``pytest perf`` with warm compile caches takes at most a third of the cold run's time.

Rerun with::

    python benchmarks/warm_cache.py                 # default CPU matrix, about 6 min on 2 cores
    python benchmarks/warm_cache.py -- -k torch     # anything after -- goes to pytest
    python benchmarks/warm_cache.py --floor         # plus a third, warm run that measures as little as it can

Both runs use a fresh, empty cache folder (``--perf-cache-dir``) and point ``TMPDIR`` into it, because
inductor keeps its precompiled C++ header in ``$TMPDIR/torchinductor_$USER`` whatever the cache folder is:
the first run is as cold as on a new machine, the second finds every cache the first one filled. Prints
the wall time of each run, their ratio, and per case the build, cold-start and measured seconds, so the
part a warm cache removes (compile, autotune, cache fills) stands apart from the part every run pays.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffperf.fileio import atomic_write_text  # noqa: E402


FLOOR_ARGS = ["--perf-rounds=1", "--perf-warmup-rounds=0", "--perf-no-fidelity", "--perf-reference=off",
              "-k", "not harness_median"]


def run_suite(cache: Path, out_json: Path, pytest_args: list[str]) -> dict:
    """One ``pytest perf`` run against ``cache``: wall seconds, exit code and each benchmark's figures."""
    tmp = cache / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp))
    cmd = [sys.executable, "-m", "pytest", "perf", "-q", "-p", "no:randomly", f"--perf-cache-dir={cache}",
           f"--benchmark-json={out_json}", *pytest_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cases = {}
    if out_json.exists():
        for b in json.loads(out_json.read_text())["benchmarks"]:
            info = b.get("extra_info") or {}
            if "build_s" in info:
                cases[info["case"]["id"] if isinstance(info.get("case"), dict) else b["name"]] = {
                    "framework": info.get("framework"), "build_s": info["build_s"],
                    "cold_start_s": info["cold_start_s"], "median_s": info["median_s"], "rounds": info["rounds"],
                }
    return {"wall_s": wall, "returncode": proc.returncode, "cases": cases, "tail": proc.stdout[-2000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="reports/warm_cache.json", help="where the figures go (default %(default)s)")
    p.add_argument("--floor", action="store_true",
                   help="also time a warm run with the least measuring (default: off)")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="diffperf-warm-cache-") as tmp:
        cache = Path(tmp) / "cache"
        cold = run_suite(cache, Path(tmp) / "cold.json", a.pytest_args)
        print(f"cold run: {cold['wall_s']:.1f} s (exit {cold['returncode']})", file=sys.stderr, flush=True)
        warm = run_suite(cache, Path(tmp) / "warm.json", a.pytest_args)
        print(f"warm run: {warm['wall_s']:.1f} s (exit {warm['returncode']})", file=sys.stderr, flush=True)
        floor = run_suite(cache, Path(tmp) / "floor.json", [*a.pytest_args, *FLOOR_ARGS]) if a.floor else None
    ratio = warm["wall_s"] / cold["wall_s"]
    lines = [f"cold {cold['wall_s']:.1f} s, warm {warm['wall_s']:.1f} s: warm/cold = {ratio:.2f} (bar: <= 0.33)", "",
             f"{'case':<52} {'build cold':>10} {'build warm':>10} {'first call cold':>15} {'first call warm':>15}"]
    cold_only = 0.0
    for case, c in cold["cases"].items():
        w = warm["cases"].get(case, {})
        lines.append(f"{case:<52} {c['build_s']:>10.1f} {w.get('build_s', float('nan')):>10.1f} "
                     f"{c['cold_start_s']:>15.1f} {w.get('cold_start_s', float('nan')):>15.1f}")
        cold_only += (c["build_s"] + c["cold_start_s"]) - (w.get("build_s", 0.0) + w.get("cold_start_s", 0.0))
    lines += ["", f"build + first call saved by the warm caches: {cold_only:.1f} s; paid by both runs: "
              f"{warm['wall_s']:.1f} s (imports, tracing, Keras layer builds, warmup, rounds, breakdown, reference, "
              "fidelity, the harness-accuracy check)"]
    if floor:
        lines += [f"warm floor (least measuring: {' '.join(FLOOR_ARGS)}): {floor['wall_s']:.1f} s "
                  f"(exit {floor['returncode']}) = {floor['wall_s'] / cold['wall_s']:.2f} of the cold run"]
    print("\n".join(lines))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"cold": cold, "warm": warm, "floor": floor, "ratio": ratio}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0 if all(r["returncode"] == 0 for r in (cold, warm, floor) if r) else 1


if __name__ == "__main__":
    raise SystemExit(main())
