"""The plugin through pytester: options, markers and skips, timing honesty, the fidelity guard."""

from __future__ import annotations

import json

import pytest

BASE = ["--perf-frameworks", "torch", "--perf-recipes", "torch:fp32-classic,torch:fp32-sdpa", "-p", "no:randomly"]


def test_help_lists_options_with_defaults(pytester: pytest.Pytester):
    result = pytester.runpytest_subprocess("-p", "diffperf.plugin", "--help")
    result.stdout.fnmatch_lines([
        "diffperf: diffusion inference benchmarks:",
        "*--perf-preset=NAME*",
        "*Default: auto.",
        "*--perf-tolerance=FRACTION*",
        "*--perf-update-baselines*",
    ])
    text = result.stdout.str()
    for option in ("--perf-recipes", "--perf-steps", "--perf-batch-size", "--perf-weights", "--perf-rounds",
                   "--perf-cache-dir", "--perf-max-time"):
        assert option in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--perf-preset", "sd3"], "*unknown preset 'sd3'; choose from auto, tiny, sd15, sdxl*"),
        (["--perf-frameworks", "torch,mxnet"], "*unknown framework(s) 'mxnet'*"),
        (["--perf-recipes", "torch:fp64-sdpa"], "*must start with a precision*"),
        (["--perf-recipes", "torch:bf16-sdpa-turbo"], "*unknown token 'turbo'*"),
        (["--perf-recipes", "onnx:fp32"], "*unknown framework 'onnx'*"),
        (["--perf-batch-size", "1,0"], "*batch size must be >= 1, got 0*"),
        (["--perf-steps", "many"], "*steps must be an integer, got 'many'*"),
        (["--perf-resolution", "big"], "*resolution must be HEIGHTxWIDTH or N, got 'big'*"),
        (["--perf-tolerance", "-3"], "*tolerance must be between 0 and 10*"),
        (["--perf-weights", "/nonexistent/sdxl"], "*--perf-weights /nonexistent/sdxl: no such directory*"),
        (["--perf-malloc", "jemalloc"], "*unknown malloc mode 'jemalloc'; choose from steady, system*"),
        (["--perf-reference", "normalize"], "*unknown reference mode 'normalize'; choose from report, rescale, off*"),
    ],
)
def test_bad_option_values_name_the_problem(fake_suite, args, message):
    result = fake_suite.runpytest_subprocess(*args, "--collect-only")
    assert result.ret != 0
    result.stderr.fnmatch_lines([message])


def test_invalid_combination_is_a_usage_error(fake_suite):
    result = fake_suite.runpytest_subprocess("--perf-frameworks", "torch", "--perf-recipes", "torch:fp32-classic-fuseqkv",
                                             "--collect-only")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*'fuseqkv' runs through SDPA*it needs 'sdpa' attention*"])
    result = fake_suite.runpytest_subprocess("--perf-frameworks", "torch", "--perf-recipes", "torch:fp32-sdpa-graphbreaks",
                                             "--collect-only")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*'graphbreaks' (fullgraph=False) needs a compile token*"])


