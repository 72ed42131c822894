"""A fixed CPU workload timed before and after each CPU case's rounds: how fast the machine ran at the time.

Note: a shared runner's speed drifts by more than a gate's tolerance over minutes to hours. Measured here
(2-core EPYC VM), the tiny pipelines and this workload went 15-20 % slower together for stretches of
seconds to tens of minutes, while a SHA-256 workload did not move (the slowdown hits vector math, not
the whole CPU). So the reference is vector math like the pipelines: float32 matmuls through torch on the
suite's threads. The gate rescales a run's rounds by ``baseline reference / this run's reference`` only
when both were measured by the same workload on the same torch build and thread count
(:func:`identity`); a torch upgrade therefore turns the rescaling off instead of hiding what the upgrade
did. It is measured outside the timed rounds (10 calls before the warmup, 10 after the rounds), so it
never sits between two timed calls, and only when torch is already loaded (importing it for this alone
would add torch to the peak RSS of a TF- or JAX-only run).
"""

from __future__ import annotations

import statistics
import time

SIZE = 384
MATMULS = 20
CALLS = 10  # before the warmup rounds, and again after the timed rounds

_cache: dict = {}


def _torch():
    import sys

    return sys.modules.get("torch")


def identity() -> str | None:
    """What a reference time is comparable with: the workload, torch version and thread count (None without torch loaded)."""
    torch = _torch()
    if torch is None:
        return None
    return f"torch {torch.__version__} float32 mm {SIZE}x{SIZE} x{MATMULS}, {torch.get_num_threads()} threads"


def time_once() -> float:
    """Seconds of one reference call."""
    torch = _torch()
    if "a" not in _cache:
        g = torch.Generator().manual_seed(0)
        _cache["a"] = torch.randn(SIZE, SIZE, generator=g)
    a = _cache["a"]
    t0 = time.perf_counter()
    for _ in range(MATMULS):
        torch.mm(a, a)
    return time.perf_counter() - t0


def sample(calls: int = CALLS) -> list[float]:
    """``calls`` reference times (empty when torch is not loaded)."""
    if _torch() is None:
        return []
    return [time_once() for _ in range(calls)]


def summarize(samples: list[float]) -> dict | None:
    """The record's ``reference`` block: identity, samples and their median (None when nothing was measured)."""
    if not samples:
        return None
    return {"identity": identity(), "samples_s": samples, "median_s": statistics.median(samples)}
