"""Baselines: ``baselines/<hardware-id>.json``, one file per hardware identity, one entry per test id.

File layout (``indent=2``, sorted keys, so a re-recorded baseline reads as a small git diff)::

    {"diffperf_baseline_schema": 2, "hardware_id": "cpu-2c-...",
     "entries": {"<test id>": {"schema": 2, "test_id": ..., "samples_s": [...], "rounds": N, "median_s": ...,
                               "cv": ..., "peak_memory_bytes": ..., "memory_kind": ..., "compile_s": ...,
                               "versions": {...}, "commit": {...}, "recorded_at": "...Z",
                               "history": [{"median_s": ..., "rounds": N, "cv": ..., "reference_s": ...,
                                            "commit": {...}, "recorded_at": "...Z", "versions": {...}}, ...]}}}

The top-level fields of an entry are the latest run that updated it (its rounds in ``samples_s``);
``history`` holds the medians of the last ``K`` runs that updated it, oldest first, the latest last
(``--perf-baseline-history K``, default :data:`DEFAULT_HISTORY`). Schema-1 files (one run per entry, no
history) still load: each entry becomes a history of one run, in memory, and is written as schema 2 the
next time the file is updated.

Every write goes to a temporary file in the same folder and is moved into place with ``os.replace``; a file
that failed to load is never written over.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from diffperf.fileio import atomic_write_text, read_json

SCHEMA = 2
READABLE_SCHEMAS = (1, 2)  # schema 1: one run per entry, migrated in memory on load
DEFAULT_HISTORY = 10
SCHEMA_KEY = "diffperf_baseline_schema"
_HW_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


class BaselineError(Exception):
    """A baseline file that cannot be used; the message names the file and the problem."""


def baseline_path(root: str | os.PathLike[str], hardware_id: str) -> Path:
    """``<root>/<hardware_id>.json`` (the hardware id must be a readable slug, as :func:`hardware.hardware_id` makes)."""
    if not _HW_RE.match(hardware_id):
        raise ValueError(f"hardware id {hardware_id!r} is not a file-name slug ([a-z0-9.-])")
    return Path(root) / f"{hardware_id}.json"


NOT_BASELINES = ("published.json",)  # the seeds' published figures live beside the baselines (diffperf.published)


def baseline_files(root: str | os.PathLike[str]) -> list[Path]:
    """The per-hardware baseline files under ``root`` (every ``*.json`` but :data:`NOT_BASELINES`)."""
    return sorted(p for p in Path(root).glob("*.json") if p.name not in NOT_BASELINES)


def round_sig(x: float, digits: int = 6) -> float:
    """``x`` rounded to ``digits`` significant digits (short, stable numbers in the JSON)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON (indent 2, sorted keys, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_history_length(value: str | int) -> int:
    """``K``, the runs a baseline entry keeps in its history: an integer >= 1 (:class:`ValueError` names it)."""
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"baseline history length must be an integer >= 1, got {value!r}") from None
    if isinstance(value, bool) or k < 1 or (isinstance(value, float) and value != k):
        raise ValueError(f"baseline history length must be an integer >= 1, got {value!r}")
    return k


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def history_item(entry: dict) -> dict:
    """The history item of the run an entry's top-level fields describe."""
    return {"median_s": entry["median_s"] if entry.get("median_s") else round_sig(_median(entry["samples_s"])),
            "rounds": entry["rounds"], "cv": entry.get("cv"), "reference_s": entry.get("reference_s"),
            "reference_id": entry.get("reference_id"), "commit": dict(entry.get("commit") or {}),
            "recorded_at": entry.get("recorded_at"), "versions": dict(entry.get("versions") or {}),
            "peak_memory_bytes": entry.get("peak_memory_bytes"), "memory_kind": entry.get("memory_kind"),
            "compile_s": entry.get("compile_s"), "compile_kind": entry.get("compile_kind"),
            "compile_cache": entry.get("compile_cache"), "first_in_process": entry.get("first_in_process")}


