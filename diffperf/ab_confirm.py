"""Gate flags re-measured as interleaved A/B: inline in the run that flags them, or afterwards on a saved run.

Inline (``--perf-confirm ab``, the default): when the stored-baseline gate flags a test's latency, peak
memory or compile time, the still-built pipeline is measured again in random-order pairs against the commit
of the baseline's latest run, built in a base worker (:mod:`diffperf.ab`), and the test fails only when the
A/B confirms: :func:`confirm_flag`.

``python -m diffperf confirm RUN -- PYTEST ARGS`` does the same for a saved run, in new processes.

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
from typing import Any, Iterable

# Package versions whose difference a same-interpreter A/B cannot measure (everything the harness records but these).
_NOT_STACK = ("pytest-benchmark",)


def stack_changes(baseline_versions: dict | None, versions: dict) -> list[str]:
    """``"torch 2.12.0 -> 2.13.0"`` for every stack package whose version differs from the baseline's."""
    base = baseline_versions or {}
    return [f"{k} {base[k]} -> {versions[k]}" for k in sorted(set(base) & set(versions))
            if k not in _NOT_STACK and base[k] != versions[k]]


# The single-value figures a flag may name: (name in messages, gate verdict key, A/B block field).
SINGLE_VALUE_FLAGS = (("peak memory", "memory", "memory"), ("compile time", "compile", "compile"))
# Fresh process pairs a flag of peak memory or compile time is judged on (in addition to the first pair, whose
# two processes are unlike: see diffperf.ab._across_pairs); it must be beyond the tolerance in every one.
SINGLE_VALUE_PAIRS = 2


def confirm_flag(sessions: dict, prepared, outcome, *, rootdir: Path, test_id: str, tolerance: float, alpha: float,
                 rounds: int, warmup_rounds: int, max_time_s: float, inject_slowdown: float, process_cv: float,
                 timeout_s: float, seed: int, malloc: str, processes: int = 1, memory_tolerance: float = 0.10,
                 compile_tolerance: float = 0.25, case_time_s: float = 600.0):
    """Re-measure the gate's flags (``outcome``: latency, peak memory, compile time) as A/B against the
    baseline's commit.

    ``sessions`` caches one :class:`diffperf.ab.AbSession` per baseline commit (the caller closes them).
    Returns a new :class:`diffperf.gate.GateOutcome` that fails while any flag stands. A latency flag stands
    when the A/B confirms it, and also when nothing can clear it: no baseline commit, a commit missing from
    this clone, stack versions that differ from the baseline's (one interpreter's A/B compares code, not an
    upgrade), a failed A/B, or an A/B that is inconclusive. Only an A/B verdict "unchanged" or "improved"
    clears it (machine drift). A peak-memory or compile-time flag is judged on :data:`SINGLE_VALUE_PAIRS`
    fresh process pairs (:func:`diffperf.ab._across_pairs`): confirmed when the head is beyond the tolerance
    in every pair, cleared when it is not, standing when no fresh pair measured it (``--perf-ab-processes 1``).
    """
    from diffperf import ab, stats
    from diffperf.gate import GateOutcome
    from diffperf.hardware import software_versions

    info = dict(outcome.info)
    commit = info.get("baseline_commit")
    latency_flag = info.get("verdict") == "regressed"
    singles = [(name, key) for name, key, _ in SINGLE_VALUE_FLAGS if info.get(f"{key}_verdict") == "regressed"]
    conf: dict[str, Any] = {"base_commit": commit, "flag_ratio": info.get("history_ratio", info.get("ratio"))}
    cmp = got = None
    changes = stack_changes(info.get("baseline_versions"), software_versions())
    if not commit:
        why = "the baseline records no commit to measure against"
    elif changes:
        why = (f"the stack differs from the baseline's ({', '.join(changes)}); an A/B in this interpreter compares "
               f"code only (measure an upgrade with --perf-ab-python)")
    else:
        why = None
        try:
            session = sessions.get(commit)
            if session is None:
                settings = ab.configure(rootdir, commit, None, timeout_s, seed, malloc, processes, case_time_s)
                session = sessions[commit] = ab.AbSession(settings)
            got = ab.pair_up(session, prepared, test_id=test_id, rounds=rounds, warmup_rounds=warmup_rounds,
                             max_time_s=max_time_s, tolerance=tolerance, alpha=alpha,
                             inject_slowdown=inject_slowdown, process_cv=process_cv,
                             min_processes=1 + SINGLE_VALUE_PAIRS if singles else 0)
        except ab.AbError as exc:
            if isinstance(exc, ab.AbWorkerError) and commit in sessions:
                sessions[commit].discard_worker()
            why = f"the A/B failed: {exc}"
        else:
            cmp = got.comparison
            conf.update(verdict=cmp.verdict, ratio=cmp.ratio, ci=[cmp.ci_low, cmp.ci_high], p=cmp.p_value,
                        processes=cmp.processes, blocks=[b.as_dict() for b in got.blocks],
                        pairs=cmp.pairs, order=got.pairs.order, order_seed=got.seed, process_cv=process_cv,
                        min_detectable_slowdown=cmp.min_detectable, pairs_seconds=got.pairs.seconds,
                        head_samples_s=got.pairs.head, base_samples_s=got.pairs.base,
                        head_commit=session.head_commit)
    where = f"against baseline commit {commit[:12]}" if commit else ""
    flags: dict[str, str] = {}
    lines: list[str] = []
    if latency_flag:
        lat_why = why or (f"the A/B is inconclusive{f' ({got.replication_stopped})' if got.replication_stopped else ''}"
                          if cmp.verdict == "inconclusive" else None)
        if cmp is not None and cmp.verdict == "regressed":
            flags["latency"], line = "confirmed", f"confirmed by interleaved A/B {where}: {cmp.describe()}"
        elif lat_why is None:
            flags["latency"], line = "machine drift", (f"not confirmed by interleaved A/B {where} (machine drift, "
                                                       f"not failing): {cmp.describe()}")
        else:
            flags["latency"], line = "not confirmable", f"flag stands, not confirmable: {lat_why}"
            line += f" ({cmp.describe()})" if cmp is not None else ""
        lines.append(line)
    for name, key in singles:
        figures = [getattr(b, key) for b in (got.blocks[1:] if got is not None else ()) if getattr(b, key)]
        tol = memory_tolerance if key == "memory" else compile_tolerance
        verdict, line = (ab._across_pairs(name, figures, tol, stats.fmt_bytes if key == "memory"
                                          else stats.fmt_seconds) if figures else ("not compared", None))
        if verdict == "regressed":
            flags[name] = "confirmed"
            lines.append(f"{name} flag confirmed by interleaved A/B {where}: {line}")
        elif verdict in ("unchanged", "improved"):
            flags[name] = "machine drift"
            lines.append(f"{name} flag not confirmed by interleaved A/B {where} (machine drift, not failing): {line}")
            info[f"{key}_flag"], info[f"{key}_verdict"] = "regressed", verdict
        else:
            flags[name] = "not confirmable"
            reason = why or line or (f"no fresh process pair measured it (--perf-ab-processes {processes}; its "
                                     f"first pair's two processes are unlike)")
            lines.append(f"{name} flag stands, not confirmable: {reason}")
    conf["flags"] = flags
    outcomes = set(flags.values())
    conf["outcome"] = ("confirmed" if "confirmed" in outcomes else
                       "machine drift" if outcomes == {"machine drift"} else "not confirmable")
    info["confirmation"] = conf
    head, *rest = outcome.message.splitlines()
    standing = [name for name, o in flags.items() if o != "machine drift"]
    verdict = "regressed" if standing else info.get("verdict")
    if flags.get("latency") == "machine drift":
        info["flag"], info["verdict"] = info.get("verdict"), cmp.verdict
        verdict = "regressed" if standing else cmp.verdict
    if not standing:
        cleared = " and ".join(flags)
        head = f"{test_id} on {info.get('hardware_id')}: {info.get('verdict')} ({cleared} flag cleared by A/B)"
    elif set(standing) != set(flags):
        head = f"{test_id} on {info.get('hardware_id')}: {' and '.join(standing)} regressed"
    return GateOutcome(bool(standing), "\n".join([head, *rest, *("  " + ln for ln in lines)]), info, verdict)


