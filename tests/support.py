"""Helpers shared by every test folder (importable as ``support``: tests/ is on sys.path)."""

from __future__ import annotations

import time
from typing import Callable


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005,
               what: str = "condition") -> float:
    """Poll ``predicate`` until it is true; AssertionError after ``timeout`` s. Returns the wait.

    A bounded poll on an observable condition, never a fixed sleep standing in for one."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start
