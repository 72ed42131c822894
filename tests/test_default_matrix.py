"""The default matrix on each device: every seed's headline conditions, and no case the matrix itself rules out.

Collected through pytester with fake hardware (``DIFFPERF_FAKE_CUDA``, ``DIFFPERF_FAKE_TPU``); a conftest dumps
each collected case, its skip/xfail marks and :func:`diffperf.cases.matrix_skip_reason` to JSON.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO

DUMP = r'''
import json
from diffperf import cases
from diffperf.cases import framework_spec

# (Tolerant of a tree without the data, so that the test fails there on the matrix, not on an import.)
matrix_skip_reason = getattr(cases, "matrix_skip_reason", lambda case: case.recipe.unsupported(case.device))

def pytest_collection_modifyitems(session, config, items):
    rows = []
    for item in items:
        case = item.callspec.params["perf_case"]
        rows.append({
            "nodeid": item.nodeid, "framework": case.framework, "device": case.device, "recipe": case.recipe.tag(),
            "case": {k: v for k, v in case.as_dict().items() if k != "recipe_fields"},
            "skips": [m.kwargs.get("reason", "") for m in item.iter_markers("skip")],
            "matrix_skip": matrix_skip_reason(case),
            "builds_preset": getattr(framework_spec(case.framework), "unsupported_preset", lambda p: None)(case.preset) is None,
        })
    with open("cases.json", "w") as fh:
        json.dump(rows, fh)
'''


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    pytester.makeconftest(DUMP)
    (pytester.path / "test_perf.py").write_text((REPO / "perf" / "test_pipelines.py").read_text())
    pytester.makeini("[pytest]\naddopts = -p diffperf.plugin --strict-markers -p no:randomly\n")
    monkeypatch.setenv("PYTHONPATH", f"{pytester.path}:{REPO}")
    for var in ("DIFFPERF_FAKE_CUDA", "DIFFPERF_FAKE_TPU", "TPU_ACCELERATOR_TYPE", "ACCELERATOR_TYPE"):
        monkeypatch.delenv(var, raising=False)
    return pytester


def _collect(suite: pytest.Pytester, *args: str) -> tuple[list[dict], pytest.RunResult]:
    result = suite.runpytest_subprocess(*args, "--collect-only", "-q")
    assert result.ret == 0, result.stderr.str()
    rows = json.loads((suite.path / "cases.json").read_text())
    selected = [r for r in rows if any(r["nodeid"] in line for line in result.stdout.lines)]
    return selected, result


def _not_ruled_out(rows: list[dict]) -> None:
    """No case is a certain skip for a reason the matrix decides (hardware is faked; a missing stack is not
    the matrix's doing)."""
    for r in rows:
        assert r["matrix_skip"] is None, r
        assert r["builds_preset"], r
        assert all("not installed" in reason for reason in r["skips"]), r


def test_default_cuda_matrix_is_the_seeds(suite, monkeypatch):
    monkeypatch.setenv("DIFFPERF_FAKE_CUDA", "1")
    rows, result = _collect(suite, "-m", "cuda")
    _not_ruled_out(rows)
    by_fw = {fw: [r for r in rows if r["framework"] == fw] for fw in ("torch", "tf", "jax")}
    assert all(by_fw.values()), {k: len(v) for k, v in by_fw.items()}
    # TF/KerasCV: the KerasCV guide's ladder and the TF seed's SavedModel rows, SD 1.x at 512x512, 3 images, 25 steps.
    tf_recipes = {r["recipe"] for r in by_fw["tf"]}
    assert {"fp32", "mp16", "fp32-xla", "mp16-xla", "fp32-savedmodel", "fp32-savedmodel-xla"} <= tf_recipes
    for r in by_fw["tf"]:
        c = r["case"]
        assert (c["preset"], c["height"], c["width"], c["batch_size"], c["steps"]) == ("sd15", 512, 512, 3, 25), c
    # PyTorch: the diffusers guide's SDXL ladder, 30 steps, batch 1.
    for r in by_fw["torch"]:
        c = r["case"]
        assert (c["preset"], c["height"], c["batch_size"], c["steps"]) == ("sdxl", 1024, 1, 30), c
    result.stdout.fnmatch_lines([
        "*test_latency?torch-cuda-sdxl-bf16-sdpa-cl-fuseqkv-compile-int8dq-bs1-30steps?",
        "*test_latency?tf-cuda-sd15-fp32-savedmodel-bs3-25steps?",
        "*test_latency?tf-cuda-sd15-fp32-savedmodel-xla-bs3-25steps?",
    ])


def test_default_tpu_matrix_is_the_jax_seeds(suite, monkeypatch):
    monkeypatch.setenv("DIFFPERF_FAKE_TPU", "v5litepod-8")
    rows, result = _collect(suite, "-m", "tpu")
    _not_ruled_out(rows)
    assert {r["framework"] for r in rows} == {"jax"}  # torch and TF do not target TPUs: nothing collected
    assert sorted(r["recipe"] for r in rows) == sorted(["bf16-jit-splithead-alldev", "bf16-aot-splithead-alldev"] * 2)
    for r in rows:
        c = r["case"]
        assert (c["preset"], c["height"], c["batch_size"], c["steps"], c["guidance_scale"]) == ("sdxl", 1024, 1, 25, 5.0)
        assert c["negative_prompt"], "the seed runs a real negative prompt"
    result.stdout.fnmatch_lines(["*test_latency?jax-tpu-sdxl-bf16-aot-splithead-alldev-bs1-25steps-cfg5-neg?"])


def test_cpu_default_is_unchanged(suite):
    rows, _ = _collect(suite, "-m", "cpu")
    _not_ruled_out(rows)
    ids = sorted({r["nodeid"].split("[", 1)[1].rstrip("]") for r in rows})
    assert ids == sorted([
        "torch-cpu-tiny-fp32-classic-bs1-4steps", "torch-cpu-tiny-fp32-sdpa-bs1-4steps",
        "torch-cpu-tiny-fp32-sdpa-compiledefault-bs1-4steps",
        "tf-cpu-tiny-fp32-bs1-4steps", "tf-cpu-tiny-fp32-xla-bs1-4steps",
        "jax-cpu-tiny-fp32-jit-bs1-4steps", "jax-cpu-tiny-fp32-aot-bs1-4steps",
    ])


def test_explicit_options_win_over_the_defaults(suite, monkeypatch):
    monkeypatch.setenv("DIFFPERF_FAKE_CUDA", "1")
    rows, _ = _collect(suite, "-m", "cuda", "--perf-frameworks", "tf", "--perf-preset", "tiny", "--perf-steps", "2",
                       "--perf-batch-size", "1,2", "--perf-recipes", "tf:fp32")
    assert sorted((r["case"]["preset"], r["case"]["steps"], r["case"]["batch_size"], r["case"]["height"]) for r in rows) \
        == [("tiny", 2, 1, 64), ("tiny", 2, 1, 64), ("tiny", 2, 2, 64), ("tiny", 2, 2, 64)]
    # Another preset than the seed's runs at that preset's own settings, not the seed's.
    monkeypatch.setenv("DIFFPERF_FAKE_TPU", "v5litepod-8")
    rows, _ = _collect(suite, "-m", "tpu", "--perf-frameworks", "jax", "--perf-preset", "tiny")
    assert rows and all((r["case"]["steps"], r["case"]["negative_prompt"]) == (4, None) for r in rows)


def test_a_preset_the_framework_lacks_is_skipped_at_collection(suite, monkeypatch):
    monkeypatch.setenv("DIFFPERF_FAKE_CUDA", "1")
    rows, _ = _collect(suite, "-m", "cuda", "--perf-frameworks", "tf", "--perf-preset", "sdxl", "--perf-recipes", "tf:fp32")
    assert rows and all(r["matrix_skip"] and "no 'sdxl' preset" in r["matrix_skip"] for r in rows)
    assert all(any("no 'sdxl' preset" in s for s in r["skips"]) for r in rows)
