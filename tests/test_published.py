"""Published figures (``baselines/published.json``) beside measured ones, and the report's ladder charts."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from diffperf import compare as cmp
from diffperf import published as pub
from diffperf.cases import Case, framework_spec
from diffperf.table import results_table

GUIDE = {  # the diffusers guide's A100 SDXL ladder, as the guide prints it
    "fp32-classic": 7.36, "bf16-classic": 4.63, "bf16-sdpa": 3.31, "bf16-sdpa-cl-compile": 2.54,
    "bf16-sdpa-cl-fuseqkv-compile": 2.52, "bf16-sdpa-cl-fuseqkv-compile-int8dq": 2.43,
}
A100 = "NVIDIA A100-SXM4-80GB"


def _record(framework: str, tag: str, device: str, hardware_id: str, median: float, **case_kw) -> dict:
    """The extra_info record the harness writes (``diffperf.harness.record``) for one case."""
    spec = framework_spec(framework)
    recipe = spec.recipe_cls.from_tag(tag)
    case = Case(framework, recipe, device=device, **case_kw)
    ladder = list(spec.named["ladder"])
    samples = [median * f for f in (0.98, 0.99, 1.0, 1.01, 1.02)]
    return {
        "diffperf_schema": 1, "case": case.as_dict(), "framework": framework, "device": device,
        "hardware_id": hardware_id, "samples_s": samples, "rounds": len(samples), "median_s": median, "cv": 0.015,
        "build_s": 1.0, "cold_start_s": median * 3, "compile_s": None,
        "peak_memory_bytes": {"cold": 1 << 30, "steady": 1 << 30}, "memory_kind": "cuda_max_allocated",
        "breakdown": {}, "images_per_s": case.batch_size / median, "fidelity": None, "compile_info": {},
        "ladder": f"{framework}:ladder" if recipe in ladder else None,
        "ladder_step": ladder.index(recipe) if recipe in ladder else None,
    }


def _saved_run(path: Path, records: list[dict], gpu_models: list[str]) -> Path:
    """A pytest-benchmark saved run as the plugin writes it (``machine_info`` from diffperf.hardware)."""
    benchmarks = []
    for rec in records:
        name = f"test_latency[{rec['framework']}-{rec['device']}-{rec['case']['id']}]"
        s = rec["samples_s"]
        benchmarks.append({
            "group": None, "name": name, "fullname": f"perf/test_pipelines.py::{name}", "params": None,
            "param": None, "options": {}, "extra_info": rec,
            "stats": {"min": min(s), "max": max(s), "mean": sum(s) / len(s), "median": sorted(s)[len(s) // 2],
                      "rounds": len(s), "iterations": 1, "data": s},
        })
    data = {
        "machine_info": {"node": "box", "processor": "x86_64", "cpu": {"brand_raw": "AMD EPYC 7B13", "count": 2},
                         "gpu": {"count": len(gpu_models), "models": gpu_models,
                                 "driver": "550.54" if gpu_models else None, "memory_mib": [81920] * len(gpu_models)},
                         "tpu": None},
        "commit_info": {"id": "0123456789abcdef0123456789abcdef01234567", "branch": "main", "dirty": False},
        "benchmarks": benchmarks, "datetime": "2026-11-29T12:00:00", "version": "5.1.0",
    }
    path.write_text(json.dumps(data))
    return path


def _guide_run(tmp_path: Path, on_gpu: bool, factor: float = 1.25) -> Path:
    """The guide's six SDXL recipes at its conditions, measured ``factor`` times slower than published."""
    device, hw = ("cuda", "cuda-1x-nvidia-a100-sxm4-80gb") if on_gpu else ("cpu", "cpu-2c-amd-epyc-7b13")
    recs = [_record("torch", tag, device, hw, secs * factor, preset="sdxl", steps=30, batch_size=1)
            for tag, secs in GUIDE.items()]
    return _saved_run(tmp_path / f"0001_{device}.json", recs, [A100] if on_gpu else [])


# ------------------------------------------------------------------------------------------------ the data


