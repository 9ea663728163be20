"""Helpers for the batch job's tests: input files, reading the output, the job as a process.

``BatchJob`` runs ``python -m ipfs_accelerate_py.batch run ...`` in a session of its own
(so a SIGKILL reaches its whole process group, as a crash would), and is always ended by
its PID in ``stop()``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import ipfs_accelerate_py

REPO = str(Path(ipfs_accelerate_py.__file__).resolve().parent.parent)


def completion_line(cid: str, prompt: str, max_tokens: int = 2, **extra: Any) -> Dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens,
                     "temperature": 0, **extra}}


def chat_line(cid: str, text: str, max_tokens: int = 2) -> Dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny-llama", "max_tokens": max_tokens, "temperature": 0,
                     "messages": [{"role": "user", "content": text}]}}


def write_input(path: Path, lines: Iterable[Any]) -> Path:
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def mixed_lines(n: int, prefix: str = "r", word: str = "hello") -> List[Dict[str, Any]]:
    return [completion_line(f"{prefix}{i}", f"{word} {i}") if i % 2
            else chat_line(f"{prefix}{i}", f"{word} {i}") for i in range(n)]


def read_output(path: Path) -> List[Dict[str, Any]]:
    with open(path, "rb") as f:
        data = f.read()
    assert not data or data.endswith(b"\n"), "the output must end with a whole line"
    return [json.loads(line) for line in data.splitlines()]


def whole_lines(path: Path) -> int:
    """Lines the job has committed so far (a torn tail is not counted)."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def ids_once(rows: List[Dict[str, Any]], expected: Iterable[str]) -> None:
    """Every expected custom id has exactly one line, and no other id has one."""
    counts = Counter(r["custom_id"] for r in rows)
    twice = {k: v for k, v in counts.items() if v != 1}
    assert not twice, f"custom ids with more than one line: {twice}"
    assert set(counts) == set(expected)


def job_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class BatchJob:
    """The job as a process in its own session; ``stop()`` ends it by PID."""

    def __init__(self, args: List[str], cwd: Path, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ipfs_accelerate_py.batch", "run", *args, "--no-progress",
             "--summary-dir", str(cwd / "results")],
            cwd=str(cwd), env=job_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL the job's whole process group: a crash, with no chance to flush."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float = 60.0) -> int:
        self.proc.wait(timeout)
        return self.proc.returncode

    def wait_said(self, text: str, timeout: float = 30.0) -> str:
        """Read the job's stderr until a line holds ``text`` (what it says once it acted)."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stderr.fileno()
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            if text.encode() in buf:
                return buf.decode()
        raise AssertionError(f"the job did not say {text!r} within {timeout}s: {buf!r}")

    def stderr(self) -> str:
        return self.proc.stderr.read().decode() if self.proc.stderr else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def run_job(args: List[str], cwd: Path, timeout: float = 60.0, **env: str) -> "tuple[int, str]":
    job = BatchJob(args, cwd, **env)
    try:
        rc = job.wait(timeout)
        return rc, job.stderr()
    finally:
        job.stop()
