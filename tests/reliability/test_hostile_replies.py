"""Hostile complete replies: bounded reads, framing per RFC 9112, typed errors, a pool that stays good.

A raw-socket loopback server (``RawServer``, below) answers each request with the next reply
a test scripts, byte for byte: a ``Content-Length`` of a terabyte, 100 MB bodies (declared,
chunked, close-delimited, one giant chunk), two different ``Content-Length`` values,
``Content-Length`` with ``Transfer-Encoding: chunked``, lengths Python's ``int`` would
misread. On every transport (aiohttp, the default; ``requests`` and the hand-written HTTP/1.1
one, given as a ``transport_factory``) each must give
its typed error at once (never a ``MemoryError``, never a read of the whole body), the
connection it came on must be closed by the client (never pooled), and the client's next
request must work. For the 100 MB bodies the peak resident memory while reading is
measured (``VmHWM``, reset first through ``/proc/self/clear_refs``): it stays near the cap,
well under the body.
"""

from __future__ import annotations

import ctypes
import gc
import socket
import time
from typing import Any, Callable, List, Optional

import pytest

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.base import build_request
from ipfs_accelerate_py.api_backends.settings import MAX_RESPONSE_BYTES, ClientSettings
from ipfs_accelerate_py.api_backends.vllm import VllmClient

from reliability_support import MODELS, RawServer, Reply, rss_bytes
from support import COMPLETE_TRANSPORT_IDS as TRANSPORT_IDS, wait_until

MIB = 1 << 20
BIG = 100 * 1000 * 1000  # the 100 MB body
QUICK = 10.0  # seconds; the client's read timeout is 30 s, so a hang cannot pass


# =========================================================================== the server
def head_then(head: bytes, body: Optional[bytes] = None, then: str = "hold") -> Reply:
    def reply(conn: socket.socket) -> str:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + head
                     + b"\r\n" + (body or b""))
        return then
    return reply


_PIECE = b"x" * MIB  # one buffer sent again and again: the server itself stays small


def big_body(head: bytes, framing: str, status: bytes = b"200 OK") -> Reply:
    """A ``BIG``-byte body: ``framing`` is "length", "chunked", "close" or "one-chunk"
    (one chunk that declares the whole size)."""
    def reply(conn: socket.socket) -> str:
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n" + head
                     + b"\r\n")
        if framing == "one-chunk":
            conn.sendall(b"%x\r\n" % BIG)
        sent = 0
        while sent < BIG:
            piece = _PIECE[:BIG - sent]
            if framing == "chunked":
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                conn.sendall(piece)
            sent += len(piece)
        if framing == "chunked":
            conn.sendall(b"0\r\n\r\n")
        return "hold"
    return reply


HEADS = {"length": b"Content-Length: %d\r\n" % BIG, "chunked": b"Transfer-Encoding: chunked\r\n",
         "one-chunk": b"Transfer-Encoding: chunked\r\n", "close": b"Connection: close\r\n"}


# =========================================================================== the client
def refused(client: VllmClient, error: type, call: Optional[Callable[[], Any]] = None
            ) -> errors.ApiError:
    """Make the call (``list_models`` by default); it must raise ``error`` within QUICK."""
    start = time.monotonic()
    with pytest.raises(error) as info:
        (call or client.list_models)()
    elapsed = time.monotonic() - start
    assert elapsed < QUICK, f"took {elapsed:.1f} s"
    return info.value


def assert_dropped_and_next_works(raw_server: RawServer, client: VllmClient) -> None:
    """The hostile reply's connection is closed by the client, and the next request gets
    the models list on another connection."""
    assert len(raw_server.requests) == 1, raw_server.requests  # a typed error is not retried
    bad = raw_server.connection_of(0)
    wait_until(lambda: bad in raw_server.closed_by_client, 10,
               what=f"the client to close connection {bad}")
    assert [m["id"] for m in client.list_models()] == ["tiny-llama"]
    assert raw_server.connection_of(1) != bad


# =========================================================================== framing
@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_a_terabyte_content_length_is_refused_before_reading(raw_server, client_on, transport):
    raw_server.script.append(head_then(b"Content-Length: 1000000000000\r\n", b"{\"object\":"))
    client = client_on(transport)
    exc = refused(client, errors.ResponseTooLargeError)
    assert exc.limit == MAX_RESPONSE_BYTES
    assert "1000000000000" in str(exc) and "max_response_bytes" in str(exc)
    assert "MAX_RESPONSE_BYTES" in str(exc)
    assert_dropped_and_next_works(raw_server, client)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
@pytest.mark.parametrize("head", [b"Content-Length: 5\r\nContent-Length: 7\r\n",
                                  b"Content-Length: 5, 7\r\n"], ids=["two-fields", "one-list"])
def test_two_different_content_lengths_are_refused(raw_server, client_on, transport, head):
    raw_server.script.append(head_then(head, b"12345\r\n"))
    client = client_on(transport)
    exc = refused(client, errors.ResponseError)
    assert not isinstance(exc, errors.TransientError)
    assert "Content-Length" in str(exc) and "9112" in str(exc)
    assert_dropped_and_next_works(raw_server, client)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
