"""Baselines: ``baselines/<hardware-id>.json``, one file per hardware identity, one entry per test id.

File layout (``indent=2``, sorted keys, so a re-recorded baseline reads as a small git diff)::

    {"diffperf_baseline_schema": 1, "hardware_id": "cpu-2c-...",
     "entries": {"<test id>": {"schema": 1, "test_id": ..., "samples_s": [...], "rounds": N, "median_s": ...,
                               "cv": ..., "peak_memory_bytes": ..., "memory_kind": ..., "compile_s": ...,
                               "versions": {...}, "commit": {...}, "recorded_at": "...Z"}}}

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

SCHEMA = 1
SCHEMA_KEY = "diffperf_baseline_schema"
_HW_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


class BaselineError(Exception):
    """A baseline file that cannot be used; the message names the file and the problem."""


def baseline_path(root: str | os.PathLike[str], hardware_id: str) -> Path:
    """``<root>/<hardware_id>.json`` (the hardware id must be a readable slug, as :func:`hardware.hardware_id` makes)."""
    if not _HW_RE.match(hardware_id):
        raise ValueError(f"hardware id {hardware_id!r} is not a file-name slug ([a-z0-9.-])")
    return Path(root) / f"{hardware_id}.json"


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


def make_entry(test_id: str, record: dict, versions: dict | None = None, commit: dict | None = None,
               recorded_at: str | None = None) -> dict:
    """A baseline entry from a perf test's record (the ``extra_info`` the plugin stores)."""
    samples = [round_sig(float(s)) for s in record["samples_s"]]
    if not samples:
        raise ValueError(f"{test_id}: a baseline needs at least one sample")
    ordered = sorted(samples)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    peak = record.get("peak_memory_bytes")
    steady = peak.get("steady") if isinstance(peak, dict) else peak
    compile_s = record.get("compile_s")
    return {
        "schema": SCHEMA,
        "test_id": test_id,
        "samples_s": samples,
        "rounds": int(record.get("rounds") or len(samples)),
        "median_s": round_sig(median),
        "cv": round_sig(float(record["cv"]), 4) if record.get("cv") is not None else None,
        "peak_memory_bytes": int(steady) if steady is not None else None,
        "memory_kind": record.get("memory_kind"),
        "compile_s": round_sig(float(compile_s)) if compile_s is not None else None,
        "compile_kind": record.get("compile_kind"),
        "reference_s": round_sig(float(record["reference_s"])) if record.get("reference_s") else None,
        "reference_id": record.get("reference_id") if record.get("reference_s") else None,
        "versions": dict(versions or {}),
        "commit": dict(commit or {}),
        "recorded_at": recorded_at or _utc_now(),
    }


def validate_entry(entry: Any, where: str) -> None:
    """Raise :class:`BaselineError` (naming ``where``) when ``entry`` is not a usable baseline entry."""
    if not isinstance(entry, dict):
        raise BaselineError(f"{where}: entry is a {type(entry).__name__}, not an object")
    if entry.get("schema") != SCHEMA:
        raise BaselineError(f"{where}: entry schema {entry.get('schema')!r}, this diffperf reads schema {SCHEMA}")
    samples = entry.get("samples_s")
    if not isinstance(samples, list) or not samples or not all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in samples
    ):
        raise BaselineError(f"{where}: 'samples_s' must be a non-empty list of positive seconds")
    if not isinstance(entry.get("rounds"), int) or entry["rounds"] < 1:
        raise BaselineError(f"{where}: 'rounds' must be a positive integer")
    if entry.get("reference_id") is not None and not isinstance(entry["reference_id"], str):
        raise BaselineError(f"{where}: 'reference_id' must be a string or null")
    for key in ("peak_memory_bytes", "compile_s", "median_s", "reference_s"):
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise BaselineError(f"{where}: {key!r} must be a non-negative number or null")


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
        written with another schema version, or holds an invalid entry.
        """
        path = Path(path)
        if not path.exists():
            return cls(path)
        data = read_json(path, "baseline file", BaselineError,
                         hint="; restore it from git (it will not be overwritten)")
        if not isinstance(data, dict) or SCHEMA_KEY not in data:
            raise BaselineError(f"baseline file {path}: not a diffperf baseline (no {SCHEMA_KEY!r} key)")
        schema = data[SCHEMA_KEY]
        if schema != SCHEMA:
            age = "an older" if isinstance(schema, int) and schema < SCHEMA else "an unknown"
            raise BaselineError(
                f"baseline file {path}: {age} schema version {schema!r}, this diffperf reads schema {SCHEMA}; "
                "re-record it (delete the file, then run with --perf-update-baselines)"
            )
        entries = data.get("entries")
        if not isinstance(entries, dict):
            raise BaselineError(f"baseline file {path}: 'entries' must be an object keyed by test id")
        for test_id, entry in entries.items():
            validate_entry(entry, f"baseline file {path}, entry {test_id!r}")
        return cls(path, data.get("hardware_id") or path.stem, entries)

    def get(self, test_id: str) -> dict | None:
        return self.entries.get(test_id)

    def put(self, entry: dict) -> None:
        """Add or replace the entry for ``entry["test_id"]``; other entries are kept."""
        validate_entry(entry, f"baseline entry {entry.get('test_id')!r} for {self.path}")
        self.entries[entry["test_id"]] = entry
        self.dirty = True

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
