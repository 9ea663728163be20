"""The output file is the checkpoint: what it holds is answered, and only whole lines count.

``open_checkpoint`` reads the file once before a run:

* a torn tail (the last line without its newline, or lines at the end that are not whole
  JSON objects, as a crash can leave them) is truncated away, so the request it belonged to
  is sent again and its line written whole;
* every custom id on a line is answered, a final error included; with ``retry_errors`` the
  error lines are dropped instead (the file is rewritten without them, through a temporary
  file and an atomic rename), so those requests run again and each id still has one line;
* a bad line *inside* the file (not at its end) is not a crash's doing: the file is refused.

``Writer`` appends whole lines, in groups: the lines of a group go out in one ``write`` and
are fsynced together, when the group is full or ``interval`` seconds after its first line.
A crash loses at most the group not yet written; those requests are redone on resume, so
every custom id ends up in the file exactly once.

Answered ids are kept as sorted 64-bit hashes (8 bytes each; see ``_input.id_hash``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ._input import id_hash

__all__ = ["Answered", "Checkpoint", "CheckpointError", "Writer", "open_checkpoint",
           "scan_lines", "fsync_dir"]


class CheckpointError(ValueError):
    """The output file cannot serve as a checkpoint (a bad line inside it)."""


class Answered:
    """A set of custom ids, by hash, in sorted numpy arrays (flat memory per id)."""

    def __init__(self, hashes: "Optional[np.ndarray]" = None) -> None:
        self._sorted = np.unique(hashes if hashes is not None
                                 else np.empty(0, dtype=np.uint64)).astype(np.uint64)

    def __len__(self) -> int:
        return int(len(self._sorted))

    def __contains__(self, custom_id: str) -> bool:
        return self.has_hash(id_hash(custom_id))

    def has_hash(self, h: int) -> bool:
        arr = self._sorted
        i = int(np.searchsorted(arr, np.uint64(h)))
        return i < len(arr) and int(arr[i]) == h

    def union(self, other: "Answered") -> "Answered":
        return Answered(np.concatenate([self._sorted, other._sorted]))

    @property
    def hashes(self) -> "np.ndarray":
        return self._sorted


@dataclass
class Scan:
    """What ``scan_lines`` found in one file."""

    good_end: int = 0  # offset just after the last whole, valid line
    torn_bytes: int = 0  # bytes after it (a torn tail)
    lines: int = 0
    errors: int = 0
    answered: "np.ndarray" = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    error_ids: "np.ndarray" = field(default_factory=lambda: np.empty(0, dtype=np.uint64))


def _grow(arr: "np.ndarray", n: int) -> "np.ndarray":
    return np.resize(arr, max(1024, len(arr) * 2)) if n == len(arr) else arr


def _line_id(raw: bytes) -> "Optional[tuple]":
    """(custom id, is an error line) of a whole output line, None if it is not one."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("custom_id"), str):
        return None
    return data["custom_id"], data.get("error") is not None


def scan_lines(path: str) -> Scan:
    """Read an output (or part) file: answered ids, error ids, and where a torn tail starts.
    Raises ``CheckpointError`` for a bad line followed by good ones."""
    scan = Scan()
    if not os.path.exists(path):
        return scan
    ids = np.empty(1024, dtype=np.uint64)
    errs = np.empty(1024, dtype=np.uint64)
    n = e = 0
    offset = 0
    bad_at: Optional[int] = None  # line number of the first bad line not yet followed by good
    bad_offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            whole = raw.endswith(b"\n")
            parsed = _line_id(raw) if whole else None
            if parsed is None:
                if bad_at is None:
                    bad_at, bad_offset = number, offset
            else:
                if bad_at is not None:
                    raise CheckpointError(
                        f"{path}: line {bad_at} is not a whole output line, and whole lines "
                        f"follow it (not a crash's torn tail); fix or move the file")
                ids = _grow(ids, n)
                ids[n] = id_hash(parsed[0])
                n += 1
                if parsed[1]:
                    errs = _grow(errs, e)
                    errs[e] = ids[n - 1]
                    e += 1
            offset += len(raw)
    scan.good_end = bad_offset if bad_at is not None else offset
    scan.torn_bytes = offset - scan.good_end
    scan.lines, scan.errors = n, e
    scan.answered, scan.error_ids = ids[:n].copy(), errs[:e].copy()
    return scan


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in ``path``'s folder durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Checkpoint:
    """The state of the output file a run resumes from."""

    path: str
    answered: Answered
    lines_kept: int
    torn_bytes: int
    errors_dropped: int


def _drop_error_lines(path: str, good_end: int) -> int:
    """Rewrite ``path`` without its error lines (atomically); return how many were dropped."""
    tmp = path + ".retry-errors.tmp"
    dropped = 0
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        offset = 0
        for raw in src:
            if offset >= good_end:
                break
            offset += len(raw)
            parsed = _line_id(raw)
            if parsed is not None and parsed[1]:
                dropped += 1
                continue
            dst.write(raw)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
    fsync_dir(path)
    return dropped


def open_checkpoint(path: str, retry_errors: bool = False) -> Checkpoint:
    """Repair ``path`` as the module docstring says and return what it answers."""
    scan = scan_lines(path)
    if scan.torn_bytes:
        with open(path, "r+b") as f:
            f.truncate(scan.good_end)
            f.flush()
            os.fsync(f.fileno())
    dropped = 0
    answered = scan.answered
    if retry_errors and scan.errors:
        dropped = _drop_error_lines(path, scan.good_end)
        answered = np.setdiff1d(scan.answered, scan.error_ids)
    if not os.path.exists(path):
        with open(path, "ab"):
            pass
        fsync_dir(path)
    return Checkpoint(path, Answered(answered), scan.lines - dropped, scan.torn_bytes, dropped)


class Writer:
    """Appends whole lines to the checkpoint in fsynced groups (see the module docstring).
    Safe to call from several threads; ``commit_if_due`` is for a ticker."""

    def __init__(self, path: str, group: int = 512, interval: float = 0.5) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._group = group
        self._interval = interval
        self._pending: List[bytes] = []
        self._first_at = 0.0
        self._lock = threading.Lock()
        self.lines_written = 0

    def write(self, line: bytes) -> None:
        """Queue one line (``line`` ends with ``\\n``); commits when the group is full."""
        with self._lock:
            if not self._pending:
                self._first_at = time.monotonic()
            self._pending.append(line)
            if len(self._pending) >= self._group:
                self._commit()

    def commit_if_due(self) -> None:
        with self._lock:
            if self._pending and time.monotonic() - self._first_at >= self._interval:
                self._commit()

    def commit(self) -> None:
        with self._lock:
            self._commit()

    def _commit(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        view = memoryview(data)
        while view:  # one write for a group in practice; a short write is finished here
            done = os.write(self._fd, view)
            view = view[done:]
        os.fsync(self._fd)
        self.lines_written += len(self._pending)
        self._pending = []

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            self._commit()
            os.close(self._fd)
            self._fd = -1
