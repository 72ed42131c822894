"""Calibrate the regression gate on real timings: false alarms with no code change, detection of injected slowdowns.

Rerun with::

    python benchmarks/gate_calibration.py                      # collect + evaluate (about 10 min on 2 cores)
    python benchmarks/gate_calibration.py --from reports/gate_calibration_raw.json   # re-evaluate only

Design. ``--runs`` + 1 batches are taken one after the other, each in a fresh Python process that builds
every tiny CPU pipeline afresh in the suite's order (like a new CI job), warms it up, then times
``--rounds`` rounds in which the calls of the three conditions -- unchanged, +5 % and +10 % -- are
interleaved (rotating order). A slowdown is injected for real: after the pipeline call returns, the caller
busy-waits for the given fraction of the call's own duration, so the noise of the slowed call is the noise
of the machine. Trial ``i`` compares batch ``i`` (head, each condition) with the unchanged rounds of batch
``i - 1`` (the baseline, recorded earlier by another process), so every trial has its own baseline and the
no-change trials are independent runs.

Both gates see the same samples: diffperf's (:func:`diffperf.stats.compare_samples`, the rule every perf
test applies: significantly slower and the median ratio above half the tolerance) and pytest-benchmark's
``--benchmark-compare-fail=mean:5%`` (``PercentageRegressionCheck``: ``head.mean / base.mean * 100 - 100 > 5``).
Each case also times the machine reference of :mod:`diffperf.reference` as the plugin does (10 calls
before the warmup, 10 after the rounds); the ``--perf-reference rescale`` rows rescale head rounds by how
much slower the machine ran it than at baseline time, as that option makes the gate do, and two more rows
rescale by its matmul part or its copy part alone. The plain diffperf rows are the gate's default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffperf import stats  # noqa: E402
from diffperf.fileio import atomic_write_text  # noqa: E402
from diffperf.gate import machine_speed_factor  # noqa: E402
from diffperf.hardware import hardware_id, software_versions  # noqa: E402


def collect(recipes: list[str], runs: int, rounds: int, steps: int, slowdowns: list[float], warmup: int,
            threads: int | None = None, raw_path: Path | None = None, malloc_mode: str = "steady") -> dict:
    """Time ``runs + 1`` batches, each in a fresh process; the raw samples are rewritten to ``raw_path`` after every batch."""
    batches: list[dict] = []
    raw = {
        "recipes": recipes, "runs": runs, "rounds": rounds, "steps": steps, "slowdowns": slowdowns,
        "hardware_id": hardware_id("cpu"), "python": platform.python_version(), "versions": software_versions(),
        "fresh_process_per_batch": True, "malloc_mode": malloc_mode, "batches": batches,
    }
    env = dict(os.environ, USE_TF="0", USE_FLAX="0")
    t_start = time.perf_counter()
    for b in range(runs + 1):
        spec = {"recipes": recipes, "rounds": rounds, "steps": steps, "conditions": [0.0] + slowdowns,
                "warmup": warmup, "threads": threads, "malloc_mode": malloc_mode}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "batch.json"
            subprocess.run([sys.executable, __file__, "--batch-worker", json.dumps(spec), str(out)], check=True, env=env)
            batch = json.loads(out.read_text())
        raw["torch_threads"] = batch.pop("torch_threads")
        batches.append(batch)
        elapsed = time.perf_counter() - t_start
        raw["collect_seconds"] = elapsed
        if raw_path is not None:
            _write_json(raw_path, raw)
        print(f"batch {b + 1}/{runs + 1} done ({elapsed:.0f} s, load {batch['loadavg']:.2f})", file=sys.stderr, flush=True)
    return raw


def collect_batch(recipes: list[str], rounds: int, steps: int, conditions: list[float], warmup: int,
                  threads: int | None, malloc_mode: str = "steady") -> dict:
    """One batch (one simulated CI run): build each pipeline, warm it up, time the interleaved conditions."""
    from diffperf import malloc, reference

    malloc_info = malloc.configure(malloc_mode)  # first, as the plugin does in pytest_configure
    import torch

    from diffperf.cases import Case
    from pipelines import torch_diffusers
    from pipelines.torch_recipes import TorchRecipe

    if threads:
        torch.set_num_threads(threads)
    batch: dict = {"started": time.time(), "loadavg": os.getloadavg()[0], "torch_threads": torch.get_num_threads(),
                   "malloc": malloc_info, "tests": {}}
    for tag in recipes:
        case = Case("torch", TorchRecipe.from_tag(tag), "tiny", steps=steps)
        runner = torch_diffusers.build(case)
        try:
            samples: dict[str, list[float]] = {str(c): [] for c in conditions}
            parts = reference.sample_parts()
            for _ in range(warmup):
                runner.generate()
            for r in range(rounds):
                k = r % len(conditions)
                for cond in conditions[k:] + conditions[:k]:
                    runner.synchronize()
                    t0 = time.perf_counter()
                    runner.generate()
                    runner.synchronize()
                    dt = time.perf_counter() - t0
                    if cond:
                        until = t0 + dt * (1.0 + cond)
                        while time.perf_counter() < until:
                            pass
                    samples[str(cond)].append(time.perf_counter() - t0)
            parts += reference.sample_parts()
            samples["reference"] = [m + c for m, c in parts]  # what the plugin records
            samples["reference_mm"] = [m for m, _ in parts]
            samples["reference_copy"] = [c for _, c in parts]
            batch["tests"][case.id] = samples
        finally:
            runner.close()
            malloc.release_free_memory()
    return batch


def pytest_benchmark_fails(head: list[float], base: list[float], percent: float = 5.0) -> bool:
    """``--benchmark-compare-fail=mean:5%`` exactly as pytest-benchmark computes it."""
    from pytest_benchmark.utils import PercentageRegressionCheck

    check = PercentageRegressionCheck("mean", percent)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return bool(check.fails({"mean": mean(head)}, {"mean": mean(base)}))


def normalized(head: list[float], head_test: dict, base_test: dict, key: str = "reference") -> list[float]:
    """Head rounds rescaled as the gate does with ``--perf-reference rescale`` (by the ``key`` reference)."""
    med = lambda xs: float(stats.np.median(xs))  # noqa: E731
    factor, _ = machine_speed_factor({"reference_s": med(head_test[key])}, {"reference_s": med(base_test[key])})
    return [x * factor for x in head]


def evaluate(raw: dict, tolerances: list[float], alpha: float, pb_percent: float) -> dict:
    conditions = ["0.0"] + [str(s) for s in raw["slowdowns"]]
    batches = raw["batches"]
    if len(batches) < 2:
        raise SystemExit("need at least two collected batches")
    tests = sorted(batches[0]["tests"])
    result: dict = {"trials": len(batches) - 1, "tests": tests, "comparisons_per_condition": (len(batches) - 1) * len(tests),
                    "gates": {}, "noise": {}}
    for t in tests:
        cvs = [stats.robust_cv(b["tests"][t]["0.0"]) for b in batches]
        meds = [float(stats.np.median(b["tests"][t]["0.0"])) for b in batches]
        result["noise"][t] = {"median_robust_cv": float(stats.np.median(cvs)), "cv_of_batch_medians": stats.cv(meds),
                              "median_min_detectable_slowdown": float(stats.np.median(
                                  [stats.min_detectable_slowdown(b["tests"][t]["0.0"], alpha=alpha) for b in batches]))}
    gates: dict = {f"diffperf tolerance={tol:.0%}": ("diffperf", tol) for tol in tolerances}
    if "reference" in batches[0]["tests"][tests[0]]:
        gates.update({f"diffperf tolerance={tol:.0%}, --perf-reference rescale": (("norm", "reference"), tol)
                      for tol in tolerances})
    for key in ("reference_mm", "reference_copy"):
        if key in batches[0]["tests"][tests[0]]:
            gates[f"diffperf tolerance={tolerances[0]:.0%}, rescaled by the {key.split('_')[1]} part only"] = (
                ("norm", key), tolerances[0])
    gates[f"pytest-benchmark mean:{pb_percent:g}%"] = ("pb", pb_percent)
    for name, (kind, param) in gates.items():
        flagged = {c: 0 for c in conditions}
        details = []
        for i in range(1, len(batches)):
            for t in tests:
                base = batches[i - 1]["tests"][t]["0.0"]
                for c in conditions:
                    head = batches[i]["tests"][t][c]
                    if kind == "pb":
                        hit = pytest_benchmark_fails(head, base, param)
                    elif kind[0] == "norm":
                        head = normalized(head, batches[i]["tests"][t], batches[i - 1]["tests"][t], kind[1])
                        hit = stats.compare_samples(head, base, tolerance=param, alpha=alpha).verdict == "regressed"
                    else:
                        hit = stats.compare_samples(head, base, tolerance=param, alpha=alpha).verdict == "regressed"
                    flagged[c] += hit
                    if hit and c == "0.0":
                        details.append(f"trial {i} {t}")
        n = result["comparisons_per_condition"]
        # All ordered pairs of distinct unchanged batches (earlier = base): a denser false-alarm estimate.
        pairs = list(itertools.combinations(range(len(batches)), 2))
        pair_alarms = 0
        for (a, b), t in itertools.product(pairs, tests):
            base, head = batches[a]["tests"][t]["0.0"], batches[b]["tests"][t]["0.0"]
            if kind == "pb":
                pair_alarms += pytest_benchmark_fails(head, base, param)
            elif kind[0] == "norm":
                head = normalized(head, batches[b]["tests"][t], batches[a]["tests"][t], kind[1])
                pair_alarms += stats.compare_samples(head, base, tolerance=param, alpha=alpha).verdict == "regressed"
            else:
                pair_alarms += stats.compare_samples(head, base, tolerance=param, alpha=alpha).verdict == "regressed"
        result["gates"][name] = {
            "false_alarms": flagged["0.0"], "false_alarm_trials": details,
            "detections": {f"+{float(c):.0%}": flagged[c] for c in conditions[1:]},
            "detection_rate": {f"+{float(c):.0%}": flagged[c] / n for c in conditions[1:]},
            "all_pairs_false_alarm_rate": pair_alarms / (len(pairs) * len(tests)),
        }
    return result


def render(raw: dict, res: dict) -> str:
    n = res["comparisons_per_condition"]
    slows = [f"+{s:.0%}" for s in raw["slowdowns"]]
    lines = [f"{res['trials']} runs x {len(res['tests'])} tests = {n} comparisons per condition, "
             f"{raw['rounds']} rounds each, hardware {raw['hardware_id']}", ""]
    head = ["gate", "false alarms", *[f"detected {s}" for s in slows], "all-pairs false-alarm rate"]
    rows = [[name, f"{g['false_alarms']}/{n}", *[f"{g['detections'][s]}/{n} ({g['detection_rate'][s]:.0%})" for s in slows],
             f"{g['all_pairs_false_alarm_rate']:.1%}"] for name, g in res["gates"].items()]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    lines.append("")
    for t, nz in res["noise"].items():
        lines.append(f"{t}: robust CV {nz['median_robust_cv']:.1%}, CV of batch medians {nz['cv_of_batch_medians']:.1%}, "
                     f"min detectable slowdown {nz['median_min_detectable_slowdown']:.1%}")
    return "\n".join(lines)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="fp32-classic,fp32-sdpa")
    p.add_argument("--runs", type=int, default=20, help="trials (runs + 1 batches are collected)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before the rounds (the plugin default, 3)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--malloc", default="steady", choices=["steady", "system"],
                   help="allocator policy of each batch, as --perf-malloc (default: steady, the plugin's default)")
    p.add_argument("--slowdowns", default="0.05,0.10")
    p.add_argument("--tolerances", default="0.10,0.05", help="diffperf gate tolerances to evaluate (10%% is the default)")
    p.add_argument("--alpha", type=float, default=0.01, help="the gate's significance level (the plugin's default)")
    p.add_argument("--pb-percent", type=float, default=5.0, help="pytest-benchmark mean:N%% threshold")
    p.add_argument("--raw", default="reports/gate_calibration_raw.json", help="where collected samples go")
    p.add_argument("--out", default="reports/gate_calibration.json")
    p.add_argument("--from", dest="from_raw", help="evaluate samples collected earlier instead of collecting")
    p.add_argument("--batch-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.batch_worker:
        spec, out = a.batch_worker
        _write_json(Path(out), collect_batch(**json.loads(spec)))
        return 0
    if a.runs < 20:
        print("note: the bar asks for at least 20 runs", file=sys.stderr)
    if a.from_raw:
        raw = json.loads(Path(a.from_raw).read_text())
    else:
        raw = collect(a.recipes.split(","), a.runs, a.rounds, a.steps, [float(s) for s in a.slowdowns.split(",")],
                      a.warmup, a.threads, Path(a.raw), a.malloc)
    t = time.perf_counter()
    res = evaluate(raw, [float(x) for x in a.tolerances.split(",")], a.alpha, a.pb_percent)
    res["evaluate_seconds"] = time.perf_counter() - t
    res["collect_seconds"] = raw.get("collect_seconds")
    print(render(raw, res))
    _write_json(Path(a.out), res)
    print(f"\nwrote {a.out}" + ("" if a.from_raw else f" and {a.raw}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
