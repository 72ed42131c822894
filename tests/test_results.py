"""The crash-safe results journal and saved-run merging."""

from __future__ import annotations

import json

import pytest

from diffperf import results

from .test_launcher import FAST, suite  # noqa: F401 (fixture)


def test_journal_lines_survive_and_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = results.Journal(path)
    journal.append({"event": "case", "nodeid": "a", "outcome": "passed"})
    journal.append({"event": "start", "nodeid": "b"})
    # No close(): the lines are already on disk, as after a kill.
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"event": "case", "nodeid": "b", "outc')  # the process died mid-write
    entries = results.read_journal(path)
    assert [e["nodeid"] for e in entries] == ["a", "b"]
    assert results.running_nodeid(entries) == "b"
    assert list(results.case_entries(entries)) == ["a"]
    path.write_text('{"event": "x"}\nnot json\n{"event": "y"}\n')
    with pytest.raises(ValueError, match="j.jsonl:2: not a journal line"):
        results.read_journal(path)


def _bench(name, median):
    return {"group": None, "name": name, "fullname": f"t.py::{name}", "params": None, "param": None,
            "extra_info": {}, "options": {}, "stats": {"min": median, "max": median, "mean": median, "stddev": 0,
                                                        "rounds": 2, "median": median, "iqr": 0, "q1": median,
                                                        "q3": median, "iqr_outliers": 0, "stddev_outliers": 0,
                                                        "outliers": "0;0", "ld15iqr": median, "hd15iqr": median,
                                                        "ops": 1 / median, "total": 2 * median, "iterations": 1,
                                                        "data": [median, median]}}


def test_merge_and_save_number_like_pytest_benchmark(tmp_path):
    j1, j2 = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    results.append_entry(j1, {"event": "run", "pid": 1, "machine_info": {"node": "box"}, "commit_info": {"id": "abc"},
                              "cuda_visible_devices": "0"})
    results.append_entry(j1, {"event": "case", "nodeid": "t.py::b", "outcome": "passed", "benchmark": _bench("b", 0.2)})
    results.append_entry(j2, {"event": "run", "pid": 2, "machine_info": {"node": "box"}, "commit_info": {"id": "abc"},
                              "cuda_visible_devices": "1"})
    results.append_entry(j2, {"event": "case", "nodeid": "t.py::a", "outcome": "passed", "benchmark": _bench("a", 0.1)})
    results.append_entry(j2, {"event": "case", "nodeid": "t.py::c", "outcome": "crashed", "reason": "exit code 137"})
    run = results.merge([j1, j2], order=["t.py::a", "t.py::b", "t.py::c"])
    assert [b["name"] for b in run["benchmarks"]] == ["a", "b"]
    assert run["commit_info"] == {"id": "abc"} and run["machine_info"]["node"] == "box"
    assert run["diffperf_failures"] == [{"nodeid": "t.py::c", "when": None, "outcome": "crashed", "reason": "exit code 137"}]
    folder = tmp_path / "storage" / "Linux-CPython-3.11-64bit"
    folder.mkdir(parents=True)
    (folder / "0001_old.json").write_text("{}")
    (folder / "0007_older.json").write_text("{}")
    first = results.save_run(run, tmp_path / "storage", "nightly", machine="Linux-CPython-3.11-64bit")
    second = results.save_run(run, tmp_path / "storage", "nightly", machine="Linux-CPython-3.11-64bit")
    assert (first.name, second.name) == ("0008_nightly.json", "0009_nightly.json")
    assert json.loads(first.read_text())["benchmarks"] == run["benchmarks"]
    assert not list(folder.glob(".*"))  # no temp file left behind
    with pytest.raises(ValueError, match="run name"):
        results.save_run(run, tmp_path / "storage", "../escape")


def test_hard_kill_mid_run_keeps_every_finished_case(suite, monkeypatch):
    """A plain pytest run whose process dies on its second case: the first case's result is on disk."""
    fake_suite = suite
    monkeypatch.setenv("FAKE_DIE_ON", "fp32-sdpa")
    result = fake_suite.runpytest_subprocess("-m", "cpu", "--perf-recipes", "torch:fp32-classic,torch:fp32-sdpa",
                                             "--perf-journal", "j.jsonl", *FAST)
    assert result.ret == 137
    entries = results.read_journal(fake_suite.path / "j.jsonl")
    cases = results.case_entries(entries)
    latency = cases["test_perf.py::test_latency[torch-cpu-tiny-fp32-classic-bs1-4steps]"]
    assert latency["outcome"] == "passed"
    bench = latency["benchmark"]
    assert bench["stats"]["rounds"] == 2 and len(bench["stats"]["data"]) == 2
    assert bench["extra_info"]["median_s"] == pytest.approx(bench["stats"]["median"])
    assert cases["test_perf.py::test_fidelity[torch-cpu-tiny-fp32-classic-bs1-4steps]"]["outcome"] == "passed"
    assert results.running_nodeid(entries) == "test_perf.py::test_latency[torch-cpu-tiny-fp32-sdpa-bs1-4steps]"
    run = entries[0]
    assert run["event"] == "run" and "diffperf_versions" in run["machine_info"]
    assert run["machine_info"]["malloc"]["mode"] in ("steady", "system")  # the allocator policy is on record


def test_failures_are_journaled_with_their_reason(fake_suite, monkeypatch):
    monkeypatch.setenv("FAKE_CORRUPT", "nan")
    result = fake_suite.runpytest_subprocess("-m", "cpu", "--perf-frameworks", "torch",
                                             "--perf-recipes", "torch:fp32-classic,torch:fp32-sdpa", *FAST)
    result.assert_outcomes(passed=3, failed=1)
    journals = list((fake_suite.path / ".diffperf-cache" / "journal").glob("*.jsonl"))  # the default journal
    assert len(journals) == 1
    result.stdout.fnmatch_lines([f"*diffperf journal (one line per finished test): {journals[0]}"])
    failed = [e for e in results.case_entries(results.read_journal(journals[0])).values() if e["outcome"] == "failed"]
    assert [e["nodeid"].split("::")[1] for e in failed] == ["test_fidelity[torch-cpu-tiny-fp32-sdpa-bs1-4steps]"]
    assert "non-finite" in failed[0]["reason"]


def test_no_default_journal_for_runs_without_perf_cases(pytester):
    pytester.makepyfile(test_plain="def test_ok():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "diffperf.plugin")
    result.assert_outcomes(passed=1)
    assert not (pytester.path / ".diffperf-cache" / "journal").exists()
