"""Cold start with an empty vs a warm JAX persistent compilation cache, each in a fresh process.

    python benchmarks/jax_cache.py --preset tiny --steps 2 --recipe fp32-jit --recipe fp32-aot

For each recipe a child process builds the Flax pipeline, makes the first call and a few steady-state calls,
and prints its figures; the parent runs it twice against the same cache folder (a fresh temporary one unless
``--cache-dir`` is given; ``--keep`` keeps what is already there, so both runs are warm). The three compile
figures are kept apart: ``compile_s`` (AOT lower+compile at build, or what jit compiled inside the first
call), ``first_call_s`` (the cold start the harness reports) and ``steady_s`` (median of the later calls).

The device is JAX's default backend (``tpu`` on a TPU VM, ``cuda`` on a GPU) unless ``--device`` names one.
On a TPU VM, the seed's own measurement (SDXL, 25 steps, every chip)::

    python benchmarks/jax_cache.py --preset sdxl --steps 25 --recipe bf16-jit-splithead-alldev --recipe bf16-aot-splithead-alldev
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    from diffperf.cases import Case
    from pipelines import flax_sd
    from pipelines.jax_recipes import FlaxRecipe

    import_s = time.perf_counter() - t0
    device = args.device or default_device()
    case = Case("jax", FlaxRecipe.from_tag(args.recipe), args.preset, device=device, steps=args.steps,
                batch_size=args.batch_size)
    t0 = time.perf_counter()
    try:
        runner = flax_sd.build(case)
    except BaseException as exc:
        if type(exc).__name__ == "Skipped":  # the builder's pytest.skip: this machine cannot run the case
            raise SystemExit(f"{args.recipe} cannot run on {device}: {exc}") from None
        raise
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner.generate()
    first_s = time.perf_counter() - t0
    steady = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        runner.generate()
        steady.append(time.perf_counter() - t0)
    info = runner.compile_info()
    runner.close()
    print("RESULT " + json.dumps({
        "recipe": args.recipe, "import_s": import_s, "build_s": build_s, "first_call_s": first_s,
        "steady_s": statistics.median(steady), "compile_info": info,
    }, default=str), flush=True)


def default_device() -> str:
    """The diffperf device of JAX's default backend (``gpu`` is ``cuda``)."""
    import jax

    backend = jax.default_backend()
    return {"gpu": "cuda"}.get(backend, backend)


def run_child(args: argparse.Namespace, recipe: str, cache_dir: str) -> dict:
    env = dict(os.environ, DIFFPERF_CACHE_DIR=cache_dir, PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--child", "--recipe", recipe, "--preset", args.preset, "--steps",
           str(args.steps), "--batch-size", str(args.batch_size), "--calls", str(args.calls)]
    if args.device:
        cmd += ["--device", args.device]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_wall_s"] = wall
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", help="FlaxRecipe tag (repeatable); default fp32-jit and fp32-aot")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda", "tpu"), default=None,
                   help="device of the case (default: JAX's default backend)")
    p.add_argument("--calls", type=int, default=3, help="steady-state calls after the first")
    p.add_argument("--cache-dir", help="cache folder to use (default: a fresh temporary folder per recipe)")
    p.add_argument("--keep", action="store_true", help="do not empty --cache-dir first")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.recipe = args.recipe[0]
        child(args)
        return 0
    results = []
    for recipe in args.recipe or ["fp32-jit", "fp32-aot"]:
        tmp = None
        if args.cache_dir:
            cache = args.cache_dir
            if not args.keep:
                shutil.rmtree(Path(cache) / "jax", ignore_errors=True)
        else:
            cache = tmp = tempfile.mkdtemp(prefix="diffperf-jax-cache-")
        try:
            for label in ("cold", "warm"):
                r = run_child(args, recipe, cache)
                r["cache"] = label
                results.append(r)
                ci = r["compile_info"]
                print(f"{recipe:<24} {label:<5} build {r['build_s']:7.2f} s  compile {ci.get('compile_s', 0):7.2f} s  "
                      f"first call {r['first_call_s']:7.2f} s  steady {r['steady_s']:7.3f} s  "
                      f"cache hits {ci.get('aot_persistent_cache_hits', 0) + ci.get('first_call_persistent_cache_hits', 0)}"
                      f"  process {r['process_wall_s']:6.1f} s", flush=True)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
