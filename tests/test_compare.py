"""Tests of ``diffperf compare`` on runs saved by a real pytest-benchmark session (pytester)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffperf import compare as cmp


HW = "cpu-2c-test-cpu"

# A perf-test stand-in: the record goes into extra_info as the diffperf plugin puts it; SCALE and MEMORY
# come from the environment so one test file yields a baseline run and a slower or bigger head run.
TEST_FILE = """
import os, random
import pytest

LADDER = [("fp32-classic", None, 1.0), ("fp32-sdpa", "+sdpa", 0.7), ("bf16-sdpa", "+bf16", 0.5)]

@pytest.mark.parametrize("recipe,step,speed", LADDER, ids=[r for r, _, _ in LADDER])
def test_pipe(benchmark, recipe, step, speed):
    scale = float(os.environ.get("SCALE", "1")) * speed
    rng = random.Random(hash((recipe, os.environ.get("SEED", "0"))))
    samples = [scale * 0.1 * rng.lognormvariate(0, 0.03) for _ in range(15)]
    benchmark.extra_info.update({
        "diffperf_schema": 1, "case": {"id": "tiny-" + recipe, "recipe": recipe}, "hardware_id": os.environ["HW"],
        "samples_s": samples, "rounds": len(samples), "cv": 0.03, "compile_s": None,
        "peak_memory_bytes": {"cold": 2_000_000, "steady": int(os.environ.get("MEMORY", "1000000"))},
        "memory_kind": "peak_rss", "ladder": "torch:ladder", "ladder_step": step or "baseline",
    })
    benchmark.pedantic(lambda: sum(range(100)), rounds=3, iterations=1)
