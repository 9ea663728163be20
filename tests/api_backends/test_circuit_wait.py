"""OPEN stops sending; it does not fail the caller (DESIGN §4), against the test double.

A request that finds its endpoint's circuit OPEN waits, holding no connection, until the
scheduled ``GET /health`` probe closes it or its deadline passes (a typed
``CircuitWaitTimeoutError`` that says how long it waited). While OPEN the server sees only
the probes; on closing, the in-flight limit restarts low. ``fail_fast`` keeps "OPEN rejects
at once". Outages are made with ``down()`` / ``up()`` (refused connections) or a reset fault on
every path; the tests wait on observable states (``wait_until``), never on fixed sleeps.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from api_support import COMPLETIONS, client_threads
from support import wait_until
from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.servers.fake_vllm import Fault

P = {"max_tokens": 2}
#: what a fail-fast call that runs into the outage ends with (refused, or the circuit it opened)
DETECTED = (errors.ConnectionError, errors.CircuitOpenError)


def health_checks(server) -> int:
    return server.request_count["/health"]


def test_random_faults_at_30_percent_never_open_the_circuit(fake_server, make_client):
    """1 000 calls, 30 % of attempts fail (500, 503, dropped): retries finish the work, the
    circuit never opens; the runs of failures that make it suspect an outage are cleared by
    a healthy ``/health`` check."""
    fake_server.fail_rate(0.3, kinds=("status500", "status503", "drop"), seed=7)
    c = make_client(fake_server, max_retries=6, batch_enabled=False, max_concurrent_requests=8)
    futures = [c.submit_inference(None, f"p{i}", P) for i in range(1000)]
    outcomes = Counter()
    for f in futures:
        try:
            f.result(30)
            outcomes["ok"] += 1
        except errors.ApiError as exc:
            outcomes[type(exc).__name__] += 1
    c.close()  # ends a health check still in flight, so both sides have counted it
    m = c.get_metrics()
    assert outcomes["ok"] >= 995, outcomes
    assert sum(fake_server.faults_injected.values()) > 300  # the faults were there
    assert "default:CLOSED->OPEN" not in m["circuit_breaker_transitions"], m
    assert m["probes"]["failed"] == 0 and m["probes"]["sent"] == health_checks(fake_server)


@pytest.mark.parametrize("outage", ["refused", "reset"])
def test_a_dead_server_opens_the_circuit_within_a_second(fake_server, make_client, outage):
    c = make_client(fake_server, max_retries=10)
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            try:
                c.run_inference(None, "x", P)
            except errors.ApiError:
                pass

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: c.get_metrics()["successes"] >= 20, what="traffic")
        died = time.monotonic()
        if outage == "refused":
            fake_server.down()
        else:
            fake_server.add_fault(Fault("reset", path="/", count=-1))  # /health too
        wait_until(lambda: c.circuit_state != "CLOSED", timeout=5, what="the circuit to open")
        assert time.monotonic() - died < 1.0
    finally:
        stop.set()
        if outage == "refused":
            fake_server.up()
        fake_server.clear_faults()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)


def test_requests_wait_for_the_circuit_and_the_dead_port_sees_only_probes(fake_server,
                                                                         make_client):
    c = make_client(fake_server, max_retries=3, max_concurrent_requests=4)
    assert c.run_inference(None, "warm", P).text
    fake_server.down()
    with pytest.raises(DETECTED):  # caught by the outage, fail-fast: it does not wait
        c.run_inference(None, "first", P, fail_fast=True)
    futures = [c.submit_inference(None, f"held {i}", P) for i in range(20)]
    wait_until(lambda: c.circuit_state != "CLOSED", what="the circuit to open")
    wait_until(lambda: c.get_metrics()["probes"]["sent"] >= 2, what="two failed probes")
    assert not any(f.done() for f in futures)  # held, not failed
    assert c.get_metrics()["in_flight_limit"]["default"] == 4
    seen_before = fake_server.request_count[COMPLETIONS]
    fake_server.up()
    results = [f.result(10) for f in futures]
    assert all(r.usage.completion_tokens == 2 for r in results)
    m = c.get_metrics()
    # the double was down: it saw nothing of the held requests until it was back
    assert seen_before == 1 and fake_server.request_count[COMPLETIONS] >= 2
    assert m["probes"]["ok"] == 1 and health_checks(fake_server) == 1  # one probe answered
    assert m["circuit_wait_seconds"]["count"] >= 20
    t = m["circuit_breaker_transitions"]
    assert t["default:CLOSED->OPEN"] == 1 and t["default:HALF-OPEN->CLOSED"] == 1, t
    assert c.circuit_state == "CLOSED"


def test_the_in_flight_limit_restarts_at_one_and_ramps_up_after_an_outage(fake_server,
                                                                          make_client):
    c = make_client(fake_server, max_concurrent_requests=8, batch_enabled=False)
    fake_server.down()
    with pytest.raises(errors.ApiError):
        c.run_inference(None, "x", P, fail_fast=True)
    wait_until(lambda: c.circuit_state != "CLOSED", what="the circuit to open")
    fake_server.up()
    wait_until(lambda: c.circuit_state == "CLOSED", what="the probe to close it")
    assert c.get_metrics()["in_flight_limit"]["default"] == 1
    for i in range(7):
        assert c.run_inference(None, f"ramp {i}", P).text
    assert c.get_metrics()["in_flight_limit"]["default"] == 8  # one more per healthy reply


def test_a_request_whose_deadline_ends_first_fails_with_a_typed_wait_error(fake_server,
                                                                           make_client):
    c = make_client(fake_server, deadline=0.8, max_retries=5)
    fake_server.down()
    try:
        start = time.monotonic()
        with pytest.raises(errors.CircuitWaitTimeoutError) as info:
            c.run_inference(None, "never sent", P)
        assert 0.7 < time.monotonic() - start < 2.5
        assert "waited" in str(info.value) and info.value.waited > 0.3
        assert c.circuit_state != "CLOSED"
        queued = c.submit_inference(None, "queued behind the circuit", P)
        with pytest.raises(errors.CircuitWaitTimeoutError, match="in the queue"):
            queued.result(5)
        assert c.get_metrics()["failures_by_type"]["CircuitWaitTimeoutError"] == 2
    finally:
        fake_server.up()


def test_fail_fast_rejects_at_once_with_retry_in(fake_server, make_client, monkeypatch):
    monkeypatch.setenv("VLLM_FAIL_FAST", "true")
    from ipfs_accelerate_py.api_backends.vllm import VllmClient
    c = VllmClient(base_url=fake_server.base_url, model="tiny-llama", minimum_calls=2,
                   max_retries=0, reset_timeout=30)
    try:
        assert c.settings.fail_fast is True
        fake_server.add_fault(Fault("status", status=500, count=2))
        for _ in range(2):
            with pytest.raises(errors.ServerError):
                c.run_inference(None, "x", P)
        start = time.monotonic()
        with pytest.raises(errors.CircuitOpenError) as info:
            c.run_inference(None, "x", P)
        assert time.monotonic() - start < 0.5 and info.value.retry_in > 25
        assert health_checks(fake_server) == 0  # fail_fast: no scheduled probes
    finally:
        c.close()


def test_a_per_call_fail_fast_on_a_waiting_client_is_rejected_while_others_wait(
        fake_server, make_client):
    c = make_client(fake_server, max_retries=3)
    fake_server.down()
    try:
        with pytest.raises(DETECTED):
            c.run_inference(None, "detects it", P, fail_fast=True)
        wait_until(lambda: c.circuit_state != "CLOSED", what="the circuit to open")
        held = c.submit_inference(None, "waits", P)
        with pytest.raises(errors.CircuitOpenError) as info:
            c.run_inference(None, "interactive", P, fail_fast=True)
        assert 0 <= info.value.retry_in <= 1.0  # the next scheduled probe
        assert not held.done()
    finally:
        fake_server.up()
    assert held.result(10).text


def test_a_stream_waits_for_the_circuit_before_its_first_byte(fake_server, make_client):
    c = make_client(fake_server, max_retries=3)
    fake_server.down()
    with pytest.raises(DETECTED):
        c.run_inference(None, "detects it", P, fail_fast=True)
    wait_until(lambda: c.circuit_state != "CLOSED", what="the circuit to open")
    out = []
    t = threading.Thread(target=lambda: out.append("".join(c.stream_generation("s", **P))))
    t.start()
    wait_until(lambda: c._endpoints["default"].breaker.waiting == 1, what="the stream to wait")
    fake_server.up()
    t.join(10)
    assert not t.is_alive() and out and out[0]


def test_close_ends_every_wait_and_leaves_no_thread(fake_server, make_client):
    before = set(threading.enumerate())
    c = make_client(fake_server, max_retries=3, max_concurrent_requests=2)
    fake_server.down()
    try:
        with pytest.raises(DETECTED):
            c.run_inference(None, "detects it", P, fail_fast=True)
        wait_until(lambda: c.circuit_state != "CLOSED", what="the circuit to open")
        futures = [c.submit_inference(None, f"held {i}", P) for i in range(5)]
        c.close(timeout=5)
        for f in futures:
            with pytest.raises(errors.ClientClosedError):
                f.result(5)
        assert not client_threads(before)
    finally:
        fake_server.up()
