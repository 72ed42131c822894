"""The allocator policy (diffperf/malloc.py): glibc's adaptive trim threshold re-faults memory every round."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from diffperf import malloc

# A round frees 3 x 20 MiB blocks at once; with glibc's adaptive thresholds (raised to 20 MiB / 40 MiB by
# the first free) the 60 MiB at the heap top is trimmed after every round and faulted back in the next.
PROGRAM = """
import resource, sys
from diffperf import malloc
print(malloc.configure(sys.argv[1])["mode"])
def rnd():
    blocks = [bytearray(b"x") * (20 << 20) for _ in range(3)]
    del blocks
faults = []
for _ in range(6):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rnd()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sum(faults[2:]))
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt policies are glibc's")
def test_steady_mode_stops_the_refaulting_that_system_mode_shows():
    mode, steady = _faults("steady")
    assert mode == "steady"
    mode, system = _faults("system")
    assert mode == "system"
    pages = 4 * 3 * (20 << 20) // 4096  # four rounds of 60 MiB
    assert system > pages // 2, f"expected the default glibc policy to re-fault, got {system} faults"
    assert steady < pages // 20, f"steady mode still faulted {steady} times in four rounds"


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="unknown malloc mode 'tcmalloc'"):
        malloc.configure("tcmalloc")