def make_entry(test_id: str, record: dict, versions: dict | None = None, commit: dict | None = None,
               recorded_at: str | None = None, previous: dict | None = None, keep: int = DEFAULT_HISTORY) -> dict:
    """A baseline entry from a perf test's record (the ``extra_info`` the plugin stores).

    With ``previous`` (the entry it replaces) the new run is appended to its history, which keeps the
    last ``keep`` runs.
    """
    keep = parse_history_length(keep)
    samples = [round_sig(float(s)) for s in record["samples_s"]]
    if not samples:
        raise ValueError(f"{test_id}: a baseline needs at least one sample")
    peak = record.get("peak_memory_bytes")
    steady = peak.get("steady") if isinstance(peak, dict) else peak
    compile_s = record.get("compile_s")
    entry = {
        "schema": SCHEMA,
        "test_id": test_id,
        "samples_s": samples,
        "rounds": int(record.get("rounds") or len(samples)),
        "median_s": round_sig(_median(samples)),
        "cv": round_sig(float(record["cv"]), 4) if record.get("cv") is not None else None,
        "peak_memory_bytes": int(steady) if steady is not None else None,
        "memory_kind": record.get("memory_kind"),
        "compile_s": round_sig(float(compile_s)) if compile_s is not None else None,
        "compile_kind": record.get("compile_kind"),
        "compile_cache": record.get("compile_cache"),
        "first_in_process": record.get("first_in_process"),
        "reference_s": round_sig(float(record["reference_s"])) if record.get("reference_s") else None,
        "reference_id": record.get("reference_id") if record.get("reference_s") else None,
        "versions": dict(versions or {}),
        "commit": dict(commit or {}),
        "recorded_at": recorded_at or _utc_now(),
    }
    past = list((previous or {}).get("history") or [])
    entry["history"] = (past + [history_item(entry)])[-keep:]
    if (previous or {}).get("ab_offsets"):  # the A/A offsets (diffperf.ab_offsets) outlive a latency refresh
        entry["ab_offsets"] = list(previous["ab_offsets"])
    return entry


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def validate_entry(entry: Any, where: str) -> None:
    """Raise :class:`BaselineError` (naming ``where``) when ``entry`` is not a usable baseline entry."""
    if not isinstance(entry, dict):
        raise BaselineError(f"{where}: entry is a {type(entry).__name__}, not an object")
    if entry.get("schema") != SCHEMA:
        raise BaselineError(f"{where}: entry schema {entry.get('schema')!r}, this diffperf reads schema {SCHEMA}")
    samples = entry.get("samples_s")
    if not isinstance(samples, list) or not samples or not all(_positive_number(s) for s in samples):
        raise BaselineError(f"{where}: 'samples_s' must be a non-empty list of positive seconds")
    if not isinstance(entry.get("rounds"), int) or entry["rounds"] < 1:
        raise BaselineError(f"{where}: 'rounds' must be a positive integer")
    if entry.get("compile_cache") not in (None, "cold", "warm"):
        raise BaselineError(f"{where}: 'compile_cache' must be 'cold', 'warm' or null")
    if entry.get("reference_id") is not None and not isinstance(entry["reference_id"], str):
        raise BaselineError(f"{where}: 'reference_id' must be a string or null")
    for key in ("peak_memory_bytes", "compile_s", "median_s", "reference_s"):
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise BaselineError(f"{where}: {key!r} must be a non-negative number or null")
    history = entry.get("history")
    if not isinstance(history, list) or not history:
        raise BaselineError(f"{where}: 'history' must be a non-empty list of runs (oldest first)")
    for i, item in enumerate(history):
        if not isinstance(item, dict):
            raise BaselineError(f"{where}: history[{i}] is a {type(item).__name__}, not an object")
        if not _positive_number(item.get("median_s")):
            raise BaselineError(f"{where}: history[{i}]: 'median_s' must be a positive number of seconds, "
                                f"got {item.get('median_s')!r}")
        if not isinstance(item.get("rounds"), int) or isinstance(item.get("rounds"), bool) or item["rounds"] < 1:
            raise BaselineError(f"{where}: history[{i}]: 'rounds' must be a positive integer")
        for key in ("commit", "versions"):
            if not isinstance(item.get(key, {}), dict):
                raise BaselineError(f"{where}: history[{i}]: {key!r} must be an object")
        ref = item.get("reference_s")
        if ref is not None and not _positive_number(ref):
            raise BaselineError(f"{where}: history[{i}]: 'reference_s' must be a positive number or null")
    if entry.get("ab_offsets") is not None:
        from diffperf.ab_offsets import validate

        validate(entry["ab_offsets"], where)  # its OffsetsError is a BaselineError


