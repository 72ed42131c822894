"""Shared helpers of the harness tests: a fake builder with a fake asynchronous device."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]

# A builder whose "device" runs work asynchronously: generate() only queues DURATION seconds of work and
# returns at once; synchronize() blocks until the queued work is done. A harness that read the clock
# without synchronizing would report ~0 s. Every sync, call and clock read is logged to FAKE_EVENTS.
FAKE_BUILDER = r'''
import atexit, json, os, time
import numpy as np
from pipelines.base import Breakdown, Generation, MemoryProbe, Runner, StepClock

EVENTS = []
_path = os.environ.get("FAKE_EVENTS")
if _path:
    atexit.register(lambda: open(_path, "w").write(json.dumps(EVENTS)))


def recording_timer():
    EVENTS.append("clock")
    return time.perf_counter()


class FakeMemory(MemoryProbe):
    kind = "fake"
    def reset(self): pass
    def peak_bytes(self): return 1 << 20


class FakeRunner(Runner):
    def __init__(self, case):
        self.case = case
        self.memory = FakeMemory()
        self.duration = float(os.environ.get("FAKE_DURATION", "0.02"))
        self.busy_until = time.perf_counter()
        self.corrupt = os.environ.get("FAKE_CORRUPT", "") if not case.recipe.is_reference else ""

    def synchronize(self):
        EVENTS.append("sync")
        while time.perf_counter() < self.busy_until:
            time.sleep(max(0.0, min(0.001, self.busy_until - time.perf_counter())))

    def _output(self):
        rng = np.random.default_rng(self.case.seed)
        images = rng.integers(0, 256, (self.case.batch_size, 8, 8, 3), dtype=np.uint8)
        latents = rng.standard_normal((self.case.batch_size, 4, 2, 2)).astype(np.float32)
        if self.corrupt == "nan":
            latents[0, 0, 0, 0] = np.nan
        elif self.corrupt == "noise":
            images = np.random.default_rng(99).integers(0, 256, images.shape, dtype=np.uint8)
        return Generation(images, latents)

    def generate(self):
        EVENTS.append("call")
        self.busy_until = max(self.busy_until, time.perf_counter()) + self.duration
        return self._output()

    def generate_instrumented(self):
        clock = StepClock(self.synchronize)
        clock.mark("start"); clock.mark("encode_end")
        for _ in range(self.case.steps):
            clock.mark("step")
        clock.mark("decode_start"); clock.mark("decode_end")
        gen = self.generate()
        clock.mark("end")
        return gen, clock.breakdown()


def build(case):
    return FakeRunner(case)
'''

FAKE_CONFTEST = r'''
import dataclasses
from diffperf import cases
import pipelines.torch_recipes

cases._REGISTRY["torch"] = dataclasses.replace(cases._REGISTRY["torch"], module="fake_builder")
'''


@pytest.fixture
def fake_suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """A pytester directory with the real perf tests, running on the fake builder."""
    pytester.makepyfile(fake_builder=FAKE_BUILDER)
    pytester.makeconftest(FAKE_CONFTEST)
    (pytester.path / "test_perf.py").write_text((REPO / "perf" / "test_pipelines.py").read_text())
    pytester.makeini("[pytest]\naddopts = -p diffperf.plugin --strict-markers\n")
    monkeypatch.setenv("PYTHONPATH", f"{pytester.path}:{REPO}")
    monkeypatch.setenv("FAKE_EVENTS", str(pytester.path / "events.json"))
    return pytester


@pytest.fixture(autouse=True, scope="session")
def _not_an_xdist_worker():
    """Under ``pytest tests -n auto``: a pytest that a test starts (pytester, pytest.main) is no xdist worker.

    pytest-benchmark reads ``PYTEST_XDIST_WORKER`` from the environment and would switch itself off there.
    """
    with pytest.MonkeyPatch.context() as mp:
        for var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
            mp.delenv(var, raising=False)
        yield
