"""Synchronized timing primitives shared by every stack.

Every clock read is preceded by a device synchronization, so queued asynchronous work (CUDA streams,
XLA dispatch) is counted in the interval it belongs to. The steady state goes through
``benchmark.pedantic`` with the synchronization as its ``setup`` (before the start read) and inside the
target (before the end read); the first call is timed apart as the cold start.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

Clock = Callable[[], float]


@dataclasses.dataclass
class Timed:
    value: Any
    seconds: float


def timed_call(fn: Callable[[], Any], sync: Callable[[], None], clock: Clock = time.perf_counter) -> Timed:
    """Run ``fn`` once between two synchronized clock reads."""
    sync()
    start = clock()
    value = fn()
    sync()
    return Timed(value, clock() - start)


def synchronized(fn: Callable[[], Any], sync: Callable[[], None]) -> Callable[[], Any]:
    """``fn`` followed by a device synchronization, as one callable (a benchmark target)."""

    def target() -> Any:
        value = fn()
        sync()
        return value

    return target


def steady_state(benchmark, fn: Callable[[], Any], sync: Callable[[], None], rounds: int, warmup_rounds: int) -> Any:
    """Time ``fn`` through ``benchmark.pedantic``: one call per round, synchronized on both sides."""
    return benchmark.pedantic(
        synchronized(fn, sync),
        setup=lambda: sync(),
        rounds=rounds,
        warmup_rounds=warmup_rounds,
        iterations=1,
    )


def bare_loop(fn: Callable[[], Any], sync: Callable[[], None], rounds: int, clock: Clock = time.perf_counter) -> list[float]:
    """The same measurement without pytest-benchmark: a plain ``perf_counter`` loop (for comparison)."""
    return [timed_call(fn, sync, clock).seconds for _ in range(rounds)]


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, mean, stdev and coefficient of variation of round times."""
    med = statistics.median(samples)
    mean = statistics.fmean(samples)
    sd = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return {"median": med, "mean": mean, "stddev": sd, "cv": sd / mean if mean else 0.0, "rounds": len(samples)}
