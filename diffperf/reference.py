"""A fixed CPU workload timed before and after each CPU case's rounds: how fast the machine ran at the time.

Note: a shared runner's speed drifts by more than a gate's tolerance over minutes to hours. Measured here
(2-core EPYC VM), the tiny pipelines went 10-20 % slower for stretches of seconds to tens of minutes;
a SHA-256 workload did not move, float32 matmuls moved with them (correlation 0.89 over 4 minutes of
interleaved calls) and a 64 MiB copy did best (0.92; the pipeline-to-reference ratio varied 1.5 % where
the pipeline alone varied 3 %). So the reference is both, through torch on the suite's threads. The gate rescales a run's rounds by ``baseline reference / this run's reference`` only
when both were measured by the same workload on the same torch build and thread count
(:func:`identity`); a torch upgrade therefore turns the rescaling off instead of hiding what the upgrade
did. It is measured outside the timed rounds (10 calls before the warmup, 10 after the rounds), so it
never sits between two timed calls, and only when torch is already loaded (importing it for this alone
would add torch to the peak RSS of a TF- or JAX-only run).
"""

from __future__ import annotations

import statistics
import time

MODES = ("report", "rescale", "off")  # what --perf-reference does with it
SIZE = 384
MATMULS = 10
STREAM_MIB = 64
COPIES = 2
CALLS = 10  # before the warmup rounds, and again after the timed rounds

def _torch():
    import sys

    return sys.modules.get("torch")


def identity() -> str | None:
    """What a reference time is comparable with: the workload, torch version and thread count (None without torch loaded)."""
    torch = _torch()
    if torch is None:
        return None
    return (f"torch {torch.__version__} float32 mm {SIZE}x{SIZE} x{MATMULS} + {STREAM_MIB} MiB copy x{COPIES}, "
            f"{torch.get_num_threads()} threads")


def _buffers(torch) -> dict:
    g = torch.Generator().manual_seed(0)
    src = torch.randn(STREAM_MIB << 18, generator=g)  # float32: 4 bytes each
    return {"a": torch.randn(SIZE, SIZE, generator=g), "src": src, "dst": torch.empty_like(src)}


def time_parts(buffers: dict) -> tuple[float, float]:
    """Seconds of the matmul part and of the copy part of one reference call."""
    torch = _torch()
    t0 = time.perf_counter()
    for _ in range(MATMULS):
        torch.mm(buffers["a"], buffers["a"])
    t1 = time.perf_counter()
    for _ in range(COPIES):
        buffers["dst"].copy_(buffers["src"])
    return t1 - t0, time.perf_counter() - t1


def sample_parts(calls: int = CALLS) -> list[tuple[float, float]]:
    """``calls`` reference calls as ``(matmul seconds, copy seconds)`` (empty when torch is not loaded).

    The 128 MiB of buffers live only during this call (one untimed call first touches them), so they
    are in no case's peak memory.
    """
    torch = _torch()
    if torch is None:
        return []
    buffers = _buffers(torch)
    time_parts(buffers)
    parts = [time_parts(buffers) for _ in range(calls)]
    del buffers
    return parts


def sample(calls: int = CALLS) -> list[float]:
    """``calls`` reference times, matmul and copy together (empty when torch is not loaded)."""
    return [mm + copy for mm, copy in sample_parts(calls)]


def summarize(samples: list[float]) -> dict | None:
    """The record's ``reference`` block: identity, samples and their median (None when nothing was measured)."""
    if not samples:
        return None
    return {"identity": identity(), "samples_s": samples, "median_s": statistics.median(samples)}