def test_repository_file_validates_and_holds_the_seeds_tables():
    data = pub.load()
    assert data.path == pub.DEFAULT_PATH
    by_table: dict[str, dict[str, float]] = {}
    for f in data.figures:
        by_table.setdefault(f.table, {})[f.recipe] = f.seconds
    assert by_table["diffusers-guide-a100-sdxl"] == GUIDE
    assert by_table["kerascv-guide-a100"] == pytest.approx(
        {"fp32": 8.52, "mp16": 6.37, "fp32-xla": 6.66, "mp16-xla": 4.56}, abs=0.005)
    assert by_table["tf-savedmodel-a100"] == {"fp32-xla": 12.40, "fp32-savedmodel-xla": 10.29, "fp32-savedmodel": 13.69}
    # The guides' ladders are the suite's ladders, step for step (the tags were transcribed right).
    for table, framework in [("diffusers-guide-a100-sdxl", "torch"), ("kerascv-guide-a100", "tf")]:
        ladder = [r.tag() for r in framework_spec(framework).named["ladder"]]
        assert list(by_table[table]) == ladder
        assert all(f.speedup_over == ladder[0] for f in data.figures if f.table == table)
    guide = [f for f in data.figures if f.table == "diffusers-guide-a100-sdxl"]
    assert {f.conditions for f in guide} == {("sdxl", 1024, 1024, 30, 1, 1)}
    assert {f.hardware_key for f in guide} == {("gpu", "A100", 80)}
    kerascv = [f for f in data.figures if f.table == "kerascv-guide-a100"]
    assert {f.conditions for f in kerascv} == {("sd15", 512, 512, 25, 3, 3)}
    # Every figure names its source file, which is one of the seeds.
    raw = json.loads(pub.DEFAULT_PATH.read_text())
    assert {t["source"]["file"] for t in raw["tables"]} | {n["file"] for n in raw["not_transcribed"]} == {
        "diffusers-accelerate-inference-guide.md", "kerascv-stable-diffusion-guide.md",
        "tf-savedmodel-xla-stable-diffusion.md", "jax-sdxl-tpu.md", "diffusion-fast.md"}


def _bad(mutate) -> dict:
    data = json.loads(pub.DEFAULT_PATH.read_text())
    mutate(data)
    return data


def _set(obj, keys, value):
    for k in keys[:-1]:
        obj = obj[k]
    obj[keys[-1]] = value


@pytest.mark.parametrize("mutate, where, problem", [
    (lambda d: d.pop("diffperf_published_schema"), "", "not a schema-1 published-figures file"),
    (lambda d: _set(d, ["tables", 0, "figures", 2, "seconds"], -3.31), "table 'diffusers-guide-a100-sdxl' figure #2",
     "'seconds' must be a positive number"),
    (lambda d: _set(d, ["tables", 0, "figures", 3, "seconds"], "2.54"), "figure #3 (bf16-sdpa-cl-compile)",
     "'seconds' must be a positive number"),
    (lambda d: _set(d, ["tables", 1, "figures", 1, "recipe"], "mp16-turbo"), "table 'kerascv-guide-a100' figure #1",
     "unknown token 'turbo'"),
    (lambda d: _set(d, ["tables", 0, "figures", 1, "recipe"], "sdpa-bf16"), "figure #1", "must start with a precision"),
    (lambda d: _set(d, ["tables", 0, "conditions", "preset"], "sd3"), "table 'diffusers-guide-a100-sdxl'", "sd3"),
    (lambda d: _set(d, ["tables", 0, "conditions", "steps"], 0), "table 'diffusers-guide-a100-sdxl'",
     "'steps' must be a positive integer"),
    (lambda d: d["tables"][2]["conditions"].pop("images"), "table 'tf-savedmodel-a100'", "lacks ['images']"),
    (lambda d: _set(d, ["tables", 2, "hardware"], "a big GPU"), "table 'tf-savedmodel-a100'", "names no GPU model"),
    (lambda d: _set(d, ["tables", 2, "speedup_over"], "mp16"), "table 'tf-savedmodel-a100'",
     "speedup_over 'mp16' is not one of the table's recipes"),
    (lambda d: _set(d, ["tables", 1, "framework"], "mxnet"), "table 'kerascv-guide-a100'", "unknown framework"),
    (lambda d: _set(d, ["tables", 1, "id"], "diffusers-guide-a100-sdxl"), "table 'diffusers-guide-a100-sdxl'",
     "the id is used twice"),
    (lambda d: d["tables"][0]["figures"].append(dict(d["tables"][0]["figures"][0])), "figure #6 (fp32-classic)",
     "appears twice"),
])
def test_bad_file_names_the_file_and_the_entry(tmp_path, mutate, where, problem):
    bad = tmp_path / "published.json"
    text = json.dumps(_bad(mutate))
    bad.write_text(text)
    with pytest.raises(pub.PublishedError) as err:
        pub.load(bad)
    msg = str(err.value)
    assert str(bad) in msg and where in msg and problem in msg, msg
    assert bad.read_text() == text  # never written


