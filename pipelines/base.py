"""The contract every framework builder fulfils, so that timing, fidelity and gating are shared.

A builder turns a :class:`~diffperf.cases.Case` into a :class:`Runner`. The harness only ever calls:

* ``generate()``: the full text-to-image call a user makes (tokenize, encode, denoise, decode, images on
  the host). Same prompt and seed every call, so every call does the same work.
* ``synchronize()``: wait for all queued device work (a no-op on a synchronous CPU backend).
* ``generate_instrumented()``: one call that also times each component, each time synchronized; used for
  the per-component breakdown only, never for the headline latency.
* ``memory``: a :class:`MemoryProbe` for the device (allocator peak on accelerators, peak RSS on CPU).
* ``close()``: release device memory and reset any global state the builder changed.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from typing import Any, Callable

import numpy as np

from diffperf.cases import Case


@dataclasses.dataclass
class Generation:
    """What one call produced, on the host: uint8 images ``[B, H, W, 3]`` and the final latents."""

    images: np.ndarray
    latents: np.ndarray | None = None


@dataclasses.dataclass
class Breakdown:
    """Seconds spent per component in one synchronized, instrumented call."""

    text_encode_s: float
    denoise_s: float
    step_s: list[float]
    decode_s: float
    total_s: float

    def as_dict(self) -> dict[str, Any]:
        steps = sorted(self.step_s)
        return {
            "text_encode_s": self.text_encode_s,
            "denoise_s": self.denoise_s,
            "denoise_step_median_s": steps[len(steps) // 2] if steps else None,
            "denoise_first_step_s": self.step_s[0] if self.step_s else None,
            "decode_s": self.decode_s,
            "other_s": max(0.0, self.total_s - self.text_encode_s - self.denoise_s - self.decode_s),
            "total_s": self.total_s,
        }


class MemoryProbe(abc.ABC):
    """Peak memory of the device a runner uses, resettable between phases."""

    kind: str = "unknown"

    @abc.abstractmethod
    def reset(self) -> None: ...

    @abc.abstractmethod
    def peak_bytes(self) -> int | None: ...


class StepClock:
    """Collects synchronized timestamps at component boundaries during an instrumented call."""

    def __init__(self, sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter):
        self._sync = sync
        self._clock = clock
        self.marks: list[tuple[str, float]] = []

    def mark(self, label: str) -> None:
        self._sync()
        self.marks.append((label, self._clock()))

    def breakdown(self) -> Breakdown:
        """Turn marks ``start, encode_end, step*, decode_start, decode_end, end`` into a Breakdown."""
        d = dict()
        steps = [t for label, t in self.marks if label == "step"]
        for label, t in self.marks:
            if label != "step":
                d.setdefault(label, t)
        start, enc_end = d["start"], d["encode_end"]
        dec_start, dec_end, end = d["decode_start"], d["decode_end"], d["end"]
        bounds = [enc_end] + steps
        step_s = [b - a for a, b in zip(bounds, bounds[1:])]
        return Breakdown(
            text_encode_s=enc_end - start,
            denoise_s=(steps[-1] if steps else dec_start) - enc_end,
            step_s=step_s,
            decode_s=dec_end - dec_start,
            total_s=end - start,
        )


class Runner(abc.ABC):
    """A built pipeline ready to be timed (see the module docstring)."""

    case: Case
    memory: MemoryProbe

    @abc.abstractmethod
    def generate(self) -> Generation: ...

    def synchronize(self) -> None:
        """Wait for queued device work; the default is for synchronous backends."""

    @abc.abstractmethod
    def generate_instrumented(self) -> tuple[Generation, Breakdown]: ...

    def close(self) -> None:
        """Release memory and reset global state."""

    def compile_info(self) -> dict[str, Any]:
        """Framework-specific compile figures measured while building (e.g. AOT compile seconds)."""
        return {}
