"""Fixtures for the batch job's tests (servers and clients are the root conftest's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

from batch_support import BatchJob


@pytest.fixture
def start_job(tmp_path: Path) -> Iterator[Callable[..., BatchJob]]:
    """``start_job(args, **env)``: a job process in ``tmp_path``; every one is ended by PID."""
    jobs: List[BatchJob] = []

    def start(args: List[str], **env: Any) -> BatchJob:
        job = BatchJob(args, tmp_path, **env)
        jobs.append(job)
        return job

    try:
        yield start
    finally:
        for job in jobs:
            job.stop()
