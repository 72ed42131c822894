"""``python -m diffperf compare BASE HEAD``: two pytest-benchmark saved runs, test by test.

A run is named by its number (``0003``), a fragment of its file name, or a path; numbers and names are
looked up under ``--storage`` (default ``.benchmarks``, pytest-benchmark's ``<machine>/NNNN_name.json``
layout). Latency verdicts use the same rule as the gate (:func:`diffperf.stats.compare_samples`) on the
round times of each side (the diffperf record's ``samples_s``, else pytest-benchmark's ``stats.data``).
Outputs: a terminal table, ``--markdown`` (for ``$GITHUB_STEP_SUMMARY``) and ``--html`` (self-contained:
figures inline as SVG). ``compare RUN`` alone renders the A/B table of an A/B run (:mod:`diffperf.ab_report`);
a head run carrying A/B results gets that table after the run-to-run one. Exit status: 0, 1 when a test
regressed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import io
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from diffperf import stats
from diffperf.fileio import atomic_write_text, read_json
from diffperf.gate import REFERENCE_NOTICE, machine_speed_factor, reference_notice
from diffperf.trend import change_points

RECORD_SCHEMA = 1
VERDICTS = ("regressed", "improved", "unchanged", "inconclusive")
_RUN_RE = re.compile(r"^(\d{4})_(.*)\.json$")


class RunError(Exception):
    """A saved run that cannot be used; the message names the file and the problem."""


class HardwareMismatch(RunError):
    """The two runs come from different hardware (use ``--force`` to compare anyway)."""


@dataclasses.dataclass
class SavedRun:
    path: Path
    data: dict

    @property
    def number(self) -> int | None:
        m = _RUN_RE.match(self.path.name)
        return int(m.group(1)) if m else None

    @property
    def label(self) -> str:
        commit = (self.commit_info.get("id") or "")[:8]
        num = f"{self.number:04d}" if self.number is not None else self.path.stem
        return f"{num}@{commit}" if commit and commit != "unversio" else num

    @property
    def machine_info(self) -> dict:
        return self.data.get("machine_info") or {}

    @property
    def commit_info(self) -> dict:
        return self.data.get("commit_info") or {}

    @property
    def benchmarks(self) -> dict[str, dict]:
        return {b["fullname"]: b for b in self.data["benchmarks"]}


def load_run(path: str | os.PathLike[str]) -> SavedRun:
    """Read and validate one pytest-benchmark saved run; :class:`RunError` names the file and the problem."""
    path = Path(path)
    data = read_json(path, "saved run", RunError)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise RunError(f"saved run {path}: not a pytest-benchmark saved run (no 'benchmarks' list)")
    if not isinstance(data.get("machine_info"), dict):
        raise RunError(f"saved run {path}: no 'machine_info' object")
    for i, b in enumerate(data["benchmarks"]):
        if not isinstance(b, dict) or not isinstance(b.get("fullname"), str) or not isinstance(b.get("stats"), dict):
            raise RunError(f"saved run {path}: benchmark #{i} lacks 'fullname' or 'stats'")
        rec = b.get("extra_info") or {}
        if "diffperf_schema" in rec:
            schema = rec["diffperf_schema"]
            if schema != RECORD_SCHEMA:
                age = "an older" if isinstance(schema, int) and schema < RECORD_SCHEMA else "an unknown"
                raise RunError(f"saved run {path}: {b['fullname']} has {age} diffperf record schema {schema!r}, "
                               f"this diffperf reads schema {RECORD_SCHEMA}; re-run the suite to record it again")
            samples = rec.get("samples_s")
            if not isinstance(samples, list) or not samples or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in samples):
                raise RunError(f"saved run {path}: {b['fullname']}: 'samples_s' must be a non-empty list of positive seconds")
    return SavedRun(path, data)


def saved_runs(storage: str | os.PathLike[str] = ".benchmarks") -> list[Path]:
    """Every ``NNNN_*.json`` under ``storage``, ordered by machine folder then number."""
    root = Path(storage)
    found = [p for p in root.rglob("*.json") if _RUN_RE.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: (str(p.parent), int(_RUN_RE.match(p.name).group(1))))


def resolve_run(spec: str, storage: str | os.PathLike[str] = ".benchmarks") -> Path:
    """The file ``spec`` names: a path, a run number (``3`` or ``0003``) or a unique name fragment."""
    p = Path(spec)
    if p.is_file():
        return p
    runs = saved_runs(storage)
    if spec.isdigit():
        hits = [r for r in runs if int(_RUN_RE.match(r.name).group(1)) == int(spec)]
    else:
        hits = [r for r in runs if spec in r.name]
    if len(hits) == 1:
        return hits[0]
    known = ", ".join(r.name for r in runs[-10:]) or "none"
    if not hits:
        raise RunError(f"no saved run matches {spec!r} under {storage} (latest: {known})")
    raise RunError(f"{spec!r} matches several saved runs under {storage}: {', '.join(str(h) for h in hits)}; give a path")


def _record(bench: dict) -> dict:
    rec = bench.get("extra_info") or {}
    return rec if "diffperf_schema" in rec else {}


def samples_of(bench: dict) -> list[float]:
    """Round times of one benchmark: the diffperf record's, else pytest-benchmark's ``stats.data``."""
    rec = _record(bench)
    if rec.get("samples_s"):
        return [float(x) for x in rec["samples_s"]]
    return [float(x) for x in bench["stats"].get("data") or []]


def median_of(bench: dict) -> float:
    s = samples_of(bench)
    return float(stats.np.median(s)) if s else float(bench["stats"]["median"])


def hardware_identity(run: SavedRun) -> dict[str, Any]:
    """What must match between two runs: diffperf hardware ids of the tests, else CPU and GPU descriptions."""
    ids = sorted({_record(b).get("hardware_id") for b in run.data["benchmarks"]} - {None})
    if ids:
        return {"hardware_ids": ids}
    mi = run.machine_info
    if mi.get("hardware_ids"):
        return {"hardware_ids": sorted(set(mi["hardware_ids"].values()))}
    cpu = mi.get("cpu") or {}
    return {"cpu": cpu.get("brand_raw") or mi.get("processor"), "cpu_count": cpu.get("count"),
            "gpu": (mi.get("gpu") or {}).get("models")}


@dataclasses.dataclass
class Row:
    test: str
    verdict: str  # regressed / improved / unchanged / inconclusive / new / removed
    base_median: float | None = None
    head_median: float | None = None
    ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    tolerance: float | None = None
    base_memory: float | None = None
    head_memory: float | None = None
    memory_verdict: str = "not compared"
    base_compile: float | None = None
    head_compile: float | None = None
    compile_verdict: str = "not compared"
    note: str = ""

    @property
    def regressed(self) -> bool:
        return "regressed" in (self.verdict, self.memory_verdict, self.compile_verdict)

    @property
    def memory_delta(self) -> float | None:
        if self.base_memory and self.head_memory is not None:
            return self.head_memory / self.base_memory - 1
        return None

    @property
    def compile_delta(self) -> float | None:
        if self.base_compile and self.head_compile is not None:
            return self.head_compile / self.base_compile - 1
        return None


def _steady(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("steady")
    return float(value) if isinstance(value, (int, float)) else None


def _single(measured: float | None, base: float | None, tol: float) -> str:
    if measured is None or not base:
        return "not compared"
    r = measured / base
    return "regressed" if r > 1 + tol else "improved" if r < 1 - tol else "unchanged"


def compare(base: SavedRun | str | os.PathLike[str], head: SavedRun | str | os.PathLike[str], force: bool = False,
            tolerance: float = 0.10, alpha: float = 0.05, memory_tolerance: float = 0.10,
            compile_tolerance: float = 0.25, rescale: bool = False) -> list[Row]:
    """One :class:`Row` per test of either run; :class:`HardwareMismatch` unless both ran on the same hardware.

    ``rescale`` rescales head rounds by the machine reference (as ``--perf-reference rescale``); without it a
    machine-speed change of 3 % or more is only noted.
    """
    base = base if isinstance(base, SavedRun) else load_run(base)
    head = head if isinstance(head, SavedRun) else load_run(head)
    bb, hbm = base.benchmarks, head.benchmarks
    pairs = [(_record(bb[t]).get("hardware_id"), _record(hbm[t]).get("hardware_id")) for t in bb if t in hbm]
    pairs = [p for p in pairs if p[0] and p[1]]
    if pairs:
        hb = {"hardware_ids": sorted({p[0] for p in pairs})}
        hh = {"hardware_ids": sorted({p[1] for p in pairs})}
        same = all(a == b for a, b in pairs)
    else:
        hb, hh = hardware_identity(base), hardware_identity(head)
        same = hb == hh
    if not same and not force:
        raise HardwareMismatch(
            f"refusing to compare runs from different hardware: {base.path} ran on {_hw_text(hb)}, "
            f"{head.path} on {_hw_text(hh)}; timings across machines say nothing about the code "
            "(pass --force to compare anyway)")
    rows = []
    for test in list(dict.fromkeys([*hbm, *bb])):
        if test not in bb:
            rows.append(Row(test, "new", head_median=median_of(hbm[test]), note="not in base"))
            continue
        if test not in hbm:
            rows.append(Row(test, "removed", base_median=median_of(bb[test]), note="not in head"))
            continue
        b, h = bb[test], hbm[test]
        rb, rh = _record(b), _record(h)
        tol = float(((rh.get("gate") or {}).get("tolerance")) or tolerance)
        sb, sh = samples_of(b), samples_of(h)
        row = Row(test, "inconclusive", base_median=median_of(b), head_median=median_of(h), tolerance=tol)
        if len(sb) >= 2 and len(sh) >= 2:
            factor, ref_note = machine_speed_factor(rh, rb)
            if factor != 1.0 and rescale:
                sh = [x * factor for x in sh]
                row.note = f"head rounds rescaled by {factor:.3f} for the machine's speed (reference workload)"
            elif abs(factor - 1.0) >= REFERENCE_NOTICE:
                row.note = reference_notice(factor, rb["reference_s"], rh["reference_s"], "--rescale-by-reference")
            elif ref_note:
                row.note = ref_note
            c = stats.compare_samples(sh, sb, tolerance=tol, alpha=alpha)
            row.verdict, row.ratio, row.ci_low, row.ci_high, row.p_value = c.verdict, c.ratio, c.ci.low, c.ci.high, c.p_value
        else:
            row.ratio = row.head_median / row.base_median
            row.note = "no round samples saved (run with the diffperf plugin or --benchmark-save-data): no test"
        row.base_memory, row.head_memory = _steady(rb.get("peak_memory_bytes")), _steady(rh.get("peak_memory_bytes"))
        if rb.get("memory_kind") == rh.get("memory_kind"):
            row.memory_verdict = _single(row.head_memory, row.base_memory, memory_tolerance)
        row.base_compile, row.head_compile = rb.get("compile_s"), rh.get("compile_s")
        row.compile_verdict = _single(row.head_compile, row.base_compile, compile_tolerance)
        rows.append(row)
    return rows


def _hw_text(hw: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in hw.items())


# ------------------------------------------------------------------------------------------------ rendering


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _cells(r: Row) -> list[str]:
    ratio = "n/a" if r.ratio is None else f"{r.ratio:.3f}"
    if r.ci_low is not None:
        ratio += f" [{r.ci_low:.3f}, {r.ci_high:.3f}]"
    mem = _pct(r.memory_delta) + (" !" if r.memory_verdict == "regressed" else "")
    comp = _pct(r.compile_delta) + (" !" if r.compile_verdict == "regressed" else "")
    return [r.test, stats.fmt_seconds(r.base_median), stats.fmt_seconds(r.head_median), ratio,
            "n/a" if r.p_value is None else f"{r.p_value:.3g}", r.verdict, mem, comp]


HEADER = ["test", "base", "head", "ratio [CI]", "p", "verdict", "memory", "compile"]


def summary_line(rows: Sequence[Row]) -> str:
    counts = {v: sum(r.verdict == v for r in rows) for v in dict.fromkeys([*VERDICTS, *(r.verdict for r in rows)])}
    extra = sum(r.regressed and r.verdict != "regressed" for r in rows)
    text = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    return text + (f"; {extra} with a memory/compile regression" if extra else "")


def render_table(rows: Sequence[Row], base: SavedRun, head: SavedRun) -> str:
    """Plain-text table for the terminal."""
    body = [_cells(r) for r in rows]
    widths = [max(len(x[i]) for x in [HEADER, *body]) for i in range(len(HEADER))]
    out = [f"base {base.label} ({base.path})", f"head {head.label} ({head.path})", ""]
    for line in [HEADER, ["-" * w for w in widths], *body]:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    out += ["", summary_line(rows), *_notes(rows), "", *_published(head).text_lines()]
    return "\n".join(out)


def _published(head: SavedRun):
    """Head's cases beside the seeds' published figures (:mod:`diffperf.published`; context, not a verdict)."""
    from diffperf import published

    return published.run_figures(published.saved_run_records(head.data), head.machine_info, f"head {head.label}")


def _notes(rows: Sequence[Row], quote: str = "") -> list[str]:
    """One line per test that carries a note (rescaled rounds, nothing to test, new or removed)."""
    notes = [f"- {quote}{r.test}{quote}: {r.note}" for r in rows if r.note]
    return ["", "notes:", *notes] if notes else []


def render_markdown(rows: Sequence[Row], base: SavedRun, head: SavedRun) -> str:
    """Markdown for a CI job summary (``$GITHUB_STEP_SUMMARY``)."""
    icon = {"regressed": ":red_circle:", "improved": ":green_circle:", "unchanged": ":white_circle:",
            "inconclusive": ":grey_question:"}
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    out = [f"### diffperf: {esc(head.label)} vs {esc(base.label)}", "", f"**{summary_line(rows)}**", "",
           "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = _cells(r)
        cells[0] = f"`{esc(cells[0])}`"
        cells[5] = f"{icon.get(r.verdict, '')} {r.verdict}".strip()
        out.append("| " + " | ".join(esc(c) if i else c for i, c in enumerate(cells)) + " |")
    out += ["", "ratio = head median / base median with its 95% bootstrap interval; p = one-sided Mann-Whitney U; "
            "memory and compile = relative change of peak memory and compile seconds (`!` beyond tolerance)."]
    out += _notes(rows, quote="`")
    out += _published(head).markdown_lines()
    return "\n".join(out) + "\n"


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _framework_of(rec: dict) -> str:
    case = rec.get("case") or {}
    return str(rec.get("framework") or case.get("framework") or (rec.get("ladder") or "").split(":")[0])


def recipe_order(framework: str, device: str | None, tags: Sequence[str]) -> list[str]:
    """``tags`` in the order their framework lists them: the ladder, else the device's default set, else the
    first named set (``FrameworkSpec.named``) holding them all; tags in no set keep their order, last."""
    tags = list(dict.fromkeys(tags))
    try:
        from diffperf.cases import framework_spec

        spec = framework_spec(framework)
    except Exception:  # noqa: BLE001 - an unknown framework (or a run saved elsewhere): keep the run's order
        return tags
    named = {name: [r.tag() for r in recipes] for name, recipes in spec.named.items()}
    default = spec.default if isinstance(spec.default, str) else spec.default.get(device or "")
    for name in dict.fromkeys(["ladder", default, *named]):
        if name in named and set(tags) <= set(named[name]):
            return sorted(tags, key=named[name].index)
    known = list(dict.fromkeys(t for recipes in named.values() for t in recipes))
    return sorted(tags, key=lambda t: (known.index(t) if t in known else len(known) + tags.index(t)))


def _ladders(run: SavedRun) -> dict[tuple, dict[str, float]]:
    """Every measured case by framework and conditions: ``{(framework, preset, device, size): {recipe: median}}``."""
    out: dict[tuple, dict[str, float]] = {}
    for b in run.data["benchmarks"]:
        rec = _record(b)
        if not rec:
            continue
        case = rec.get("case") or {}
        size = (f"{case['height']}x{case['width']}, batch {case.get('batch_size')}, {case.get('steps')} steps"
                if case.get("height") else None)
        key = (_framework_of(rec), case.get("preset"), case.get("device") or rec.get("device"), size)
        out.setdefault(key, {})[str(case.get("recipe") or b["name"])] = median_of(b)
    return out


def ladder_figures(base: SavedRun, head: SavedRun) -> list[str]:
    """One bar chart per framework and conditions: every measured recipe, labelled by its tag, in its
    ladder's (or recipe set's) order, base and head side by side, head's speed-up over the first bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    lb, lh = _ladders(base), _ladders(head)
    for key in dict.fromkeys([*lh, *lb]):
        base_by, head_by = lb.get(key, {}), lh.get(key, {})
        labels = recipe_order(key[0], key[2], [*head_by, *base_by])
        x = stats.np.arange(len(labels))
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(labels)), 3.6))
        nan = float("nan")
        hv = [head_by.get(s, nan) for s in labels]
        bv = [base_by.get(s, nan) for s in labels]
        shown, shown_label = (hv, f"head {head.label}") if head_by else (bv, f"base {base.label}")
        if base_by and head_by:
            ax.bar(x - 0.2, bv, 0.4, label=f"base {base.label}", color="#bbbbbb")
            bars = ax.bar(x + 0.2, hv, 0.4, label=shown_label, color="#4c72b0")
        else:
            bars = ax.bar(x, shown, 0.6, label=shown_label, color="#4c72b0")
        first_at = next(i for i, v in enumerate(shown) if v == v)
        first = shown[first_at]
        for bar, v in zip(bars, shown):
            if v == v:
                ax.annotate(f"{v:.3g}s\n{first / v:.2f}x", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                            va="bottom", fontsize=8)
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.set_ylabel("median latency (s)")
        ax.set_title("optimization ladder: " + ", ".join(str(k) for k in key if k), fontsize=10)
        ax.legend(fontsize=8, title=f"bar labels: {shown_label.split()[0]} median,\nspeed-up over {labels[first_at]}",
                  title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, off the bars
        ax.margins(y=0.25)
        with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays <text>: readable, searchable, testable
            figs.append(_svg(fig))
    return figs


def trend_series(runs: Sequence[SavedRun]) -> dict[str, list[tuple[str, float]]]:
    """Per test: (run label, median) over ``runs`` in order."""
    series: dict[str, list[tuple[str, float]]] = {}
    for run in runs:
        for test, b in run.benchmarks.items():
            series.setdefault(test, []).append((run.label, median_of(b)))
    return series


def trend_figures(runs: Sequence[SavedRun]) -> list[tuple[str, list[int], str]]:
    """(test, change-point indices, inline SVG) per test seen in at least three runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for test, pts in trend_series(runs).items():
        if len(pts) < 3:
            continue
        labels, values = [p[0] for p in pts], [p[1] for p in pts]
        cps = change_points(values)  # ruptures PELT (diffperf/trend.py)
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(pts)), 2.8))
        ax.plot(range(len(values)), values, marker="o", ms=3, color="#4c72b0")
        for i, cp in enumerate(cps):
            ax.axvline(cp - 0.5, color="#c44e52", ls="--", label="change point" if i == 0 else None)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("median (s)")
        ax.set_title(test, fontsize=9)
        if cps:
            ax.legend(fontsize=7)
        out.append((test, cps, _svg(fig)))
    return out


def render_html(rows: Sequence[Row], base: SavedRun, head: SavedRun, trend_runs: Sequence[SavedRun] = ()) -> str:
    """A self-contained HTML report: table, ladder bar charts, trends with change points (SVG inline)."""
    e = html.escape
    cls = {"regressed": "bad", "improved": "good"}
    trs = "\n".join("<tr class='%s'>%s</tr>" % (cls.get(r.verdict, ""), "".join(f"<td>{e(c)}</td>" for c in _cells(r)))
                    for r in rows)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>diffperf compare</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:3px 8px;font-size:13px}tr.bad{background:#fbe3e4}tr.good{background:#e3f6e3}</style></head><body>",
        f"<h1>diffperf: {e(head.label)} vs {e(base.label)}</h1><p><b>{e(summary_line(rows))}</b></p>",
        f"<p>base: {e(str(base.path))} ({e(str(base.data.get('datetime', '')))})<br>"
        f"head: {e(str(head.path))} ({e(str(head.data.get('datetime', '')))})</p>",
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEADER) + f"</tr>\n{trs}</table>",
        _published(head).html_section(),
    ]
    ladders = ladder_figures(base, head)
    if ladders:
        parts.append("<h2>Optimization ladder</h2>" + "".join(f"<div>{svg}</div>" for svg in ladders))
    if trend_runs:
        figs = trend_figures(trend_runs)
        parts.append(f"<h2>Trends over {len(trend_runs)} saved runs</h2>")
        for test, cps, svg in figs:
            labels = [lbl for lbl, _ in trend_series(trend_runs)[test]]
            where = ", ".join(f"between {labels[i - 1]} and {labels[i]}" for i in cps if 0 < i < len(labels)) or "none"
            parts.append(f"<div><p>{e(test)}: change points: {e(where)}</p>{svg}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def trend_runs_for(head: SavedRun, storage: str | os.PathLike[str], n: str) -> list[SavedRun]:
    """The last ``n`` (or ``all``) saved runs of head's folder up to head, oldest first.

    Runs that do not load or ran on other hardware than head are left out (with a note on stderr).
    """
    folder = head.path.parent
    paths = [p for p in saved_runs(storage) if p.parent == folder] or [head.path]
    if head.number is not None:
        paths = [p for p in paths if int(_RUN_RE.match(p.name).group(1)) <= head.number]
    if n != "all":
        paths = paths[-int(n):]
    runs, hw = [], hardware_identity(head)
    for p in paths:
        try:
            run = load_run(p)
        except RunError as exc:
            print(f"diffperf compare: skipping in trend: {exc}", file=sys.stderr)
            continue
        if hardware_identity(run) != hw:
            print(f"diffperf compare: skipping in trend: {p} ran on other hardware", file=sys.stderr)
            continue
        runs.append(run)
    return runs


def main(argv: Iterable[str] | None = None) -> int:
    """``compare BASE HEAD [--storage DIR] [--markdown FILE] [--html FILE] [--force] [--trend N|all]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="python -m diffperf compare", description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="base run; alone, an A/B run (--perf-ab-base/--perf-ab-python) to render")
    p.add_argument("head", nargs="?", help="head run (omit it to render the A/B section of one A/B run)")
    p.add_argument("--storage", default=".benchmarks", help="pytest-benchmark storage folder (default .benchmarks)")
    p.add_argument("--markdown", help="write a markdown report here ('-' for $GITHUB_STEP_SUMMARY)")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--force", action="store_true", help="compare runs from different hardware anyway")
    p.add_argument("--rescale-by-reference", action="store_true",
                   help="rescale head rounds by the machine reference workload before the test (default: only note it)")
    p.add_argument("--trend", help="plot the last N saved runs (or 'all') in the HTML report")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--alpha", type=float, default=0.01)
    a = p.parse_args(argv)
    if a.trend is not None and a.trend != "all" and not (a.trend.isdigit() and int(a.trend) >= 2):
        p.error("--trend takes a number >= 2 or 'all'")
    if a.head is None:
        return _main_ab(a)
    try:
        base = load_run(resolve_run(a.base, a.storage))
        head = load_run(resolve_run(a.head, a.storage))
        rows = compare(base, head, force=a.force, tolerance=a.tolerance, alpha=a.alpha, rescale=a.rescale_by_reference)
    except RunError as exc:
        print(f"diffperf compare: error: {exc}", file=sys.stderr)
        return 2
    from diffperf.ab_report import ab_records, render_ab_markdown, render_ab_table

    ab = ab_records(head)
    print(render_table(rows, base, head) + (f"\n\n{render_ab_table(ab)}" if ab else ""))
    if a.markdown:
        write_markdown(a.markdown, render_markdown(rows, base, head) + (f"\n{render_ab_markdown(ab)}" if ab else ""))
    if a.html:
        trend = trend_runs_for(head, a.storage, a.trend) if a.trend else []
        atomic_write_text(a.html, render_html(rows, base, head, trend))
    return 1 if any(r.regressed for r in rows) else 0