def migrate_entry(entry: Any) -> Any:
    """A schema-1 entry as schema 2 (a history of its one run); anything else unchanged."""
    if isinstance(entry, dict) and entry.get("schema") == 1 and "history" not in entry:
        entry = dict(entry, schema=SCHEMA)
        if isinstance(entry.get("samples_s"), list) and entry["samples_s"] and isinstance(entry.get("rounds"), int):
            try:
                entry["history"] = [history_item(entry)]
            except (TypeError, KeyError):
                pass  # validate_entry names the problem
    return entry


def _like_runs(entry: dict, compile_cache: str | None, first_in_process: bool | None) -> list[dict]:
    """The history's runs with the same compile-cache state (a run that does not record one matches) and the
    same process context: ``first_in_process``, the case was the first pipeline of its framework in its
    process (a run that does not say so was not: the fp32 reference is built first by default)."""
    return [item for item in entry.get("history") or []
            if not (compile_cache and item.get("compile_cache") and item["compile_cache"] != compile_cache)
            and bool(first_in_process) == bool(item.get("first_in_process"))]


def history_memory(entry: dict, memory_kind: str | None, compile_cache: str | None,
                   first_in_process: bool | None = None) -> list[float]:
    """The steady peak memory of the history's runs measured as ``memory_kind`` with the same compile-cache
    state and process context (:func:`_like_runs`; a run that predates memory in the history, or another
    kind, is left out)."""
    return [float(item["peak_memory_bytes"]) for item in _like_runs(entry, compile_cache, first_in_process)
            if _positive_number(item.get("peak_memory_bytes")) and item.get("memory_kind") == memory_kind]


def history_compile(entry: dict, compile_kind: str | None, compile_cache: str | None,
                    first_in_process: bool | None = None) -> list[float]:
    """The compile seconds of the history's runs of the same figure (``compile_kind``; an item without one
    holds the cold-start excess), compile-cache state and process context (:func:`_like_runs`)."""
    kind = compile_kind or "cold-start-excess"
    return [float(item["compile_s"]) for item in _like_runs(entry, compile_cache, first_in_process)
            if isinstance(item.get("compile_s"), (int, float)) and not isinstance(item["compile_s"], bool)
            and item["compile_s"] >= 0 and (item.get("compile_kind") or "cold-start-excess") == kind]


def history_medians(entry: dict) -> list[float]:
    """The medians of the runs in an entry's history, oldest first."""
    return [float(item["median_s"]) for item in entry.get("history") or []]


