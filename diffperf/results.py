"""Crash-safe results: a per-case journal on disk, and merging journals into one pytest-benchmark saved run.

Each pytest process appends JSON lines to its journal (``--perf-journal``): a ``run`` line at session start
(pid, machine_info, commit_info, pinned devices), a ``start`` line when a test begins, and a ``case`` line
when it ends (outcome, the failure's reason, and, for a measured benchmark, its entry in pytest-benchmark's
saved-run format: stats with the round data and the diffperf record in ``extra_info``). Every line is
flushed and fsync'ed before the next test runs, so a process that is killed (out of memory, a compiler
crash, Ctrl-C, a timeout) loses nothing already measured; a ``start`` without its ``case`` names the test
that was running when the process died.

:func:`save_run` turns the ``case`` lines of any number of journals into one saved run under
``<storage>/<machine-id>/NNNN_<name>.json``, numbered the way pytest-benchmark numbers them, so that
``pytest-benchmark compare`` and ``python -m diffperf compare`` read it like any other.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pytest

JOURNAL_SCHEMA = 1
_NUM_RE = re.compile(r"^(\d{4})_.*\.json$")


def _dumps(obj: Any) -> str:
    try:
        from pytest_benchmark.utils import safe_dumps
    except ImportError:  # pragma: no cover - pytest-benchmark is a dependency
        return json.dumps(obj, default=str)
    return safe_dumps(obj, ensure_ascii=True)


class Journal:
    """An append-only JSON-lines file; every line is on disk (flush + fsync) when :meth:`append` returns."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def append(self, entry: dict) -> None:
        line = _dumps(entry)
        self._fh.write(line + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def append_entry(path: str | os.PathLike, entry: dict) -> None:
    """Append one line to the journal at ``path`` (used by the launcher for cases a dead worker left)."""
    journal = Journal(path)
    try:
        journal.append(entry)
    finally:
        journal.close()


def read_journal(path: str | os.PathLike) -> list[dict]:
    """The entries of a journal; a torn last line (the process died while writing it) is dropped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    entries = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the last line, with or without its newline
                continue
            raise ValueError(f"{path}:{i + 1}: not a journal line: {line[:80]!r}") from None
    return entries


def case_entries(entries: Iterable[dict]) -> dict[str, dict]:
    """The last ``case`` entry per node id (keeping the benchmark of its call when a teardown failed later)."""
    out: dict[str, dict] = {}
    for e in entries:
        if e.get("event") == "case":
            prev = out.get(e["nodeid"])
            if prev is not None and prev.get("benchmark") and not e.get("benchmark"):
                e = e | {"benchmark": prev["benchmark"]}
            out[e["nodeid"]] = e
    return out


def running_nodeid(entries: list[dict]) -> str | None:
    """The node id that started and never finished (the test running when the process died), if any."""
    done = set(case_entries(entries))
    started = [e["nodeid"] for e in entries if e.get("event") == "start"]
    for nodeid in reversed(started):
        if nodeid not in done:
            return nodeid
    return None


# --------------------------------------------------------------------------------------------------
# The pytest side: registered by diffperf.plugin.
# --------------------------------------------------------------------------------------------------


def default_journal_path(cache_dir: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return cache_dir / "journal" / f"{stamp}-{os.getpid()}.jsonl"


def _reason(report: pytest.TestReport) -> str | None:
    if report.passed:
        return None
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    text = getattr(report, "longreprtext", "") or str(report.longrepr or "")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E ")]
    return "\n".join((errors or lines)[-20:]) or None


class JournalPlugin:
    """Writes the journal of this pytest process and applies ``--perf-select``."""

    def __init__(self, config: pytest.Config, path: Path | None, select: Path | None, only_perf: bool = False):
        self.config = config
        self.path = path
        self.only_perf = only_perf  # the default journal is kept only for runs that measure cases
        self.journal: Journal | None = None
        self.select = None
        if select is not None:
            self.select = [ln.strip() for ln in Path(select).read_text(encoding="utf-8").splitlines() if ln.strip()]

    # -- selection ---------------------------------------------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list) -> None:
        if self.select is None:
            return
        wanted = set(self.select)
        keep = [it for it in items if it.nodeid in wanted]
        drop = [it for it in items if it.nodeid not in wanted]
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep

    # -- journal -----------------------------------------------------------------------------------

    def _write(self, entry: dict) -> None:
        if self.path is None:
            return
        if self.journal is None:
            self.journal = Journal(self.path)
            self.journal.append(self._header())
        self.journal.append({"schema": JOURNAL_SCHEMA, "time": time.time(), "pid": os.getpid()} | entry)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if self.only_perf and not any("perf_case" in getattr(it, "fixturenames", ()) for it in session.items):
            self.path = None

    def _header(self) -> dict:
        bs = getattr(self.config, "_benchmarksession", None)
        machine_info = commit_info = None
        machine_id = None
        if bs is not None:
            try:
                machine_info = bs.get_machine_info()
                commit_info = self.config.hook.pytest_benchmark_generate_commit_info(config=self.config)
                self.config.hook.pytest_benchmark_update_commit_info(config=self.config, commit_info=commit_info)
                machine_id = bs.machine_id
            except Exception as exc:  # never lose a run over its metadata
                machine_info = {"error": f"{type(exc).__name__}: {exc}"}
        return {
            "schema": JOURNAL_SCHEMA, "time": time.time(), "pid": os.getpid(),
            "event": "run", "argv": sys.argv, "machine_id": machine_id,
            "machine_info": machine_info, "commit_info": commit_info,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        self._write({"event": "start", "nodeid": nodeid})

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        report = yield
        # One ``case`` line per test: at the end of its call, or of its setup when that did not pass;
        # a failing teardown adds a second line.
        if report.when == "call" or (report.when == "setup" and not report.passed) or (
            report.when == "teardown" and report.failed
        ):
            entry = {
                "event": "case", "nodeid": item.nodeid, "when": report.when,
                "outcome": "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome,
                "reason": _reason(report), "duration_s": report.duration,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            }
            bench = getattr(item, "funcargs", {}).get("benchmark") if report.when == "call" else None
            stats = getattr(bench, "stats", None)
            if stats is not None and not getattr(bench, "has_error", False):
                entry["benchmark"] = stats.as_dict(include_data=True)
            self._write(entry)
        return report

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.journal is not None and self.config.getoption("verbose") >= 0:
            terminalreporter.write_line(f"diffperf journal (one line per finished test): {self.journal.path}")

    def pytest_unconfigure(self) -> None:
        if self.journal is not None:
            self.journal.close()


def configure(config: pytest.Config, cache_dir: Path) -> None:
    """Register the journal plugin (called from diffperf.plugin's ``pytest_configure``)."""
    from diffperf import distributed

    role = distributed.role(config)
    if role == "controller":
        return  # under pytest-xdist each worker writes its own journal; the controller merges them
    opt = config.getoption("perf_journal", None)
    path = None if opt == "none" else Path(opt).resolve() if opt else default_journal_path(cache_dir)
    if role == "worker":
        path, opt = distributed.worker_journal(config), None
    select = config.getoption("perf_select", None)
    if path is None and select is None:
        return
    plugin = JournalPlugin(config, path, Path(select) if select else None, only_perf=not opt)
    config.pluginmanager.register(plugin, "diffperf-journal")


# --------------------------------------------------------------------------------------------------
# Merging into a saved run
# --------------------------------------------------------------------------------------------------


def merge(journals: Iterable[str | os.PathLike], order: list[str] | None = None) -> dict:
    """One pytest-benchmark run (``--benchmark-json`` format) from the ``case`` lines of ``journals``.

    ``order`` (node ids) sets the order of the benchmarks; others follow in journal order. Tests that did
    not pass are listed under ``diffperf_failures`` with their reason (pytest-benchmark ignores the key).
    """
    runs, cases = [], {}
    for path in journals:
        entries = read_journal(path)
        runs += [e for e in entries if e.get("event") == "run"]
        cases.update(case_entries(entries))
    rank = {nodeid: i for i, nodeid in enumerate(order or [])}
    ordered = sorted(cases.values(), key=lambda e: rank.get(e["nodeid"], len(rank)))
    first = next((r for r in runs if r.get("machine_info") and "error" not in r["machine_info"]), runs[0] if runs else {})
    machine_info = dict(first.get("machine_info") or {})
    machine_info["diffperf_workers"] = [
        {"pid": r.get("pid"), "cuda_visible_devices": r.get("cuda_visible_devices")} for r in runs
    ]
    try:
        from pytest_benchmark import __version__ as version
    except ImportError:  # pragma: no cover
        version = None
    return {
        "machine_info": machine_info,
        "commit_info": first.get("commit_info") or {},
        "benchmarks": [e["benchmark"] for e in ordered if e.get("benchmark")],
        "datetime": datetime.now(timezone.utc).isoformat(),
        "version": version,
        "diffperf_failures": [
            {k: e.get(k) for k in ("nodeid", "when", "outcome", "reason")}
            for e in ordered if e.get("outcome") not in ("passed", "skipped", "xfailed")
        ],
    }


def machine_id() -> str:
    """pytest-benchmark's storage folder name for this interpreter (``Linux-CPython-3.12-64bit``)."""
    from pytest_benchmark.utils import get_machine_id

    return get_machine_id()


def _write_exclusive(folder: Path, name: str, text: str) -> Path:
    """Write ``NNNN_<name>.json`` in ``folder`` with the next free number, atomically and never overwriting."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        while True:
            nums = [int(m.group(1)) for p in folder.iterdir() if (m := _NUM_RE.match(p.name))]
            final = folder / f"{max(nums, default=0) + 1:04d}_{name}.json"
            try:
                os.link(tmp, final)  # fails instead of overwriting a run saved meanwhile
                return final
            except FileExistsError:
                continue
            except OSError:  # no hard links on this filesystem
                os.replace(tmp, final)
                return final
    finally:
        tmp.unlink(missing_ok=True)


def save_run(run: dict, storage: str | os.PathLike, name: str, machine: str | None = None) -> Path:
    """Save ``run`` as pytest-benchmark would with ``--benchmark-save=name``; return the file."""
    if not re.fullmatch(r"[\w.\-]+", name):
        raise ValueError(f"run name {name!r}: use letters, digits, '.', '_' and '-'")
    from pytest_benchmark.utils import safe_dumps

    text = safe_dumps(run, ensure_ascii=True, indent=4)
    return _write_exclusive(Path(storage) / (machine or machine_id()), name, text)


def write_json(run: dict, path: str | os.PathLike) -> Path:
    """Write ``run`` to ``path`` atomically (temp file + rename)."""
    from pytest_benchmark.utils import safe_dumps

    from diffperf.fileio import atomic_write_text

    return atomic_write_text(path, safe_dumps(run, ensure_ascii=True, indent=4))
