"""Unit tests of the statistics, the baseline store and the gate (synthetic samples, no pipelines)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffperf import stats
from diffperf.baselines import SCHEMA_KEY, BaselineError, BaselineStore, baseline_path, make_entry
from diffperf.gate import Gate, GateSettings

HW = "cpu-2c-test-cpu"


def lognormal(n, scale=1.0, cv=0.05, seed=0):
    return (scale * np.random.default_rng(seed).lognormal(0.0, cv, n)).tolist()


def record(samples, memory=1_000_000, compile_s=None):
    return {"diffperf_schema": 1, "samples_s": samples, "rounds": len(samples), "cv": stats.cv(samples),
            "peak_memory_bytes": {"cold": memory, "steady": memory}, "memory_kind": "peak_rss", "compile_s": compile_s}


# ----------------------------------------------------------------------------------------------- stats


def test_no_false_alarm_on_identical_distributions():
    alarms = sum(
        stats.compare_samples(lognormal(15, seed=2 * i), lognormal(15, seed=2 * i + 1), tolerance=0.10).verdict
        == "regressed"
        for i in range(100)
    )
    assert alarms <= 2


def test_detects_a_15_percent_shift_with_enough_rounds():
    rounds = stats.required_rounds(0.05, 0.15, power=0.95, tolerance=0.10)
    hits = sum(
        stats.compare_samples(lognormal(rounds, 1.15, seed=2 * i), lognormal(rounds, seed=2 * i + 1),
                              tolerance=0.10).verdict == "regressed"
        for i in range(50)
    )
    assert hits >= 45


def test_improvement_and_inconclusive():
    base = lognormal(20, seed=1)
    assert stats.compare_samples(lognormal(20, 0.8, seed=2), base).verdict == "improved"
    noisy = stats.compare_samples(lognormal(3, 1.2, cv=0.5, seed=3), lognormal(3, cv=0.5, seed=4))
    assert noisy.verdict == "inconclusive"


def test_ratio_ci_brackets_the_ratio_and_is_seeded():
    h, b = lognormal(20, 1.1, seed=5), lognormal(20, seed=6)
    ci = stats.median_ratio_ci(h, b)
    assert ci.low < ci.ratio < ci.high
    assert ci == stats.median_ratio_ci(h, b)


def test_cv_and_min_detectable_slowdown_shrink_with_rounds():
    assert stats.cv([1.0, 1.0, 1.0]) == 0.0
    assert abs(stats.cv(lognormal(2000, cv=0.05)) - 0.05) < 0.005
    few = stats.min_detectable_slowdown(lognormal(5, cv=0.05))
    many = stats.min_detectable_slowdown(lognormal(80, cv=0.05))
    assert many < few and 0 < many < 0.05


def test_required_rounds_grows_with_noise_and_respects_budget():
    quiet, noisy = stats.required_rounds(0.02, 0.10), stats.required_rounds(0.10, 0.10)
    assert quiet < noisy
    assert stats.required_rounds(0.10, 0.10, round_seconds=1.0, budget_s=8, min_rounds=5) == 8
    assert stats.required_rounds(0.10, 0.10, round_seconds=1.0, budget_s=1, min_rounds=5) == 5


def test_change_points_find_level_shifts_and_nothing_in_noise():
    rng = np.random.default_rng(3)
    series = np.r_[rng.normal(1, 0.01, 15), rng.normal(1.2, 0.01, 15)]
    assert stats.change_points(series) == [15]
    assert stats.change_points(rng.normal(1, 0.01, 40)) == []


# ------------------------------------------------------------------------------------------- baselines


def test_baseline_path_is_readable_and_checked(tmp_path):
    assert baseline_path(tmp_path, HW) == tmp_path / f"{HW}.json"
    with pytest.raises(ValueError):
        baseline_path(tmp_path, "../etc/passwd")


def test_store_update_keeps_other_entries_and_is_reviewable(tmp_path):
    path = baseline_path(tmp_path, HW)
    store = BaselineStore.load(path)
    store.put(make_entry("t::a", record([0.1234567891, 0.2])))
    store.put(make_entry("t::b", record([0.3, 0.31])))
    store.save()
    again = BaselineStore.load(path)
    again.put(make_entry("t::a", record([0.5, 0.6])))
    again.save()
    data = json.loads(path.read_text())
    assert data[SCHEMA_KEY] == 1 and set(data["entries"]) == {"t::a", "t::b"}
    assert data["entries"]["t::a"]["samples_s"] == [0.5, 0.6]
    assert make_entry("x", record([0.1234567891]))["samples_s"] == [0.123457]
    assert path.read_text() == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize(
    "content, problem",
    [("", "empty"), ("{\"entries\": ", "corrupted JSON"), ("[]", "not a diffperf baseline"),
     (json.dumps({SCHEMA_KEY: 0, "entries": {}}), "older schema"),
     (json.dumps({SCHEMA_KEY: 1, "entries": {"t": {"schema": 1, "samples_s": [], "rounds": 1}}}), "samples_s")],
)
def test_bad_baseline_names_file_and_problem_and_is_never_overwritten(tmp_path, content, problem):
    path = baseline_path(tmp_path, HW)
    path.write_text(content)
    with pytest.raises(BaselineError) as err:
        BaselineStore.load(path)
    assert str(path) in str(err.value) and problem in str(err.value)
    gate = Gate(GateSettings(baselines_dir=tmp_path, update=True))
    out = gate.check("t::a", HW, record(lognormal(10)))
    assert out.failed and str(path) in out.message
    with pytest.raises(BaselineError):
        gate.finish(versions={}, commit={})
    assert path.read_text() == content


# ------------------------------------------------------------------------------------------------ gate


def _gate_with_baseline(tmp_path, samples, **settings):
    store = BaselineStore.load(baseline_path(tmp_path, HW))
    store.put(make_entry("t::a", record(samples, compile_s=1.0)))
    store.put(make_entry("t::other", record([1.0, 1.0])))
    store.save()
    return Gate(GateSettings(baselines_dir=tmp_path, **settings))


def test_no_baseline_passes_and_says_nothing_compared(tmp_path):
    out = Gate(GateSettings(baselines_dir=tmp_path)).check("t::a", HW, record(lognormal(10)))
    assert not out.failed
    assert out.message == f"no baseline for t::a on {HW}: nothing compared"
    assert "cv" in out.info and "min_detectable_slowdown" in out.info


def test_regression_message_has_the_numbers(tmp_path):
    gate = _gate_with_baseline(tmp_path, lognormal(20, seed=1))
    out = gate.check("t::a", HW, record(lognormal(20, 1.3, seed=2), compile_s=1.0))
    assert out.failed and out.verdict == "regressed"
    for part in ("baseline", "head", "ratio", "p=", "tolerance 10%", "min detectable"):
        assert part in out.message
    assert out.info["ratio_ci"][0] > 1.1


def test_noise_and_per_test_tolerance(tmp_path):
    gate = _gate_with_baseline(tmp_path, lognormal(20, seed=1))
    assert not gate.check("t::a", HW, record(lognormal(20, seed=3), compile_s=1.0)).failed
    assert not gate.check("t::a", HW, record(lognormal(20, 1.3, seed=2), compile_s=1.0), tolerance=0.5).failed
    faster = gate.check("t::a", HW, record(lognormal(20, 0.7, seed=4), compile_s=1.0))
    assert not faster.failed and "improved" in faster.message


def test_memory_and_compile_use_their_own_tolerances(tmp_path):
    gate = _gate_with_baseline(tmp_path, lognormal(20, seed=1))
    same = lognormal(20, seed=3)
    mem = gate.check("t::a", HW, record(same, memory=1_200_000, compile_s=1.0))
    assert mem.failed and "peak memory regressed" in mem.message
    comp = gate.check("t::a", HW, record(same, compile_s=1.2))
    assert not comp.failed  # within the 25% compile tolerance
    comp = gate.check("t::a", HW, record(same, compile_s=1.5))
    assert comp.failed and "compile time regressed" in comp.message


def test_compile_figures_of_another_kind_are_not_compared(tmp_path):
    """JAX AOT's ahead-of-time compile seconds are not the cold-start excess an older baseline holds."""
    gate = _gate_with_baseline(tmp_path, lognormal(20, seed=1))  # baseline: compile 1.0 s, no kind (older)
    same = lognormal(20, seed=3)
    aot = gate.check("t::a", HW, record(same, compile_s=30.0) | {"compile_kind": "ahead-of-time"})
    assert not aot.failed and aot.info["compile_verdict"] == "not compared"
    assert "compile time: measured as ahead-of-time, baseline as cold-start-excess; not compared" in aot.message
    excess = gate.check("t::a", HW, record(same, compile_s=1.5) | {"compile_kind": "cold-start-excess"})
    assert excess.failed and "compile time regressed" in excess.message
    assert make_entry("t::b", record(same, compile_s=2.0) | {"compile_kind": "ahead-of-time"})["compile_kind"] == "ahead-of-time"


