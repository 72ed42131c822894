"""Timing primitives and the CPU memory probe, with fake clocks and devices."""

from __future__ import annotations

import numpy as np
import pytest

from diffperf import fidelity
from diffperf.memory import RSSProbe
from diffperf.timing import bare_loop, summarize, timed_call
from pipelines.base import StepClock


class FakeDevice:
    def __init__(self):
        self.events = []
        self.now = 0.0

    def clock(self):
        self.events.append("clock")
        return self.now

    def sync(self):
        self.events.append("sync")
        self.now += 0.5  # queued work finishes only at a sync

    def call(self):
        self.events.append("call")
        return 42


def test_timed_call_syncs_before_each_clock_read():
    dev = FakeDevice()
    timed = timed_call(dev.call, dev.sync, dev.clock)
    assert dev.events == ["sync", "clock", "call", "sync", "clock"]
    assert timed.value == 42 and timed.seconds == 0.5


def test_bare_loop_and_summary():
    dev = FakeDevice()
    samples = bare_loop(dev.call, dev.sync, 4, dev.clock)
    assert samples == [0.5] * 4
    s = summarize([1.0, 2.0, 3.0])
    assert s["median"] == 2.0 and s["rounds"] == 3 and s["cv"] == pytest.approx(0.5)


def test_step_clock_breakdown():
    dev = FakeDevice()
    clock = StepClock(dev.sync, dev.clock)
    for label in ["start", "encode_end", "step", "step", "step", "decode_start", "decode_end", "end"]:
        clock.mark(label)
    b = clock.breakdown()
    assert b.text_encode_s == 0.5 and b.denoise_s == 1.5 and b.step_s == [0.5] * 3
    assert b.decode_s == 0.5 and b.total_s == 3.5
    assert b.as_dict()["denoise_step_median_s"] == 0.5


def test_rss_probe_sees_an_allocation():
    probe = RSSProbe()
    probe.reset()
    before = probe.peak_bytes()
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
    peak = probe.peak_bytes()
    del block
    assert peak - before >= 60 * 2**20


def test_fidelity_metrics():
    a = np.zeros((1, 4, 4, 3), np.uint8)
    assert fidelity.psnr(a, a) == float("inf")
    b = a.copy()
    b[0, 0, 0, 0] = 255
    assert fidelity.psnr(a, b) == pytest.approx(10 * np.log10(48), rel=1e-6)
    assert fidelity.cosine(np.ones(3), 2 * np.ones(3)) == pytest.approx(1.0)
    with pytest.raises(fidelity.FidelityError, match="1 NaN and 1 inf"):
        fidelity.check_finite("latents", np.array([np.nan, np.inf, 0.0]))
    with pytest.raises(fidelity.FidelityError, match="shape mismatch"):
        fidelity.psnr(a, np.zeros((1, 4, 4, 4)))


class _Runner:
    """A runner whose calls, syncs and instrumented calls are logged next to the reference's calls."""

    def __init__(self, events):
        self.events = events
        self.memory = RSSProbe()

    def generate(self):
        self.events.append("call")

    def synchronize(self):
        pass

    def generate_instrumented(self):
        from pipelines.base import Breakdown

        self.events.append("instrumented")
        return None, Breakdown(text_encode_s=0.0, denoise_s=0.0, step_s=[0.0], decode_s=0.0, total_s=0.0)

    def compile_info(self):
        return {}


@pytest.mark.parametrize("device, enabled, expected", [("cpu", True, 22), ("cpu", False, 0), ("cuda", True, 0)])
def test_machine_reference_is_timed_around_the_rounds_never_between(monkeypatch, device, enabled, expected):
    pytest.importorskip("torch")
    from diffperf import harness, reference
    from diffperf.cases import Case
    from pipelines.torch_recipes import TorchRecipe

    events: list[str] = []
    real = reference.time_parts
    monkeypatch.setattr(reference, "time_parts", lambda buffers: events.append("reference") or real(buffers))
    case = Case("torch", TorchRecipe.from_tag("fp32-sdpa"), "tiny", device=device, steps=2)
    prepared = harness.Prepared(case, _Runner(events), 0.0, 0.0, None, None, None)
    rec = harness.measure(prepared, None, rounds=4, warmup_rounds=3, breakdown_rounds=1, machine_reference=enabled)
    assert events.count("reference") == expected  # 2 x (1 untimed + 10 timed)
    timed = [i for i, e in enumerate(events) if e == "call"]
    refs = [i for i, e in enumerate(events) if e == "reference"]
    assert not any(timed[0] < i < timed[-1] for i in refs), "a reference call ran between two timed calls"
    if expected:
        import torch

        assert rec["reference_s"] > 0 and len(rec["reference"]["samples_s"]) == 20
        assert rec["reference_id"] == reference.identity() and torch.__version__ in rec["reference_id"]
    else:
        assert rec["reference"] is None and rec["reference_s"] is None and rec["reference_id"] is None
