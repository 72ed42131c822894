"""Per-process speed offsets of one case: K processes of this tree build it, then take rounds in turn.

Rerun with::

    python benchmarks/process_offsets.py                               # default env, fp32-classic tiny
    python benchmarks/process_offsets.py --env default,thp,omp1 --reps 2

Each of ``--processes`` workers (:class:`diffperf.ab.BaseWorker`, this tree, this interpreter) builds the
torch tiny case of ``--recipe`` and is warmed; then ``--rounds`` cycles, each one round of every worker in a
seeded random order. A cycle's log-times are centred on their mean, so the machine's drift cancels, and each
worker's median of those is its offset. The spread of the offsets (sd, in %) next to their own standard error
says how much of two processes' difference is the processes themselves: what ``--perf-ab-process-cv`` and
process pairs (``diffperf/ab_replicate.py``) are for. ``--env`` tries environment settings that might make
processes alike (each applied to every worker of that batch): ``thp`` (PyTorch's ``THP_MEM_ALLOC_ENABLE=1``,
2 MiB pages for large tensors), ``omp1`` (``OMP_NUM_THREADS=1``), ``passive`` (``OMP_WAIT_POLICY=PASSIVE``).
Run it alone: another process on the cores is what it measures against.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from diffperf import ab  # noqa: E402

ENVS = {"default": {}, "thp": {"THP_MEM_ALLOC_ENABLE": "1"}, "omp1": {"OMP_NUM_THREADS": "1"},
        "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def offsets(env_extra: dict, scratch: Path, *, processes: int, rounds: int, recipe: str, seed: int) -> dict:
    """Build the case in ``processes`` workers, take ``rounds`` cycles; each worker's offset and the spread."""
    env = dict(os.environ, **env_extra)
    workers = [ab.BaseWorker(sys.executable, ROOT, scratch / f"w{i}", 600, env=env, side="head")
               for i in range(processes)]
    try:
        for w in workers:
            w.request("hello", 600)
        case = {"framework": "torch", "recipe": recipe, "preset": "tiny", "device": "cpu", "batch_size": 1,
                "steps": 4, "seed": 0}
        for w in workers:
            w.request("build", 1800, case=case)
        for w in workers:
            for _ in range(3):
                w.request("round")
        rng = random.Random(seed)
        times = [[] for _ in workers]
        for _ in range(rounds):
            order = list(range(processes))
            rng.shuffle(order)
            for i in order:
                times[i].append(float(workers[i].request("round")["seconds"]))
    finally:
        for w in workers:
            w.close()
    logs = np.log(np.array(times))
    centred = logs - logs.mean(axis=0, keepdims=True)
    med = np.median(centred, axis=1)
    se = float(np.mean([1.2533 * np.std(x) / math.sqrt(len(x)) for x in centred]))  # s.e. of a median
    return {"offsets": med.tolist(), "sd": float(np.std(med, ddof=1)), "se": se,
            "median_round_s": float(np.median(times))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="default", help=f"comma-separated, from {', '.join(ENVS)} (default: default)")
    p.add_argument("--recipe", default="fp32-classic", help="torch recipe of the tiny case (default fp32-classic)")
    p.add_argument("--processes", type=int, default=6, help="workers per batch (default 6)")
    p.add_argument("--rounds", type=int, default=150, help="cycles of one round per worker (default 150)")
    p.add_argument("--reps", type=int, default=1, help="batches per --env setting (default 1)")
    a = p.parse_args(argv)
    names = a.env.split(",")
    unknown = [n for n in names if n not in ENVS]
    if unknown:
        p.error(f"--env: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(ENVS)}")
    with tempfile.TemporaryDirectory(prefix="process-offsets-") as tmp:
        for rep in range(a.reps):
            for name in names:
                got = offsets(ENVS[name], Path(tmp) / f"{name}{rep}", processes=a.processes, rounds=a.rounds,
                              recipe=a.recipe, seed=rep)
                print(f"{name:8s} {a.recipe} offsets % " + " ".join(f"{100 * m:+.1f}" for m in got["offsets"])
                      + f"  sd {100 * got['sd']:.2f}%  (their own s.e. ~{100 * got['se']:.2f}%)  median round "
                        f"{1000 * got['median_round_s']:.0f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
