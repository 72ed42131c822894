"""The C allocator's policy for the measuring process: glibc's adaptive thresholds pinned, so CPU timings repeat.

Note: glibc serves large blocks with ``mmap`` and returns freed memory at the top of the heap to the OS
past a trim threshold; both thresholds adapt to the biggest block freed *so far in the process*. So the
same pipeline, after the same warmup, runs in one of two modes depending on what the process did before:
measured here, the tiny fp32 classic-attention pipeline built first in a fresh process took 20,000-37,000
minor page faults per call and 0.24 s, but 0 faults and 0.20 s when built after another pipeline (and,
by chance, in 3 of 21 fresh processes). A gate cannot tell that 20 % flip from a regression.
``steady`` pins the thresholds at the values a long-running process converges to (mmap threshold at
glibc's maximum, 32 MiB; trim threshold 1 GiB), so every case runs in the steady mode whatever ran
before it; :func:`release_free_memory` hands the kept memory back to the OS between cases so one case's
free memory does not sit in the next one's peak RSS. ``system`` leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

MODES = ("steady", "system")
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_state: dict = {"mode": "system", "description": "system allocator defaults"}


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def configure(mode: str) -> dict:
    """Apply ``mode`` (``steady`` or ``system``) to this process and return what was applied."""
    if mode not in MODES:
        raise ValueError(f"unknown malloc mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "steady":
        libc = _glibc()
        if libc is None:
            _state.update(mode="system", description="not glibc: system allocator defaults")
        elif libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
            _state.update(mode="steady", description="glibc mmap_threshold=32 MiB, trim_threshold=1 GiB (fixed)")
        else:
            _state.update(mode="system", description="glibc refused mallopt: system allocator defaults")
    return dict(_state)


def current() -> dict:
    """The policy in force, for ``machine_info``."""
    return dict(_state)


def release_free_memory() -> None:
    """Return the allocator's free memory to the OS (``malloc_trim(0)``) when the policy keeps it."""
    if _state["mode"] == "steady":
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