def write_markdown(option: str, md: str) -> None:
    """``--markdown`` output: appended to ``$GITHUB_STEP_SUMMARY`` for ``-`` (nothing outside CI), else a file
    written atomically."""
    if option == "-":
        target = os.environ.get("GITHUB_STEP_SUMMARY")
        if target:
            with open(target, "a", encoding="utf-8") as fh:
                fh.write(md)
    else:
        atomic_write_text(option, md)


def _main_ab(a: argparse.Namespace) -> int:
    """``compare RUN``: the A/B table of one A/B run; exit 1 when a test regressed, 2 on bad input."""
    from diffperf.ab_report import ab_records, regressed, render_ab_markdown, render_ab_table

    try:
        run = load_run(resolve_run(a.base, a.storage))
    except RunError as exc:
        print(f"diffperf compare: error: {exc}", file=sys.stderr)
        return 2
    records = ab_records(run)
    if not records:
        print(f"diffperf compare: error: {run.path} carries no A/B results (run with --perf-ab-base or "
              f"--perf-ab-python); give a base and a head run to compare two runs", file=sys.stderr)
        return 2
    print(render_ab_table(records))
    if a.markdown:
        write_markdown(a.markdown, render_ab_markdown(records))
    if a.html:
        print("diffperf compare: --html renders two runs; not written for one A/B run", file=sys.stderr)
    return 1 if any(regressed(ab) for _t, ab in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