class BaselineStore:
    """The baselines of one hardware identity, loaded from and saved to one JSON file."""

    def __init__(self, path: str | os.PathLike[str], hardware_id: str | None = None, entries: dict | None = None):
        self.path = Path(path)
        self.hardware_id = hardware_id or self.path.stem
        self.entries: dict[str, dict] = dict(entries or {})
        self.dirty = False

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "BaselineStore":
        """The store in ``path`` (an empty store when the file does not exist).

        Raises :class:`BaselineError` naming the file when it is empty, not JSON, not a diffperf baseline,
        written with another schema version, recorded on other hardware than its name says, or holds an
        invalid entry (a history item included). Schema-1 files are migrated in memory.
        """
        path = Path(path)
        if not path.exists():
            return cls(path)
        data = read_json(path, "baseline file", BaselineError,
                         hint="; restore it from git (it will not be overwritten)")
        if not isinstance(data, dict) or SCHEMA_KEY not in data:
            raise BaselineError(f"baseline file {path}: not a diffperf baseline (no {SCHEMA_KEY!r} key)")
        schema = data[SCHEMA_KEY]
        if schema not in READABLE_SCHEMAS:
            age = "an older" if isinstance(schema, int) and schema < SCHEMA else "an unknown"
            raise BaselineError(
                f"baseline file {path}: {age} schema version {schema!r}, this diffperf reads schemas "
                f"{', '.join(map(str, READABLE_SCHEMAS))}; re-record it (delete the file, then run with "
                "--perf-update-baselines)"
            )
        hw = data.get("hardware_id")
        if hw is not None and hw != path.stem:
            raise BaselineError(
                f"baseline file {path}: recorded on hardware {hw!r}, but its name says {path.stem!r}; a baseline "
                "from other hardware says nothing about this one (record one here with --perf-update-baselines)")
        entries = data.get("entries")
        if not isinstance(entries, dict):
            raise BaselineError(f"baseline file {path}: 'entries' must be an object keyed by test id")
        entries = {test_id: migrate_entry(entry) for test_id, entry in entries.items()}
        for test_id, entry in entries.items():
            validate_entry(entry, f"baseline file {path}, entry {test_id!r}")
        return cls(path, hw or path.stem, entries)

    def get(self, test_id: str) -> dict | None:
        return self.entries.get(test_id)

    def put(self, entry: dict) -> None:
        """Add or replace the entry for ``entry["test_id"]``; other entries are kept."""
        validate_entry(entry, f"baseline entry {entry.get('test_id')!r} for {self.path}")
        self.entries[entry["test_id"]] = entry
        self.dirty = True

    def append(self, test_id: str, record: dict, versions: dict | None = None, commit: dict | None = None,
               recorded_at: str | None = None, keep: int = DEFAULT_HISTORY) -> dict:
        """Record ``record`` as the latest run of ``test_id``, appended to its history (the last ``keep`` kept)."""
        entry = make_entry(test_id, record, versions=versions, commit=commit, recorded_at=recorded_at,
                           previous=self.entries.get(test_id), keep=keep)
        self.put(entry)
        return entry

    def to_json(self) -> dict:
        return {SCHEMA_KEY: SCHEMA, "hardware_id": self.hardware_id, "entries": self.entries}

    def save(self) -> None:
        """Write the store atomically, re-reading the file first so entries written meanwhile are kept.

        A file on disk that does not load is left alone (:class:`BaselineError`).
        """
        on_disk = BaselineStore.load(self.path)
        merged = dict(on_disk.entries)
        merged.update(self.entries)
        self.entries = merged
        atomic_write_json(self.path, self.to_json())
        self.dirty = False


# --------------------------------------------------------------------------------- python -m diffperf baseline


def load_runs_oldest_first(run_paths, error: type[Exception] = BaselineError) -> list:
    """The saved runs (:func:`diffperf.compare.load_run`), oldest first by their ``datetime``; a run that does
    not load raises ``error`` naming it."""
    from diffperf.compare import RunError, load_run

    runs = []
    for p in run_paths:
        try:
            runs.append(load_run(p))
        except RunError as exc:
            raise error(str(exc)) from None
    return sorted(runs, key=lambda r: str(r.data.get("datetime") or ""))


def fold_runs(run_paths: list[str | os.PathLike[str]], baselines_dir: str | os.PathLike[str],
              keep: int = DEFAULT_HISTORY) -> list[Path]:
    """Append every diffperf record of the saved runs (oldest first, by their ``datetime``) to the baselines.

    Each run's benchmarks land in ``<baselines_dir>/<hardware id>.json`` with the run's commit, date and
    framework versions. Every run and every file is read and checked first: on any bad input
    (:class:`BaselineError` naming it) nothing is written.
    """
    keep = parse_history_length(keep)
    stores: dict[str, BaselineStore] = {}
    for run in load_runs_oldest_first(run_paths):
        mi = run.machine_info
        versions = mi.get("diffperf_versions") or {}
        commit = {k: run.commit_info.get(k) for k in ("id", "time", "branch", "dirty", "project") if k in run.commit_info}
        date = str(run.data.get("datetime") or "") or None
        if date and not date.endswith("Z") and "+" not in date[10:]:
            date = date.split(".")[0] + "Z"
        found = 0
        for bench in run.data["benchmarks"]:
            rec = bench.get("extra_info") or {}
            if "diffperf_schema" not in rec or not rec.get("hardware_id"):
                continue
            hw = rec["hardware_id"]
            if hw not in stores:
                stores[hw] = BaselineStore.load(baseline_path(baselines_dir, hw))
            stores[hw].append(bench["fullname"], rec, versions=versions, commit=commit, recorded_at=date, keep=keep)
            found += 1
        if not found:
            raise BaselineError(f"saved run {run.path}: no diffperf record with a hardware id; nothing to fold")
    return save_all(stores.values())


