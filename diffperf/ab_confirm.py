"""``python -m diffperf confirm RUN -- PYTEST ARGS``: re-measure the stored-baseline gate's flags as A/B.

A test the gate flagged in ``RUN`` (a saved or merged run: latency, peak memory or compile time
"regressed" against its baseline) is measured again as an interleaved A/B against the commit its baseline
records (``extra_info["gate"]["baseline_commit"]``), one pytest process per baseline commit with
``--perf-select`` and ``--perf-ab-base``. A flag the A/B also calls "regressed" is *confirmed*; one it does
not is *machine drift*. The report (terminal, ``--markdown``) says which is which.

Exit status: 0 when nothing is confirmed and every failure of ``RUN`` was a gate flag the A/B cleared; 1
when a flag is confirmed, a flag has no baseline commit to measure against, an A/B re-measurement failed,
or ``RUN`` lists failures that are not gate flags (``diffperf_failures``: crashes, fidelity); 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable



def gate_flags(run) -> list[dict]:
    """The tests the gate flagged in ``run``: ``{"test", "commit", "what", "ratio"}``."""
    out = []
    for name, bench in run.benchmarks.items():
        gate = (bench.get("extra_info") or {}).get("gate") or {}
        what = [k for k, key in (("latency", "verdict"), ("peak memory", "memory_verdict"),
                                 ("compile time", "compile_verdict")) if gate.get(key) == "regressed"]
        if what:
            out.append({"test": name, "commit": gate.get("baseline_commit"), "what": what, "ratio": gate.get("ratio")})
    return out


def remeasure(flags: list[dict], pytest_args: list[str], python: str, workdir: Path) -> dict[str, dict]:
    """A/B of every flag against its baseline commit; ``{test: extra_info["ab"] or {"verdict": "error", ...}}``."""
    results: dict[str, dict] = {}
    by_commit: dict[str, list[str]] = {}
    for f in flags:
        if f["commit"]:
            by_commit.setdefault(f["commit"], []).append(f["test"])
    for i, (commit, tests) in enumerate(sorted(by_commit.items())):
        select, out = workdir / f"confirm-{i}.select", workdir / f"confirm-{i}.json"
        select.write_text("\n".join(tests) + "\n", encoding="utf-8")
        cmd = [python, "-m", "pytest", *pytest_args, "--perf-select", str(select), "--perf-ab-base", commit,
               "--benchmark-json", str(out)]
        print(f"diffperf confirm: {' '.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = {}
        if out.is_file():
            got = {b["fullname"]: (b.get("extra_info") or {}).get("ab") for b in json.loads(out.read_text())["benchmarks"]}
        for test in tests:
            ab = got.get(test)
            results[test] = ab if isinstance(ab, dict) else {
                "verdict": "error", "error": f"no A/B result (pytest exit status {proc.returncode}): "
                                            f"{(proc.stdout + proc.stderr).strip()[-300:]}"}
    return results


def conclude(flags: list[dict], results: dict[str, dict]) -> list[dict]:
    """One row per flag: confirmed / machine drift / not confirmed (why)."""
    rows = []
    for f in flags:
        ab = results.get(f["test"])
        if not f["commit"]:
            outcome = "not confirmed: the baseline records no commit"
        elif not ab or ab.get("verdict") == "error":
            outcome = f"not confirmed: A/B failed ({(ab or {}).get('error', 'no result')})"
        elif "regressed" in (ab.get("verdict"), ab.get("memory_verdict"), ab.get("compile_verdict")):
            outcome = "confirmed"
        else:
            outcome = "machine drift"
        rows.append(f | {"ab": ab, "outcome": outcome})
    return rows


def _ab_text(ab: dict | None) -> str:
    if not ab or ab.get("ratio") is None:
        return "n/a"
    low, high = ab["ci"]
    return f"{ab['verdict']} {ab['ratio']:.3f} [{low:.3f}, {high:.3f}]"


def render(rows: list[dict], other_failures: list[dict], markdown: bool = False) -> str:
    confirmed = sum(r["outcome"] == "confirmed" for r in rows)
    drift = sum(r["outcome"] == "machine drift" for r in rows)
    head = (f"{len(rows)} gate flag(s): {confirmed} confirmed by A/B, {drift} machine drift, "
            f"{len(rows) - confirmed - drift} not confirmed")
    header = ["test", "gate", "baseline commit", "A/B", "outcome"]
    body = [[r["test"], f"{', '.join(r['what'])} regressed" + (f" {r['ratio']:.3f}" if r.get("ratio") else ""),
             (r["commit"] or "none")[:12], _ab_text(r["ab"]), r["outcome"]] for r in rows]
    if markdown:
        out = ["### diffperf: gate flags re-measured as A/B", "", f"**{head}**", ""]
        if body:
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    else:
        widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
        out = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]
    if other_failures:
        out += ["", "failures that are not gate flags:"]
        out += [f"- {f.get('nodeid')}: {(f.get('reason') or f.get('outcome') or '').splitlines()[0][:200]}"
                for f in other_failures]
    return "\n".join(out) + "\n"


def main(argv: Iterable[str] | None = None) -> int:
    from diffperf.compare import RunError, load_run, resolve_run, write_markdown

    argv = list(sys.argv[1:] if argv is None else argv)
    own, pytest_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m diffperf confirm", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="saved or merged run (number, name fragment or path)")
    p.add_argument("--storage", default=".benchmarks", help="pytest-benchmark storage folder (default .benchmarks)")
    p.add_argument("--markdown", help="write the report here ('-' for $GITHUB_STEP_SUMMARY)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the re-measurement (default: this one)")
    a = p.parse_args(own)
    try:
        run = load_run(resolve_run(a.run, a.storage))
    except RunError as exc:
        print(f"diffperf confirm: error: {exc}", file=sys.stderr)
        return 2
    flags = gate_flags(run)
    flagged = {f["test"] for f in flags}
    other = [f for f in run.data.get("diffperf_failures") or [] if f.get("nodeid") not in flagged]
    with tempfile.TemporaryDirectory(prefix="diffperf-confirm-") as tmp:
        results = remeasure(flags, pytest_args, a.python, Path(tmp)) if flags else {}
    rows = conclude(flags, results)
    print(render(rows, other))
    if a.markdown:
        write_markdown(a.markdown, render(rows, other, markdown=True))
    return 1 if other or any(r["outcome"] != "machine drift" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
