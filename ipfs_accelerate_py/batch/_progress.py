"""What a run shows and leaves behind: a progress bar and a summary JSON.

The bar (tqdm) counts every request of the file: done / total, rate, ETA, and the errors so
far; ids answered by an earlier run count as done at once. The summary (requests, tokens,
errors by type, wall time) is written to ``collected_results/`` when the run ends, stopped
or not.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from tqdm import tqdm

__all__ = ["Progress", "Summary", "write_summary"]


@dataclass
class Summary:
    """The figures of one run."""

    runner: str
    input: str
    output: str
    endpoints: List[str]
    requests_in_file: int = 0
    already_answered: int = 0
    sent: int = 0
    ok: int = 0
    errors: int = 0
    errors_by_type: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    torn_bytes_repaired: int = 0
    error_lines_dropped: int = 0
    stopped_by: Optional[str] = None
    unfinished: int = 0
    started: float = field(default_factory=time.time)
    wall_s: float = 0.0

    @property
    def complete(self) -> bool:
        return self.stopped_by is None and self.unfinished == 0

    def record(self, ok: bool, error_type: Optional[str] = None,
               usage: Optional[Dict[str, Any]] = None) -> None:
        if ok:
            self.ok += 1
            if usage:
                self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                self.completion_tokens += int(usage.get("completion_tokens") or 0)
        else:
            self.errors += 1
            self.errors_by_type[error_type or "unknown"] += 1

    def as_dict(self) -> Dict[str, Any]:
        answered = self.ok + self.errors
        return {
            "runner": self.runner, "input": self.input, "output": self.output,
            "endpoints": self.endpoints, "requests_in_file": self.requests_in_file,
            "already_answered": self.already_answered, "sent": self.sent,
            "answered_this_run": answered, "ok": self.ok, "errors": self.errors,
            "errors_by_type": dict(self.errors_by_type),
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens,
                       "total": self.prompt_tokens + self.completion_tokens},
            "torn_bytes_repaired": self.torn_bytes_repaired,
            "error_lines_dropped": self.error_lines_dropped,
            "stopped_by": self.stopped_by, "unfinished": self.unfinished,
            "complete": self.complete, "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(answered / self.wall_s, 1) if self.wall_s > 0 else None,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
        }


def write_summary(summary: Summary, folder: str = "collected_results") -> str:
    """Write the summary as ``batch_<output name>_<time>.json`` in ``folder``; its path."""
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(os.path.basename(summary.output))[0] or "output"
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(summary.started))
    path = os.path.join(folder, f"batch_{stem}_{stamp}_{os.getpid()}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary.as_dict(), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


class Progress:
    """The bar; ``advance`` after every answered (or skipped) request."""

    def __init__(self, total: int, summary: Summary, enabled: bool = True) -> None:
        self._summary = summary
        self._bar: Any = None
        self._shown_errors = -1
        if enabled:
            self._bar = tqdm(total=total, unit="req", dynamic_ncols=True, mininterval=0.5,
                             smoothing=0.05, desc="batch")

    def advance(self, n: int = 1) -> None:
        bar = self._bar
        if bar is None:
            return
        bar.update(n)
        if self._summary.errors != self._shown_errors:
            self._shown_errors = self._summary.errors
            bar.set_postfix(errors=self._shown_errors, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
