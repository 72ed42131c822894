"""One side of an interleaved A/B run in a process of its own, holding one built pipeline at a time.

The base worker is long-lived (every case's first process pair); the further process pairs of
:mod:`diffperf.ab_replicate` are a head worker and a base worker each, the first ones kept from case to case
(their pipelines released), later ones closed after the case.
Started by :mod:`diffperf.ab` as ``<python> <copy of this file>`` with its side's tree as its working
directory and first on ``PYTHONPATH``, so a base worker imports the *base tree's* ``diffperf`` and ``pipelines``.
This file is copied next to the base worktree before it is run: the base revision may predate A/B, so
the worker uses only what every diffperf revision has (``harness.prepare``, ``cases``, ``timing``).

Protocol: one JSON object a line on stdin, one JSON answer a line on a private copy of stdout (fd 1
itself is pointed at stderr, so a library printing to stdout cannot corrupt the protocol). Every answer
has ``ok``; a failed request answers ``{"ok": false, "error": ..., "kind": ...}`` and the worker keeps
serving. Requests:

* ``hello`` -> python, versions, the files ``diffperf`` and ``pipelines`` were imported from;
* ``preload`` (``case``) -> the case's builder module and the stack it imports lazily are imported (what the
  base worker does while the test process imports the same stack);
* ``build`` (``case``: the head's ``Case.as_dict()``; ``slowdown``: a head worker's injected slowdown) -> build
  and cold-start figures, builder file, whether it was its framework's first pipeline in the worker. With
  ``hold``, the worker answers ``{"ok": true, "stage": "built"}`` once the pipeline is built and waits for a
  ``go`` line before its first call (any other line ends the worker): the two workers of a further process pair
  build at once and make their timed first calls one at a time. A base tree whose ``harness.prepare`` cannot
  stop there answers ``built`` before it starts, so it builds alone;
* ``warm`` (``rounds``) -> seconds of each warmup round; ``reset_memory``;
* ``round`` -> ``seconds`` of one synchronized call;
* ``stats`` -> steady peak memory, memory kind, compile info;
* ``release`` -> the pipeline is closed; ``close`` -> the process exits.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


REQUESTS = ("hello", "preload", "build", "warm", "reset_memory", "round", "stats", "release")  # and "close"
# The device-sharing settings the head's plugin put in the environment (inherited by this worker).
DEVICE_ENV = ("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_PREALLOCATE", "TF_FORCE_GPU_ALLOW_GROWTH", "TF_XLA_FLAGS")


def _case(d: dict):
    from diffperf.cases import Case, resolve_recipes

    recipes = resolve_recipes(d["framework"], [d["recipe"]])
    if len(recipes) != 1:
        raise ValueError(f"recipe {d['recipe']!r} names {len(recipes)} recipes in the base tree")
    fields = {k: d[k] for k in ("framework", "preset", "device", "batch_size", "steps", "height", "width", "seed",
                                "weights", "prompt") if k in d}
    import dataclasses

    known = {f.name for f in dataclasses.fields(Case)}
    return Case(recipe=recipes[0], **{k: v for k, v in fields.items() if k in known})


class Worker:
    def __init__(self, proto=None) -> None:
        self.prepared = None
        self.call = None
        self.proto = proto  # the protocol's output (a held build answers twice)

    def _hold(self) -> None:
        """Answer that the pipeline is built, then wait for ``go`` (anything else, or EOF, ends the worker)."""
        self.proto.write(json.dumps({"ok": True, "stage": "built"}) + "\n")
        line = sys.stdin.readline()
        if (json.loads(line) if line.strip() else {}).get("cmd") != "go":
            self.proto.write(json.dumps({"ok": True}) + "\n")
            raise SystemExit(0)

    def hello(self, req: dict) -> dict:
        import diffperf
        import pipelines

        try:
            from diffperf.hardware import software_versions

            versions = software_versions()
        except ImportError:  # pragma: no cover - a very old base tree
            versions = {}
        return {"python": sys.executable, "version": sys.version.split()[0], "pid": os.getpid(), "cwd": os.getcwd(),
                "diffperf_file": diffperf.__file__, "pipelines_path": list(pipelines.__path__), "versions": versions,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "device_env": {k: os.environ.get(k) for k in DEVICE_ENV}}

    def preload(self, req: dict) -> dict:
        import importlib

        from diffperf.cases import framework_spec

        module = importlib.import_module(framework_spec(_case(req["case"]).framework).module)
        try:
            from diffperf.memory import preload_stack
        except ImportError:  # a base tree before it: the build imports the rest
            return {}
        preload_stack(getattr(module, "PRELOAD", ()))
        return {}

    def build(self, req: dict) -> dict:
        import importlib

        from diffperf import harness
        from diffperf.cases import framework_spec

        self.release({})
        case = _case(req["case"])
        module = importlib.import_module(framework_spec(case.framework).module)
        hold = {}
        if req.get("hold"):
            import inspect

            if "before_first_call" in inspect.signature(harness.prepare).parameters:
                hold = {"before_first_call": self._hold}
            else:  # a base tree before it: built alone
                self._hold()
        self.prepared = harness.prepare(case, **hold)
        runner = self.prepared.runner
        self.call = runner.generate
        if req.get("slowdown"):  # --perf-inject-slowdown, sent to head workers only (the head tree has slowed())
            self.call = harness.slowed(runner.generate, float(req["slowdown"]), runner.synchronize)
        return {"case_id": case.id, "build_s": self.prepared.build_s, "cold_start_s": self.prepared.cold_start_s,
                "cold_peak_bytes": self.prepared.cold_peak_bytes, "builder_file": getattr(module, "__file__", None),
                "memory_kind": getattr(runner.memory, "kind", None),
                "first_in_process": getattr(self.prepared, "first_in_process", None)}  # None: a base tree before it

    def _round(self) -> float:
        from diffperf.timing import timed_call

        if self.prepared is None:
            raise RuntimeError("no case built: send 'build' first")
        return timed_call(self.call, self.prepared.runner.synchronize).seconds

    def warm(self, req: dict) -> dict:
        return {"seconds": [self._round() for _ in range(int(req.get("rounds", 1)))]}

    def reset_memory(self, req: dict) -> dict:
        self.prepared.runner.memory.reset()
        return {}

    def round(self, req: dict) -> dict:
        return {"seconds": self._round()}

    def stats(self, req: dict) -> dict:
        runner = self.prepared.runner
        info = runner.compile_info() if hasattr(runner, "compile_info") else {}
        recipe = self.prepared.case.recipe
        compiles = bool(info.get("compiles")) or any(getattr(recipe, f, None) for f in ("compile_mode", "jit_compile", "mode"))
        return {"steady_peak_bytes": runner.memory.peak_bytes(), "memory_kind": getattr(runner.memory, "kind", None),
                "compile_info": info, "compiles": compiles}

    def release(self, req: dict) -> dict:
        prepared, self.prepared = self.prepared, None
        if prepared is not None:
            prepared.close()
        return {}


def _die_with_parent() -> None:
    """On Linux, get SIGKILL when the head dies (killed outright, no chance to close this worker)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> int:
    _die_with_parent()
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        from diffperf import malloc

        malloc.configure(os.environ.get("DIFFPERF_AB_MALLOC", "steady"))
    except (ImportError, AttributeError, ValueError):
        pass
    worker = Worker(proto)
    for line in iter(sys.stdin.readline, ""):
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.get("cmd")
        if cmd == "close":
            worker.release({})
            proto.write(json.dumps({"ok": True}) + "\n")
            return 0
        handler = getattr(worker, cmd, None) if cmd in REQUESTS else None
        try:
            if handler is None:
                raise ValueError(f"unknown request {cmd!r}")
            answer = {"ok": True} | handler(req)
        except Exception as exc:
            traceback.print_exc()
            answer = {"ok": False, "kind": type(exc).__name__, "error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(answer, default=str) + "\n")
    worker.release({})
    return 0


if __name__ == "__main__":
    sys.exit(main())