def gate_flags(run) -> list[dict]:
    """The tests the gate flagged in ``run``: ``{"test", "commit", "what", "ratio", "inline"}``.

    Flags the run already confirmed or cleared by A/B (``--perf-confirm ab``) carry that confirmation as
    ``inline`` and are not measured again.
    """
    out = []
    for name, bench in run.benchmarks.items():
        gate = (bench.get("extra_info") or {}).get("gate") or {}
        conf = gate.get("confirmation") or {}
        what = [name for name, key in (("latency", ""), ("peak memory", "memory_"), ("compile time", "compile_"))
                if gate.get(f"{key}flag", gate.get(f"{key}verdict")) == "regressed"]
        if what:
            covered = set(conf.get("flags") or ({"latency"} if conf else ()))  # older runs confirmed latency only
            inline = conf if conf.get("outcome") in ("confirmed", "machine drift") and set(what) <= covered else None
            out.append({"test": name, "commit": gate.get("baseline_commit"), "what": what, "ratio": gate.get("ratio"),
                        "inline": inline})
    return out


def remeasure(flags: list[dict], pytest_args: list[str], python: str, workdir: Path) -> dict[str, dict]:
    """A/B of every flag against its baseline commit; ``{test: extra_info["ab"] or {"verdict": "error", ...}}``."""
    results: dict[str, dict] = {}
    by_commit: dict[str, list[str]] = {}
    for f in flags:
        if f["commit"] and not f.get("inline"):
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
        ab = f.get("inline") or results.get(f["test"])
        if f.get("inline"):
            outcome = f["inline"]["outcome"] + " (in the run)"
        elif not f["commit"]:
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
    confirmed = sum(r["outcome"].startswith("confirmed") for r in rows)
    drift = sum(r["outcome"].startswith("machine drift") for r in rows)
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
    return 1 if other or any(not r["outcome"].startswith("machine drift") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
