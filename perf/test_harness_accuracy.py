"""Bar: the harness's reported median is within 2% of a bare ``perf_counter`` loop around the same call.

Both are measured side by side in one run on the same built pipeline: a bare loop, the harness
(``benchmark.pedantic`` with its synchronization), then the bare loop again, so drift hits both.
"""

import statistics

import pytest

from diffperf.timing import bare_loop, steady_state


@pytest.mark.cpu
def test_harness_median_matches_bare_loop(benchmark):
    pytest.importorskip("torch", reason="the torch stack is not installed: pip install -e '.[torch]'")
    from diffperf.api import build_pipeline

    runner = build_pipeline("fp32-sdpa", preset="tiny")
    try:
        for _ in range(3):
            runner.generate()
        bare = bare_loop(runner.generate, runner.synchronize, 10)
        steady_state(benchmark, runner.generate, runner.synchronize, rounds=20, warmup_rounds=0)
        bare += bare_loop(runner.generate, runner.synchronize, 10)
    finally:
        runner.close()
    harness = benchmark.stats.stats.median
    bare_median = statistics.median(bare)
    ratio = harness / bare_median
    benchmark.extra_info.update(harness_median_s=harness, bare_median_s=bare_median, ratio=ratio, bare_samples_s=bare)
    assert abs(ratio - 1) <= 0.02, f"harness median {harness:.4f} s vs bare loop {bare_median:.4f} s: ratio {ratio:.4f}"
