"""Fixtures for the api_backends tests (the double, ``make_client`` and the real server are
the root conftest's; helpers are in ``api_support``)."""

from __future__ import annotations

from typing import Callable, Iterator, List

import pytest

from api_support import CountingListener
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer


@pytest.fixture
def counting_listener() -> Iterator[CountingListener]:
    """A listener that counts connections: a client pointed at it proves nothing was sent."""
    listener = CountingListener()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def fakes(start_fake: Callable[..., FakeVllmServer]) -> List[FakeVllmServer]:
    """Two started test doubles (two servers to route over), stopped after the test."""
    return [start_fake(), start_fake()]
