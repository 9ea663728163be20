"""Fixtures for the generator tests."""

from __future__ import annotations

from typing import Iterator

import pytest

from ipfs_accelerate_py.api_backends import plugins


@pytest.fixture
def fresh_plugins() -> Iterator[None]:
    """A plugin manager rebuilt before and after the test, so registrations do not leak."""
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()
