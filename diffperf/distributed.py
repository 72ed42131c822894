"""The benchmark matrix under pytest-xdist (``pytest perf -m cuda -n auto``): one worker per GPU.

pytest-benchmark turns itself off under xdist, so a plain ``-n`` run would pass with nothing timed. Here
the diffperf harness takes over instead, with the launcher's journals and merge (:mod:`diffperf.results`):

* the controller gives worker ``gwN`` the N-th visible GPU (``CUDA_VISIBLE_DEVICES``, set in the worker's
  ``pytest_configure``, before any test builds a pipeline) and ``-n auto`` starts one worker per GPU;
* the controller's scheduler keeps the tests of one framework on one worker (``--perf-dist-group
  framework``, so its compile caches stay warm in that process) or at least those of one case (``case``:
  its tests share the built pipeline), and gives every other test out one by one, as ``--dist load`` does;
* each worker times its cases with the harness's synchronized loop (the same rounds, warmup and clock
  reads as a single process), hands the samples to its benchmark fixture and writes its own journal;
* at the end the controller merges the journals (:func:`diffperf.results.merge`) into one run: the
  results table, ``--benchmark-save``/``--benchmark-autosave`` (:func:`diffperf.results.save_run`) and
  ``--benchmark-json`` (:func:`diffperf.results.write_json`).

Where workers would share a device and distort each other's timings (CPU or TPU cases with more than
one worker, more workers than GPUs, ``--dist each``) the run stops once the workers have collected,
before any pipeline is built, with the reason and the alternatives.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest

from diffperf import results
from diffperf.launcher import framework_of, param_id, parse_devices

GROUPS = ("framework", "case")
ALTERNATIVES = (
    "run it in one process with -n 0, or in one isolated process per device with "
    "python -m diffperf launch --devices all -- <your pytest arguments without -n>"
)


def role(config: pytest.Config) -> str | None:
    """``"worker"`` in an xdist worker, ``"controller"`` in the process that drives workers, else ``None``."""
    if getattr(config, "workerinput", None) is not None:
        return "worker"
    # xdist's own test for starting workers (its DSession may be registered after diffperf's pytest_configure).
    if config.getoption("dist", "no") != "no" and config.getoption("tx", None) and not config.getoption("collectonly"):
        return "controller"
    return None


def visible_gpus() -> list[str]:
    """The ids a worker can be pinned to (``CUDA_VISIBLE_DEVICES`` entries); empty without a GPU."""
    return [d for d in parse_devices("all") if d is not None]


def auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: one worker per visible GPU; without one (or with ``PYTEST_XDIST_AUTO_NUM_WORKERS`` set),
    xdist's own default (then refused for CPU cases)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return len(visible_gpus()) or None


def worker_index(worker_id: str) -> int:
    return int(worker_id[2:]) if worker_id.startswith("gw") and worker_id[2:].isdigit() else 0


def refusal(devices: dict[str, bool], workers: int, gpus: int, dist: str) -> str | None:
    """Why a distributed run of cases on ``devices`` (device -> any case runs) must not start, or ``None``."""
    running = {d for d, runs in devices.items() if runs}
    if not running:
        return None
    head = "diffperf: refusing to time benchmark cases under pytest-xdist: "
    if dist == "each":
        return head + f"--dist each would run every case on each of the {workers} workers; {ALTERNATIVES}."
    shared = sorted(running & {"cpu", "tpu"})
    if shared and workers > 1:
        what = " and ".join(f"{d.upper()} cases" for d in shared)
        return (head + f"{what} selected with {workers} workers: they would share the "
                f"{'CPU cores' if shared == ['cpu'] else 'device'} and distort each other's timings. "
                f"Select CUDA cases only (-m cuda, one worker per GPU), or {ALTERNATIVES}.")
    if "cuda" in running and workers > gpus:
        fix = f"Use -n auto (one worker per GPU) or at most -n {gpus}" if gpus else "nvidia-smi lists no GPU to pin them to"
        return (head + f"{workers} workers for {gpus} visible GPU(s): workers would share a GPU and distort each "
                f"other's timings. {fix}; or {ALTERNATIVES}.")
    return None


# --------------------------------------------------------------------------------------------------
# The controller
# --------------------------------------------------------------------------------------------------


def _scheduler_class():
    from xdist.scheduler import LoadGroupScheduling

    class CaseScheduling(LoadGroupScheduling):
        """``--dist loadgroup`` keyed by the benchmark case's framework (or case) instead of ``@group`` marks.

        Note: xdist_group marks would add ``@group`` to every node id, and with them to the benchmark names
        and the baseline keys; this keys the same scheduling on the case id and leaves node ids alone.
        """

        def __init__(self, config, log=None, *, key):
            super().__init__(config, log)
            self._key = key

        def _split_scope(self, nodeid: str) -> str:
            return self._key(nodeid) or super()._split_scope(nodeid)

        def remove_node(self, node):
            """xdist's ``remove_node``, except that the test a crashed worker was running is not run again.

            Note: xdist puts the crashed test back with the rest of its group, so a case that kills its
            worker (out of memory, a compiler crash) would kill every replacement until the restarts run
            out and its group's other cases would never run; here it is recorded as crashed once
            (``pytest_handlecrashitem``) and the rest of the group goes on in the new worker.
            """
            workload = self.assigned_work.pop(node)
            pending = [(scope, n) for scope, unit in workload.items() for n, done in unit.items() if not done]
            if not pending:
                return None
            scope, crashitem = pending[0]
            workload[scope][crashitem] = True
            self.workqueue.update({s: unit for s, unit in workload.items() if not all(unit.values())})
            for other in self.assigned_work:
                self._reschedule(other)
            return crashitem

    return CaseScheduling


class Controller:
    """The xdist controller's side: pins workers, checks the selection, merges the workers' journals."""

    def __init__(self, config: pytest.Config, cache_dir: Path):
        self.config = config
        self.gpus = visible_gpus()
        self.group = config.getoption("perf_dist_group")
        self.order: list[str] = []
        self.held: dict[str, str] = {}  # live worker id -> its GPU
        self.assigned: dict[str, str] = {}  # every worker id of the run -> its GPU
        self.checked = False
        opt = config.getoption("perf_journal", None)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        if opt and opt != "none":
            path = Path(opt).resolve()
            self.journal_template = str(path.with_name(f"{path.stem}-{{worker}}{path.suffix or '.jsonl'}"))
            stale = sorted(path.parent.glob(f"{path.stem}-gw*{path.suffix or '.jsonl'}"))
            if stale:
                raise pytest.UsageError(f"--perf-journal {opt}: worker journals of an earlier run are there "
                                        f"({', '.join(p.name for p in stale)}); name a new journal file")
        else:  # under -n the journals carry the results to the controller, so 'none' still writes them
            self.journal_template = str(cache_dir / "journal" / f"{stamp}-{os.getpid()}-xdist" / "{worker}.jsonl")

    # -- workers -----------------------------------------------------------------------------------

    def journal(self, worker_id: str) -> Path:
        return Path(self.journal_template.replace("{worker}", worker_id))

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        # gwN gets the N-th GPU; a worker started in place of a crashed one (a new id) gets the GPU it freed.
        index = worker_index(node.gateway.id)
        free = [g for g in self.gpus if g not in self.held.values()]
        device = self.gpus[index] if index < len(self.gpus) and self.gpus[index] in free else (free or [None])[0]
        if device is not None:
            self.held[node.gateway.id] = self.assigned[node.gateway.id] = device
        node.workerinput["diffperf"] = {"cuda_visible_devices": device, "journal": str(self.journal(node.gateway.id))}

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        self.held.pop(node.gateway.id, None)

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str, report, sched) -> None:
        """Record the test a dead worker was running in its journal, as the launcher does."""
        node = getattr(report, "node", None)
        if node is not None:
            results.append_entry(self.journal(node.gateway.id), {
                "event": "case", "nodeid": crashitem, "outcome": "crashed", "when": "call",
                "reason": str(report.longrepr), "cuda_visible_devices": self.assigned.get(node.gateway.id),
            })

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log):
        if config.getvalue("dist") not in ("load", "loadgroup"):
            return None  # an explicit --dist loadscope/loadfile/worksteal/each is the user's (each is refused)
        return _scheduler_class()(config, log, key=self.scope)

    def scope(self, nodeid: str) -> str | None:
        """The scheduling unit of a benchmark case's test: its framework or its case (``None`` for other tests)."""
        if param_id(nodeid) not in self._cases():
            return None
        framework = framework_of(nodeid)
        return f"diffperf:{framework}" if self.group == "framework" else f"diffperf:{framework}/{param_id(nodeid)}"

    def _cases(self) -> dict[str, tuple[str, bool]]:
        """param id -> (device, skipped) of every case the options select (the collection's own data)."""
        if not hasattr(self, "_case_map"):
            from diffperf.plugin import build_cases

            self._case_map = {}
            for param in build_cases(self.config):
                case = param.values[0]
                skipped = any(m.name == "skip" for m in param.marks)
                self._case_map[param.id] = (case.device, skipped)
        return self._case_map

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        if self.checked:
            return
        self.checked = True
        self.order = list(ids)
        devices: dict[str, bool] = {}
        cases = self._cases()
        for nodeid in ids:
            found = cases.get(param_id(nodeid))
            if found is not None:
                devices[found[0]] = devices.get(found[0], False) or not found[1]
        workers = len(self.config.getvalue("tx") or ())
        reason = refusal(devices, workers, len(self.gpus), self.config.getvalue("dist"))
        if reason:
            raise pytest.UsageError(reason)

    # -- the merged run ----------------------------------------------------------------------------

    def journals(self) -> list[Path]:
        pattern = self.journal("gw*")
        return sorted(pattern.parent.glob(pattern.name)) if pattern.parent.is_dir() else []

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        journals = self.journals()
        if not journals:
            return
        run = results.merge(journals, order=self.order)
        perf = getattr(self.config, "_diffperf_session", None)
        if perf is not None:
            perf.records = [(b["fullname"], b["extra_info"]) for b in run["benchmarks"]]
        self.summary = save(self.config, run)
        self.summary.append(f"diffperf journals (one per xdist worker): {', '.join(str(j) for j in journals)}")

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter) -> None:
        for line in getattr(self, "summary", ()):
            terminalreporter.write_line(line)


