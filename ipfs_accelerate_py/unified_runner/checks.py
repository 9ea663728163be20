"""Running named checks: each one raises on failure, and the recorder keeps the verdict.

A check is a function that takes a ``details`` dict (to record what it measured) and
raises ``AssertionError`` (or any error) when the thing it checks is wrong. One failing
check never stops the next one: the suite reports every verdict.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, TextIO

from .results import CheckResult

__all__ = ["SkipCheck", "CheckRecorder", "CheckFn"]

CheckFn = Callable[[Dict[str, Any]], None]


class SkipCheck(Exception):
    """Raised by a check that cannot apply here (say why); recorded as skipped, not failed."""


class CheckRecorder:
    """Runs checks in order, times them, prints one line each, and keeps the results."""

    def __init__(self, out: Optional[TextIO] = None) -> None:
        self.results: List[CheckResult] = []
        self._out = out

    def run(self, name: str, fn: CheckFn) -> CheckResult:
        details: Dict[str, Any] = {}
        start = time.perf_counter()
        status, message = "passed", ""
        try:
            fn(details)
        except SkipCheck as exc:
            status, message = "skipped", str(exc)
        except AssertionError as exc:
            status, message = "failed", str(exc) or "assertion failed"
        except Exception as exc:  # noqa: BLE001 - any error is this check's failure
            status, message = "failed", f"{type(exc).__name__}: {exc}"
        result = CheckResult(name=name, status=status,  # type: ignore[arg-type]
                             duration_seconds=time.perf_counter() - start,
                             message=message, details=details)
        self.results.append(result)
        if self._out is not None:
            label = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[status]
            tail = f" - {message}" if message else ""
            print(f"  {label}  {name} ({result.duration_seconds:.2f} s){tail}", file=self._out,
                  flush=True)
        return result

    def counts(self) -> Dict[str, int]:
        out = {"passed": 0, "failed": 0, "skipped": 0}
        for r in self.results:
            out[r.status] += 1
        return out

    @property
    def status(self) -> str:
        """failed if any check failed; skipped if nothing passed; else passed."""
        c = self.counts()
        if c["failed"]:
            return "failed"
        return "passed" if c["passed"] else "skipped"
