"""Progress lines for long steps (building, compiling), so a user can tell the run is not hung.

Inside pytest the plugin points :data:`sink` at the terminal reporter; elsewhere lines go to stderr.
A step that runs longer than ``heartbeat_s`` prints a "still running" line every ``heartbeat_s``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator

sink: Callable[[str], None] | None = None
heartbeat_s: float = 30.0


def say(message: str) -> None:
    line = f"[diffperf] {message}"
    if sink is not None:
        sink(line)
    else:
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(what: str) -> Iterator[dict]:
    """Announce ``what``, heartbeat while it runs, and report its duration; yields a dict with ``seconds``."""
    say(f"{what} ...")
    result: dict = {}
    stop = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            say(f"{what}: still running after {time.perf_counter() - start:.0f} s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield result
    except BaseException:
        say(f"{what}: failed after {time.perf_counter() - start:.1f} s")
        raise
    finally:
        stop.set()
        thread.join()
        result["seconds"] = time.perf_counter() - start
    say(f"{what}: done in {result['seconds']:.1f} s")