def json_path(value) -> Path:
    """The path that ``--benchmark-json`` names, as a ``Path``.

    pytest-benchmark 5.3 parses it into a ``Path``; 5.1 and 5.2 into a file it opened for writing
    (``argparse.FileType("wb")``), which is closed here so that the run is written through a temp file and
    a rename like every other file diffperf writes.
    """
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    name = getattr(value, "name", None)
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"--benchmark-json: expected a path or a file opened by pytest-benchmark, got {value!r}")
    value.close()
    return Path(name)


def save(config: pytest.Config, run: dict) -> list[str]:
    """Write the merged ``run`` where ``--benchmark-json``/``--benchmark-save``/``--benchmark-autosave`` say.

    Returns the lines that tell where it went.
    """
    bs = getattr(config, "_benchmarksession", None)
    lines: list[str] = []
    if bs is None:
        return lines
    if not run["benchmarks"]:
        if bs.json or bs.save or bs.autosave:
            lines.append("diffperf: no benchmark finished on the workers; nothing saved")
        return lines
    if bs.json:
        lines.append(f"merged run written to {results.write_json(run, json_path(bs.json))}")
    name = bs.save or bs.autosave
    if name:
        storage = getattr(bs.storage, "path", None)
        if storage is None:
            lines.append(f"merged run NOT saved: diffperf saves the workers' run to file storage only, not {bs.storage}")
        else:
            lines.append(f"merged run saved as {results.save_run(run, storage, name, machine=bs.machine_id)}")
    return lines