def test_update_records_every_checked_test_and_keeps_others(tmp_path):
    gate = _gate_with_baseline(tmp_path, lognormal(20, seed=1), update=True)
    out = gate.check("t::a", HW, record(lognormal(20, 1.5, seed=2), compile_s=1.0))
    assert not out.failed and "being updated" in out.message
    gate.check("t::new", "cpu-4c-other", record([0.2, 0.21]))
    written = gate.finish(versions={"torch": "x"}, commit={"id": "abc"})
    assert sorted(p.name for p in written) == sorted([f"{HW}.json", "cpu-4c-other.json"])
    data = json.loads(baseline_path(tmp_path, HW).read_text())["entries"]
    assert set(data) == {"t::a", "t::other"}
    assert data["t::a"]["commit"] == {"id": "abc"} and data["t::a"]["median_s"] > 1.3


def test_reference_workload_rescales_a_slower_machine(tmp_path):
    rec = record(lognormal(20, seed=1))
    rec["reference_s"], rec["reference_id"] = 0.05, "torch 2.13.0 mm, 2 threads"
    store = BaselineStore.load(baseline_path(tmp_path, HW))
    store.put(make_entry("t::a", rec))
    store.save()
    gate = Gate(GateSettings(baselines_dir=tmp_path, rescale_by_reference=True))
    busy = record(lognormal(20, 1.5, seed=2))
    assert gate.check("t::a", HW, busy).failed
    busy["reference_s"], busy["reference_id"] = 0.075, "torch 2.13.0 mm, 2 threads"  # the whole machine ran 1.5x slower
    out = gate.check("t::a", HW, busy)
    assert not out.failed and abs(out.info["machine_speed_factor"] - 2 / 3) < 1e-9 and "rescaled" in out.message
    reported = Gate(GateSettings(baselines_dir=tmp_path)).check("t::a", HW, busy)  # the default: report only
    assert reported.failed and not reported.info["rescaled_by_reference"]
    assert "reference workload 50% slower than at baseline time" in reported.message
    busy["reference_id"] = "torch 2.14.0 mm, 2 threads"  # an upgrade may have moved the reference itself
    out = gate.check("t::a", HW, busy)
    assert out.failed and out.info["machine_speed_factor"] == 1.0
    assert "not rescaled: the machine reference differs" in out.message
