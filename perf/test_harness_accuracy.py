"""Bar: the harness's reported median is within 2% of a bare ``perf_counter`` loop around the same call.

Both are measured side by side on the same built pipeline, interleaved round by round: the pedantic
``setup`` (outside the harness's clock) runs one bare, synchronized ``perf_counter`` round before each
harness round, so the machine's drift over the run hits both series alike.
"""

import statistics

import pytest

from diffperf.timing import bare_loop, synchronized


@pytest.mark.cpu
def test_harness_median_matches_bare_loop(benchmark):
    pytest.importorskip("torch", reason="the torch stack is not installed: pip install -e '.[torch]'")
    from diffperf.api import build_pipeline

    runner = build_pipeline("fp32-sdpa", preset="tiny")
    try:
        for _ in range(3):
            runner.generate()
        bare: list[float] = []

        def bare_round_then_sync():
            bare.extend(bare_loop(runner.generate, runner.synchronize, 1))
            runner.synchronize()

        benchmark.pedantic(synchronized(runner.generate, runner.synchronize), setup=bare_round_then_sync,
                           rounds=30, warmup_rounds=0, iterations=1)
    finally:
        runner.close()
    harness = benchmark.stats.stats.median
    bare_median = statistics.median(bare)
    ratio = harness / bare_median
    benchmark.extra_info.update(harness_median_s=harness, bare_median_s=bare_median, ratio=ratio, bare_samples_s=bare)
    assert abs(ratio - 1) <= 0.02, f"harness median {harness:.4f} s vs bare loop {bare_median:.4f} s: ratio {ratio:.4f}"