@pytest.mark.parametrize("content, problem", [("", "empty"), ("{", "corrupted JSON")])
def test_unreadable_file_names_the_file(tmp_path, content, problem):
    bad = tmp_path / "published.json"
    bad.write_text(content)
    with pytest.raises(pub.PublishedError, match=re.escape(str(bad)) + ".*" + problem):
        pub.load(bad)


@pytest.mark.parametrize("name, key", [
    ("NVIDIA A100-SXM4-80GB", ("gpu", "A100", 80)),
    ("NVIDIA A100 80GB PCIe", ("gpu", "A100", 80)),
    ("A100 80GB", ("gpu", "A100", 80)),
    ("cuda-1x-nvidia-a100-sxm4-80gb", ("gpu", "A100", 80)),
    ("cuda-8x-nvidia-a100-sxm4-40gb", ("gpu", "A100", 40)),
    ("NVIDIA H100 80GB HBM3", ("gpu", "H100", 80)),
    ("Tesla T4", ("gpu", "T4", None)),
    ("Tesla V100-SXM2-16GB", ("gpu", "V100", 16)),
    ("NVIDIA GeForce RTX 4090", ("gpu", "RTX 4090", None)),
    ("TPU v5e", ("tpu", "v5e")),
    ("v5litepod-8", ("tpu", "v5e")),
    ("TPU v5 lite", ("tpu", "v5e")),
    ("tpu-v5litepod-8", ("tpu", "v5e")),
    ("v4-8", ("tpu", "v4")),
    ("v5p-16", ("tpu", "v5p")),
    ("tpu-tpu", None),
    ("cpu-2c-amd-epyc-7b13", None),
    ("", None),
])
def test_hardware_normalization(name, key):
    assert pub.hardware_key(name) == key


def test_hardware_matching_rule():
    a100_80 = pub.hardware_key("A100 80GB")
    assert pub.hardware_matches(a100_80, pub.hardware_key("NVIDIA A100-SXM4-80GB"))
    assert not pub.hardware_matches(a100_80, pub.hardware_key("NVIDIA A100-SXM4-40GB"))
    assert not pub.hardware_matches(a100_80, pub.hardware_key("NVIDIA H100 80GB HBM3"))
    assert pub.hardware_matches(pub.hardware_key("A100"), pub.hardware_key("NVIDIA A100-SXM4-40GB"))
    assert not pub.hardware_matches(pub.hardware_key("TPU v5e"), pub.hardware_key("v4-8"))
    assert not pub.hardware_matches(a100_80, None)


# ------------------------------------------------------------------------------------------------ the reports


def test_a100_report_shows_the_guides_numbers_beside_the_measured_ones(tmp_path):
    run = _guide_run(tmp_path, on_gpu=True)
    md, page = tmp_path / "summary.md", tmp_path / "report.html"
    assert cmp.main(["compare", str(run), str(run), "--markdown", str(md), "--html", str(page)]) == 0
    text = md.read_text()
    assert "#### Published figures" in text and pub.NONE_APPLIES not in text
    published_rows = [r for r in text.splitlines() if "diffusers-accelerate-inference-guide.md" in r]
    assert len(published_rows) == 6
    for (tag, secs), row in zip(GUIDE.items(), published_rows):
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert tag in cells[0] and cells[2] == "A100 80GB"
        assert cells[3] == f"{secs:.3g} s"  # the guide's figure
        assert float(cells[4].split()[0]) == pytest.approx(secs * 1.25, rel=1e-2)  # measured
        assert float(cells[5]) == pytest.approx(1.25, abs=0.01)  # measured / published
        assert cells[6] == "`fp32-classic`"
        assert float(cells[7].rstrip("x")) == pytest.approx(7.36 / secs, abs=0.006)  # published speed-up
        assert float(cells[8].rstrip("x")) == pytest.approx(7.36 / secs, abs=0.006)  # measured, same ladder shape
    html_text = page.read_text()
    assert "<h2>Published figures</h2>" in html_text and "<td>7.36 s</td>" in html_text and "<td>2.43 s</td>" in html_text
    assert "3.03x" in html_text  # 7.36 / 2.43, published and measured
    out = cmp.render_table(cmp.compare(run, run), cmp.load_run(run), cmp.load_run(run))
    assert "published figures (published.json" in out and "7.36 s" in out and "1.25" in out


