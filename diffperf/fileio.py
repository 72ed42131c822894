"""Atomic writes and validated JSON reads for every file a user keeps (baselines, runs, reports)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to a temp file beside ``path``, fsync it, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def read_json(path: str | os.PathLike[str], what: str, error: type[Exception], hint: str = "") -> Any:
    """Parse a JSON file; ``error`` names the file and the problem (unreadable, empty, corrupted)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path}: cannot be read ({exc})") from exc
    if not text.strip():
        raise error(f"{what} {path}: the file is empty{hint}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path}: corrupted JSON at line {exc.lineno} column {exc.colno} ({exc.msg}){hint}") from exc
