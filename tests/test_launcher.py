"""``python -m diffperf launch`` on the fake builder: crashes, timeouts, Ctrl-C, device pinning, isolation, merging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffperf import launcher, plugin, results

REPO = Path(__file__).resolve().parents[1]

# All three stacks on the fake builder, plus a way to make one case die or hang.
ALL_FAKE_CONFTEST = r'''
import dataclasses
from diffperf import cases
for fw in ("torch", "tf", "jax"):
    cases._REGISTRY[fw] = dataclasses.replace(cases.framework_spec(fw), module="fake_builder")
'''
FAULTS = r'''

_plain_build = build


def build(case):
    """FAKE_DIE_ON / FAKE_HANG_ON: a fragment of the case id that dies (exit 137, like the OOM killer) or hangs."""
    if not case.recipe.is_reference:
        if os.environ.get("FAKE_DIE_ON") and os.environ["FAKE_DIE_ON"] in case.id:
            os._exit(137)
        if os.environ.get("FAKE_HANG_ON") and os.environ["FAKE_HANG_ON"] in case.id:
            time.sleep(600)
    return _plain_build(case)
'''
FAST = ["--perf-rounds", "2", "--perf-warmup-rounds", "0", "-p", "no:randomly"]


@pytest.fixture
def suite(fake_suite):
    """The fake suite for every framework, with injectable faults (hard kill, hang)."""
    fake_suite.makeconftest(ALL_FAKE_CONFTEST)
    builder = fake_suite.path / "fake_builder.py"
    builder.write_text(builder.read_text() + FAULTS)
    return fake_suite


def launch(suite, *args, timeout=240):
    return suite.run(sys.executable, "-m", "diffperf", "launch", *args, timeout=timeout)


def journal_cases(run_dir):
    out = []
    for path in sorted(run_dir.glob("*.jsonl")):
        entries = results.read_journal(path)
        pid = next(e["pid"] for e in entries if e.get("event") == "run") if any(
            e.get("event") == "run" for e in entries) else None
        out += [e | {"run_pid": pid} for e in entries if e.get("event") == "case"]
    return out


def test_grouping_and_devices():
    ids = ["perf/t.py::test_latency[torch-cuda-sdxl-bf16-sdpa-bs1-30steps]",
           "perf/t.py::test_fidelity[torch-cuda-sdxl-bf16-sdpa-bs1-30steps]",
           "perf/t.py::test_latency[jax-cuda-sdxl-fp32-jit-bs1-30steps]",
           "perf/t.py::test_latency[torch-cuda-sdxl-fp32-classic-bs1-30steps]",
           "tests/x.py::test_plain"]
    assert [(g.key, len(g.nodeids)) for g in launcher.make_groups(ids, "framework")] == [
        ("torch", 3), ("jax", 1), ("other", 1)]
    assert [len(g.nodeids) for g in launcher.make_groups(ids, "case")] == [2, 1, 1, 1]
    assert launcher.parse_devices("0,1,3") == ["0", "1", "3"]
    assert launcher.parse_devices("none") == [None]
    with pytest.raises(Exception, match="distinct"):
        launcher.parse_devices("0,0")
    assert "SIGKILL" in launcher.describe_exit(137) and "out-of-memory" in launcher.describe_exit(-9)
    assert launcher.describe_exit(1) == "exit code 1"


def test_reserved_options_are_refused(suite):
    result = launch(suite, "--", "--benchmark-save=x")
    assert result.ret == 2
    result.stderr.fnmatch_lines(["*--benchmark-save=x: the launcher sets these itself*"])


def test_crash_loses_nothing_and_workers_are_pinned_and_merged(suite, monkeypatch):
    """Two fake GPUs: one case dies like an OOM kill, the rest go on; one merged run that both compares read."""
    monkeypatch.setenv("DIFFPERF_FAKE_CUDA", "1")
    monkeypatch.setenv("FAKE_DIE_ON", "fp32-sdpa")
    run_dir = suite.path / "launch"
    result = launch(suite, "--devices", "0,1", "--save", "nightly", "--storage", "bench", "--json", "run.json",
                    "--run-dir", str(run_dir), "--",
                    "-m", "cuda", "--perf-preset", "tiny", "--perf-recipes", "torch:fp32-classic,torch:fp32-sdpa,tf:standard",
                    *FAST)
    assert result.ret == 1, result.stdout.str()
    result.stdout.fnmatch_lines([
        "*CRASHED *test_latency?torch-cuda-tiny-fp32-sdpa-bs1-4steps?*exit code 137 (128 + SIGKILL)*",
        "*1 crashed, 1 not run, 4 passed*",
    ])
    run = json.loads((suite.path / "run.json").read_text())
    names = sorted(b["name"] for b in run["benchmarks"])
    assert names == ["test_latency[tf-cuda-tiny-fp32-bs1-4steps]", "test_latency[torch-cuda-tiny-fp32-classic-bs1-4steps]"]
    failures = {f["nodeid"].split("::")[1]: f for f in run["diffperf_failures"]}
    assert failures["test_latency[torch-cuda-tiny-fp32-sdpa-bs1-4steps]"]["outcome"] == "crashed"
    assert "exit code 137" in failures["test_latency[torch-cuda-tiny-fp32-sdpa-bs1-4steps]"]["reason"]
    assert failures["test_fidelity[torch-cuda-tiny-fp32-sdpa-bs1-4steps]"]["outcome"] == "not run"
    # One worker per device, each pinned: every case ran with CUDA_VISIBLE_DEVICES set to its worker's GPU.
    cases = journal_cases(run_dir)
    assert {c["cuda_visible_devices"] for c in cases if "cuda_visible_devices" in c} == {"0", "1"}
    assert {w["cuda_visible_devices"] for w in run["machine_info"]["diffperf_workers"]} == {"0", "1"}
    for bench in run["benchmarks"]:
        assert bench["stats"]["rounds"] == 2 and bench["extra_info"]["median_s"] > 0
    # The saved run: pytest-benchmark's layout and numbering, readable by its compare and by diffperf's.
    saved = list((suite.path / "bench").glob("*/0001_nightly.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["benchmarks"] == run["benchmarks"]
    env = dict(os.environ, PYTHONPATH=f"{suite.path}:{REPO}")
    cli = subprocess.run([os.path.join(os.path.dirname(sys.executable), "pytest-benchmark"), "--storage",
                          str(suite.path / "bench"), "compare", "0001", "--group-by", "name"],
                         capture_output=True, text=True, env=env, cwd=suite.path, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "test_latency[tf-cuda-tiny-fp32-bs1-4steps]" in cli.stdout
    diff = subprocess.run([sys.executable, "-m", "diffperf", "compare", str(saved[0]), "run.json"],
                          capture_output=True, text=True, env=env, cwd=suite.path, timeout=120)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert "test_latency[torch-cuda-tiny-fp32-classic-bs1-4steps]" in diff.stdout


def test_frameworks_run_in_their_own_processes(suite):
    run_dir = suite.path / "launch"
    result = launch(suite, "--devices", "0,1,2", "--isolate", "framework", "--run-dir", str(run_dir), "--",
                    "-m", "cpu", "--perf-recipes", "torch:fp32-sdpa,tf:standard,jax:baseline", *FAST)
    assert result.ret == 0, result.stdout.str()
    pids: dict[str, set] = {}
    for case in journal_cases(run_dir):
        pids.setdefault(launcher.framework_of(case["nodeid"]), set()).add(case["pid"])
    assert set(pids) == {"torch", "tf", "jax"}
    assert all(len(p) == 1 for p in pids.values()), pids  # each stack's tests share one process
    assert len(set().union(*pids.values())) == 3  # and no two stacks share one


def test_in_process_sharing_settings(monkeypatch, tmp_path):
    """When stacks do share a process or a device: no preallocation, memory growth, caches emptied."""
    for var in ("XLA_PYTHON_CLIENT_PREALLOCATE", "TF_FORCE_GPU_ALLOW_GROWTH"):
        monkeypatch.delenv(var, raising=False)
    plugin.configure_caches(tmp_path, ("torch", "tf", "jax"))
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert "set_memory_growth(gpu, True)" in (REPO / "pipelines" / "kerascv_sd.py").read_text()
    assert "torch.cuda.empty_cache()" in (REPO / "pipelines" / "torch_diffusers.py").read_text()


def test_case_timeout_kills_the_case_and_the_rest_goes_on(suite, monkeypatch):
    monkeypatch.setenv("FAKE_HANG_ON", "fp32-sdpa-bs1")
    # 10 s: the case that does not hang must finish well within it on a busy 2-core machine too.
    result = launch(suite, "--case-timeout", "10", "--json", "run.json", "--run-dir", "launch", "--",
                    "-m", "cpu", "--perf-recipes", "torch:fp32-sdpa,torch:fp32-sdpa-cl", *FAST)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*CRASHED *test_latency?torch-cpu-tiny-fp32-sdpa-bs1*timed out after 10 s*",
                                 "*going on with the 2 remaining test(s) in a new process*"])
    run = json.loads((suite.path / "run.json").read_text())
    assert [b["name"] for b in run["benchmarks"]] == ["test_latency[torch-cpu-tiny-fp32-sdpa-cl-bs1-4steps]"]
    assert {f["outcome"] for f in run["diffperf_failures"]} == {"crashed", "not run"}


def test_ctrl_c_stops_the_workers_and_keeps_what_finished(suite, monkeypatch):
    monkeypatch.setenv("FAKE_HANG_ON", "fp32-sdpa")
    run_dir = suite.path / "launch"
    # A Ctrl-C at a terminal, where SIGINT is handled: a non-interactive shell starts background jobs with
    # SIGINT ignored, an ignored SIGINT is inherited, and Python then installs no KeyboardInterrupt handler.
    # (Not preexec_fn: forking a process that has loaded JAX can deadlock.)
    as_at_a_terminal = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                        "sys.argv[0] = 'diffperf'; runpy.run_module('diffperf', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen(
        [sys.executable, "-c", as_at_a_terminal, "launch", "--json", "run.json", "--run-dir", str(run_dir), "--",
         "-m", "cpu", "--perf-recipes", "torch:fp32-classic,torch:fp32-sdpa", *FAST],
        cwd=suite.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the hanging case has started
        entries = [e for p in run_dir.glob("*.jsonl") for e in results.read_journal(p)]
        if any(e.get("event") == "start" and "test_latency[torch-cpu-tiny-fp32-sdpa" in e["nodeid"] for e in entries):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the hanging case never started")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    run = json.loads((suite.path / "run.json").read_text())
    assert [b["name"] for b in run["benchmarks"]] == ["test_latency[torch-cpu-tiny-fp32-classic-bs1-4steps]"]
    assert [f["outcome"] for f in run["diffperf_failures"]] == ["interrupted"], out + "".join(p.read_text() for p in run_dir.glob("*.log"))