def test_same_run_on_cpu_says_no_published_figure_applies(tmp_path):
    run = _guide_run(tmp_path, on_gpu=False)
    md, page = tmp_path / "summary.md", tmp_path / "report.html"
    assert cmp.main(["compare", str(run), str(run), "--markdown", str(md), "--html", str(page)]) == 0
    for text in (md.read_text(), page.read_text()):
        assert "no published figure applies to this hardware (device cpu)" in text
        assert "A100 80GB" in text  # says where figures do exist
        assert "7.36 s" not in text and "diffusers-accelerate-inference-guide.md" not in text


def test_conditions_must_match_too(tmp_path):
    """An A100 80GB run at 20 steps: same hardware, other conditions; one guide recipe alone: no measured speed-up."""
    recs = [_record("torch", "bf16-sdpa", "cuda", "cuda-1x-nvidia-a100-sxm4-80gb", 2.0, preset="sdxl", steps=20),
            _record("torch", "bf16-sdpa", "cuda", "cuda-1x-nvidia-a100-sxm4-80gb", 3.0, preset="sdxl", steps=30)]
    run = cmp.load_run(_saved_run(tmp_path / "0001_x.json", recs, [A100]))
    figs = pub.run_figures(pub.saved_run_records(run.data), run.machine_info)
    assert [m.figure.recipe for m in figs.found] == ["bf16-sdpa"] and "30steps" in figs.found[0].test
    m = figs.found[0]
    assert m.ratio == pytest.approx(3.0 / 3.31, rel=0.01) and m.published_speedup == pytest.approx(7.36 / 3.31)
    assert m.measured_speedup is None and "fp32-classic not measured" in "\n".join(figs.text_lines())
    run20 = cmp.load_run(_saved_run(tmp_path / "0002_x.json", recs[:1], [A100]))
    text = "\n".join(pub.run_figures(pub.saved_run_records(run20.data), run20.machine_info).text_lines())
    assert "no published figure applies: no case of this run ran at a published figure's conditions" in text
    assert "torch sdxl 1024x1024, 30 steps, batch 1, 1 images" in text


def test_other_gpu_model_does_not_match(tmp_path):
    recs = [_record("torch", t, "cuda", "cuda-1x-nvidia-h100-80gb-hbm3", s, preset="sdxl", steps=30) for t, s in GUIDE.items()]
    run = cmp.load_run(_saved_run(tmp_path / "0001_h.json", recs, ["NVIDIA H100 80GB HBM3"]))
    figs = pub.run_figures(pub.saved_run_records(run.data), run.machine_info)
    assert not figs.found and "no published figure applies to this hardware (H100 80GB)" in figs.text_lines()[0]


def test_results_table_shows_published_figures_from_the_hardware_id():
    recs = [(f"n{i}", _record("torch", t, "cuda", "cuda-1x-nvidia-a100-sxm4-80gb", s * 0.8, preset="sdxl", steps=30))
            for i, (t, s) in enumerate(GUIDE.items())]
    lines = results_table(recs)
    at = next(i for i, line in enumerate(lines) if line.startswith("published figures"))
    assert "context, not a gate" in lines[at]
    body = lines[at + 3:at + 9]
    assert len(body) == 6 and all("A100 80GB" in line and "0.80" in line for line in body)
    assert "7.36 s" in body[0] and "5.89 s" in body[0] and "3.03x" in body[-1]
    cpu = [(n, _record("torch", "fp32-classic", "cpu", "cpu-2c-amd-epyc", 0.5, preset="tiny", steps=2)) for n in "a"]
    assert "no published figure applies to this hardware" in results_table(cpu)[-1]


