"""The CPU memory figure counts the case's own growth, not what the process held before the case."""

from __future__ import annotations

import numpy as np
import pytest

from diffperf import memory

MiB = 2**20


@pytest.fixture(autouse=True)
def _no_stale_mark():
    yield
    memory.clear_case_start()


def _touch(n_bytes: int) -> np.ndarray:
    a = np.ones(n_bytes // 8, dtype=np.float64)  # written, so resident
    return a


@pytest.mark.parametrize("exact", [True, False], ids=["clear_refs", "sampling"])
def test_unrelated_allocation_before_the_case_is_not_counted(monkeypatch, exact):
    if exact and not memory._can_reset_hwm():
        pytest.skip("/proc/self/clear_refs is not writable here")
    monkeypatch.setattr(memory, "_can_reset_hwm", lambda: exact)
    unrelated = _touch(384 * MiB)  # like TensorFlow and JAX imported first
    memory.mark_case_start()
    probe = memory.RSSProbe(interval_s=0.001)
    probe.reset()
    case = _touch(96 * MiB)
    if not exact:
        import time

        time.sleep(0.05)  # let the sampling thread see it
    peak, process_peak = probe.peak_bytes(), probe.process_peak_bytes()
    del case
    assert process_peak >= 384 * MiB + 80 * MiB  # the process did hold both
    assert 80 * MiB <= peak <= 96 * MiB + 64 * MiB, peak / MiB  # the figure holds the case's 96 MiB only
    del unrelated
    probe._stop.set()  # ends the sampling thread of the fallback


def test_the_figure_is_the_same_with_or_without_a_prior_allocation():
    def case_peak(prior_bytes: int) -> int:
        prior = _touch(prior_bytes) if prior_bytes else None
        memory.mark_case_start()
        probe = memory.RSSProbe()
        probe.reset()
        a = _touch(128 * MiB)
        peak = probe.peak_bytes()
        del a, prior
        return peak

    alone, after = case_peak(0), case_peak(512 * MiB)
    assert abs(after - alone) <= 48 * MiB, (alone / MiB, after / MiB)
    assert memory.RSSProbe.kind == "peak_rss_growth"


def test_probe_without_a_mark_starts_from_its_creation(monkeypatch):
    monkeypatch.setattr(memory, "_case_start_rss", None)
    probe = memory.RSSProbe()
    assert abs(probe.start_bytes - memory.current_rss()) < 64 * MiB
    assert memory.RSSProbe(start_bytes=123).start_bytes == 123


def test_preload_stack_imports_what_the_builder_would_and_skips_what_is_missing():
    imports = (("json", ("dumps",)), ("no_such_module_here", ()), ("os", ("no_such_attribute",)),
               ("platform", ("python_version()",)))
    assert memory.preload_stack(imports) == ["json", "platform"]
    assert memory.preload_stack(()) == []
    import importlib

    from diffperf.cases import FRAMEWORKS, framework_spec

    for fw in FRAMEWORKS:  # every real builder declares its lazy imports
        assert importlib.import_module(framework_spec(fw).module).PRELOAD


def test_prepare_counts_the_builds_weights_and_not_an_earlier_allocation(monkeypatch):
    """Through ``harness.prepare``: a build holding 96 MiB of weights reads the same after 512 MiB held elsewhere."""
    from diffperf import harness
    from diffperf.cases import Case
    from pipelines.torch_recipes import TorchRecipe

    class Runner:
        def __init__(self):
            self.weights = _touch(96 * MiB)
            self.memory = memory.RSSProbe()

        def synchronize(self):
            pass

        def generate(self):
            return float(self.weights[::4096].sum())

        def generate_instrumented(self):
            return self.generate(), None

        def close(self):
            self.weights = None

    monkeypatch.setattr(harness, "builder", lambda framework: lambda case: Runner())
    case = Case("torch", TorchRecipe.from_tag("fp32-sdpa"), "tiny", steps=2)

    def cold_peak(prior_bytes):
        prior = _touch(prior_bytes) if prior_bytes else None
        prepared = harness.prepare(case)
        peak = prepared.cold_peak_bytes
        prepared.close()
        del prior
        return peak

    alone, after = cold_peak(0), cold_peak(512 * MiB)
    assert 80 * MiB <= alone <= 96 * MiB + 64 * MiB, alone / MiB
    assert abs(after - alone) <= 48 * MiB, (alone / MiB, after / MiB)


def test_a_pipeline_built_through_the_api_makes_the_next_case_not_the_first_in_its_process(monkeypatch):
    """``first_in_process`` (the memory context of a case) counts every build of the framework, not only
    ``harness.prepare``'s: ``perf/test_harness_accuracy.py`` builds a torch pipeline through the API before the
    matrix, and a first case recorded as "first" then grew 34-53 MiB instead of a first pipeline's 88-93 MiB."""
    from diffperf import api, harness
    from diffperf.cases import Case
    from pipelines.torch_recipes import TorchRecipe

    class Runner:
        def __init__(self):
            self.memory = memory.RSSProbe()

        def synchronize(self):
            pass

        def generate(self):
            return 0.0

        def generate_instrumented(self):
            return self.generate(), None

        def close(self):
            pass

    monkeypatch.setattr(harness, "builder", lambda framework: lambda case: Runner())
    monkeypatch.setattr(harness, "_BUILT_FRAMEWORKS", set())
    monkeypatch.setattr(harness, "_BUILT_CASES", [])
    case = Case("torch", TorchRecipe.from_tag("fp32-sdpa"), "tiny", steps=2)
    firsts, befores = [], []
    for _ in range(2):
        prepared = harness.prepare(case)
        firsts.append(prepared.first_in_process)
        befores.append(prepared.ran_before)
        prepared.close()
    assert firsts == [True, False]
    assert befores == [(), (case.full_id,)]  # what the process built before: the A/A offsets' key (ab_offsets)
    monkeypatch.setattr(harness, "_BUILT_FRAMEWORKS", set())
    other = Case("torch", TorchRecipe.from_tag("fp32-classic"), "tiny", steps=2)
    api.build_pipeline(other).close()
    prepared = harness.prepare(case)
    prepared.close()
    assert prepared.first_in_process is False
    assert prepared.ran_before == (case.full_id, case.full_id, other.full_id)  # API builds count too, in order
    assert harness.record(prepared, [0.1, 0.1], None, [])["ran_before"] == [case.full_id, case.full_id, other.full_id]
    assert harness._BUILT_FRAMEWORKS == {"torch"}  # another framework's first pipeline is still its first
