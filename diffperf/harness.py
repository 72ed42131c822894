"""Building and measuring one case: the sequence every stack goes through, inside pytest or not.

``prepare`` builds the pipeline and times the first call on its own (cold start: tracing, compilation,
autotuning, cache fills), then runs one instrumented call whose output feeds the fidelity guard.
``measure`` times the steady state through pytest-benchmark (or a bare loop outside pytest), picks the
number of rounds from the noise seen in the warmup rounds, and assembles the record that goes into the
benchmark's ``extra_info``.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import statistics
import time
from typing import Any, Callable

from diffperf import progress
from diffperf.cases import Case, framework_spec
from diffperf.hardware import hardware_id
from diffperf.timing import summarize, timed_call

SCHEMA = 1


def builder(framework: str) -> Callable[[Case], Any]:
    """The ``build(case) -> Runner`` function of a framework."""
    return importlib.import_module(framework_spec(framework).module).build


@dataclasses.dataclass
class Prepared:
    """A built case with its cold-start figures and the output used for the fidelity guard."""

    case: Case
    runner: Any
    build_s: float
    cold_start_s: float
    cold_peak_bytes: int | None
    generation: Any
    first_breakdown: Any
    cold_memory_kind: str | None = None  # the probe's kind for the cold peak (it may differ from the steady one)
    compile_cache: str | None = None  # "cold" / "warm": whether build + first call wrote persistent cache entries
    first_in_process: bool = False  # the first pipeline of its framework built in this process (memory context)
    ran_before: tuple[str, ...] = ()  # full ids of the cases this process built before it, in order (its state)

    def close(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.close()
        gc.collect()
        from diffperf import malloc

        malloc.release_free_memory()


def release_shared(keep: str | None = None) -> None:
    """Let every imported builder but ``keep``'s drop what it keeps between its cases (``release_shared()``).

    Called before each build, so one framework's kept state never sits in memory (or in a peak-memory
    figure) while another framework's case runs.
    """
    import sys

    from diffperf.cases import FRAMEWORKS

    for name in FRAMEWORKS:
        module = sys.modules.get(framework_spec(name).module) if name != keep else None
        release = getattr(module, "release_shared", None)
        if release is not None:
            release()


def cache_entries(root: str | None = None) -> set[str] | None:
    """The files under the persistent compile caches (``DIFFPERF_CACHE_DIR``, journals aside), or ``None``."""
    import os

    root = root or os.environ.get("DIFFPERF_CACHE_DIR")
    if not root or not os.path.isdir(root):
        return None
    found = set()
    for folder, dirs, files in os.walk(root):
        if folder == root and "journal" in dirs:
            dirs.remove("journal")
        found.update(os.path.join(folder, f) for f in files)
    return found


def cache_state(before: set[str] | None, after: set[str] | None) -> str | None:
    """``"cold"`` when a case wrote new persistent cache entries (its compile was paid), else ``"warm"``.

    Note: a compile figure from a fresh clone (cold caches: torch.compile 60-90 s on 2 cores) and one
    from a rerun (warm: 6-7 s) measure different things; the gate compares compile seconds only between
    records of the same state, so a fresh machine's first run is not a "compile time regression".
    """
    if before is None or after is None:
        return None
    return "cold" if after - before else "warm"


_BUILT_FRAMEWORKS: set[str] = set()  # frameworks that built a pipeline in this process (Prepared.first_in_process)
_BUILT_CASES: list[str] = []  # full ids of the cases built in this process, in order (Prepared.ran_before)


def build(case: Case) -> Any:
    """Build ``case``'s runner with its framework's builder and note that the framework, and the case, have built
    in this process.

    Every build goes through here (``prepare``, ``api.build_pipeline``), so a case's ``first_in_process`` is
    false after any earlier pipeline of its framework, not only one built by ``prepare``: a run's first
    torch case after ``perf/test_harness_accuracy.py`` (which builds through the API) is not the first.
    """
    runner = builder(case.framework)(case)
    _BUILT_FRAMEWORKS.add(case.framework)
    _BUILT_CASES.append(case.full_id)
    return runner


def import_stack(case: Case) -> None:
    """Import ``case``'s builder module and the stack it imports lazily (its ``PRELOAD``), as a build would."""
    from diffperf import memory

    memory.preload_stack(getattr(importlib.import_module(framework_spec(case.framework).module), "PRELOAD", ()))