def test_unreadable_published_file_is_one_line_not_a_crash(tmp_path):
    bad = tmp_path / "published.json"
    bad.write_text("{")
    rec = _record("torch", "fp32-classic", "cpu", "cpu-2c-x", 0.5, preset="tiny", steps=2)
    line = results_table([("n", rec)], published_path=bad)[-1]
    assert line.startswith("published figures: not shown:") and str(bad) in line and "corrupted JSON" in line


# ------------------------------------------------------------------------------------------------ ladder charts


def _svg_texts(svg: str) -> list[str]:
    """Every text element of a matplotlib SVG (saved with svg.fonttype 'none'), in document order."""
    root = ET.fromstring(svg)
    return ["".join(el.itertext()).strip() for el in root.iter() if el.tag.endswith("}text")]


def _xtick_labels(svg: str) -> list[str]:
    """The x tick labels of a matplotlib SVG chart, left to right (matplotlib groups them as ``xtick_<n>``)."""
    root = ET.fromstring(svg)
    return ["".join(t.itertext()).strip() for g in root.iter() if g.get("id", "").startswith("xtick_")
            for t in g.iter() if t.tag.endswith("}text")]


def test_ladder_charts_hold_every_measured_recipe_in_ladder_order(tmp_path):
    """The default CPU recipe sets (torch cpu, tf cpu, jax modes), measured in a shuffled order."""
    cpu = "cpu-2c-amd-epyc-7b13"
    measured = [("torch", "fp32-sdpa-compiledefault", 0.2), ("jax", "fp32-aot", 0.30), ("torch", "fp32-classic", 0.4),
                ("tf", "fp32-xla", 0.25), ("torch", "fp32-sdpa", 0.32), ("jax", "fp32-jit", 0.33), ("tf", "fp32", 0.5)]
    recs = [_record(fw, tag, "cpu", cpu, secs, preset="tiny", steps=4) for fw, tag, secs in measured]
    run = _saved_run(tmp_path / "0001_cpu.json", recs, [])
    page = tmp_path / "report.html"
    assert cmp.main([str(run), str(run), "--html", str(page)]) == 0
    text = page.read_text()
    svgs = re.findall(r"<svg.*?</svg>", text, flags=re.S)
    charts = {}
    for svg in svgs:
        texts = _svg_texts(svg)
        title = next(t for t in texts if t.startswith("optimization ladder"))
        charts[title.split(": ")[1].split(",")[0]] = (texts, _xtick_labels(svg))
    assert set(charts) == {"torch", "tf", "jax"}
    expected = {"torch": ["fp32-classic", "fp32-sdpa", "fp32-sdpa-compiledefault"], "tf": ["fp32", "fp32-xla"],
                "jax": ["fp32-jit", "fp32-aot"]}
    secs = {(fw, tag): s for fw, tag, s in measured}
    for fw, tags in expected.items():
        texts, xticks = charts[fw]
        assert xticks == tags  # every measured recipe, labelled by its tag, in the ladder's / recipe set's order
        assert f"speed-up over {tags[0]}" in texts
        first = secs[(fw, tags[0])]
        for tag in tags:  # each bar: its median and its speed-up over the first bar
            assert f"{first / secs[(fw, tag)]:.2f}x" in texts
    assert "<td>" in text and "tiny" in next(t for t in _svg_texts(svgs[0]) if t.startswith("optimization ladder"))


