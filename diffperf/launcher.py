"""``python -m diffperf launch``: the benchmark matrix in isolated pytest processes, one worker per device.

pytest-benchmark turns itself off under pytest-xdist, so parallelism and isolation come from here instead:

1. the node ids are collected once (``pytest --collect-only -q`` with the given arguments);
2. they are grouped: ``framework`` (each of PyTorch, TensorFlow, JAX in processes of its own, so no stack
   holds device memory another one needs), ``case`` (one process per case: its tests share the built
   pipeline), or ``none``; ``auto`` is ``case`` with several devices, ``framework`` otherwise;
3. one worker thread per device takes groups from a queue and runs each in a fresh ``pytest`` process with
   the same arguments plus ``--perf-select`` (the group's node ids) and ``--perf-journal``, pinned to its
   device with ``CUDA_VISIBLE_DEVICES``;
4. when a process dies (a signal, the out-of-memory killer, a compiler crash, ``--case-timeout``), the test
   it was running is recorded as ``crashed`` with the exit status and the tail of its output, the other
   tests of that case as not run, and the rest of the group goes on in a new process;
5. at the end (also after Ctrl-C, which stops the workers) the journals are merged into one
   pytest-benchmark saved run (``--save``, ``--json``) that ``compare`` reads like any other.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from diffperf import results
from diffperf.cases import FRAMEWORKS

CLEAN_EXITS = (0, 1, 2, 5)  # pytest: all passed, some failed, interrupted, nothing collected
RESERVED = ("--benchmark-save", "--benchmark-autosave", "--benchmark-json", "--perf-journal", "--perf-select")
NOT_RUN = "not run"


def param_id(nodeid: str) -> str:
    """The parametrization id of ``nodeid`` (the case), or the node id itself."""
    m = re.search(r"\[(.*)\]$", nodeid)
    return m.group(1) if m else nodeid


def framework_of(nodeid: str) -> str:
    """``torch``, ``tf`` or ``jax`` for a perf case (ids read ``<framework>-<device>-...``), else ``other``."""
    head = param_id(nodeid).split("-", 1)[0]
    return head if head in FRAMEWORKS else "other"


@dataclasses.dataclass
class Group:
    key: str
    nodeids: list[str]


def make_groups(nodeids: list[str], isolate: str) -> list[Group]:
    """Split ``nodeids`` into process groups, keeping collection order inside each group."""
    key: Callable[[str], str] = {
        "framework": framework_of,
        "case": lambda n: f"{framework_of(n)}/{param_id(n)}",
        "none": lambda n: "all",
    }[isolate]
    groups: dict[str, Group] = {}
    for n in nodeids:
        groups.setdefault(key(n), Group(key(n), [])).nodeids.append(n)
    return list(groups.values())


def parse_devices(spec: str) -> list[str | None]:
    """``none`` (one unpinned worker), ``all`` (one per visible NVIDIA GPU, else one unpinned), or ``0,1,...``."""
    spec = spec.strip()
    if spec in ("", "none"):
        return [None]
    if spec == "all":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip():
            return [d.strip() for d in visible.split(",") if d.strip()]
        from diffperf.hardware import nvidia_gpus

        n = len(nvidia_gpus())
        return [str(i) for i in range(n)] or [None]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices or len(set(devices)) != len(devices):
        raise argparse.ArgumentTypeError(f"--devices {spec!r}: give 'all', 'none' or distinct ids like 0,1,2")
    return devices


def describe_exit(rc: int) -> str:
    """Why a worker process ended, in words."""
    sig = -rc if rc < 0 else rc - 128 if 128 < rc < 160 else None
    if sig is None:
        return f"exit code {rc}"
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    how = f"killed by {name}" if rc < 0 else f"exit code {rc} (128 + {name})"
    if sig == signal.SIGKILL:
        how += ": often the out-of-memory killer (see dmesg)"
    elif sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
        how += ": the process crashed (a native library, a compiler)"
    return how


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


@dataclasses.dataclass
class Launch:
    """One launch: the pytest arguments, the workers' devices, where the journals go."""

    pytest_args: list[str]
    devices: list[str | None]
    isolate: str = "auto"
    run_dir: Path = dataclasses.field(default_factory=lambda: Path(".diffperf-cache") / "launch" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    case_timeout: float | None = None
    grace_s: float = 20.0
    python: str = sys.executable
    echo: Callable[[str], None] = print

    def __post_init__(self):
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counter = 0
        self.interrupted = False

    # -- collection --------------------------------------------------------------------------------

    def collect(self) -> list[str]:
        args = [a for a in self.pytest_args if a not in ("-v", "-vv", "--verbose")]
        proc = subprocess.run([self.python, "-m", "pytest", *args, "--collect-only", "-q", "--perf-journal", "none"],
                              capture_output=True, text=True)
        if proc.returncode not in (0, 5):
            raise RuntimeError(f"collection failed (exit code {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        return [ln.strip() for ln in proc.stdout.splitlines() if re.match(r"^\S+::\S", ln.strip())]

    # -- one process -------------------------------------------------------------------------------

    def _signal(self, proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _run_process(self, nodeids: list[str], device: str | None, label: str):
        """Run ``nodeids`` in one pytest process; return (journal, exit code, timed-out node id, log)."""
        with self.lock:
            self.counter += 1
            tag = f"{self.counter:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)[:60]}"
        select, journal, log = (self.run_dir / f"{tag}{ext}" for ext in (".select", ".jsonl", ".log"))
        select.write_text("\n".join(nodeids) + "\n", encoding="utf-8")
        # Each worker is a pytest session of its own, never an xdist worker (pytest-benchmark would turn off).
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        cmd = [self.python, "-m", "pytest", *self.pytest_args, "--perf-select", str(select), "--perf-journal", str(journal)]
        timed_out = None
        with open(log, "wb") as out:
            # A session of its own: the launcher decides when its workers stop (Ctrl-C, timeouts).
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            stop_sent = None
            while proc.poll() is None:
                if self.stop.is_set():
                    if stop_sent is None:
                        stop_sent = time.monotonic()
                        self._signal(proc, signal.SIGINT)
                    elif time.monotonic() - stop_sent > self.grace_s:
                        self._signal(proc, signal.SIGKILL)
                elif self.case_timeout is not None:
                    entries = results.read_journal(journal)
                    running = results.running_nodeid(entries)
                    started = [e["time"] for e in entries if e.get("event") == "start" and e["nodeid"] == running]
                    if running and started and time.time() - started[-1] > self.case_timeout:
                        timed_out = running
                        self._signal(proc, signal.SIGKILL)
                        proc.wait()
                        break
                time.sleep(0.1)
        return journal, proc.returncode, timed_out, log

    def _run_group(self, group: Group, device: str | None) -> None:
        where = f"device {device}" if device is not None else "worker"
        pending = list(group.nodeids)
        while pending and not self.stop.is_set():
            journal, rc, timed_out, log = self._run_process(pending, device, group.key)
            entries = results.read_journal(journal)
            done = results.case_entries(entries)
            left = [n for n in pending if n not in done]
            counts: dict[str, int] = {}
            for n in pending:
                if n in done:
                    counts[done[n]["outcome"]] = counts.get(done[n]["outcome"], 0) + 1
            summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "nothing finished"
            self.echo(f"[{where}] {group.key}: {summary} ({describe_exit(rc)}; journal {journal})")
            dead = results.running_nodeid(entries)
            if self.stop.is_set() and dead is not None:
                results.append_entry(journal, {"event": "case", "nodeid": dead, "outcome": "interrupted",
                                               "device": device, "reason": "interrupted (Ctrl-C) while running"})
            if not left or self.stop.is_set():
                return
            if timed_out is not None:
                why = f"timed out after {self.case_timeout:g} s (--case-timeout); the worker was killed"
            else:
                why = f"the worker process died: {describe_exit(rc)}"
            tail = _tail(log)
            if dead is None:
                # Nothing was running: the process ended before its first test or after its last one.
                reason = (f"{NOT_RUN}: the worker ended ({describe_exit(rc)}) without running it"
                          if rc in CLEAN_EXITS else f"{NOT_RUN}: {why} before the test started")
                for n in left:
                    results.append_entry(journal, {"event": "case", "nodeid": n, "outcome": NOT_RUN,
                                                   "reason": reason + (f"\n{tail}" if tail else ""), "device": device})
                self.echo(f"[{where}] {group.key}: {len(left)} not run: {reason}")
                return
            results.append_entry(journal, {
                "event": "case", "nodeid": dead, "outcome": "crashed", "device": device,
                "reason": f"{why}\n--- last output ---\n{tail}" if tail else why,
            })
            self.echo(f"[{where}] CRASHED {dead}: {why}")
            siblings = [n for n in left if n != dead and param_id(n) == param_id(dead)]
            for n in siblings:
                results.append_entry(journal, {"event": "case", "nodeid": n, "outcome": NOT_RUN, "device": device,
                                               "reason": f"{NOT_RUN}: its case crashed in {dead}: {why}"})
            pending = [n for n in left if n != dead and n not in siblings]
            if pending:
                self.echo(f"[{where}] {group.key}: going on with the {len(pending)} remaining test(s) in a new process")

    # -- the whole launch --------------------------------------------------------------------------

    def run(self, nodeids: list[str]) -> list[Path]:
        """Run ``nodeids`` on the workers; return the journals (after Ctrl-C too, with ``interrupted`` set)."""
        isolate = self.isolate if self.isolate != "auto" else ("case" if len(self.devices) > 1 else "framework")
        groups = make_groups(nodeids, isolate)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        todo: queue.Queue = queue.Queue()
        for g in groups:
            todo.put(g)
        errors: list[BaseException] = []

        finished = [threading.Event() for _ in self.devices]

        def worker(device: str | None, done: threading.Event) -> None:
            try:
                while not self.stop.is_set():
                    try:
                        group = todo.get_nowait()
                    except queue.Empty:
                        return
                    self._run_group(group, device)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                self.stop.set()
            finally:
                done.set()

        self.echo(f"diffperf launch: {len(nodeids)} tests in {len(groups)} group(s) (isolate={isolate}) on "
                  f"{len(self.devices)} worker(s) {[d for d in self.devices if d is not None] or ''}; journals in {self.run_dir}")
        threads = [threading.Thread(target=worker, args=(d, e), daemon=True) for d, e in zip(self.devices, finished)]
        for t in threads:
            t.start()
        # Note: the main thread polls events instead of calling Thread.join(): a Ctrl-C inside join() can
        # leave is_alive() false for a live worker, and the launcher would exit with its children running.
        try:
            while not all(e.is_set() for e in finished):
                time.sleep(0.1)
        except KeyboardInterrupt:
            self.interrupted = True
            self.echo(f"interrupted: stopping the workers (up to {self.grace_s:g} s; Ctrl-C again to kill them)...")
            self.stop.set()
            while not all(e.is_set() for e in finished):
                try:
                    time.sleep(0.1)
                except KeyboardInterrupt:
                    self.grace_s = 0.0
        if errors:
            raise errors[0]
        return sorted(self.run_dir.glob("*.jsonl"))


def _report(run: dict, nodeids: list[str], journals: list[Path], echo: Callable[[str], None]) -> dict[str, int]:
    cases: dict[str, dict] = {}
    for j in journals:
        cases.update(results.case_entries(results.read_journal(j)))
    counts: dict[str, int] = {}
    for n in nodeids:
        outcome = cases[n]["outcome"] if n in cases else NOT_RUN
        counts[outcome] = counts.get(outcome, 0) + 1
    for failure in run["diffperf_failures"]:
        first = (failure.get("reason") or "").splitlines()[:1]
        echo(f"{failure['outcome'].upper()} {failure['nodeid']}: {first[0] if first else ''}")
    echo("diffperf launch: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return counts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, pytest_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(
        prog="python -m diffperf launch", usage="%(prog)s [options] -- PYTEST_ARGS...",
        description="Run the benchmark matrix in isolated pytest processes, one worker per device, and merge the "
                    "results into one saved run. Example: python -m diffperf launch --devices all --save nightly "
                    "-- perf -m cuda",
    )
    p.add_argument("--isolate", choices=("auto", "framework", "case", "none"), default="auto",
                   help="what runs in a process of its own. Default: auto (case with several devices, else framework).")
    p.add_argument("--devices", default="none", metavar="SPEC",
                   help="'all' (one worker per visible NVIDIA GPU), 'none' (one unpinned worker) or ids 0,1,... "
                        "(CUDA_VISIBLE_DEVICES of each worker). Default: none.")
    p.add_argument("--save", metavar="NAME", help="save the merged run as <storage>/<machine>/NNNN_NAME.json")
    p.add_argument("--storage", default=".benchmarks", metavar="DIR", help="pytest-benchmark storage. Default: .benchmarks.")
    p.add_argument("--json", metavar="FILE", help="also write the merged run here (--benchmark-json format)")
    p.add_argument("--case-timeout", type=float, default=None, metavar="SECONDS",
                   help="kill a worker whose current test runs longer; the test is recorded as crashed. Default: none.")
    p.add_argument("--run-dir", default=None, metavar="DIR",
                   help="journals, node id lists and worker logs. Default: .diffperf-cache/launch/<time>.")
    args = p.parse_args(own)
    bad = [a for a in pytest_args if a.split("=", 1)[0] in RESERVED]
    if bad:
        p.error(f"{', '.join(bad)}: the launcher sets these itself; use launch --save/--json")
    try:
        devices = parse_devices(args.devices)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    launch = Launch(pytest_args, devices, isolate=args.isolate, case_timeout=args.case_timeout)
    if args.run_dir:
        launch.run_dir = Path(args.run_dir)
    try:
        nodeids = launch.collect()
    except RuntimeError as exc:
        print(f"diffperf launch: {exc}", file=sys.stderr)
        return 2
    if not nodeids:
        print("diffperf launch: no tests collected", file=sys.stderr)
        return 5
    journals = launch.run(nodeids)
    run = results.merge(journals, order=nodeids)
    counts = _report(run, nodeids, journals, print)
    if args.json:
        print(f"merged run written to {results.write_json(run, args.json)}")
    if args.save:
        if run["benchmarks"]:
            print(f"merged run saved as {results.save_run(run, args.storage, args.save)}")
        else:
            print("diffperf launch: no benchmark finished; nothing saved", file=sys.stderr)
    if launch.interrupted:
        return 130
    return 0 if set(counts) <= {"passed", "skipped", "xfailed"} else 1


if __name__ == "__main__":
    sys.exit(main())
