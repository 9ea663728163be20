"""Helpers shared by every test folder (importable as ``support``: tests/ is on sys.path).

Plain functions and constants, no fixtures (those live in the ``conftest.py`` files):

- ``wait_until``: a bounded poll on a condition that changes in another thread.
- ``FAST``: client settings that make retries take milliseconds and keep every wait bounded
  (what the root conftest's ``make_client`` starts from).
- ``TRANSPORT_IDS`` / ``transport_factory``: build a client on either transport (``requests``
  or the lean ``http.client`` one), so a case can run on both.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Tuple

from ipfs_accelerate_py.api_backends.transport import (HttpClientTransport, RequestsTransport,
                                                        Transport)

__all__ = ["wait_until", "FAST", "TRANSPORT_IDS", "transport_factory", "REAL_SERVER_API_KEY"]

#: The key ``real_vllm_server_with_key`` requires (``Authorization: Bearer ...`` on /v1/*).
REAL_SERVER_API_KEY = "sk-test-key-123"

#: Settings that make retries quick (milliseconds) and keep every wait bounded.
FAST: Dict[str, Any] = dict(model="tiny-llama", retry_delay=0.002, max_retry_delay=0.01,
                            timeout=5.0, connect_timeout=2.0)

#: The two transports a client can run on, by test id.
TRANSPORT_IDS: Tuple[str, ...] = ("requests", "httpclient")
_TRANSPORTS = {"requests": RequestsTransport, "httpclient": HttpClientTransport}


def transport_factory(name: str) -> Callable[[Any], Transport]:
    """A client's ``transport_factory`` for the transport ``name`` (one of ``TRANSPORT_IDS``),
    built from the client's settings as the default factory builds it."""
    cls = _TRANSPORTS[name]

    def make(s: Any) -> Transport:
        return cls(s.base_url, s.api_key_value, pool_size=max(s.max_concurrent_requests, 10),
                   verify=s.ca_bundle or s.verify_tls, extra_headers=s.extra_headers,
                   max_response_bytes=s.max_response_bytes)
    return make


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
