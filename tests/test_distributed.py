"""``pytest perf -n ...`` (pytest-xdist) on the fake builder: one worker per (fake) GPU, every case timed once."""

from __future__ import annotations

import json

import pytest

from diffperf import distributed, results

pytest.importorskip("xdist", reason="pytest-xdist is not installed: pip install -e '.[dev]'")

ARGS = ["--perf-frameworks", "torch", "--perf-recipes", "torch:fp32-classic,torch:fp32-sdpa", "--perf-preset", "tiny",
        "--perf-rounds", "3", "--perf-warmup-rounds", "0", "-p", "no:randomly"]
LATENCY = ["test_latency[torch-cuda-tiny-fp32-classic-bs1-4steps]", "test_latency[torch-cuda-tiny-fp32-sdpa-bs1-4steps]"]


def test_two_fake_gpus_two_workers_each_pinned_every_case_timed_and_merged_once(fake_suite, monkeypatch):
    monkeypatch.setenv("DIFFPERF_FAKE_GPUS", "2")
    result = fake_suite.runpytest_subprocess(
        "-n", "auto", "-m", "cuda", *ARGS, "--perf-dist-group", "case", "--perf-journal", "journal.jsonl",
        "--benchmark-save", "nightly", "--benchmark-storage", "bench", "--benchmark-json", "run.json",
    )
    out = result.stdout.str()
    assert result.ret == 0, out + result.stderr.str()
    result.stdout.fnmatch_lines(["created: 2/2 workers", "*diffperf results*", "merged run written to run.json",
                                 "merged run saved as *0001_nightly.json", "diffperf journals (one per xdist worker): *",
                                 "*4 passed*"])
    assert "Benchmarks are automatically disabled" not in out + result.stderr.str()
    for case in ("torch-cuda-tiny-fp32-classic-bs1-4steps", "torch-cuda-tiny-fp32-sdpa-bs1-4steps"):
        assert any(line.startswith(case) for line in out.splitlines()), f"{case} missing from the results table"

    # Each worker saw its own GPU: gwN ran with CUDA_VISIBLE_DEVICES=N, from its run line to each of its cases.
    seen = {}
    for worker in ("gw0", "gw1"):
        entries = results.read_journal(fake_suite.path / f"journal-{worker}.jsonl")
        runs = [e for e in entries if e.get("event") == "run"]
        cases = [e for e in entries if e.get("event") == "case"]
        assert runs and {r["cuda_visible_devices"] for r in runs} == {worker[2:]}
        assert cases and {c["cuda_visible_devices"] for c in cases} == {worker[2:]}
        assert runs[0]["machine_info"]["gpu"]["count"] == 1  # the worker sees only its own GPU
        seen[worker] = {c["nodeid"].split("::")[1] for c in cases}
    assert not seen["gw0"] & seen["gw1"], "a case ran on both workers"

    # Every case timed (the harness's samples in pytest-benchmark's format) and in the merged run once.
    run = json.loads((fake_suite.path / "run.json").read_text())
    assert sorted(b["name"] for b in run["benchmarks"]) == LATENCY
    duration = 0.02  # FAKE_DURATION's default: a round that did not wait for the fake device would read ~0 s
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        assert bench["stats"]["rounds"] == 3 and bench["stats"]["data"] == info["samples_s"]
        assert bench["fullname"].endswith(bench["name"]) and "@" not in bench["fullname"]
        assert min(info["samples_s"]) >= duration and info["median_s"] >= duration
    assert {w["cuda_visible_devices"] for w in run["machine_info"]["diffperf_workers"]} == {"0", "1"}
    assert run["diffperf_failures"] == []
    saved = list((fake_suite.path / "bench").glob("*/0001_nightly.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["benchmarks"] == run["benchmarks"]


def test_merged_run_goes_where_benchmark_json_points_as_a_path_or_an_opened_file(tmp_path):
    """pytest-benchmark 5.3 parses --benchmark-json into a Path, 5.1-5.2 into a file opened 'wb': both get the run.

    Found on a GPU machine with pytest-benchmark 5.2.3, where ``-n auto --benchmark-json`` crashed at the end.
    """
    import argparse
    import types

    target = tmp_path / "run.json"
    run = {"benchmarks": [{"name": "test_latency[torch-cuda-tiny-fp32-sdpa-bs1-4steps]"}], "machine_info": {}}
    opened = argparse.FileType("wb")(str(target))
    for value in (opened, target, str(target)):
        bs = types.SimpleNamespace(json=value, save=None, autosave=None)
        lines = distributed.save(types.SimpleNamespace(_benchmarksession=bs), run)
        assert lines == [f"merged run written to {target}"]
        assert json.loads(target.read_text()) == run
        target.unlink()
    assert opened.closed
    with pytest.raises(TypeError, match="--benchmark-json"):
        distributed.json_path(object())


def test_framework_group_keeps_a_stack_on_one_worker(fake_suite, monkeypatch):
    monkeypatch.setenv("DIFFPERF_FAKE_GPUS", "2")
    result = fake_suite.runpytest_subprocess("-n", "2", "-m", "cuda", *ARGS, "--perf-journal", "journal.jsonl",
                                             "--perf-no-fidelity")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    ran = {w: [e for e in results.read_journal(fake_suite.path / f"journal-{w}.jsonl") if e.get("event") == "case"]
           for w in ("gw0", "gw1")}
    assert sorted(len(cases) for cases in ran.values()) == [0, 4]  # 2 cases x (latency, fidelity), one worker


@pytest.mark.parametrize("gpus, args, message", [
    (None, ["-n", "2", "-m", "cpu"], "*CPU cases selected with 2 workers: they would share the CPU cores*"),
    ("1", ["-n", "2", "-m", "cuda"], "*2 workers for 1 visible GPU(s): workers would share a GPU*"),
    ("2", ["-n", "2", "-m", "cuda", "--dist", "each"], "*--dist each would run every case on each of the 2 workers*"),
])
def test_shared_devices_are_refused_at_start(fake_suite, monkeypatch, gpus, args, message):
    if gpus:
        monkeypatch.setenv("DIFFPERF_FAKE_GPUS", gpus)
    result = fake_suite.runpytest_subprocess(*args, *ARGS, "--perf-journal", "journal.jsonl")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines([message + "-n 0*python -m diffperf launch*"])
    result.stdout.fnmatch_lines(["*no tests ran*"])
    assert not list(fake_suite.path.glob("journal-gw*.jsonl")), "a worker ran a test before the refusal"


def test_refusal_rules():
    assert distributed.refusal({}, 8, 0, "load") is None
    assert distributed.refusal({"cpu": False, "cuda": True}, 2, 2, "load") is None  # CPU cases all skipped
    assert distributed.refusal({"cpu": True}, 1, 0, "load") is None  # one worker shares nothing
    assert "TPU cases" in distributed.refusal({"tpu": True}, 2, 0, "load")
    assert "3 workers for 2 visible GPU" in distributed.refusal({"cuda": True}, 3, 2, "loadgroup")


def test_fake_gpus_follow_cuda_visible_devices(monkeypatch):
    from diffperf import hardware

    monkeypatch.setenv("DIFFPERF_FAKE_GPUS", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    hardware.nvidia_gpus.cache_clear()
    try:
        assert len(hardware.nvidia_gpus()) == 2 and distributed.visible_gpus() == ["1", "3"]
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        hardware.nvidia_gpus.cache_clear()
        assert distributed.visible_gpus() == ["0", "1", "2", "3"]
        assert distributed.auto_num_workers(None) == 4
    finally:
        hardware.nvidia_gpus.cache_clear()


def test_one_worker_measures_cpu_cases_and_skips_plain_benchmarks(fake_suite):
    """-n 1 shares nothing: CPU cases are timed as in one process; a test timed by pytest-benchmark is skipped."""
    (fake_suite.path / "test_plain.py").write_text(
        "def test_plain_benchmark(benchmark):\n    benchmark(sum, range(10))\n"
    )
    args = ["-n", "1", "-m", "cpu or not (cuda or tpu)", *ARGS, "--perf-no-fidelity", "--perf-journal", "journal.jsonl",
            "--benchmark-json", "run.json", "-rs"]
    result = fake_suite.runpytest_subprocess(*args)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_plain.py: pytest-benchmark is off under pytest-xdist*-n 0",
                                 "*2 passed, 3 skipped*"])
    run = json.loads((fake_suite.path / "run.json").read_text())
    assert sorted(b["name"] for b in run["benchmarks"]) == [n.replace("cuda", "cpu") for n in LATENCY]
    assert all(b["stats"]["rounds"] == 3 for b in run["benchmarks"])
    # The worker journals of that run stay; a second run naming the same journal is refused, not mixed in.
    again = fake_suite.runpytest_subprocess(*args)
    assert again.ret == pytest.ExitCode.USAGE_ERROR
    again.stderr.fnmatch_lines(["*--perf-journal journal.jsonl: worker journals of an earlier run are there*"])


def test_a_worker_replacing_a_crashed_one_gets_its_gpu_and_the_crash_is_recorded(fake_suite, monkeypatch):
    """One fake GPU, one worker: the case that dies (like an OOM kill) is recorded; the rest run on the same GPU."""
    from tests.test_launcher import FAULTS

    builder = fake_suite.path / "fake_builder.py"
    builder.write_text(builder.read_text() + FAULTS)
    monkeypatch.setenv("DIFFPERF_FAKE_GPUS", "1")
    monkeypatch.setenv("FAKE_DIE_ON", "fp32-sdpa")
    args = [a if a != "torch:fp32-classic,torch:fp32-sdpa" else "torch:fp32-classic,torch:fp32-sdpa,torch:bf16-sdpa"
            for a in ARGS]
    result = fake_suite.runpytest_subprocess("-n", "auto", "-m", "cuda", "-k", "test_latency", *args,
                                             "--perf-journal", "journal.jsonl", "--benchmark-json", "run.json")
    assert result.ret == 1, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*replacing crashed worker gw0*", "*1 failed, 2 passed*"])
    run = json.loads((fake_suite.path / "run.json").read_text())
    assert sorted(b["name"] for b in run["benchmarks"]) == ["test_latency[torch-cuda-tiny-bf16-sdpa-bs1-4steps]",
                                                           "test_latency[torch-cuda-tiny-fp32-classic-bs1-4steps]"]
    [crash] = run["diffperf_failures"]
    assert crash["outcome"] == "crashed" and crash["nodeid"].endswith("test_latency[torch-cuda-tiny-fp32-sdpa-bs1-4steps]")
    replacement = [e for e in results.read_journal(fake_suite.path / "journal-gw1.jsonl") if e.get("event") == "run"]
    assert replacement and replacement[0]["cuda_visible_devices"] == "0"  # not unpinned, not a GPU it does not own
