"""The regression gate every perf test passes through: its record against the baseline of this hardware.

Latency is judged against the baseline's history of run medians when it holds
:data:`diffperf.stats.MIN_HISTORY` runs or more (:func:`diffperf.stats.compare_to_history`: slower than the
run-to-run spread explains, and by more than the tolerance); with a shorter history, against the rounds of its
latest run (:func:`diffperf.stats.compare_samples`: median ratio beyond the tolerance *and* a significant
one-sided Mann-Whitney U), and the verdict says that it ignores between-run drift. Every verdict states the
between-run CV and the smallest regression the baseline can flag at the run's alpha. Peak memory and compile
seconds are one number per run, so no test is possible: with 3 or more like runs in the history they fail when
above the history's highest run by more than their own tolerance (``memory_tolerance`` 10 %,
``compile_tolerance`` 25 %), else when above the latest run by more than it; "improved" mirrors it.

Note: a shared runner's speed drifts between runs (other jobs, frequency), which no test on the rounds of
one run can tell from a regression. CPU records carry ``reference_s``, the median seconds of the fixed
workload of :mod:`diffperf.reference` timed around the rounds. When the baseline carries one with the same
``reference_id``, a machine-speed change of 3 % or more is reported next to the verdict; with
``rescale_by_reference`` (``--perf-reference rescale``) the measured rounds are also rescaled by
``baseline reference / measured reference`` before the test. Rescaling is not the default: measured
here, the reference followed some of the machine's slow phases and not others, and rescaling by it
raised as many false alarms as it removed (``benchmarks/gate_calibration.py``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from diffperf import stats
from diffperf.baselines import (DEFAULT_HISTORY, BaselineError, BaselineStore, baseline_path, history_medians,
                                 history_compile, history_memory, parse_history_length)


@dataclasses.dataclass
class GateSettings:
    tolerance: float = 0.10
    memory_tolerance: float = 0.10
    compile_tolerance: float = 0.25
    alpha: float = 0.01
    update: bool = False
    baselines_dir: str | os.PathLike[str] = "baselines"
    n_boot: int = stats.DEFAULT_BOOT
    seed: int = stats.DEFAULT_SEED
    rescale_by_reference: bool = False
    history: int = DEFAULT_HISTORY  # runs kept per baseline entry (--perf-baseline-history)

    def __post_init__(self):
        self.history = parse_history_length(self.history)


@dataclasses.dataclass
class GateOutcome:
    failed: bool
    message: str
    info: dict[str, Any]
    verdict: str = "not compared"  # latency verdict: regressed / improved / unchanged / inconclusive / not compared


def _single_value(kind: str, measured: float | None, base: float | None, tol: float, fmt,
                  names: tuple[str, str] = ("baseline", "measured")) -> tuple[str, str | None]:
    """(verdict, message line) for a one-number metric; ``names`` call the two figures (an A/B: base, head)."""
    if measured is None or base is None:
        return "not compared", None
    if base <= 0:
        return "not compared", f"{kind}: {names[0]} is {fmt(base)}; not compared"
    ratio = measured / base
    if ratio > 1 + tol:
        verdict = "regressed"
    elif ratio < 1 - tol:
        verdict = "improved"
    else:
        verdict = "unchanged"
    return verdict, (f"{kind} {verdict}: {names[0]} {fmt(base)}, {names[1]} {fmt(measured)}, ratio {ratio:.3f} "
                     f"(tolerance {tol:.0%}, single value: no statistical test)")


def first_pipeline_mismatch(a: tuple[str, bool], b: tuple[str, bool]) -> str:
    """The "not compared" line for two peak-memory figures of which one was its framework's first pipeline in
    its process and the other not (``(name, first_in_process)`` each).

    Note: a framework's first pipeline in a process pays one-time allocations (measured: tiny fp32 classic
    grew 87.8 MiB as the first torch pipeline of its process, 34.8-51.0 MiB over 20 runs that built the fp32
    reference first), so the two figures measure different things.
    """
    where = {True: "as the first", False: "after another"}
    return (f"peak memory: {a[0]} {where[a[1]]} pipeline of its framework in its process, {b[0]} {where[b[1]]} "
            f"(a framework's first pipeline pays one-time allocations); not compared")


def _steady_memory(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("steady")
    return float(value) if value is not None else None


class Gate:
    """Checks records against ``<baselines_dir>/<hardware-id>.json``; with ``update`` records them there."""

    def __init__(self, settings: GateSettings | None = None):
        self.settings = settings or GateSettings()
        self._stores: dict[str, BaselineStore | BaselineError] = {}
        self._pending: dict[str, dict[str, dict]] = {}  # hardware id -> test id -> record

    def store(self, hardware_id: str) -> BaselineStore:
        """The baselines of ``hardware_id`` (loaded once); raises :class:`BaselineError` for a bad file."""
        if hardware_id not in self._stores:
            try:
                self._stores[hardware_id] = BaselineStore.load(baseline_path(self.settings.baselines_dir, hardware_id))
            except BaselineError as exc:
                self._stores[hardware_id] = exc
        got = self._stores[hardware_id]
        if isinstance(got, BaselineError):
            raise got
        return got

    def suggest_rounds(self, pilot_samples: list[float], rounds: int, tolerance: float | None = None,
                       budget_s: float | None = None, max_rounds: int = 200) -> int:
        """Total rounds a test should take given its first ``pilot_samples`` (adaptive rounds).

        Enough for :func:`stats.compare_samples` to flag a slowdown of twice the tolerance with power 0.8
        at the run's ``alpha``, given the pilot's robust CV; never fewer than ``rounds`` (the configured
        count) and, with ``budget_s`` (seconds for the whole steady state), no more than the budget affords.
        """
        tol = self.settings.tolerance if tolerance is None else float(tolerance)
        if len(pilot_samples) < 3:
            return rounds
        round_s = float(stats.np.median(pilot_samples))
        return stats.required_rounds(stats.robust_cv(pilot_samples), 2 * tol, alpha=self.settings.alpha, power=0.8,
                                     tolerance=tol, min_rounds=rounds, max_rounds=max(rounds, max_rounds),
                                     round_seconds=round_s, budget_s=budget_s)

    def check(self, test_id: str, hardware_id: str, record: dict, tolerance: float | None = None) -> GateOutcome:
        """Judge ``record`` (a perf test's extra_info record) against its baseline.

        ``tolerance`` overrides the run's latency tolerance for this test. With ``settings.update`` the
        record is queued for :meth:`finish` and a regression does not fail the test (it is reported).
        """
        s = self.settings
        tol = s.tolerance if tolerance is None else float(tolerance)
        samples = [float(x) for x in record.get("samples_s") or []]
        info: dict[str, Any] = {"hardware_id": hardware_id, "tolerance": tol, "alpha": s.alpha,
                                "memory_tolerance": s.memory_tolerance, "compile_tolerance": s.compile_tolerance}
        if samples:
            info["cv"] = stats.cv(samples)
            info["robust_cv"] = stats.robust_cv(samples)
            info["min_detectable_slowdown"] = stats.min_detectable_slowdown(samples, alpha=s.alpha, seed=s.seed)
        if s.update:
            self._pending.setdefault(hardware_id, {})[test_id] = record
        try:
            base = self.store(hardware_id).get(test_id)
        except BaselineError as exc:
            info["verdict"] = "error"
            return GateOutcome(True, str(exc), info, "error")
        if base is None:
            msg = f"no baseline for {test_id} on {hardware_id}: nothing compared"
            if s.update:
                msg += " (baseline will be recorded at the end of the session)"
            info["verdict"] = "no baseline"
            return GateOutcome(False, msg, info, "no baseline")
        if not samples:
            info["verdict"] = "error"
            return GateOutcome(True, f"{test_id}: the record has no samples; nothing compared", info, "error")

        speed, ref_note = machine_speed_factor(record, base)
        factor = speed if s.rescale_by_reference else 1.0
        samples = [x * factor for x in samples]
        info["machine_speed_factor"], info["rescaled_by_reference"] = speed, factor != 1.0
        cmp = stats.compare_samples(samples, base["samples_s"], tolerance=tol, alpha=s.alpha, n_boot=s.n_boot, seed=s.seed)
        medians = history_medians(base)
        info.update(verdict=cmp.verdict, baseline_median_s=cmp.base_median, measured_median_s=cmp.head_median,
                    ratio=cmp.ratio, ratio_ci=[cmp.ci.low, cmp.ci.high], p_slower=cmp.p_slower,
                    p_faster=cmp.p_faster, min_detectable_slowdown=cmp.min_detectable,
                    baseline_rounds=base.get("rounds"), baseline_commit=(base.get("commit") or {}).get("id"),
                    baseline_versions=base.get("versions"),
                    history_runs=len(medians), between_run_cv=stats.between_run_cv(medians) if len(medians) >= 2 else None)
        lines = [f"latency {cmp.describe()}, baseline rounds {len(base['samples_s'])}, measured rounds {len(samples)}, "
                 f"CV {info['cv']:.1%}, min detectable slowdown {cmp.min_detectable:.1%}"]
        verdict = cmp.verdict
        if len(medians) >= stats.MIN_HISTORY:
            hc = stats.compare_to_history(samples, medians, tolerance=tol, alpha=s.alpha, seed=s.seed)
            verdict = hc.verdict
            info.update(verdict=verdict, gate_rule="between-run", history_center_s=hc.center,
                        history_ratio=hc.ratio, drift_explained=hc.explained, min_flaggable_regression=hc.min_flaggable)
            lines = [f"latency {hc.describe()}",
                     f"between-run CV {hc.between_run_cv:.1%} over {hc.runs} runs; smallest regression this baseline "
                     f"can flag at alpha {s.alpha:g}: {hc.min_flaggable:.1%}",
                     f"(latest baseline run alone: {cmp.verdict}, ratio {cmp.ratio:.3f}, measured rounds "
                     f"{len(samples)}, CV {info['cv']:.1%})"]
        else:
            cv_text = (f"{info['between_run_cv']:.1%} over {len(medians)} runs" if info["between_run_cv"] is not None
                       else "unknown")
            info.update(gate_rule="within-run", min_flaggable_regression=cmp.min_detectable)
            lines.append(f"between-run CV {cv_text}; this verdict ignores between-run drift (baseline history of "
                         f"{len(medians)} run(s), {stats.MIN_HISTORY} needed); smallest regression this baseline can "
                         f"flag at alpha {s.alpha:g}: {cmp.min_detectable:.1%} (within-run noise only)")
        if factor != 1.0:
            lines.append(f"measured rounds rescaled by {factor:.3f} (reference workload: baseline "
                         f"{stats.fmt_seconds(base['reference_s'])}, now {stats.fmt_seconds(record['reference_s'])})")
        elif abs(speed - 1.0) >= REFERENCE_NOTICE:
            lines.append(reference_notice(speed, base["reference_s"], record["reference_s"]))
        if ref_note:
            lines.append(ref_note)
        failures = ["latency"] if verdict == "regressed" else []

        mem_v, mem_line = _single_value("peak memory", _steady_memory(record.get("peak_memory_bytes")),
                                        _steady_memory(base.get("peak_memory_bytes")), s.memory_tolerance, stats.fmt_bytes)
        mem_history = history_memory(base, record.get("memory_kind"), record.get("compile_cache"),
                                     record.get("first_in_process"))
        if mem_line and len(mem_history) >= stats.MIN_HISTORY:
            mem_v, mem_line = _against_history("peak memory", _steady_memory(record.get("peak_memory_bytes")),
                                               mem_history, s.memory_tolerance, stats.fmt_bytes)
            info["memory_history_runs"] = len(mem_history)
        elif record.get("memory_kind") and base.get("memory_kind") and record["memory_kind"] != base["memory_kind"]:
            mem_v, mem_line = "not compared", (f"peak memory: measured as {record['memory_kind']}, baseline as "
                                               f"{base['memory_kind']}; not compared")
        elif mem_line and bool(record.get("first_in_process")) != bool(base.get("first_in_process")):
            mem_v, mem_line = "not compared", first_pipeline_mismatch(
                ("measured", bool(record.get("first_in_process"))), ("baseline", bool(base.get("first_in_process"))))
        elif mem_line and _cache_states_differ(record, base):
            # Measured on the tiny CPU cases: a cold compile leaves compiler memory in the process that the steady
            # phase's RSS still holds (torch.compile +52 MiB, TF XLA +100, JAX jit +210, JAX AOT +22); a warm one not.
            mem_v, mem_line = "not compared", (f"peak memory: measured with a {record['compile_cache']} compile cache, "
                                               f"baseline with a {base['compile_cache']} one (a cold compile leaves "
                                               f"compiler memory in the process); not compared")
        comp_s = record.get("compile_s")
        slower = speed < 1.0 and comp_s is not None  # the machine's measured slowdown is allowed for, never its speedup
        comp_measured = comp_s * speed if slower else comp_s
        comp_v, comp_line = _single_value("compile time", comp_measured, base.get("compile_s"), s.compile_tolerance,
                                          stats.fmt_seconds)
        comp_history = history_compile(base, record.get("compile_kind"), record.get("compile_cache"),
                                       record.get("first_in_process"))
        # A baseline without a kind predates JAX AOT's ahead-of-time figure: it holds the cold-start excess.
        base_kind = base.get("compile_kind") or "cold-start-excess"
        if comp_measured is not None and len(comp_history) >= stats.MIN_HISTORY:
            comp_v, comp_line = _against_history("compile time", comp_measured, comp_history, s.compile_tolerance,
                                                 stats.fmt_seconds)
            info["compile_history_runs"] = len(comp_history)
        elif record.get("compile_kind") and comp_s is not None and base.get("compile_s") is not None \
                and record["compile_kind"] != base_kind:
            comp_v, comp_line = "not compared", (f"compile time: measured as {record['compile_kind']}, baseline as "
                                                 f"{base_kind}; not compared")
        elif comp_line and _cache_states_differ(record, base):
            comp_v, comp_line = "not compared", (f"compile time: measured with a {record['compile_cache']} compile cache, "
                                                 f"baseline with a {base['compile_cache']} one; not compared")
        if comp_line and slower and comp_v != "not compared":
            # Measured: a nightly-style run failed JAX jit and TF XLA compile time while the machine ran its
            # reference workload 12-56 % slower than at baseline time; compiling is host CPU work like it.
            comp_line += (f"; measured {stats.fmt_seconds(comp_s)} rescaled by {speed:.3f}, the machine's "
                          f"reference workload being slower than at baseline time")
            info["compile_rescaled_by_reference"] = speed
        info["memory_verdict"], info["compile_verdict"] = mem_v, comp_v
        for one_verdict, line, name in ((mem_v, mem_line, "peak memory"), (comp_v, comp_line, "compile time")):
            if line:
                lines.append(line)
            if one_verdict == "regressed":
                failures.append(name)
        failed = bool(failures) and not s.update
        if failures:
            head = f"{test_id} on {hardware_id}: {' and '.join(failures)} regressed"
            head += " (baseline is being updated, not failing)" if s.update else ""
        else:
            head = f"{test_id} on {hardware_id}: {verdict}"
        return GateOutcome(failed, "\n".join([head, *("  " + ln for ln in lines)]), info, verdict)

    def finish(self, versions: dict | None = None, commit: dict | None = None) -> list[Path]:
        """With ``settings.update``: append every checked record to its entry's history in its hardware's file.

        Other entries of each file are kept; each file is replaced atomically; a file that failed to load
        is left untouched (its :class:`BaselineError` is raised after the other files are written).
        Returns the paths written.
        """
        if not self.settings.update or not self._pending:
            return []
        if versions is None:
            from diffperf.hardware import software_versions

            versions = software_versions()
        if commit is None:
            commit = _commit_info()
        written, errors = [], []
        for hw, records in sorted(self._pending.items()):
            try:
                store = self.store(hw)
                for test_id, record in records.items():
                    store.append(test_id, record, versions=versions, commit=commit, keep=self.settings.history)
                store.save()
                written.append(store.path)
            except BaselineError as exc:
                errors.append(exc)
        self._pending.clear()
        if errors:
            raise BaselineError("; ".join(str(e) for e in errors))
        return written


def _against_history(name: str, measured: float, history: list[float], tol: float, fmt) -> tuple[str, str]:
    """A one-number-per-run figure (peak memory, compile seconds) against the history's runs: "regressed" only
    above all of them by more than ``tol``, "improved" below all of them by more than ``tol``.

    Note: between runs of unchanged code these figures spread far more than a tolerance (measured here over
    20-30 runs: fp32-classic RSS growth 34-51 MiB, JAX AOT 143-172 MiB; warm TF XLA compile 2.97-3.63 s,
    torch.compile 5.68-6.64 s, and 3.9-5.3 s / 8.5-9.3 s in slow phases of the VM), so one earlier run is
    no yardstick; the history's range is.
    """
    high, low = max(history), min(history)
    if measured > high * (1 + tol):
        verdict = "regressed"
    elif measured < low * (1 - tol):
        verdict = "improved"
    else:
        verdict = "unchanged"
    return verdict, (f"{name} {verdict}: measured {fmt(measured)}, the history's {len(history)} runs "
                     f"{fmt(low)}-{fmt(high)} (tolerance {tol:.0%} beyond that range; single value per run)")


def _cache_states_differ(record: dict, base: dict) -> bool:
    """Whether the record and its baseline were measured with different compile-cache states (cold / warm)."""
    return bool(record.get("compile_cache") and base.get("compile_cache")
                and record["compile_cache"] != base["compile_cache"])


REFERENCE_NOTICE = 0.03  # a machine-speed change this large is mentioned next to the verdict


def reference_notice(factor: float, base_s: float, now_s: float, option: str = "--perf-reference rescale") -> str:
    """The line that tells a reader the machine itself ran at another speed than at baseline time."""
    how = "slower" if factor < 1 else "faster"
    return (f"note: the machine ran its reference workload {abs(1 / factor - 1):.0%} {how} than at baseline time "
            f"({stats.fmt_seconds(base_s)} -> {stats.fmt_seconds(now_s)}); part of this difference may be the machine "
            f"({option} corrects for it)")


def machine_speed_factor(record: dict, base: dict) -> tuple[float, str | None]:
    """``(factor, note)``: ``base reference / record reference`` to rescale the record's rounds by.

    1.0 unless both carry a machine reference (:mod:`diffperf.reference`) with the same ``reference_id``;
    the note says why a reference present on both sides was not used.
    """
    if not (record.get("reference_s") and base.get("reference_s")):
        return 1.0, None
    if record.get("reference_id") != base.get("reference_id"):
        return 1.0, (f"rounds not rescaled: the machine reference differs from the baseline's "
                     f"({record.get('reference_id')!r} vs {base.get('reference_id')!r})")
    return float(base["reference_s"]) / float(record["reference_s"]), None


def _commit_info() -> dict:
    """The commit that produced a baseline, as pytest-benchmark records it (id, branch, dirty...)."""
    try:
        from pytest_benchmark.utils import get_commit_info

        info = get_commit_info()
        return {k: info.get(k) for k in ("id", "time", "branch", "dirty", "project") if k in info}
    except Exception:  # pragma: no cover - not a git checkout
        return {}
