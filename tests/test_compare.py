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


def _history(tmp_path, storage, scales, add_noise=True):
    """Saved runs 0001.. with the given scales (a drifting but level series plus the shifts asked for)."""
    import random

    base = json.loads(run_file(storage, "1").read_text())
    root = tmp_path / "hist"
    folder = root / "Linux-CPython-3.11-64bit"
    folder.mkdir(parents=True)
    rng = random.Random(7)
    for i, scale in enumerate(scales):
        data = json.loads(json.dumps(base))
        data["commit_info"]["id"] = f"{i + 1:02d}" + "c" * 38
        noise = rng.lognormvariate(0, 0.02) if add_noise else 1.0
        for b in data["benchmarks"]:
            b["extra_info"]["samples_s"] = [x * scale * noise for x in b["extra_info"]["samples_s"]]
        (folder / f"{i + 1:04d}_run.json").write_text(json.dumps(data))
    return root


def test_trend_lists_change_points_with_commit_ranges_and_fails_on_a_slower_newest_segment(tmp_path, storage, capsys):
    from diffperf.trend import main as trend_main

    root = _history(tmp_path, storage, [1.0] * 8 + [1.3] * 6)
    assert trend_main(["--storage", str(root), "--baselines-dir", str(tmp_path / "none")]) == 1
    out = capsys.readouterr().out
    assert out.count("1 change point(s)") == 3
    assert "between 0008@08cccccc and 0009@09cccccc (commits 08cccccc..09cccccc)" in out
    assert "SLOWER: the newest segment is +30" in out
    assert trend_main(["--storage", str(root), "--tolerance", "0.5", "--baselines-dir", str(tmp_path / "none")]) == 0


def test_trend_passes_a_faster_newest_segment_and_a_level_series(tmp_path, storage, capsys):
    from diffperf.trend import main as trend_main

    faster = _history(tmp_path, storage, [1.3] * 7 + [1.0] * 7)
    assert trend_main(["--storage", str(faster), "--baselines-dir", str(tmp_path / "none")]) == 0
    assert "change point" in capsys.readouterr().out
    (tmp_path / "level").mkdir()
    level = _history(tmp_path / "level", storage, [1.0] * 14)
    assert trend_main(["--storage", str(level), "--baselines-dir", str(tmp_path / "none")]) == 0
    assert "no change point" in capsys.readouterr().out


def test_trend_reads_baseline_histories_and_names_bad_input(tmp_path, capsys):
    from diffperf.baselines import BaselineStore, baseline_path
    from diffperf.trend import main as trend_main

    store = BaselineStore.load(baseline_path(tmp_path, HW))
    for i, m in enumerate([1.0, 1.01, 0.99, 1.0, 1.02, 1.4, 1.41, 1.39, 1.4]):
        rec = {"samples_s": [m, m * 1.01, m * 0.99], "rounds": 3, "cv": 0.01}
        store.append("t::a", rec, commit={"id": f"{i:02d}" + "b" * 38}, recorded_at=f"2026-01-{i + 1:02d}T00:00:00Z")
    store.save()
    assert trend_main(["--storage", str(tmp_path / "none"), "--baselines-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "commits 04bbbbbb..05bbbbbb" in out and f"baseline {baseline_path(tmp_path, HW)}" in out
    baseline_path(tmp_path, HW).write_text("{")
    assert trend_main(["--storage", str(tmp_path / "none"), "--baselines-dir", str(tmp_path)]) == 2
    assert str(baseline_path(tmp_path, HW)) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        trend_main(["--last", "2"])


def test_trend_subcommand_of_the_module(tmp_path, storage):
    root = _history(tmp_path, storage, [1.0] * 8 + [1.3] * 6)
    proc = subprocess.run([sys.executable, "-m", "diffperf", "trend", "--storage", str(root), "--baselines-dir",
                           str(tmp_path / "none")], capture_output=True, text=True, cwd=Path(cmp.__file__).parents[1])
    assert proc.returncode == 1, proc.stderr
    assert "08cccccc..09cccccc" in proc.stdout