def prepare(case: Case, after_imports: Callable[[], Any] | None = None,
            before_first_call: Callable[[], Any] | None = None) -> Prepared:
    """Build ``case`` and time its first call (cold start) apart from everything else.

    ``after_imports`` is called once the case's stack is imported, before anything is built or timed (the A/B
    run waits there for the base worker's imports of the same stack, which ran alongside this process's);
    ``before_first_call`` once the pipeline is built, before its first call (the two workers of a further A/B
    process pair build at once there, then make their first calls one at a time).
    """
    first_in_process = case.framework not in _BUILT_FRAMEWORKS
    ran_before = tuple(_BUILT_CASES)
    release_shared(keep=case.framework)
    from diffperf import memory

    import_stack(case)
    if after_imports is not None:
        after_imports()
    cached_before = cache_entries()
    memory.mark_case_start()  # after the stack's imports, before the build: the CPU memory figure's zero
    try:
        with progress.step(f"{case.framework} {case.id}: build") as built:
            runner = build(case)
    finally:
        memory.clear_case_start()  # the runner's probe has read it; a stale mark must not reach later probes
    try:
        if before_first_call is not None:
            runner.synchronize()  # the build's queued device work (a GPU's weight init) is done before it says so
            before_first_call()
        runner.memory.reset()
        with progress.step(f"{case.framework} {case.id}: first call (compile, autotune, cache fill)"):
            cold = timed_call(runner.generate, runner.synchronize)
        cold_peak = runner.memory.peak_bytes()
        cold_kind = runner.memory.kind
        compile_cache = cache_state(cached_before, cache_entries())
        generation, breakdown = runner.generate_instrumented()
    except BaseException:
        runner.close()
        raise
    return Prepared(case, runner, built["seconds"], cold.seconds, cold_peak, generation, breakdown, cold_kind,
                    compile_cache, first_in_process, ran_before)


def _required_rounds(warm: list[float], tolerance: float, min_rounds: int, budget_s: float) -> int:
    """Rounds for the gate to catch a ``tolerance`` slowdown at the warmup's noise, within ``budget_s``."""
    from diffperf import stats

    if tolerance <= 0:
        return min_rounds
    return stats.required_rounds(stats.robust_cv(warm), tolerance, alpha=0.01, power=0.95, tolerance=tolerance,
                                 min_rounds=min_rounds, max_rounds=max(min_rounds, 200),
                                 round_seconds=statistics.median(warm), budget_s=budget_s)


@dataclasses.dataclass
class RoundPlan:
    warmup: list[float]
    rounds: int


def plan_rounds(prepared: Prepared, min_rounds: int, warmup_rounds: int, max_time_s: float, tolerance: float,
                call: Callable[[], Any]) -> RoundPlan:
    """Run the warmup rounds (timed, then discarded) and choose the steady-state round count.

    At least ``min_rounds``; more when the warmup noise says ``min_rounds`` could not detect a
    ``tolerance`` slowdown, as long as the rounds fit in ``max_time_s``.
    """
    runner = prepared.runner
    warm = [timed_call(call, runner.synchronize).seconds for _ in range(max(warmup_rounds, 0))]
    rounds = min_rounds
    if len(warm) >= 3:
        rounds = _required_rounds(warm, tolerance, min_rounds, max_time_s)
    return RoundPlan(warm, rounds)


def slowed(call: Callable[[], Any], fraction: float, sync: Callable[[], None]) -> Callable[[], Any]:
    """``call`` made ``fraction`` slower by busy-waiting (used only to calibrate the gate)."""
    if not fraction:
        return call

    def target() -> Any:
        start = time.perf_counter()
        value = call()
        sync()
        end = time.perf_counter() + (time.perf_counter() - start) * fraction
        while time.perf_counter() < end:
            pass
        return value

    return target


def case_compiles(case, compile_info: dict) -> bool:
    """Whether the case's first call compiles: the runner says so, or its recipe asks for a compiler."""
    return bool(compile_info.get("compiles")) or any(
        getattr(case.recipe, f, None) for f in ("compile_mode", "jit_compile", "mode"))


def compile_figure(cold_start_s: float, median_s: float, compile_info: dict, compiles: bool) -> tuple[float | None, str | None]:
    """The compile seconds a record reports and gates, and which figure it is.

    A runner that compiles ahead of time at build (JAX AOT lower+compile) reports those seconds as
    ``ahead_of_time_compile_s``: its cold start holds only the dispatch-cache fill, so that is the figure
    (``ahead-of-time``). Otherwise the first call's excess over a steady call (``cold-start-excess``).
    """
    ahead = compile_info.get("ahead_of_time_compile_s")
    if ahead is not None:
        return float(ahead), "ahead-of-time"
    if compiles:
        return max(0.0, cold_start_s - median_s), "cold-start-excess"
    return None, None


