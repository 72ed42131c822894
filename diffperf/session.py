"""The run's state behind the plugin's fixtures: fidelity references, measured records and the gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffperf.cases import Case


class PerfSession:
    """Per-run state: reference outputs for the fidelity guard, records for the summary, the gate."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.references: dict = {}
        self.records: list[tuple[str, dict]] = []
        self.gate = make_gate(config)
        self.ab = make_ab(config)

    def fidelity(self, prepared) -> dict | None:
        """Compare ``prepared``'s output with its fp32 reference (``None`` with --perf-no-fidelity)."""
        from diffperf import fidelity

        if self.config.getoption("perf_no_fidelity"):
            return None
        if getattr(prepared, "fidelity_result", None) is None:
            ref = self.reference(prepared.case)
            gen = prepared.generation
            prepared.fidelity_result = fidelity.compare(
                gen.images, gen.latents, ref.images, ref.latents, prepared.case.recipe.fidelity_thresholds()
            )
        return prepared.fidelity_result

    def measure(self, prepared, benchmark, request: pytest.FixtureRequest) -> dict:
        """Time the steady state, attach the record to the benchmark, and apply the regression gate."""
        from diffperf import harness
        from diffperf.fidelity import FidelityError

        opt = self.config.getoption
        marker = request.node.get_closest_marker("perf_tolerance")
        tolerance = float(marker.args[0]) if marker else opt("perf_tolerance")
        case = prepared.case
        benchmark.group = f"{case.framework}-{case.device}-{case.preset}"
        bench = None if getattr(benchmark, "disabled", False) else benchmark
        ab_outcome = ab_error = None
        if self.ab is not None:
            from diffperf import ab

            try:
                rec, ab_outcome = ab.measure(
                    self.ab, prepared, bench, test_id=request.node.nodeid, rounds=opt("perf_rounds"),
                    warmup_rounds=opt("perf_warmup_rounds"), max_time_s=opt("perf_max_time"), tolerance=tolerance,
                    alpha=opt("perf_alpha"), memory_tolerance=opt("perf_memory_tolerance"),
                    compile_tolerance=opt("perf_compile_tolerance"), inject_slowdown=opt("perf_inject_slowdown"))
            except ab.AbDoesNotFit as exc:
                pytest.skip(str(exc))
            except ab.AbError as exc:  # the head is still measured and kept; the test fails with the error
                ab_error = str(exc)
                if isinstance(exc, ab.AbWorkerError):
                    self.ab.discard_worker()
        if ab_outcome is None:
            rec = harness.measure(
                prepared, bench,
                rounds=opt("perf_rounds"), warmup_rounds=opt("perf_warmup_rounds"), max_time_s=opt("perf_max_time"),
                tolerance=tolerance, inject_slowdown=opt("perf_inject_slowdown"),
                machine_reference=opt("perf_reference") != "off",
            )
        if ab_error is not None:
            rec["ab"] = {"verdict": "error", "error": ab_error, "head_commit": self.ab.head_commit,
                         "base_commit": self.ab.base_commit}
        try:
            result = self.fidelity(prepared)
            rec["fidelity"] = None if result is None else result.as_dict() | {"ok": result.ok}
        except FidelityError as exc:
            rec["fidelity"] = {"ok": False, "error": str(exc)}
        if self.gate is not None:
            outcome = self.gate.check(request.node.nodeid, rec["hardware_id"], rec, tolerance=tolerance)
            rec["gate"] = outcome.info
            rec["gate_message"] = outcome.message
        benchmark.extra_info.update(rec)
        self.records.append((request.node.nodeid, rec))
        if ab_error is not None:
            pytest.fail(f"{request.node.nodeid}: A/B failed, head measured alone: {ab_error}", pytrace=False)
        if ab_outcome is not None:  # the pairs decide; the stored-baseline gate's verdict is only recorded
            if ab_outcome.failed:
                pytest.fail(ab_outcome.message, pytrace=False)
            return rec
        if self.gate is not None and outcome.failed:
            pytest.fail(outcome.message, pytrace=False)
        return rec

    def reference(self, case: Case):
        """The fp32 unoptimized output for ``case`` (built on demand and released at once)."""
        from diffperf.harness import prepare

        ref_case = case.reference
        if ref_case not in self.references:
            prepared = prepare(ref_case)
            self.references[ref_case] = prepared.generation
            prepared.close()
        return self.references[ref_case]


def make_gate(config: pytest.Config):
    """The regression gate configured from the options (``None`` until diffperf.gate is present)."""
    try:
        from diffperf.gate import Gate, GateSettings
    except ImportError:
        return None
    opt = config.getoption
    baselines = opt("perf_baselines_dir")
    return Gate(GateSettings(
        tolerance=opt("perf_tolerance"), memory_tolerance=opt("perf_memory_tolerance"),
        compile_tolerance=opt("perf_compile_tolerance"), alpha=opt("perf_alpha"),
        update=opt("perf_update_baselines"), rescale_by_reference=opt("perf_reference") == "rescale",
        baselines_dir=Path(baselines).resolve() if baselines else Path(config.rootpath) / "baselines",
    ))


def make_ab(config: pytest.Config):
    """The A/B base side (:class:`diffperf.ab.AbSession`) from --perf-ab-base / --perf-ab-python, or ``None``."""
    opt = config.getoption
    if opt("perf_ab_base", None) is None and opt("perf_ab_python", None) is None:
        return None
    from diffperf import ab

    try:
        settings = ab.configure(Path(config.rootpath), opt("perf_ab_base"), opt("perf_ab_python"),
                                opt("perf_ab_timeout"), opt("perf_seed"), opt("perf_malloc"))
    except ab.AbError as exc:
        raise pytest.UsageError(str(exc)) from None
    return ab.AbSession(settings)
