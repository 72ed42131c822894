"""Calibrate interleaved A/B against the stored-baseline gate: A/A false alarms, A/B detection of a real slowdown.

Rerun with::

    python benchmarks/ab_calibration.py                         # 20 A/A + 20 A/B runs (run it alone: ~1-2 h on 2 cores)
    python benchmarks/ab_calibration.py --runs 2                # a quick check that it works
    python benchmarks/ab_calibration.py --runs 20 --wall-time   # also: wall time of the default CPU matrix, A/B vs plain

Design. The committed ``HEAD`` of this checkout is cloned into a temporary folder (commit ``A``), and a
commit ``B`` is made there whose torch builder busy-waits after every UNet call for ``--slowdown`` (6 %) of
that call's own synchronized duration: the denoising loop about 6 % slower, for real, with the machine's
noise. One plain run at ``A`` records the stored baselines (``--perf-update-baselines``). Then ``--runs``
A/A runs (``A`` checked out, ``--perf-ab-base A``) and ``--runs`` A/B runs (``B`` checked out,
``--perf-ab-base A``) alternate, each a fresh pytest process on the two eager torch tiny cases
(``torch:fp32-classic,torch:fp32-sdpa``) with ``--perf-tolerance 0.03``. Every run gives two verdicts per
case on the same head rounds: the A/B verdict (paired rounds, ``extra_info["ab"]``) and the stored-baseline
gate's (``extra_info["gate"]``), so both are judged on the same machine in the same hour.

The bar (issue 11): at most 1 of 40 A/A verdicts "regressed", at least 38 of 40 A/B verdicts "regressed".
The report (``--out``, JSON, written atomically after every run) keeps every run's verdicts, ratios and
pair counts; the table printed at the end counts the verdicts.

``--resume`` continues the report at ``--out`` instead of starting anew (a run of 40 takes hours on 2 cores;
it can be stopped and continued, in another session on the same machine): only when the measured code
(``diffperf/``, ``pipelines/``, ``perf/``) is the same tree as at the report's commit A and the options
match, else it stops and names what differs. Each continuation is a ``segment`` with its own commits and
stored baseline (recorded at its start, so the gate is still judged in the same hour).

``--set-aside RUN=REASON`` marks run ``RUN`` (its number as printed, A/A and A/B both) as not measured alone,
e.g. another process shared the cores: the report keeps its verdicts with the reason, the table counts the
runs measured alone and, apart, the set-aside ones, and ``--runs`` then means runs measured alone (one more
pair is run for each set aside).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffperf.fileio import atomic_write_text  # noqa: E402

RECIPES = "torch:fp32-classic,torch:fp32-sdpa"
ANCHOR = "    return TorchRunner(case, pipe, device, state)\n"
SLOW_PATCH = '''    _unet_forward = pipe.unet.forward
    _slow = float({slowdown!r})  # ab_calibration: the denoising loop made slower, for real

    def _slowed_forward(*args, **kwargs):
        import time as _time

        start = _time.perf_counter()
        out = _unet_forward(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        until = start + (_time.perf_counter() - start) * (1.0 + _slow)
        while _time.perf_counter() < until:
            pass
        return out

    pipe.unet.forward = _slowed_forward
'''


def git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="ab-calibration", GIT_AUTHOR_EMAIL="ab@localhost",
               GIT_COMMITTER_NAME="ab-calibration", GIT_COMMITTER_EMAIL="ab@localhost")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout.strip()


def make_clone(tmp: Path, slowdown: float) -> tuple[Path, str, str]:
    """Clone HEAD into ``tmp/repo``; commit the slowed builder on top. Returns (repo, commit A, commit B)."""
    if git(ROOT, "status", "--porcelain", "--untracked-files=no"):
        print("note: uncommitted changes are not calibrated (the clone is of the committed HEAD)", file=sys.stderr)
    repo = tmp / "repo"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(repo)], check=True)
    git(repo, "checkout", "--quiet", "--detach", git(ROOT, "rev-parse", "HEAD"))
    a = git(repo, "rev-parse", "HEAD")
    builder = repo / "pipelines" / "torch_diffusers.py"
    text = builder.read_text()
    if text.count(ANCHOR) != 1:
        raise SystemExit(f"ab_calibration: cannot find {ANCHOR.strip()!r} once in {builder}; update SLOW_PATCH's anchor")
    builder.write_text(text.replace(ANCHOR, SLOW_PATCH.format(slowdown=slowdown) + ANCHOR))
    git(repo, "commit", "--quiet", "-am", f"ab_calibration: UNet {slowdown:.0%} slower")
    b = git(repo, "rev-parse", "HEAD")
    return repo, a, b


MEASURED = ("diffperf", "pipelines", "perf")  # the code a calibration measures; a resumed report needs it unchanged


def measured_trees(repo: Path, commit: str) -> dict[str, str | None]:
    """The git tree id of each :data:`MEASURED` folder at ``commit`` (``None`` where it is missing)."""
    out = {}
    for folder in MEASURED:
        got = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{commit}:{folder}"],
                             capture_output=True, text=True)
        out[folder] = got.stdout.strip() or None
    return out


def resumable(out: Path, options: dict, repo: Path = ROOT) -> dict:
    """The report at ``out`` to continue; ``SystemExit`` naming why it cannot be (no report, other options,
    measured code changed since its commit A)."""
    try:
        report = json.loads(out.read_text())
    except FileNotFoundError:
        raise SystemExit(f"ab_calibration --resume: no report at {out} to continue (--out names it)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"ab_calibration --resume: cannot read the report {out}: {exc}") from None
    differ = [f"{k} {report.get(k)!r} (this call: {v!r})" for k, v in options.items() if report.get(k, v) != v]
    if differ:
        raise SystemExit(f"ab_calibration --resume: {out} was made with other options: {'; '.join(differ)}")
    then = report.get("measured_trees") or measured_trees(repo, report.get("commit_a", ""))
    now = measured_trees(repo, "HEAD")
    changed = [f for f in MEASURED if then.get(f) is None or then.get(f) != now.get(f)]
    if changed:
        raise SystemExit(f"ab_calibration --resume: the measured code changed since the report's commit A "
                         f"{str(report.get('commit_a'))[:12]} ({', '.join(f + '/' for f in changed)}); start a new "
                         f"report (another --out) instead of mixing two versions' verdicts")
    report["measured_trees"] = then
    return report


def run_pytest(repo: Path, commit: str, args: list[str], json_path: Path) -> tuple[dict, float, int]:
    """Check ``commit`` out, run the suite in a fresh process; (benchmark json, wall seconds, exit status)."""
    git(repo, "checkout", "--quiet", "--detach", commit)
    env = dict(os.environ, PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "pytest", "perf/test_pipelines.py", "-p", "no:randomly", "-p", "no:cacheprovider",
           "-q", "--benchmark-json", str(json_path), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if not json_path.is_file():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"ab_calibration: pytest wrote no results (exit status {proc.returncode}): {' '.join(cmd)}")
    return json.loads(json_path.read_text()), wall, proc.returncode


def verdicts(data: dict) -> dict[str, dict]:
    out = {}
    for bench in data["benchmarks"]:
        rec = bench.get("extra_info") or {}
        ab, gate = rec.get("ab") or {}, rec.get("gate") or {}
        out[rec.get("case", {}).get("id", bench["name"])] = {
            "ab": ab.get("verdict"), "ab_ratio": ab.get("ratio"), "ab_ci": ab.get("ci"), "pairs": ab.get("pairs"),
            "ab_min_detectable": ab.get("min_detectable_slowdown"), "ab_error": ab.get("error"),
            "processes": ab.get("processes"), "block_ratios": [b.get("ratio") for b in ab.get("blocks") or []],
            "pairs_seconds": ab.get("pairs_seconds"),
            "gate": gate.get("verdict"), "gate_ratio": gate.get("ratio"),
        }
    return out


def parse_set_aside(values: list[str]) -> dict[int, str]:
    """``RUN=REASON`` options as {run index (0-based): reason}; ``SystemExit`` names a malformed one."""
    out = {}
    for value in values:
        run, sep, reason = value.partition("=")
        if not sep or not run.strip().isdigit() or int(run) < 1 or not reason.strip():
            raise SystemExit(f"ab_calibration --set-aside {value!r}: expected RUN=REASON, RUN a run number "
                             f"(1, 2, ... as printed) and REASON why it was not measured alone")
        out[int(run) - 1] = reason.strip()
    return out


def set_aside(report: dict, reasons: dict[int, str]) -> None:
    """Mark the runs of ``reasons`` (both conditions) as set aside, with the reason, in ``report``; ``SystemExit``
    names a run the report does not hold."""
    missing = sorted(set(reasons) - {r["index"] for r in report["runs"]})
    if missing:
        raise SystemExit(f"ab_calibration --set-aside: the report holds no run {', '.join(str(i + 1) for i in missing)}")
    for r in report["runs"]:
        if r["index"] in reasons:
            r["set_aside"] = reasons[r["index"]]


def _counts(runs: list[dict]) -> list[tuple]:
    rows = []
    for cond in ("A/A", "A/B"):
        these = [r for r in runs if r["condition"] == cond]
        for judge in ("ab", "gate"):
            c = Counter(v[judge] for r in these for v in r["cases"].values())
            rows.append((cond, "interleaved A/B" if judge == "ab" else "stored-baseline gate", sum(c.values()),
                         c.get("regressed", 0), c.get("unchanged", 0), c.get("inconclusive", 0), c.get("improved", 0),
                         sum(v for k, v in c.items() if k not in ("regressed", "unchanged", "inconclusive", "improved"))))
    return rows


def table(report: dict) -> str:
    """The verdict counts of the runs measured alone (and, apart, of the runs set aside) and the wall times."""
    alone = [r for r in report["runs"] if not r.get("set_aside")]
    aside = [r for r in report["runs"] if r.get("set_aside")]
    rows = _counts(alone)
    if aside:
        rows += [(f"{cond} (set aside)", *rest) for cond, *rest in _counts(aside)]
    header = ("runs", "judge", "verdicts", "regressed", "unchanged", "inconclusive", "improved", "other")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [header, *rows]]
    for i, reason in sorted({r["index"]: r["set_aside"] for r in aside}.items()):
        lines.append(f"run {i + 1} set aside: {reason}")
    walls = [r["wall_s"] for r in report["runs"]]
    if walls and report.get("baseline_wall_s"):
        lines.append(f"wall time: plain run {report['baseline_wall_s']:.0f} s, A/B runs median "
                     f"{sorted(walls)[len(walls) // 2]:.0f} s (these two cases)")
    if report.get("wall_matrix"):
        w = report["wall_matrix"]
        lines.append(f"default CPU matrix: plain {w['plain_s']:.0f} s, A/B {w['ab_s']:.0f} s, ratio {w['ratio']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="A/A runs and A/B runs, each (default 20)")
    p.add_argument("--slowdown", type=float, default=0.06, help="UNet slowdown of commit B (default 0.06)")
    p.add_argument("--tolerance", default="0.03", help="--perf-tolerance (default 0.03)")
    p.add_argument("--recipes", default=RECIPES, help=f"--perf-recipes (default {RECIPES})")
    p.add_argument("--extra", default="", help="more pytest options, e.g. '--perf-max-time 60'")
    p.add_argument("--wall-time", action="store_true", help="also time one plain and one A/B run of the default CPU matrix")
    p.add_argument("--out", default=str(ROOT / "reports" / "ab_calibration.json"), help="report (default reports/ab_calibration.json)")
    p.add_argument("--resume", action="store_true",
                   help="continue the report at --out up to --runs each (default: start a new one); refused when "
                        "diffperf/, pipelines/ or perf/ changed since its commit A, or the options differ")
    p.add_argument("--set-aside", action="append", default=[], metavar="RUN=REASON",
                   help="run RUN (as printed; A/A and A/B) was not measured alone: keep its verdicts apart, with "
                        "REASON, and run one more (repeatable; default: none)")
    a = p.parse_args(argv)
    reasons = parse_set_aside(a.set_aside)
    common = ["--perf-frameworks", "torch", "--perf-recipes", a.recipes, "--perf-tolerance", a.tolerance,
              "--perf-no-fidelity", "-k", "latency", *a.extra.split()]
    out = Path(a.out)
    options = {"slowdown": a.slowdown, "tolerance": a.tolerance, "recipes": a.recipes, "extra": a.extra}
    previous = resumable(out, options) if a.resume else None
    set_aside(previous or {"runs": []}, reasons)  # a run it cannot mark stops it here, before the clone and baseline
    with tempfile.TemporaryDirectory(prefix="ab-calibration-") as tmp:
        tmp = Path(tmp)
        repo, commit_a, commit_b = make_clone(tmp, a.slowdown)
        baselines = tmp / "baselines"
        segment = {"commit_a": commit_a, "commit_b": commit_b, "started": time.time()}
        if previous is not None:
            report = previous
            report.setdefault("segments", [{"commit_a": report["commit_a"], "commit_b": report["commit_b"],
                                            "started": report.get("started")}])
            report["segments"].append(segment)
        else:
            report = {"commit_a": commit_a, "commit_b": commit_b, **options, "started": time.time(),
                      "loadavg": os.getloadavg()[0], "measured_trees": measured_trees(ROOT, "HEAD"), "runs": [],
                      "segments": [segment]}
        gate_opts = ["--perf-baselines-dir", str(baselines)]
        _data, wall, _rc = run_pytest(repo, commit_a, [*common, *gate_opts, "--perf-update-baselines"], tmp / "base.json")
        report.setdefault("baseline_wall_s", wall)
        segment["baseline_wall_s"] = wall
        print(f"baselines recorded at A ({wall:.0f} s)", file=sys.stderr, flush=True)
        done = {(r["condition"], r["index"]) for r in report["runs"]}
        aside = {r["index"] for r in report["runs"] if r.get("set_aside")}
        total = a.runs + len(aside)
        for i in range(total):
            for cond, head in (("A/A", commit_a), ("A/B", commit_b)):
                if (cond, i) in done:
                    continue
                data, wall, rc = run_pytest(repo, head, [*common, *gate_opts, "--perf-ab-base", commit_a],
                                            tmp / f"run-{i}-{cond.replace('/', '')}.json")
                got = verdicts(data)
                report["runs"].append({"condition": cond, "index": i, "wall_s": wall, "exit_status": rc, "cases": got,
                                       "loadavg": os.getloadavg()[0], "segment": len(report["segments"]) - 1})
                atomic_write_text(out, json.dumps(report, indent=1))
                print(f"run {i + 1}/{total} {cond}: " + ", ".join(f"{k}: A/B {v['ab']} {v['ab_ratio'] or 0:.3f} "
                      f"({v['processes'] or 1} process pairs), gate {v['gate']}" for k, v in got.items())
                      + f" ({wall:.0f} s)", file=sys.stderr, flush=True)
        if a.wall_time:
            _d, plain_s, _ = run_pytest(repo, commit_a, ["--perf-no-fidelity", "-k", "latency"], tmp / "wall-plain.json")
            _d, ab_s, _ = run_pytest(repo, commit_a, ["--perf-no-fidelity", "-k", "latency", "--perf-ab-base", commit_a],
                                     tmp / "wall-ab.json")
            report["wall_matrix"] = {"plain_s": plain_s, "ab_s": ab_s, "ratio": ab_s / plain_s}
        report["finished"] = segment["finished"] = time.time()
        atomic_write_text(out, json.dumps(report, indent=1))
    print(table(report))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
