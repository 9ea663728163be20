"""``close()`` under load: 16 requests in flight and 200 queued.

What ``close()`` promises (``BaseApiBackend.close``): it returns within a bounded time
(its ``timeout``, by default the read timeout + 1 s); every queued request fails at once
with ``ClientClosedError`` and is never sent; every in-flight request finishes or fails
(no future is left pending); no thread of the client's is left (its loop, the threads of a
sync transport); the endpoint's sockets are closed.

Three cases: in-flight work that ends before the read timeout (it succeeds), in-flight work
stalled past the read timeout (it fails, and a retry is not attempted after close), and a
``close(timeout=0.5)`` shorter than the stall (close returns on time; the stragglers still
end within the read timeout).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter
from typing import Any, List

import pytest

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.servers.fake_vllm import Fault, FakeVllmServer

from reliability_support import worker_threads
from support import TRANSPORT_IDS, wait_until

IN_FLIGHT = 16
QUEUED = 200
#: the threads a client runs: its loop, and the threads of a sync transport it was given
WORKER_PREFIX = "vllm-"
TRANSPORT_PREFIX = "vllm-transport"
PARAMS = {"max_tokens": 2, "temperature": 0}


def outcome(f: "concurrent.futures.Future[Any]") -> str:
    assert f.done()
    exc = f.exception(0)
    if exc is None:
        assert f.result(0).usage.completion_tokens == 2
        return "ok"
    assert isinstance(exc, errors.ApiError), repr(exc)
    return type(exc).__name__


def load_up(client, server: FakeVllmServer) -> List["concurrent.futures.Future[Any]"]:
    """Submit 216 requests; return once 16 are on the wire and 200 wait in the queue."""
    futures = [client.submit_inference(None, f"shutdown {i}", PARAMS)
               for i in range(IN_FLIGHT + QUEUED)]
    wait_until(lambda: server.request_count["/v1/completions"] == IN_FLIGHT
               and client.current_requests == IN_FLIGHT, 10, what="16 requests in flight")
    assert len(client.request_queue) == QUEUED
    assert not any(f.done() for f in futures)
    return futures


def finish(server: FakeVllmServer, client, before_threads: int, before_set) -> None:
    assert worker_threads(WORKER_PREFIX, before_set) == []
    server.stop()
    wait_until(lambda: threading.active_count() <= before_threads, 10,
               what=f"threads back to {before_threads}: {[t.name for t in threading.enumerate()]}")


@pytest.mark.parametrize("transport", TRANSPORT_IDS)  # sync ones: the default is the cases below
def test_close_with_work_in_flight_and_queued(make_client, baseline_threads, transport):
    """In-flight requests take 1.5 s (under the 3 s read timeout): close() waits for them,
    fails the 200 queued ones at once, and leaves nothing behind."""
    before_set = set(threading.enumerate())
    server = FakeVllmServer(latency=1.5).start()
    try:
        client = make_client(server.base_url, transport, max_concurrent_requests=IN_FLIGHT,
                             queue_size=1000, batch_enabled=False, timeout=3.0, max_retries=2)
        futures = load_up(client, server)
        # the test's sync transports: each call in flight holds one of the client's
        # transport threads (aiohttp, the default, would hold none)
        assert len(worker_threads(TRANSPORT_PREFIX, before_set)) == IN_FLIGHT

        t0 = time.monotonic()
        client.close()
        took = time.monotonic() - t0
        print(f"\nclose() with {IN_FLIGHT} in flight + {QUEUED} queued [{transport}]: {took:.2f}s")
        assert took < 3.0 + 2.0, took
        assert all(f.done() for f in futures)  # nothing pending once close() returned

        outcomes = Counter(outcome(f) for f in futures)
        assert outcomes == {"ok": IN_FLIGHT, "ClientClosedError": QUEUED}, outcomes
        assert all(outcome(f) == "ClientClosedError" for f in futures[IN_FLIGHT:])
        assert server.request_count["/v1/completions"] == IN_FLIGHT  # the queued were never sent
        m = client.get_metrics()
        assert m["requests"] == IN_FLIGHT + QUEUED == m["successes"] + m["failures"]
        assert m["failures_by_type"] == {"ClientClosedError": QUEUED}
        with pytest.raises(errors.ClientClosedError):
            client.submit_inference(None, "after close", PARAMS)
        wait_until(lambda: server.open_connections == 0, 5, what="the client's sockets to close")
        finish(server, client, baseline_threads, before_set)
    finally:
        server.stop()


def test_close_with_work_stalled_past_the_read_timeout(make_client, baseline_threads):
    """The server holds the 16 in-flight requests at a gate; the read timeout is 2 s. close()
    returns once those reads time out: the 16 fail (no retry starts after close), the 200
    queued fail with ClientClosedError."""
    before_set = set(threading.enumerate())
    server = FakeVllmServer().start()
    try:
        server.add_fault(Fault("gate", count=IN_FLIGHT))
        client = make_client(server.base_url, max_concurrent_requests=IN_FLIGHT, queue_size=1000,
                             batch_enabled=False, timeout=2.0, max_retries=3, retry_delay=0.5)
        futures = load_up(client, server)

        t0 = time.monotonic()
        client.close()
        took = time.monotonic() - t0
        print(f"\nclose() with {IN_FLIGHT} stalled + {QUEUED} queued: {took:.2f}s")
        assert took < 2.0 + 2.0, took
        assert all(f.done() for f in futures)
        outcomes = Counter(outcome(f) for f in futures)
        assert all(outcome(f) == "ClientClosedError" for f in futures[IN_FLIGHT:])
        stalled = Counter(outcome(f) for f in futures[:IN_FLIGHT])
        assert set(stalled) <= {"TimeoutError", "ClientClosedError"}, outcomes
        assert server.request_count["/v1/completions"] == IN_FLIGHT  # no retry went out
        m = client.get_metrics()
        assert m["requests"] == IN_FLIGHT + QUEUED == m["failures"]
        finish(server, client, baseline_threads, before_set)
    finally:
        server.stop()


def test_close_timeout_shorter_than_the_stall_returns_on_time(make_client, baseline_threads):
    """close(timeout=0.5) returns in about 0.5 s even though 16 reads are still waiting; the
    stragglers end by their own read timeout (2 s) or as the loop stops, and no client
    thread is left then."""
    before_set = set(threading.enumerate())
    server = FakeVllmServer().start()
    try:
        server.add_fault(Fault("gate", count=IN_FLIGHT))
        client = make_client(server.base_url, max_concurrent_requests=IN_FLIGHT, queue_size=1000,
                             batch_enabled=False, timeout=2.0, max_retries=3)
        futures = load_up(client, server)

        t0 = time.monotonic()
        client.close(timeout=0.5)
        took = time.monotonic() - t0
        print(f"\nclose(timeout=0.5) with {IN_FLIGHT} stalled + {QUEUED} queued: {took:.2f}s")
        assert took < 0.5 + 1.0, took
        assert all(outcome(f) == "ClientClosedError" for f in futures[IN_FLIGHT:])
        # Bounded waits: each straggler resolves within its read timeout (+ margin).
        for f in futures[:IN_FLIGHT]:
            try:
                f.result(timeout=max(0.01, t0 + 2.0 + 3.0 - time.monotonic()))
            except concurrent.futures.TimeoutError:
                pytest.fail("an in-flight request did not end within its read timeout")
            except errors.ApiError:
                pass
        assert {outcome(f) for f in futures[:IN_FLIGHT]} <= {"TimeoutError", "ClientClosedError"}
        wait_until(lambda: worker_threads(WORKER_PREFIX, before_set) == [], 3,
                   what="the client's threads to exit")
        assert time.monotonic() - t0 < 2.0 + 3.0
        finish(server, client, baseline_threads, before_set)
    finally:
        server.stop()
