"""Peak resident memory of this process on CPU, resettable between phases.

Note: Linux keeps the peak RSS (``VmHWM``) per process; writing ``5`` to ``/proc/self/clear_refs``
resets it to the current RSS, so each phase (cold call, steady state) gets its own peak without a
sampling thread. Where that file is not writable, a psutil sampling thread stands in (coarser).
"""

from __future__ import annotations

import os
import threading

import psutil

from pipelines.base import MemoryProbe


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return _read_hwm() is not None
    except OSError:
        return False


class RSSProbe(MemoryProbe):
    """Peak RSS of this process since the last :meth:`reset`."""

    kind = "peak_rss"

    def __init__(self, interval_s: float = 0.01):
        self._exact = _can_reset_hwm()
        self._interval = interval_s
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        if self._exact:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._stop = threading.Event()
        proc = psutil.Process(os.getpid())
        self._peak = proc.memory_info().rss

        def sample(stop=self._stop):
            while not stop.wait(self._interval):
                self._peak = max(self._peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def peak_bytes(self) -> int | None:
        if self._exact:
            return _read_hwm()
        return max(self._peak, psutil.Process(os.getpid()).memory_info().rss)
