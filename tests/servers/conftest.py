"""Fixtures for the server tests: a loopback HTTP session, and doubles mirrored from the real
server (the real servers themselves are the root conftest's)."""

from __future__ import annotations

import http.client as http_client
import json
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit

import pytest
import requests

from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer
from support import REAL_SERVER_API_KEY


@pytest.fixture(scope="module")
def http() -> requests.Session:
    """A session that never goes through an HTTP proxy from the environment (loopback only)."""
    session = requests.Session()
    session.trust_env = False
    return session


def _get_json(base_url: str, path: str, api_key: Optional[str] = None) -> Any:
    parts = urlsplit(base_url)
    conn = http_client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        reply = conn.getresponse()
        body = reply.read()
        assert reply.status == 200, body
        return json.loads(body)
    finally:
        conn.close()


def _mirror(real_base_url: str, api_key: Optional[str]) -> FakeVllmServer:
    """A double configured like the real server: same served names, context length and key."""
    data = _get_json(real_base_url, "/v1/models", api_key)["data"]
    version = _get_json(real_base_url, "/version")["version"]
    return FakeVllmServer(models=[m["id"] for m in data], max_model_len=data[0]["max_model_len"],
                          api_key=api_key, version=version)


@pytest.fixture(scope="module")
def mirrored_fake(real_vllm_server: Any) -> Iterator[FakeVllmServer]:
    """A double mirroring ``real_vllm_server``, for the whole module."""
    with _mirror(real_vllm_server.base_url, None) as fake:
        yield fake


@pytest.fixture(scope="module")
def mirrored_fake_with_key(real_vllm_server_with_key: Any) -> Iterator[FakeVllmServer]:
    """A double mirroring ``real_vllm_server_with_key`` (the same API key)."""
    with _mirror(real_vllm_server_with_key.base_url, REAL_SERVER_API_KEY) as fake:
        yield fake
