"""The run's state behind the plugin's fixtures: fidelity references, measured records and the gate."""

from __future__ import annotations

import functools

from pathlib import Path

import pytest

from diffperf.cases import Case


class ReferenceUnavailable:
    """A fidelity reference that could not be built: remembered so that it is not rebuilt for every case."""

    def __init__(self, ref_case: Case, exc: BaseException):
        self.skipped = isinstance(exc, pytest.skip.Exception)
        what = "was skipped" if self.skipped else f"failed: {type(exc).__name__}"
        self.message = f"fidelity reference {ref_case.framework}-{ref_case.device}-{ref_case.id} {what}: {exc}".strip()


class PerfSession:
    """Per-run state: reference outputs for the fidelity guard, records for the summary, the gate."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.references: dict = {}
        self.records: list[tuple[str, dict]] = []
        self.gate = make_gate(config)
        self.ab = make_ab(config)
        self.confirmers: dict = {}  # baseline commit -> AbSession of the inline confirmation (--perf-confirm ab)

    def fidelity(self, prepared) -> dict | None:
        """Compare ``prepared``'s output with its fp32 reference (``None`` with --perf-no-fidelity)."""
        from diffperf import fidelity

        if self.config.getoption("perf_no_fidelity"):
            return None
        if getattr(prepared, "fidelity_result", None) is None:
            ref = self.reference(prepared.case)
            gen = prepared.generation
            try:
                prepared.fidelity_result = fidelity.compare(
                    gen.images, gen.latents, ref.images, ref.latents, prepared.case.recipe.fidelity_thresholds()
                )
            except fidelity.FidelityError:
                raise
            except Exception as exc:
                raise fidelity.FidelityError(
                    f"comparing {prepared.case.id} with its reference failed: {type(exc).__name__}: {exc}"
                ) from exc
        return prepared.fidelity_result

    def measure(self, prepared, benchmark, request: pytest.FixtureRequest) -> dict:
        """Time the steady state, attach the record to the benchmark, and apply the regression gate."""
        from diffperf import distributed, harness
        from diffperf.fidelity import FidelityError

        opt = self.config.getoption
        marker = request.node.get_closest_marker("perf_tolerance")
        tolerance = float(marker.args[0]) if marker else opt("perf_tolerance")
        case = prepared.case
        benchmark.group = f"{case.framework}-{case.device}-{case.preset}"
        bench = None if getattr(benchmark, "disabled", False) else benchmark
        ab_outcome = ab_error = None
        if self.ab is not None:
            from diffperf import ab, ab_offsets
            from diffperf.hardware import hardware_id

            try:
                offset, offset_note = ab_offsets.lookup(self.gate, request.node.nodeid, hardware_id(case.device),
                                                        prepared.ran_before)
                rec, ab_outcome = ab.measure(
                    self.ab, prepared, bench, test_id=request.node.nodeid, rounds=opt("perf_rounds"),
                    warmup_rounds=opt("perf_warmup_rounds"), max_time_s=opt("perf_max_time"), tolerance=tolerance,
                    alpha=opt("perf_alpha"), memory_tolerance=opt("perf_memory_tolerance"),
                    compile_tolerance=opt("perf_compile_tolerance"), inject_slowdown=opt("perf_inject_slowdown"),
                    process_cv=opt("perf_ab_process_cv"), offset=offset, offset_note=offset_note)
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
        except FidelityError as exc:  # any error of the fidelity phase arrives as one (see fidelity())
            rec["fidelity"] = {"ok": False, "error": str(exc)}
        except pytest.skip.Exception as exc:
            rec["fidelity"] = {"ok": None, "skipped": str(exc)}
        if rec["fidelity"] is not None:
            rec["fidelity"]["reference"] = case.reference.recipe.tag()
        if self.gate is not None:
            outcome = self.gate.check(request.node.nodeid, rec["hardware_id"], rec, tolerance=tolerance)
            if outcome.failed and ab_outcome is None and ab_error is None and opt("perf_confirm") == "ab":
                outcome = self.confirm(prepared, outcome, request.node.nodeid, tolerance)
            rec["gate"] = outcome.info
            rec["gate_message"] = outcome.message
        benchmark.extra_info.update(rec)
        distributed.attach_samples(self.config, benchmark, rec["samples_s"])  # an xdist worker's timing
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

    def confirm(self, prepared, outcome, test_id: str, tolerance: float):
        """The gate's flags re-measured as A/B against the baseline's commit (:mod:`diffperf.ab_confirm`)."""
        from diffperf.ab_confirm import confirm_flag

        opt = self.config.getoption
        return confirm_flag(
            self.confirmers, prepared, outcome, rootdir=Path(self.config.rootpath), test_id=test_id,
            tolerance=tolerance, alpha=opt("perf_alpha"), rounds=opt("perf_rounds"),
            warmup_rounds=opt("perf_warmup_rounds"), max_time_s=opt("perf_max_time"),
            inject_slowdown=opt("perf_inject_slowdown"), process_cv=opt("perf_ab_process_cv"),
            timeout_s=opt("perf_ab_timeout"), seed=opt("perf_seed"), malloc=opt("perf_malloc"),
            processes=opt("perf_ab_processes"), case_time_s=opt("perf_ab_max_time"),
            memory_tolerance=opt("perf_memory_tolerance"),
            compile_tolerance=opt("perf_compile_tolerance"))

    def ab_hooks(self, case: Case, session: pytest.Session) -> dict:
        """``harness.prepare``'s hooks when this run measures ``case`` as A/B (``--perf-ab-base``/``--perf-ab-python``
        and its latency test selected); else none.

        ``after_imports`` waits for the base worker's imports of the case's stack, started now (the test process
        imports its own meanwhile). On the CPU it then starts the base worker's build, and ``before_first_call``
        waits for it: the two builds run at once, the head's first call alone (:meth:`AbSession.start_build`).
        On a GPU the base builds after the head's first call, once the head's peak says whether both fit.
        """
        if self.ab is None or case not in _ab_cases(session.items):
            return {}
        ab = self.ab
        ab.preload(case)
        if case.device != "cpu":
            return {"after_imports": ab.await_preload}
        return {"after_imports": functools.partial(ab.start_build, case), "before_first_call": ab.await_built}

    def ab_cancel(self, case: Case) -> None:
        """End the base worker's held build of ``case`` when its latency test did not take it."""
        if self.ab is not None:
            self.ab.cancel_build(case)

    def start_ab(self, items) -> None:
        """Before the first test: start the base worker and import the first A/B case's stack in it and in this
        process at once (the test process would otherwise import it in its first test, the worker later)."""
        from diffperf.harness import import_stack

        cases = _ab_cases(items) if self.ab is not None else []
        if not cases:
            return
        self.ab.preload(cases[0])
        try:
            import_stack(cases[0])
        except Exception:  # the case's own build reports it
            pass
        finally:
            self.ab.await_preload()

    def close_ab(self) -> None:
        """Stop every A/B base worker and remove its worktree (--perf-ab-base and the inline confirmations)."""
        for session in [self.ab, *self.confirmers.values()]:
            if session is not None:
                session.close()

    def build_reference(self, case: Case) -> None:
        """Build ``case``'s reference, keep its output and free it, unless done already (or fidelity is off).

        Called before ``case`` itself is built, so the reference never shares the device with the case's
        parameters. A reference that fails or is skipped is remembered as such, never rebuilt.
        """
        from diffperf.harness import prepare

        ref_case = case.reference
        if self.config.getoption("perf_no_fidelity") or ref_case in self.references:
            return
        try:
            prepared = prepare(ref_case)
        except (Exception, pytest.skip.Exception) as exc:
            self.references[ref_case] = ReferenceUnavailable(ref_case, exc)
            return
        self.references[ref_case] = prepared.generation
        prepared.close()

    def reference(self, case: Case):
        """The reference output for ``case`` (built now if it was not built before the case).

        Raises FidelityError when the reference could not be built, pytest's skip when it was skipped.
        """
        from diffperf.fidelity import FidelityError

        self.build_reference(case)
        ref = self.references[case.reference]
        if isinstance(ref, ReferenceUnavailable):
            if ref.skipped:
                pytest.skip(ref.message)
            raise FidelityError(ref.message)
        return ref


def _ab_cases(items) -> list[Case]:
    """The cases whose latency test is among ``items`` and not skipped by a mark, in run order (A/B measures them)."""
    return [item.callspec.params["perf_case"] for item in items
            if getattr(item, "originalname", None) == "test_latency" and getattr(item, "callspec", None) is not None
            and "perf_case" in item.callspec.params and item.get_closest_marker("skip") is None]


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
        history=opt("perf_baseline_history"),
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
                                opt("perf_ab_timeout"), opt("perf_seed"), opt("perf_malloc"),
                                opt("perf_ab_processes"), opt("perf_ab_max_time"))
    except ab.AbError as exc:
        raise pytest.UsageError(str(exc)) from None
    return ab.AbSession(settings)