def save_all(stores) -> list[Path]:
    """Save every store (:meth:`BaselineStore.save`, atomic each); their paths, sorted."""
    stores = list(stores)  # iterated twice
    for store in stores:
        store.save()
    return sorted(store.path for store in stores)


def main(argv: list[str] | None = None) -> int:
    """``python -m diffperf baseline fold RUN... [--baselines-dir DIR] [--keep K]``, ``baseline offsets RUN...``
    (:func:`diffperf.ab_offsets.fold`) and ``baseline check``."""
    import argparse
    import sys

    from diffperf import ab_offsets

    def k_type(value: str) -> int:
        try:
            return parse_history_length(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def offsets_keep(value: str) -> int:
        try:
            keep = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--keep {value!r}: not an integer") from None
        if keep < ab_offsets.MIN_OBSERVATIONS:
            raise argparse.ArgumentTypeError(f"--keep {value}: keep at least {ab_offsets.MIN_OBSERVATIONS} "
                                             "A/A observations (fewer are never used)")
        return keep

    p = argparse.ArgumentParser(prog="python -m diffperf baseline",
                                description="build and check baseline files (baselines/README.md)")
    sub = p.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fold", help="append saved runs (pytest-benchmark JSON, oldest first) to the baseline history")
    f.add_argument("runs", nargs="+", help="saved run files, e.g. .benchmarks/*/00*_calib.json")
    f.add_argument("--baselines-dir", default="baselines", help="default: baselines")
    f.add_argument("--keep", type=k_type, default=DEFAULT_HISTORY,
                   help=f"runs kept in each entry's history (K). Default: {DEFAULT_HISTORY}.")
    c = sub.add_parser("check", help="load every baseline file and print its entries and history lengths")
    c.add_argument("--baselines-dir", default="baselines", help="default: baselines")
    o = sub.add_parser("offsets", help="append the first process pair's ratio of saved A/A runs (--perf-ab-base "
                                       "HEAD) to each entry's ab_offsets (diffperf/ab_offsets.py)")
    o.add_argument("runs", nargs="+", help="saved A/A run files, e.g. .benchmarks/*/00*_aa.json")
    o.add_argument("--baselines-dir", default="baselines", help="default: baselines")
    o.add_argument("--keep", type=offsets_keep, default=ab_offsets.KEEP,
                   help=f"A/A observations kept in each entry for each set of builds before the case (ran_before). "
                        f"Default: {ab_offsets.KEEP}.")
    a = p.parse_args(argv)
    try:
        if a.action == "fold":
            for path in fold_runs(a.runs, a.baselines_dir, a.keep):
                print(f"baselines written: {path}")
            return 0
        if a.action == "offsets":
            for path in ab_offsets.fold(a.runs, a.baselines_dir, a.keep):
                print(f"baselines written (ab_offsets): {path}")
            return 0
        files = baseline_files(a.baselines_dir)
        for path in files:
            store = BaselineStore.load(path)
            lengths = sorted({len(e["history"]) for e in store.entries.values()})
            aa = sorted({len(e["ab_offsets"]) for e in store.entries.values() if e.get("ab_offsets")})
            print(f"{path}: {len(store.entries)} entries, history of {', '.join(map(str, lengths)) or '-'} run(s)"
                  + (f", A/A first pairs of {', '.join(map(str, aa))}" if aa else ""))
        if not files:
            print(f"no baseline file under {a.baselines_dir}")
        return 0
    except BaselineError as exc:  # ab_offsets.OffsetsError included
        print(f"diffperf baseline: error: {exc}", file=sys.stderr)
        return 2