@pytest.mark.parametrize("value", [b"1_0", b"+10", b"-1", b"0x10", b"ten"])
def test_a_content_length_that_is_not_digits_is_refused(raw_server, client_on, transport, value):
    # int() reads "1_0" and "+10" as 10; RFC 9112 allows only digits
    raw_server.script.append(head_then(b"Content-Length: " + value + b"\r\n", b"0123456789"))
    client = client_on(transport)
    exc = refused(client, errors.ResponseError)
    assert "invalid Content-Length" in str(exc)
    assert_dropped_and_next_works(raw_server, client)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_identical_content_lengths_are_one_length(raw_server, client_on, transport):
    n = b"%d" % len(MODELS)
    raw_server.script.append(head_then(b"Content-Length: " + n + b"\r\nContent-Length: " + n
                                   + b"\r\n", MODELS, then="keep"))
    client = client_on(transport)
    if transport == "aiohttp":  # llhttp refuses even identical ones, as RFC 9112 6.3 allows
        refused(client, errors.ResponseError)
        assert_dropped_and_next_works(raw_server, client)
        return
    assert [m["id"] for m in client.list_models()] == ["tiny-llama"]
    assert [m["id"] for m in client.list_models()] == ["tiny-llama"]
    assert raw_server.connection_of(1) == raw_server.connection_of(0)  # a good reply keeps its socket


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_chunked_wins_over_content_length_and_the_connection_is_not_reused(raw_server, client_on,
                                                                           transport):
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(MODELS), MODELS)
    raw_server.script.append(head_then(b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", body,
                                   then="keep"))
    client = client_on(transport)
    if transport == "aiohttp":  # llhttp refuses both framings at once (smuggling, RFC 9112 6.3)
        exc = refused(client, errors.ResponseError)
        assert "Content-Length" in str(exc)
        assert_dropped_and_next_works(raw_server, client)
        return
    assert [m["id"] for m in client.list_models()] == ["tiny-llama"]  # framed by chunked
    wait_until(lambda: raw_server.connection_of(0) in raw_server.closed_by_client, 10,
               what="the client to close the connection of a reply with both framings")
    assert [m["id"] for m in client.list_models()] == ["tiny-llama"]
    assert raw_server.connection_of(1) != raw_server.connection_of(0)


# =========================================================================== 100 MB bodies
def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _trim_heap() -> None:
    """Give freed heap back to the OS (glibc), so memory an earlier test freed but the
    allocator kept cannot hide what ``fn`` allocates."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_growth(fn: Callable[[], Any]) -> int:
    """How far the resident set rose above its level before ``fn`` while ``fn`` ran."""
    gc.collect()
    _trim_heap()
    if not _reset_peak():
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    base = rss_bytes()
    fn()
    return _peak_rss() - base


#: Peak RSS allowed above the cap while a body is read and refused (allocator slack,
#: a read buffer, the bytearray growth step); measured figures are in the commit message.
SLACK = 24 * MIB


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
@pytest.mark.parametrize("framing", ["length", "chunked", "one-chunk", "close"])
@pytest.mark.parametrize("cap", [MAX_RESPONSE_BYTES, 4 * MIB], ids=["default-cap", "4MiB-cap"])
def test_a_100_mb_body_is_refused_with_memory_near_the_cap(raw_server, client_on, transport, framing,
                                                           cap, record_property):
    raw_server.script.append(big_body(HEADS[framing], framing))
    client = client_on(transport, max_response_bytes=cap)
    caught: List[errors.ApiError] = []
    grew = peak_growth(lambda: caught.append(refused(client, errors.ResponseTooLargeError)))
    record_property("peak_rss_growth_mib", round(grew / MIB, 1))
    print(f"\n{transport} {framing} cap={cap // MIB} MiB: peak RSS +{grew / MIB:.1f} MiB")
    assert caught[0].limit == cap
    assert grew < cap + SLACK, f"peak RSS grew {grew / MIB:.1f} MiB reading a 100 MB body"
    assert grew < BIG
    assert_dropped_and_next_works(raw_server, client)


# =========================================================================== streams
def _stream_request():
    return build_request("Tell me a story", "tiny-llama", {"max_tokens": 4}, stream=True)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_a_100_mb_error_reply_to_a_stream_is_refused(raw_server, client_on, transport):
    # an error reply to a stream is read whole by the client: it gets the same cap
    raw_server.script.append(big_body(HEADS["chunked"], "chunked", status=b"500 Internal Server Error"))
    client = client_on(transport, max_response_bytes=4 * MIB, max_retries=0)
    exc = refused(client, errors.ResponseTooLargeError, lambda: client.stream(_stream_request()))
    assert exc.limit == 4 * MIB
    assert_dropped_and_next_works(raw_server, client)


@pytest.mark.parametrize("transport", TRANSPORT_IDS)
def test_a_stream_with_two_content_lengths_is_refused(raw_server, client_on, transport):
    raw_server.script.append(head_then(b"Content-Length: 5\r\nContent-Length: 70\r\n", b"data:"))
    client = client_on(transport, max_retries=0)
    exc = refused(client, errors.ResponseError, lambda: client.stream(_stream_request()))
    assert "Content-Length" in str(exc)
    assert_dropped_and_next_works(raw_server, client)


# =========================================================================== the setting
def test_max_response_bytes_is_a_setting_read_from_the_environment():
    assert ClientSettings().max_response_bytes == MAX_RESPONSE_BYTES == 64 * MIB
    env = {"VLLM_MAX_RESPONSE_BYTES": "1048576"}
    assert ClientSettings.from_env("VLLM_", environ=env).max_response_bytes == MIB
    with pytest.raises(errors.ConfigurationError) as info:
        ClientSettings.from_env("VLLM_", environ={"VLLM_MAX_RESPONSE_BYTES": "0"})
    assert "VLLM_MAX_RESPONSE_BYTES" in str(info.value)


def test_the_setting_reaches_the_transport_a_client_builds_itself(raw_server):
    """No transport factory: the client's own default transport enforces its setting."""
    raw_server.script.append(head_then(b"Content-Length: 5000\r\n", b"{\"object\":"))
    with VllmClient(base_url=raw_server.base_url, max_response_bytes=4096, max_retries=0) as client:
        exc = refused(client, errors.ResponseTooLargeError)
        assert exc.limit == 4096 and "5000" in str(exc)