def record(prepared: Prepared, samples: list[float], steady_peak: int | None, breakdowns: list[dict],
           fidelity: dict | None = None, steady_memory_kind: str | None = None) -> dict[str, Any]:
    """The ``extra_info`` record of one measured case."""
    case, runner = prepared.case, prepared.runner
    summary = summarize(samples)
    compile_info = runner.compile_info() if runner is not None else {}
    devices = int(compile_info.get("devices", 1) or 1)
    spec = framework_spec(case.framework)
    ladder = list(spec.named.get("ladder", ()))
    compiles = case_compiles(case, compile_info)
    median_breakdown = {}
    if breakdowns:
        for key in breakdowns[0]:
            vals = [b[key] for b in breakdowns if b.get(key) is not None]
            median_breakdown[key] = statistics.median(vals) if vals else None
    compile_s, compile_kind = compile_figure(prepared.cold_start_s, summary["median"], compile_info, compiles)
    memory_kind = steady_memory_kind or (runner.memory.kind if runner is not None else None)
    return {
        "diffperf_schema": SCHEMA,
        "case": case.as_dict(),
        "framework": case.framework,
        "device": case.device,
        "hardware_id": hardware_id(case.device),
        "samples_s": samples,
        "rounds": len(samples),
        "median_s": summary["median"],
        "cv": summary["cv"],
        "build_s": prepared.build_s,
        "cold_start_s": prepared.cold_start_s,
        # Compile seconds (see compile_figure); with the cold start ("first inference") and the median
        # ("inference") they are the JAX seed's three figures.
        "compile_s": compile_s,
        "compile_kind": compile_kind,
        "compile_cache": prepared.compile_cache,
        "first_in_process": prepared.first_in_process,
        "ran_before": list(prepared.ran_before),
        "peak_memory_bytes": {"cold": prepared.cold_peak_bytes, "steady": steady_peak},
        "memory_kind": memory_kind,
        "memory_kinds": {"cold": prepared.cold_memory_kind or memory_kind, "steady": memory_kind},
        "breakdown": median_breakdown,
        "images_per_s": case.batch_size * devices / summary["median"],
        "fidelity": fidelity,
        "compile_info": compile_info,
        "ladder": f"{case.framework}:ladder" if case.recipe in ladder else None,
        "ladder_step": ladder.index(case.recipe) if case.recipe in ladder else None,
    }


def measure(prepared: Prepared, benchmark=None, *, rounds: int = 10, warmup_rounds: int = 3,
            max_time_s: float = 120.0, tolerance: float = 0.10, breakdown_rounds: int = 3,
            inject_slowdown: float = 0.0, machine_reference: bool = True) -> dict[str, Any]:
    """Time the steady state of a prepared case and return its record.

    With a pytest-benchmark fixture the rounds go through ``benchmark.pedantic`` (synchronized before
    each clock read); without one, through a bare ``perf_counter`` loop with the same synchronization.
    CPU cases also time the machine reference (:mod:`diffperf.reference`) before the warmup and after
    the rounds, unless ``machine_reference`` is false.
    """
    from diffperf import reference

    runner = prepared.runner
    use_reference = machine_reference and prepared.case.device == "cpu"
    ref_samples = reference.sample() if use_reference else []
    call = slowed(runner.generate, inject_slowdown, runner.synchronize)
    plan = plan_rounds(prepared, rounds, warmup_rounds, max_time_s, tolerance, call)
    runner.memory.reset()
    with progress.step(f"{prepared.case.id}: {plan.rounds} steady-state rounds"):
        if benchmark is not None:
            from diffperf.timing import steady_state

            steady_state(benchmark, call, runner.synchronize, plan.rounds, 0)
            samples = list(benchmark.stats.stats.data)
        else:
            samples = [timed_call(call, runner.synchronize).seconds for _ in range(plan.rounds)]
    steady_peak = runner.memory.peak_bytes()
    steady_kind = runner.memory.kind
    if use_reference:
        ref_samples += reference.sample()
    breakdowns = [runner.generate_instrumented()[1].as_dict() for _ in range(breakdown_rounds)]
    rec = record(prepared, samples, steady_peak, breakdowns, steady_memory_kind=steady_kind)
    ref = reference.summarize(ref_samples)
    rec.update(reference=ref, reference_s=ref["median_s"] if ref else None, reference_id=ref["identity"] if ref else None)
    return rec
