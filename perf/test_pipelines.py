"""The benchmark matrix: every selected case is built once and measured by the tests below.

Select with the ``--perf-*`` options and the hardware markers (``-m cpu``, ``-m cuda``, ``-m tpu``).
"""


def test_latency(perf_case, benchmark, perf_session, request):
    """Steady-state latency (with cold start, breakdown, memory in extra_info), gated on the baseline."""
    record = perf_session.measure(perf_case, benchmark, request)
    assert record["rounds"] >= 1 and record["median_s"] > 0


def test_fidelity(perf_case, perf_session):
    """The output stays finite and close to the fp32, unoptimized reference of the same seed."""
    result = perf_session.fidelity(perf_case)
    if result is None:
        import pytest

        pytest.skip("--perf-no-fidelity given")
    assert result.ok, result.message(perf_case.case.id)