# --------------------------------------------------------------------------------------------------
# A worker
# --------------------------------------------------------------------------------------------------


class Worker:
    """An xdist worker's side: the harness times diffperf's cases; other benchmark tests are skipped."""

    def __init__(self, config: pytest.Config):
        self.config = config

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        bs = getattr(self.config, "_benchmarksession", None)
        if bs is not None:  # the controller saves the merged run; a worker never writes one of its own
            bs.save = bs.autosave = bs.json = None

    @staticmethod
    def _plain_benchmarks(items: list) -> list:
        return [it for it in items if "benchmark" in getattr(it, "fixturenames", ()) and "perf_case" not in it.fixturenames]

    def pytest_collection_modifyitems(self, items: list) -> None:
        skip = pytest.mark.skip(reason="pytest-benchmark is off under pytest-xdist and diffperf times only its own "
                                       "cases there; run this test with -n 0")
        for item in self._plain_benchmarks(items):
            item.add_marker(skip)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # pytest-benchmark's "benchmarks are automatically disabled" warning: diffperf's cases are timed all the same.
        bs = getattr(self.config, "_benchmarksession", None)
        if bs is not None and not self._plain_benchmarks(session.items):
            bs.xdist_benchmark_found = False


def pin_worker(config: pytest.Config) -> None:
    """In a worker: pin it to its GPU (before anything builds a pipeline) and register :class:`Worker`."""
    info = config.workerinput.get("diffperf") or {}  # type: ignore[attr-defined]
    device = info.get("cuda_visible_devices")
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        from diffperf import hardware

        hardware.nvidia_gpus.cache_clear()
    config.pluginmanager.register(Worker(config), "diffperf-xdist-worker")


def worker_journal(config: pytest.Config) -> Path | None:
    """This worker's journal, as the controller named it (``None`` when the controller is no diffperf one)."""
    path = (getattr(config, "workerinput", None) or {}).get("diffperf", {}).get("journal")
    return Path(path) if path else None


def configure(config: pytest.Config, cache_dir: Path) -> None:
    """Called first in diffperf.plugin's ``pytest_configure``: set up the controller or the worker side."""
    which = role(config)
    if which == "worker":
        pin_worker(config)
    elif which == "controller":
        config.pluginmanager.register(Controller(config, cache_dir), "diffperf-xdist-controller")


def attach_samples(config: pytest.Config, benchmark, samples: list[float]) -> None:
    """In a worker, give the (disabled) benchmark fixture the harness's samples, as pedantic would have.

    The journal then records them in pytest-benchmark's saved-run format for the controller's merge.

    Note: this goes through two private members of pytest-benchmark's fixture: ``_make_stats`` builds the
    same ``Metadata`` (with the fixture's options) that ``pedantic`` fills, and ``_mode`` marks the fixture
    used, as ``pedantic`` does, so it does not warn that it "was not used at all".
    """
    if role(config) != "worker" or benchmark is None or getattr(benchmark, "stats", None) is not None:
        return
    stats = benchmark._make_stats(1)
    for seconds in samples:
        stats.update(seconds)
    benchmark._mode = "diffperf harness (pytest-xdist worker)"
