"""The A/B section of ``python -m diffperf compare``: a saved run's ``extra_info["ab"]`` as a table.

An A/B run carries both sides of every test (head and base rounds, measured in pairs), so it is
rendered on its own: ``python -m diffperf compare RUN``; a head run given with a base run also gets
this section after the run-to-run table.
"""

from __future__ import annotations

from typing import Sequence

from diffperf import stats

HEADER = ["test", "base", "head", "ratio [CI]", "p", "pairs", "min det.", "verdict", "memory", "compile"]


def ab_records(run) -> list[tuple[str, dict]]:
    """``(test, ab record)`` of every benchmark of a saved run that carries one."""
    out = []
    for name, bench in run.benchmarks.items():
        ab = (bench.get("extra_info") or {}).get("ab")
        if isinstance(ab, dict):
            out.append((name, ab))
    return out


def regressed(ab: dict) -> bool:
    return "regressed" in (ab.get("verdict"), ab.get("memory_verdict"), ab.get("compile_verdict"))


def _median(xs) -> float | None:
    return float(stats.np.median(xs)) if xs else None


def _cells(test: str, ab: dict) -> list[str]:
    if ab.get("verdict") == "error":
        return [test, "n/a", "n/a", "n/a", "n/a", "0", "n/a", "error", "", ""]
    low, high = ab.get("ci") or (None, None)
    ratio = f"{ab['ratio']:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")
    mds = ab.get("min_detectable_slowdown")
    return [test, stats.fmt_seconds(_median(ab.get("base_samples_s"))), stats.fmt_seconds(_median(ab.get("head_samples_s"))),
            ratio, f"{ab['p']:.3g}", _pairs(ab), "n/a" if mds is None else f"{mds:.1%}", str(ab["verdict"]),
            str(ab.get("memory_verdict", "")), str(ab.get("compile_verdict", ""))]


def _pairs(ab: dict) -> str:
    procs = ab.get("processes") or 1
    if (ab.get("offset_prior") or {}).get("settled_first_pair"):
        return f"{ab.get('pairs')} in 1 proc (A/A offsets)"
    return f"{ab.get('pairs')} in {procs} proc" if procs > 1 else str(ab.get("pairs"))


def _commits(records: Sequence[tuple[str, dict]]) -> str:
    if not records:
        return ""
    ab = records[0][1]
    base, head = ab.get("base_commit") or {}, ab.get("head_commit") or {}
    b = (base.get("id") or "?")[:12] + (f" ({base['rev']})" if base.get("rev") else "")
    h = (head.get("id") or "?")[:12] + (" (dirty)" if head.get("dirty") else "")
    py_b = ((ab.get("base") or {}).get("python")) or "?"
    py_h = ((ab.get("head") or {}).get("python")) or "?"
    return f"A/B: head {h} ({py_h}) vs base {b} ({py_b}), rounds in random-order pairs"


def _errors(records: Sequence[tuple[str, dict]], quote: str = "") -> list[str]:
    lines = [f"- {quote}{t}{quote}: {ab.get('error', '').splitlines()[0] if ab.get('error') else ''}"
             for t, ab in records if ab.get("verdict") == "error"]
    return ["", "errors:", *lines] if lines else []


def render_ab_table(records: Sequence[tuple[str, dict]]) -> str:
    """Plain-text A/B table."""
    body = [_cells(t, ab) for t, ab in records]
    widths = [max(len(x[i]) for x in [HEADER, *body]) for i in range(len(HEADER))]
    out = [_commits(records), ""]
    for line in [HEADER, ["-" * w for w in widths], *body]:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    counts = {}
    for _t, ab in records:
        counts[ab.get("verdict")] = counts.get(ab.get("verdict"), 0) + 1
    out += ["", ", ".join(f"{n} {v}" for v, n in counts.items()), *_errors(records)]
    return "\n".join(out)


def render_ab_markdown(records: Sequence[tuple[str, dict]]) -> str:
    """Markdown A/B table for a CI job summary."""
    icon = {"regressed": ":red_circle:", "improved": ":green_circle:", "unchanged": ":white_circle:",
            "inconclusive": ":grey_question:", "error": ":warning:"}
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    out = ["### diffperf A/B", "", esc(_commits(records)), "", "| " + " | ".join(HEADER) + " |",
           "|" + "---|" * len(HEADER)]
    for t, ab in records:
        cells = _cells(t, ab)
        cells[0] = f"`{esc(cells[0])}`"
        cells[7] = f"{icon.get(ab.get('verdict'), '')} {cells[7]}".strip()
        out.append("| " + " | ".join(esc(c) if i else c for i, c in enumerate(cells)) + " |")
    out += ["", "ratio = exp(median of paired log(head/base)) with its bootstrap interval; p = one-sided Wilcoxon "
            "signed-rank; across K process pairs (\"in K proc\"): ratio = exp(mean of the pairs' median log-ratios), "
            "interval and p from a moderated t over them; min det. = smallest slowdown the pairs could detect; "
            "memory and compile: head vs base, single values against their tolerances."]
    out += _errors(records, quote="`")
    return "\n".join(out) + "\n"