"""


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """Four saved runs: 0001 base, 0002 same, 0003 slower by 30%, 0004 other hardware."""
    root = tmp_path_factory.mktemp("runs")
    (root / "test_perf.py").write_text(TEST_FILE)
    for name, env in [("base", {"SEED": "1"}), ("same", {"SEED": "2"}), ("slow", {"SEED": "3", "SCALE": "1.3"}),
                      ("otherhw", {"SEED": "4", "HW": "cuda-1x-nvidia-h100"})]:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {"HW": HW, **env}.items():
                mp.setenv(key, value)
            code = pytest.main(["-q", "-p", "no:cacheprovider", "--import-mode=importlib", str(root / "test_perf.py"),
                                f"--rootdir={root}", f"--benchmark-save={name}",
                                f"--benchmark-storage={root / '.benchmarks'}"])
        assert code == 0
    return root / ".benchmarks"


def run_file(storage: Path, number: str) -> Path:
    return cmp.resolve_run(number, storage)


def test_resolves_runs_by_number_name_and_path(storage):
    p = run_file(storage, "0003")
    assert p.name.startswith("0003_") and cmp.resolve_run("3", storage) == p
    assert cmp.resolve_run("slow", storage) == p and cmp.resolve_run(str(p), storage) == p
    with pytest.raises(cmp.RunError, match="no saved run matches"):
        cmp.resolve_run("nope", storage)


def test_unchanged_and_regressed(storage):
    rows = cmp.compare(run_file(storage, "1"), run_file(storage, "2"))
    assert {r.verdict for r in rows} <= {"unchanged", "inconclusive"} and not any(r.regressed for r in rows)
    rows = cmp.compare(run_file(storage, "1"), run_file(storage, "3"))
    assert all(r.verdict == "regressed" and r.ratio > 1.2 and r.p_value < 0.05 for r in rows)
    assert len(rows) == 3


def test_refuses_other_hardware_unless_forced(storage):
    with pytest.raises(cmp.HardwareMismatch, match="different hardware.*--force"):
        cmp.compare(run_file(storage, "1"), run_file(storage, "4"))
    assert len(cmp.compare(run_file(storage, "1"), run_file(storage, "4"), force=True)) == 3


def test_cli_reports_and_exit_codes(storage, tmp_path, capsys):
    md, page = tmp_path / "summary.md", tmp_path / "report.html"
    code = cmp.main(["compare", "1", "3", "--storage", str(storage), "--markdown", str(md), "--html", str(page),
                     "--trend", "all"])
    out = capsys.readouterr().out
    assert code == 1 and "regressed" in out and "ratio [CI]" in out
    assert md.read_text().startswith("### diffperf") and "| `" in md.read_text()
    text = page.read_text()
    assert text.count("<svg") >= 2 and "optimization ladder" in text and "change points" in text
    assert "src=\"http" not in text  # self-contained
    assert cmp.main(["1", "2", "--storage", str(storage)]) == 0
    assert cmp.main(["1", "4", "--storage", str(storage)]) == 2
    assert "different hardware" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, problem",
    [("", "empty"), ("{", "corrupted JSON"), ("{}", "not a pytest-benchmark saved run")],
)
def test_bad_saved_run_names_file(tmp_path, storage, content, problem, capsys):
    bad = tmp_path / "0009_bad.json"
    bad.write_text(content)
    with pytest.raises(cmp.RunError) as err:
        cmp.load_run(bad)
    assert str(bad) in str(err.value) and problem in str(err.value)
    assert cmp.main([str(bad), "1", "--storage", str(storage)]) == 2
    assert bad.read_text() == content


def test_older_record_schema_is_refused(tmp_path, storage):
    data = json.loads(run_file(storage, "1").read_text())
    data["benchmarks"][0]["extra_info"]["diffperf_schema"] = 0
    old = tmp_path / "0001_old.json"
    old.write_text(json.dumps(data))
    with pytest.raises(cmp.RunError, match="older diffperf record schema"):
        cmp.load_run(old)


def test_trend_change_point_on_synthetic_history(tmp_path, storage):
    base = json.loads(run_file(storage, "1").read_text())
    folder = tmp_path / "Linux-CPython-3.11-64bit"
    folder.mkdir()
    for i in range(12):
        data = json.loads(json.dumps(base))
        data["commit_info"]["id"] = f"{i:040x}"
        for b in data["benchmarks"]:
            b["extra_info"]["samples_s"] = [x * (1.25 if i >= 8 else 1.0) for x in b["extra_info"]["samples_s"]]
        (folder / f"{i + 1:04d}_run.json").write_text(json.dumps(data))
    runs = cmp.trend_runs_for(cmp.load_run(folder / "0012_run.json"), tmp_path, "all")
    figs = cmp.trend_figures(runs)
    assert len(figs) == 3 and all(cps == [8] for _, cps, _ in figs)


def test_pytest_benchmark_compare_still_reads_the_runs(storage):
    files = [str(run_file(storage, n)) for n in ("1", "3")]
    proc = subprocess.run([sys.executable, "-c", "from pytest_benchmark.cli import main; main()", "compare", *files],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "test_pipe[fp32-sdpa]" in proc.stdout


def test_module_runs_on_its_own(storage):
    proc = subprocess.run([sys.executable, "-m", "diffperf.compare", "1", "2", "--storage", str(storage)],
                          capture_output=True, text=True, cwd=Path(cmp.__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "unchanged" in proc.stdout or "inconclusive" in proc.stdout


def test_machine_reference_rescales_only_a_matching_workload(tmp_path, storage):
    """Head ran 30% slower, and so did the machine's reference workload: no regression, with a note saying why."""
    folder = tmp_path / "Linux-CPython-3.11-64bit"
    folder.mkdir()
    for number, src, ref, ident in [("0001", "1", 0.030, "torch X mm"), ("0002", "3", 0.039, "torch X mm"),
                                    ("0003", "3", 0.039, "torch Y mm")]:
        data = json.loads(run_file(storage, src).read_text())
        for b in data["benchmarks"]:
            b["extra_info"].update(reference_s=ref, reference_id=ident)
        (folder / f"{number}_run.json").write_text(json.dumps(data))
    rows = cmp.compare(folder / "0001_run.json", folder / "0002_run.json")  # default: flagged, with the machine noted
    assert all(r.verdict == "regressed" and "reference workload 30% slower" in r.note for r in rows)
    rows = cmp.compare(folder / "0001_run.json", folder / "0002_run.json", rescale=True)
    assert all(r.verdict in ("unchanged", "inconclusive") and 0.95 < r.ratio < 1.05 for r in rows)
    assert all("rescaled by 0.769" in r.note for r in rows)
    base, head = cmp.load_run(folder / "0001_run.json"), cmp.load_run(folder / "0002_run.json")
    assert "notes:" in cmp.render_table(rows, base, head) and "rescaled by 0.769" in cmp.render_markdown(rows, base, head)
    rows = cmp.compare(folder / "0001_run.json", folder / "0003_run.json", rescale=True)  # another torch build
    assert all(r.verdict == "regressed" and "not rescaled" in r.note for r in rows)
