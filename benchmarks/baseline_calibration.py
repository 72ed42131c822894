"""Calibrate the gate with a baseline history: today's gate and the between-run gate on the same real runs.

Rerun with (alone on the machine; each run is the main command, ``pytest perf``, in a fresh process)::

    python benchmarks/baseline_calibration.py --runs 20 --inject auto      # collect + evaluate
    python benchmarks/baseline_calibration.py --from reports/baseline_calibration   # re-evaluate only
    python benchmarks/baseline_calibration.py --collect-only --runs 5 --label baseline   # runs for a baseline

Design. ``--runs`` unchanged runs of the default CPU matrix (``pytest perf``, or ``--pytest-args``) are
taken one after the other, each saved with pytest-benchmark (``--benchmark-save``) under
``OUT/storage``; then as many runs with ``--perf-inject-slowdown`` (the timed calls made that much slower).
``--inject auto`` sizes the slowdown at twice the largest "smallest regression this baseline can flag"
over the cases, the bar of issue 12. The history comes from the committed baseline
(``--baselines``, default ``baselines/<hardware id>.json``) when its entries hold 3 runs or more, else
from the first ``--history-runs`` unchanged runs (those runs are then left out of the evaluation).

Three verdicts on the same samples:

* today's gate (:func:`diffperf.stats.compare_samples`): the run's rounds against the rounds of the
  history's latest run;
* the history gate (:func:`diffperf.stats.compare_to_history`): the run's median against the history's
  run-to-run spread, tolerance beyond it;
* the run's verdict: what the run itself recorded (``extra_info["gate"]``): the history gate, and each of
  its latency flags re-measured as interleaved A/B against the baseline's commit (``--perf-confirm ab``,
  the default), "regressed" only when the A/B confirms.

The table gives, per gate, the "regressed" verdicts on unchanged runs (false alarms) and on injected
runs (detections), and per case the between-run CV and the smallest flaggable regression. The exit
status of each main-command run (against ``--perf-baselines-dir``, default the committed baselines) is
listed too: the "passes N out of N" bar.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffperf import stats  # noqa: E402
from diffperf.baselines import BaselineStore, baseline_path, history_medians  # noqa: E402
from diffperf.compare import _record, load_run, samples_of, saved_runs  # noqa: E402
from diffperf.fileio import atomic_write_text  # noqa: E402


def run_main_command(out: Path, label: str, pytest_args: list[str], baselines_dir: Path, inject: float = 0.0) -> dict:
    """One ``pytest perf`` run in a fresh process, saved as ``<label>``; returns its exit status and duration."""
    cmd = [sys.executable, "-m", "pytest", *pytest_args, f"--benchmark-save={label}",
           f"--benchmark-storage={out / 'storage'}", f"--perf-baselines-dir={baselines_dir}", "-q"]
    if inject:
        cmd.append(f"--perf-inject-slowdown={inject}")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{int(t0)}-{label}.log").write_text(proc.stdout + proc.stderr)
    return {"label": label, "inject": inject, "rc": proc.returncode, "started": t0, "seconds": time.time() - t0,
            "loadavg": os.getloadavg()[0]}


def collect(out: Path, runs: int, pytest_args: list[str], baselines_dir: Path, label: str, inject: float = 0.0,
            log: list | None = None) -> list[dict]:
    done = []
    for i in range(runs):
        rec = run_main_command(out, label, pytest_args, baselines_dir, inject)
        done.append(rec)
        if log is not None:
            log.append(rec)
            atomic_write_text(out / "runs.json", json.dumps(log, indent=1))
        print(f"{label} {i + 1}/{runs}: exit {rec['rc']}, {rec['seconds']:.0f} s, load {rec['loadavg']:.2f}",
              file=sys.stderr, flush=True)
    return done


def load_saved(out: Path, label: str) -> list[dict[str, dict]]:
    """Per saved run labelled ``label`` (oldest first): test id -> {samples, hardware_id}."""
    found = []
    for p in saved_runs(out / "storage"):
        if p.name.endswith(f"_{label}.json"):
            run = load_run(p)
            found.append({t: {"samples": samples_of(b), "hardware_id": _record(b).get("hardware_id"),
                              "gate": _record(b).get("gate") or {}}
                          for t, b in run.benchmarks.items()})
    return found


def histories(unchanged: list[dict], baselines: Path | None, history_runs: int) -> tuple[dict, dict, int, str]:
    """(test -> history medians, test -> latest baseline samples, unchanged runs used up, where from)."""
    tests = sorted(unchanged[0]) if unchanged else []
    if baselines is not None and baselines.is_file():
        store = BaselineStore.load(baselines)
        meds = {t: history_medians(store.get(t)) for t in tests if store.get(t)}
        if meds and all(len(m) >= stats.MIN_HISTORY for m in meds.values()):
            return meds, {t: store.get(t)["samples_s"] for t in meds}, 0, f"committed baseline {baselines}"
    used = unchanged[:history_runs]
    meds = {t: [float(stats.np.median(r[t]["samples"])) for r in used if t in r] for t in tests}
    return meds, {t: used[-1][t]["samples"] for t in tests}, history_runs, f"the first {history_runs} unchanged runs"


def evaluate(out: Path, baselines: Path | None, history_runs: int, tolerance: float, alpha: float) -> str:
    unchanged, injected = load_saved(out, "calib-unchanged"), load_saved(out, "calib-injected")
    meds, latest, skip, source = histories(unchanged, baselines, history_runs)
    evals = [("unchanged", r) for r in unchanged[skip:]] + [("injected", r) for r in injected]
    gates = ("today's gate", "history gate", "run's verdict")
    counts = {g: {"unchanged": [0, 0], "injected": [0, 0]} for g in gates}
    confirmations = {"unchanged": {}, "injected": {}}
    per_case = {}
    for kind, run in evals:
        for t, m in meds.items():
            if t not in run or len(m) < stats.MIN_HISTORY:
                continue
            head = run[t]["samples"]
            today = stats.compare_samples(head, latest[t], tolerance=tolerance, alpha=alpha).verdict
            hist = stats.compare_to_history(head, m, tolerance=tolerance, alpha=alpha)
            ran = run[t]["gate"]  # what the run itself decided: history gate, then the inline A/B (--perf-confirm)
            for gate, verdict in (("today's gate", today), ("history gate", hist.verdict),
                                  ("run's verdict", ran.get("verdict") if ran.get("history_runs") else None)):
                if verdict is not None:
                    counts[gate][kind][0] += verdict == "regressed"
                    counts[gate][kind][1] += 1
            outcome = (ran.get("confirmation") or {}).get("outcome")
            if outcome:
                confirmations[kind][outcome] = confirmations[kind].get(outcome, 0) + 1
            per_case.setdefault(t, []).append(hist.min_flaggable)
    lines = [f"history: {source}; tolerance {tolerance:.0%}, alpha {alpha:g}",
             f"{'gate':<14} {'false alarms (unchanged)':>26} {'caught (injected)':>20}"]
    for gate, c in counts.items():
        u, i = c["unchanged"], c["injected"]
        lines.append(f"{gate:<14} {f'{u[0]} of {u[1]}':>26} {f'{i[0]} of {i[1]}':>20}")
    lines.append("run's verdict: the gate of each run as it ran (history gate, then its flags re-measured as A/B "
                 "against the baseline's commit, --perf-confirm ab)")
    for kind, got in confirmations.items():
        if got:
            lines.append(f"  A/B re-measurements of {kind} runs' flags: "
                         + ", ".join(f"{n} {outcome}" for outcome, n in sorted(got.items())))
    lines += ["", f"{'case':<70} {'between-run CV':>15} {'smallest flaggable':>19}"]
    for t, m in meds.items():
        cv = stats.between_run_cv(m)
        flag = float(stats.np.median(per_case[t])) if per_case.get(t) else float("nan")
        lines.append(f"{t[-70:]:<70} {'n/a' if cv is None else f'{cv:.1%}':>15} {flag:>18.1%}")
    runs_log = out / "runs.json"
    if runs_log.is_file():
        log = json.loads(runs_log.read_text())
        for kind in ("calib-unchanged", "calib-injected"):
            rcs = [r["rc"] for r in log if r["label"] == kind]
            if rcs:
                lines.append(f"main command exit status, {kind}: {sum(rc == 0 for rc in rcs)} of {len(rcs)} passed")
    return "\n".join(lines)


def auto_inject(out: Path, baselines: Path | None, history_runs: int, alpha: float, tolerance: float) -> float:
    """Twice the largest smallest-flaggable regression over the cases (from the history and the last unchanged run)."""
    unchanged = load_saved(out, "calib-unchanged")
    meds, _, _, _ = histories(unchanged, baselines, history_runs)
    flags = [stats.compare_to_history(unchanged[-1][t]["samples"], m, tolerance=tolerance, alpha=alpha).min_flaggable
             for t, m in meds.items() if len(m) >= stats.MIN_HISTORY and t in unchanged[-1]]
    if not flags:
        raise SystemExit("no case has a history of 3 runs: cannot size --inject auto")
    return round(2 * max(flags), 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="unchanged runs, and as many injected runs. Default: 20.")
    p.add_argument("--inject", default="auto", help="injected slowdown (0.5 = 50%%) or 'auto'. Default: auto.")
    p.add_argument("--history-runs", type=int, default=5,
                   help="unchanged runs that form the history when the committed baseline has none. Default: 5.")
    p.add_argument("--baselines", type=Path, default=None,
                   help="baseline file with a history. Default: baselines/<this machine's CPU hardware id>.json.")
    p.add_argument("--perf-baselines-dir", type=Path, default=ROOT / "baselines",
                   help="what the main command gates against during collection. Default: baselines/.")
    p.add_argument("--pytest-args", default="perf", help="the main command's arguments. Default: 'perf'.")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "baseline_calibration", help="Default: reports/baseline_calibration.")
    p.add_argument("--from", dest="from_dir", type=Path, default=None, help="re-evaluate saved runs only.")
    p.add_argument("--collect-only", action="store_true", help="only take --runs unchanged runs (for baseline fold).")
    p.add_argument("--label", default="calib-unchanged", help="save name of --collect-only runs. Default: calib-unchanged.")
    p.add_argument("--tolerance", type=float, default=0.10, help="Default: 0.10.")
    p.add_argument("--alpha", type=float, default=0.01, help="Default: 0.01.")
    a = p.parse_args()
    if a.runs < 1 or a.history_runs < stats.MIN_HISTORY:
        p.error(f"--runs must be >= 1 and --history-runs >= {stats.MIN_HISTORY}")
    if a.baselines is None:
        from diffperf.hardware import hardware_id

        a.baselines = baseline_path(ROOT / "baselines", hardware_id("cpu"))
    out = a.from_dir or a.out
    out.mkdir(parents=True, exist_ok=True)
    args = a.pytest_args.split()
    if a.collect_only:
        collect(out, a.runs, args, a.perf_baselines_dir, a.label)
        print(f"fold them into the baseline: python -m diffperf baseline fold {out}/storage/*/*_{a.label}.json")
        return 0
    if a.from_dir is None:
        log: list = []
        collect(out, a.runs, args, a.perf_baselines_dir, "calib-unchanged", log=log)
        inject = (auto_inject(out, a.baselines, a.history_runs, a.alpha, a.tolerance) if a.inject == "auto"
                  else float(a.inject))
        print(f"injected slowdown: {inject:.1%}", file=sys.stderr)
        collect(out, a.runs, args, a.perf_baselines_dir, "calib-injected", inject=inject, log=log)
    report = evaluate(out, a.baselines, a.history_runs, a.tolerance, a.alpha)
    atomic_write_text(out / "report.txt", report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
