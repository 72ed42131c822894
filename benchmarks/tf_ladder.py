"""Cold and warm seconds of the TF/KerasCV recipes, each in a fresh process (so cold starts are honest).

    python benchmarks/tf_ladder.py                       # tiny, ladder + savedmodel, 10 steps, bs1, CPU
    python benchmarks/tf_ladder.py --recipes fp32 mp16-xla --steps 25 --batch-size 3 --device cuda

Prints one JSON line per recipe (build, cold = first ``generate()``, warm median of ``--repeat`` calls,
per-component breakdown, peak memory, compile info), then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["ladder", "savedmodel"]


def run_one(tag: str, preset: str, steps: int, batch_size: int, device: str, repeat: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from diffperf.cases import Case
    from pipelines.tf_recipes import KerasRecipe

    case = Case("tf", KerasRecipe.from_tag(tag), preset, device=device, steps=steps, batch_size=batch_size)
    t0 = time.perf_counter()
    from pipelines import kerascv_sd

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner = kerascv_sd.build(case)
    build_s = time.perf_counter() - t0
    try:
        runner.memory.reset()
        t0 = time.perf_counter()
        runner.generate()
        runner.synchronize()
        cold_s = time.perf_counter() - t0
        cold_peak = runner.memory.peak_bytes()
        _, breakdown = runner.generate_instrumented()
        runner.memory.reset()
        warm = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            runner.generate()
            runner.synchronize()
            warm.append(time.perf_counter() - t0)
        return dict(
            recipe=tag, case=case.id, import_s=import_s, build_s=build_s, cold_s=cold_s,
            warm_median_s=statistics.median(warm), warm_s=warm, breakdown=breakdown.as_dict(),
            cold_peak_bytes=cold_peak, warm_peak_bytes=runner.memory.peak_bytes(),
            memory_kind=runner.memory.kind, compile_info=runner.compile_info(),
        )
    finally:
        runner.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", default=DEFAULT, help="tags or named sets (default: ladder savedmodel)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.preset, args.steps, args.batch_size, args.device,
                                             args.repeat), default=str), flush=True)
        return

    sys.path.insert(0, str(ROOT))
    from diffperf.cases import resolve_recipes

    results = []
    for recipe in resolve_recipes("tf", args.recipes):
        cmd = [sys.executable, __file__, "--one", recipe.tag(), "--preset", args.preset, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--device", args.device, "--repeat", str(args.repeat)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            res = {"recipe": recipe.tag(), "error": " | ".join(tail)}
        else:
            res = json.loads(lines[-1][len("RESULT "):])
        print(json.dumps(res, default=str), flush=True)
        results.append(res)

    print(f"\n{'recipe':<24}{'build s':>10}{'cold s':>10}{'warm s':>10}{'export s':>10}{'load s':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['recipe']:<24}  ERROR {r['error'][:200]}")
            continue
        ci = r["compile_info"]
        print(f"{r['recipe']:<24}{r['build_s']:>10.2f}{r['cold_s']:>10.2f}{r['warm_median_s']:>10.3f}"
              f"{ci.get('export_s', float('nan')):>10.2f}{ci.get('load_s', float('nan')):>10.2f}")


if __name__ == "__main__":
    main()
