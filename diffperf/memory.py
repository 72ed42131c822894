"""Peak resident memory a case adds to this process on CPU, resettable between phases.

What it counts: the peak RSS of a phase (cold call, steady state) minus the RSS at case start, which
:func:`mark_case_start` takes after the case's framework stack is imported (its lazy imports included,
:func:`preload_stack`) and before its pipeline is built (``diffperf.harness.prepare``). So the figure holds the case's weights, activations, compiled code
and whatever its framework allocates while building and running it, and not what the process held
before: other frameworks imported earlier (TensorFlow, JAX), earlier cases' leftovers, the interpreter.

Note: Linux keeps the peak RSS (``VmHWM``) per process; writing ``5`` to ``/proc/self/clear_refs``
resets it to the current RSS, so each phase gets its own peak without a sampling thread. Where that file
is not writable, a psutil sampling thread stands in (coarser).
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


_case_start_rss: int | None = None

def preload_stack(imports) -> list[str]:
    """Import what a builder would import on its first build: its ``PRELOAD`` (module, names to resolve on it).

    Called before the case-start mark, so a framework's first case does not carry its stack's code in its
    memory figure while its later cases do not. A missing module or name is skipped (the build itself
    reports or skips it). Returns the modules imported.
    """
    import importlib

    done = []
    for module_name, names in imports:
        try:
            module = importlib.import_module(module_name)
            for name in names:
                attr = getattr(module, name.removesuffix("()"))
                if name.endswith("()"):
                    attr()
        except Exception:
            continue
        done.append(module_name)
    return done


def current_rss() -> int:
    """This process's resident set size now, in bytes."""
    return int(psutil.Process(os.getpid()).memory_info().rss)


def mark_case_start() -> int:
    """Record the RSS a case starts from (what :class:`RSSProbe` subtracts); returns it.

    Garbage is collected and the C allocator's free memory handed back to the OS (``malloc_trim``) first:
    memory freed earlier but still resident would otherwise be reused by the case without raising RSS, so
    the figure would shrink by whatever happened to be free.
    """
    global _case_start_rss
    import gc

    from diffperf.malloc import _glibc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    _case_start_rss = current_rss()
    return _case_start_rss


def clear_case_start() -> None:
    """Forget the mark (probes created later start from their own creation)."""
    global _case_start_rss
    _case_start_rss = None


class RSSProbe(MemoryProbe):
    """Peak RSS of this process since the last :meth:`reset`, minus the RSS at case start.

    ``start_bytes`` defaults to the mark :func:`mark_case_start` set for the build in progress (or, outside
    ``harness.prepare``, the RSS when the probe is created: after the build, so without the weights).
    """

    kind = "peak_rss_growth"  # baselines measured as "peak_rss" (whole process) are not compared with it

    def __init__(self, interval_s: float = 0.01, start_bytes: int | None = None):
        if start_bytes is None:
            start_bytes = _case_start_rss if _case_start_rss is not None else current_rss()
        self.start_bytes = int(start_bytes)
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

    def process_peak_bytes(self) -> int | None:
        """The whole process's peak RSS since the last :meth:`reset`."""
        if self._exact:
            return _read_hwm()
        return max(self._peak, current_rss())

    def peak_bytes(self) -> int | None:
        peak = self.process_peak_bytes()
        return None if peak is None else max(0, peak - self.start_bytes)