def test_marker_selection_and_skip_reasons_without_gpu(fake_suite, monkeypatch):
    monkeypatch.delenv("DIFFPERF_FAKE_CUDA", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi
    result = fake_suite.runpytest_subprocess(*BASE, "-m", "cuda", "-rs", "--benchmark-disable")
    result.assert_outcomes(skipped=4)
    result.stdout.fnmatch_lines(["*SKIPPED*no CUDA device on this machine*"])
    collected = fake_suite.runpytest_subprocess(*BASE, "-m", "cpu", "--collect-only", "-q")
    collected.stdout.fnmatch_lines([
        "*test_latency?torch-cpu-tiny-fp32-classic-bs1-4steps?",
        "*test_fidelity?torch-cpu-tiny-fp32-sdpa-bs1-4steps?",
        "4/8 tests collected (4 deselected)*",
    ])


def test_reported_median_matches_known_duration_and_syncs_before_clock(fake_suite, monkeypatch):
    monkeypatch.setenv("FAKE_DURATION", "0.05")
    result = fake_suite.runpytest_subprocess(
        *BASE, "-m", "cpu", "--perf-rounds", "7", "--perf-warmup-rounds", "2",
        "--benchmark-timer", "fake_builder.recording_timer", "--benchmark-json", "out.json",
    )
    result.assert_outcomes(passed=4)
    data = json.loads((fake_suite.path / "out.json").read_text())
    for bench in data["benchmarks"]:
        median = bench["stats"]["median"]
        # The device work is asynchronous: without a sync before the clock the median would be ~0. The upper
        # bound only has to tell "one queued call" from two; a busy machine oversleeps the fake device's waits.
        assert 0.05 <= median < 0.05 * 1.5, median
        info = bench["extra_info"]
        assert info["rounds"] == 7 == len(info["samples_s"])
        assert abs(info["median_s"] - median) < 1e-9
        assert info["cold_start_s"] >= 0.05
        assert info["images_per_s"] == pytest.approx(1 / median)
    events = json.loads((fake_suite.path / "events.json").read_text())
    clock_reads = [i for i, e in enumerate(events) if e == "clock"]
    assert len(clock_reads) == 2 * 7 * 2  # start and end of every steady-state round, two cases
    assert all(events[i - 1] == "sync" for i in clock_reads), "a clock read was not preceded by a sync"
    result.stdout.fnmatch_lines(["*diffperf results*", "*torch-cpu-tiny-fp32-classic-bs1-4steps*"])


@pytest.mark.parametrize("corruption, message", [
    ("nan", "*latents contains non-finite values: 1 NaN and 0 inf*"),
    ("noise", "*output differs from the fp32 reference beyond its thresholds: PSNR*"),
])
def test_fidelity_guard_fails_a_corrupted_pipeline(fake_suite, monkeypatch, corruption, message):
    monkeypatch.setenv("FAKE_CORRUPT", corruption)
    result = fake_suite.runpytest_subprocess(*BASE, "-m", "cpu", "--perf-rounds", "2", "--perf-warmup-rounds", "0",
                                             "-k", "fidelity")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([message])


def test_fidelity_can_be_turned_off(fake_suite, monkeypatch):
    monkeypatch.setenv("FAKE_CORRUPT", "noise")
    result = fake_suite.runpytest_subprocess(*BASE, "-m", "cpu", "--perf-no-fidelity", "-k", "fidelity", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*--perf-no-fidelity given*"])


def test_one_build_per_case_released_before_the_next(fake_suite):
    fake_suite.makepyfile(fake_builder_log=r'''
import fake_builder
LOG = []
_orig_build, _orig_close = fake_builder.build, fake_builder.FakeRunner.close
def build(case):
    LOG.append(("build", case.id))
    return _orig_build(case)
def close(self):
    LOG.append(("close", self.case.id))
fake_builder.FakeRunner.close = close
import atexit, json
atexit.register(lambda: open("builds.json", "w").write(json.dumps(LOG)))
''')
    fake_suite.makeconftest(fake_suite.path.joinpath("conftest.py").read_text().replace('"fake_builder"', '"fake_builder_log"'))
    result = fake_suite.runpytest_subprocess(*BASE, "-m", "cpu", "--perf-rounds", "2", "--perf-warmup-rounds", "0")
    result.assert_outcomes(passed=4)
    log = json.loads((fake_suite.path / "builds.json").read_text())
    assert log == [
        ["build", "tiny-fp32-classic-bs1-4steps"], ["close", "tiny-fp32-classic-bs1-4steps"],
        ["build", "tiny-fp32-sdpa-bs1-4steps"], ["close", "tiny-fp32-sdpa-bs1-4steps"],
    ]


def test_saved_run_is_written_atomically_and_announced(fake_suite):
    result = fake_suite.runpytest_subprocess(*BASE, "-m", "cpu", "--perf-rounds", "2", "--perf-warmup-rounds", "0",
                                             "--benchmark-save", "first", "--benchmark-storage", "store")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*run saved under: *store*"])
    saved = list((fake_suite.path / "store").rglob("0001_first.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["benchmarks"]
    assert not list((fake_suite.path / "store").rglob("*.tmp")), "a temp file was left behind"


def test_a_reference_that_cannot_be_built_fails_only_the_fidelity_of_each_case_and_is_built_once(fake_suite):
    """Any error of the fidelity phase (here the reference's build: an out-of-memory) is a clear failure of that
    case's fidelity test; the latency tests still pass, and the reference is not rebuilt for every case."""
    fake_suite.makepyfile(fake_builder_oom=r'''
import atexit, json
import fake_builder
LOG = []
def build(case):
    LOG.append(case.id)
    if case.recipe.tag() == "fp32-classic":
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 12.9 GiB")
    return fake_builder.build(case)
atexit.register(lambda: open("builds.json", "w").write(json.dumps(LOG)))
''')
    fake_suite.makeconftest(fake_suite.path.joinpath("conftest.py").read_text().replace('"fake_builder"', '"fake_builder_oom"'))
    result = fake_suite.runpytest_subprocess("--perf-frameworks", "torch", "--perf-recipes", "torch:fp32-sdpa,torch:bf16-sdpa",
                                             "-p", "no:randomly", "-m", "cpu", "--perf-rounds", "2",
                                             "--perf-warmup-rounds", "0", "--benchmark-json", "out.json", "-rf")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["E*FidelityError: fidelity reference torch-cpu-tiny-fp32-classic-bs1-4steps failed: "
                                 "RuntimeError: RESOURCE_EXHAUSTED*"])
    assert not [ln for ln in result.stdout.lines if ln.startswith("FAILED") and "test_latency" in ln]
    builds = json.loads((fake_suite.path / "builds.json").read_text())
    assert builds.count("tiny-fp32-classic-bs1-4steps") == 1, builds
    for bench in json.loads((fake_suite.path / "out.json").read_text())["benchmarks"]:
        fid = bench["extra_info"]["fidelity"]
        assert fid["ok"] is False and "RESOURCE_EXHAUSTED" in fid["error"] and fid["reference"] == "fp32-classic"


_KNOWN_FAILURE_CONFTEST = r'''
from diffperf.cases import ExpectedError
from pipelines.torch_recipes import TorchRecipe

TorchRecipe.known_failure = lambda self, device: "upstream#1: sdpa breaks" if self.attention == "sdpa" else None
TorchRecipe.known_failure_raises = lambda self, device: (
    ExpectedError("fake_known.UpstreamError", r"branch shape") if self.attention == "sdpa" else None)
'''

_KNOWN_FAILURE_BUILDER = r'''
import os
import fake_builder

class UpstreamError(Exception):
    pass

class OutOfMemory(Exception):
    pass

def build(case):
    if case.recipe.attention == "sdpa":
        kind = os.environ["FAKE_FAILURE"]
        if kind == "upstream":
            raise UpstreamError("branch shape mismatch (3 vs 2)")
        if kind == "oom":
            raise OutOfMemory("out of memory while building: branch shape")  # right message, wrong type
        if kind == "other-message":
            raise UpstreamError("ran out of device memory")  # right type, wrong message
    return fake_builder.build(case)
'''


@pytest.mark.parametrize("kind, outcomes", [
    ("upstream", {"passed": 2, "xfailed": 2}),
    ("oom", {"passed": 2, "errors": 2}),
    ("other-message", {"passed": 2, "errors": 2}),
    ("none", {"passed": 2, "failed": 2}),  # strict: it works now, and the suite says so
])
def test_known_failure_xfails_only_on_the_declared_error(fake_suite, monkeypatch, kind, outcomes):
    fake_suite.makepyfile(fake_known=_KNOWN_FAILURE_BUILDER)
    conftest = fake_suite.path.joinpath("conftest.py").read_text().replace('"fake_builder"', '"fake_known"')
    fake_suite.makeconftest(conftest + _KNOWN_FAILURE_CONFTEST)
    monkeypatch.setenv("FAKE_FAILURE", kind)
    result = fake_suite.runpytest_subprocess(*BASE, "-m", "cpu", "--perf-rounds", "2", "--perf-warmup-rounds", "0",
                                             "-rxX")
    result.assert_outcomes(**outcomes)
    if kind == "upstream":
        result.stdout.fnmatch_lines(["*XFAIL*fp32-sdpa*upstream#1: sdpa breaks*"])


def test_known_failure_without_raises_is_refused(fake_suite):
    fake_suite.makeconftest(fake_suite.path.joinpath("conftest.py").read_text() + (
        "\nfrom pipelines.torch_recipes import TorchRecipe\n"
        "TorchRecipe.known_failure = lambda self, device: 'upstream#1' if self.attention == 'sdpa' else None\n"))
    result = fake_suite.runpytest_subprocess(*BASE, "-m", "cpu", "--collect-only")
    assert result.ret != 0
    result.stdout.re_match_lines([r".*recipe 'fp32-sdpa': known_failure without known_failure_raises.*"])