def test_recipe_order_follows_the_ladder_then_the_named_sets():
    assert cmp.recipe_order("torch", "cpu", ["fp32-sdpa", "fp32-sdpa-compiledefault", "fp32-classic"]) == [
        "fp32-classic", "fp32-sdpa", "fp32-sdpa-compiledefault"]
    assert cmp.recipe_order("tf", "cuda", ["fp32-savedmodel-xla", "mp16", "fp32", "fp32-savedmodel"]) == [
        "fp32", "mp16", "fp32-savedmodel", "fp32-savedmodel-xla"]
    assert cmp.recipe_order("jax", "cpu", ["bf16-aot-splithead-4dev", "bf16-aot-splithead"]) == [
        "bf16-aot-splithead", "bf16-aot-splithead-4dev"]
    assert cmp.recipe_order("torch", "cpu", ["fp16-sdpa", "fp32-classic"]) == ["fp32-classic", "fp16-sdpa"]
    assert cmp.recipe_order("nope", None, ["b", "a"]) == ["b", "a"]


def test_base_only_and_head_only_recipes_both_get_a_bar(tmp_path):
    cpu = "cpu-2c-x"
    base = _saved_run(tmp_path / "0001_b.json", [_record("torch", t, "cpu", cpu, s, preset="tiny", steps=4)
                                                  for t, s in [("fp32-classic", 0.4), ("fp32-sdpa", 0.3)]], [])
    head = _saved_run(tmp_path / "0002_h.json", [_record("torch", t, "cpu", cpu, s, preset="tiny", steps=4)
                                                  for t, s in [("fp32-classic", 0.4), ("fp32-sdpa-compiledefault", 0.2)]], [])
    (svg,) = cmp.ladder_figures(cmp.load_run(base), cmp.load_run(head))
    texts = _svg_texts(svg)
    assert _xtick_labels(svg) == ["fp32-classic", "fp32-sdpa", "fp32-sdpa-compiledefault"]
    assert "2.00x" in texts and "1.00x" in texts  # head's bars over head's first bar


def test_contract_describes_the_layout_relative_to_the_repo_root():
    text = (Path(pub.__file__).resolve().parents[1] / "docs" / "CONTRACT.md").read_text()
    assert not re.search(r"(?<![\w.])/(work|home|root|tmp|Users)/", text), "an absolute machine path in docs/CONTRACT.md"
    assert "relative to the repository root" in text and "`.venv/`" in text


def test_tf_tables_match_at_their_own_conditions(tmp_path):
    """KerasCV guide at 25 steps, the SavedModel seed at 50 steps, both 3 images at 512x512 on an A100 40GB."""
    hw = "cuda-1x-nvidia-a100-sxm4-40gb"
    at25 = [_record("tf", t, "cuda", hw, s, preset="sd15", steps=25, batch_size=3)
            for t, s in [("fp32", 10.0), ("mp16", 7.0), ("fp32-xla", 8.0), ("mp16-xla", 5.0), ("fp32-savedmodel", 9.0)]]
    at50 = [_record("tf", t, "cuda", hw, s, preset="sd15", steps=50, batch_size=3)
            for t, s in [("fp32-xla", 15.0), ("fp32-savedmodel-xla", 12.0), ("fp32-savedmodel", 16.0)]]
    run = cmp.load_run(_saved_run(tmp_path / "0001_tf.json", at25 + at50, ["NVIDIA A100-SXM4-40GB"]))
    found = pub.run_figures(pub.saved_run_records(run.data), run.machine_info).found
    got = {(m.figure.table, m.figure.recipe, m.figure.conditions[3]) for m in found}
    assert got == {("kerascv-guide-a100", t, 25) for t in ("fp32", "mp16", "fp32-xla", "mp16-xla")} | {
        ("tf-savedmodel-a100", t, 50) for t in ("fp32-xla", "fp32-savedmodel-xla", "fp32-savedmodel")}
    by = {(m.figure.table, m.figure.recipe): m for m in found}
    assert by[("kerascv-guide-a100", "mp16-xla")].measured_speedup == pytest.approx(10.0 / 5.0)
    assert by[("kerascv-guide-a100", "mp16-xla")].published_speedup == pytest.approx(8.52483057975769 / 4.5636537075042725)
    assert by[("tf-savedmodel-a100", "fp32-savedmodel-xla")].measured_speedup == pytest.approx(16.0 / 12.0)
    assert by[("tf-savedmodel-a100", "fp32-xla")].ratio == pytest.approx(15.0 / 12.40)
    # The 80GB guide's figures do not apply to a 40GB A100.
    assert not any(m.figure.table == "diffusers-guide-a100-sdxl" for m in found)
