"""Per-build speed offsets of one case inside one process: is A/B's between-process offset per process or per build?

Rerun with (alone on the machine; once per process you want to see)::

    python benchmarks/build_offsets.py fp32-classic --builds 4 --rounds 25 --seed 1

Builds ``--builds`` pipelines of the case (tiny preset, CPU) in this process, warms each, then takes
``--rounds`` rounds of every build in a seeded random order per round (so the machine's drift is shared)
and prints each build's median over the builds' geometric mean. Builds that agree within a process while
separate processes differ (``benchmarks/ab_calibration.py``'s A/A ratios) mean the offset is per process.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffperf import api  # noqa: E402
from diffperf.harness import prepare  # noqa: E402
from diffperf.timing import timed_call  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="a torch recipe tag, e.g. fp32-classic")
    p.add_argument("--builds", type=int, default=4, help="pipelines built in this process (default 4)")
    p.add_argument("--rounds", type=int, default=25, help="rounds per build (default 25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the round order (default 0)")
    a = p.parse_args()
    if a.builds < 2 or a.rounds < 3:
        p.error("--builds must be >= 2 and --rounds >= 3")
    case = api.make_case(a.recipe)
    preps = [prepare(case) for _ in range(a.builds)]
    try:
        for prep in preps:
            for _ in range(3):
                timed_call(prep.runner.generate, prep.runner.synchronize)
        times: list[list[float]] = [[] for _ in preps]
        rng = random.Random(a.seed)
        for _ in range(a.rounds):
            order = list(range(len(preps)))
            rng.shuffle(order)
            for i in order:
                times[i].append(timed_call(preps[i].runner.generate, preps[i].runner.synchronize).seconds)
    finally:
        for prep in preps:
            prep.close()
    medians = [statistics.median(t) for t in times]
    centre = math.exp(statistics.mean(math.log(m) for m in medians))
    print(f"{a.recipe}: build medians / their geometric mean: " + " ".join(f"{m / centre:.3f}" for m in medians)
          + f" (centre {centre * 1000:.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
