"""SSE decoding under any byte split, and every error shape vLLM/FastAPI send."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional

import pytest
from hypothesis import given, settings, strategies as st

from ipfs_accelerate_py.api_backends import errors
from ipfs_accelerate_py.api_backends.errors import error_for_status, parse_retry_after, redact, register_secret
from ipfs_accelerate_py.api_backends.sse import SSEDecoder, iter_sse_data
from ipfs_accelerate_py.api_backends.transport import HttpResponse
from ipfs_accelerate_py.api_backends.vllm import VllmAdapter

VLLM_STREAM = (
    b'data: {"id":"cmpl-1","choices":[{"index":0,"text":"niri"}]}\n\n'
    b': keep-alive\n\n'
    b'data: {"id":"cmpl-1","choices":[{"index":0,"text":" talk","finish_reason":"length"}]}\n\n'
    b'data: {"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    b'data: [DONE]\n\n'
)
EXPECTED = [json.dumps({"id": "cmpl-1", "choices": [{"index": 0, "text": "niri"}]}, separators=(",", ":")),
            None, None, "[DONE]"]


def decode_all(chunks):
    return list(iter_sse_data(chunks))


def test_whole_stream():
    events = decode_all([VLLM_STREAM])
    assert len(events) == 4 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "niri"


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"])
def test_every_split_point_and_line_ending(sep):
    stream = VLLM_STREAM.replace(b"\n", sep)
    whole = decode_all([stream])
    assert whole == decode_all([VLLM_STREAM])
    for i in range(len(stream) + 1):
        assert decode_all([stream[:i], stream[i:]]) == whole, i
    assert decode_all([bytes([b]) for b in stream]) == whole


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(VLLM_STREAM)), max_size=12),
       st.sampled_from([b"\n", b"\r\n"]))
def test_random_chunking_gives_the_same_events(cuts, sep):
    stream = VLLM_STREAM.replace(b"\n", sep)
    points = sorted(set(min(c, len(stream)) for c in cuts))
    chunks, prev = [], 0
    for p in points + [len(stream)]:
        chunks.append(stream[prev:p])
        prev = p
    assert decode_all(chunks) == decode_all([VLLM_STREAM])


SSE_PIECES = [b'data: {"a":1}\n\n', b": keep-alive\n\n", b"data: x\r\n\r\n", b"data:y\n\n",
              b"event: e\ndata: z\n\n", b"\n", b"data: [DONE]\n\n", b"data: a\ndata: b\n\n",
              b"data: \xc3\xa9\n\n", b"data: \xc3", b"\xa9\n\n", b"id: 7\n", b"data: tail"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SSE_PIECES), max_size=10), st.lists(st.integers(0, 400), max_size=6))
def test_whole_events_in_one_read_decode_as_byte_by_byte(pieces, cuts):
    """Reads that hold whole one-line events are split at their blank lines at once (the
    common framing); whatever the framing and however the bytes are cut, the events are
    those the stream gives fed one byte at a time (line by line throughout)."""
    stream = b"".join(pieces)
    points = sorted(set(min(c, len(stream)) for c in cuts))
    chunks = [stream[a:b] for a, b in zip([0] + points, points + [len(stream)])]
    assert decode_all(chunks) == decode_all([bytes([b]) for b in stream])


def test_a_whole_event_over_the_bound_is_refused_in_one_read():
    with pytest.raises(errors.ResponseError):
        SSEDecoder(max_event_bytes=1024).feed(b"data: " + b"x" * 2000 + b"\n\n")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_crashes(data):
    dec = SSEDecoder(max_event_bytes=1000)
    try:
        dec.feed(data)
        dec.flush()
    except errors.ResponseError:
        pass


def test_multiline_data_and_unterminated_last_event():
    assert decode_all([b"data: a\ndata: b\n\n", b"data: tail"]) == ["a\nb", "tail"]


def test_event_size_is_bounded():
    dec = SSEDecoder(max_event_bytes=1024)
    with pytest.raises(errors.ResponseError):
        dec.feed(b"data: " + b"x" * 2000)
    dec2 = SSEDecoder(max_event_bytes=1024)
    with pytest.raises(errors.ResponseError):
        for _ in range(10):
            dec2.feed(b"data: " + b"x" * 200 + b"\n")


def test_multi_megabyte_event_within_limit():
    big = b"data: " + b"y" * (3 * 1024 * 1024) + b"\n\n"
    assert len(decode_all([big[i:i + 65536] for i in range(0, len(big), 65536)])[0]) == 3 * 1024 * 1024


# ------------------------------------------------------------------ error shapes (real bodies)
@pytest.mark.parametrize("status,body,cls,message,param", [
    (404, '{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","param":"model","code":404}}',
     errors.NotFoundError, "The model `x` does not exist.", "model"),
    (400, '{"error":{"message":"max_tokens=100000 cannot be greater than max_model_len=512.","type":"BadRequestError","param":"max_tokens","code":400}}',
     errors.BadRequestError, "max_tokens=100000", "max_tokens"),
    (400, '{"object":"error","message":"old style","type":"BadRequestError","param":"temperature","code":400}',
     errors.BadRequestError, "old style", "temperature"),
    (401, '{"error":"Unauthorized"}', errors.AuthenticationError, "Unauthorized", None),
    (404, '{"detail":"Not Found"}', errors.NotFoundError, "Not Found", None),
    (405, '{"detail":"Method Not Allowed"}', errors.MethodNotAllowedError, "Method Not Allowed", None),
    (403, "", errors.PermissionDeniedError, "(empty body)", None),
    (408, "timeout", errors.RequestTimeoutError, "timeout", None),
    (409, "{}", errors.ConflictError, "{}", None),
    (422, '{"detail":[{"loc":["body","x"]}]}', errors.UnprocessableEntityError, "loc", None),
    (429, '{"error":{"message":"slow down"}}', errors.RateLimitError, "slow down", None),
    (500, '<html><body>Internal Server Error</body></html>', errors.ServerError, "Internal Server Error", None),
    (502, "bad gateway", errors.ServerError, "bad gateway", None),
    (503, '{"error":{"message":"overloaded","type":"ServiceUnavailableError","code":503}}',
     errors.ServiceUnavailableError, "overloaded", None),
])
def test_error_shapes(status, body, cls, message, param):
    # the vLLM adapter reads its pre-0.10.1 shape and hands every other body to the generic parser
    err = VllmAdapter().parse_error(HttpResponse(status, {}, body.encode()))
    assert type(err) is cls and err.status_code == status
    assert message in err.message and err.param == param
    assert isinstance(err, errors.ApiError)
    assert isinstance(err, errors.TransientError) == (status in (408, 409, 429) or status >= 500)


def test_the_generic_parser_does_not_know_vllms_old_error_shape():
    old = '{"object":"error","message":"old style","type":"BadRequestError","param":"temperature"}'
    err = error_for_status(400, old, {})
    assert type(err) is errors.BadRequestError and err.param is None and err.error_type is None
    assert "old style" in err.message  # the body itself, not a message read from it


def test_retry_after_headers():
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert error_for_status(429, "", {"Retry-After": "1"}).retry_after == 1.0
    assert error_for_status(503, "", {"retry-after-ms": "250"}).retry_after == 0.25


def test_secrets_are_redacted_from_error_text():
    register_secret("sk-supersecret-42")
    err = error_for_status(400, '{"error":{"message":"bad key sk-supersecret-42"}}', {})
    assert "sk-supersecret-42" not in str(err) + repr(err) + err.body
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer ***"
    http = errors.HTTPStatusError("x", status_code=400, headers={"Authorization": "Bearer k", "X": "1"})
    assert "Authorization" not in http.headers


# ------------------------------------------------------------------ the error tree, as drawn
def _drawn_tree(text: str) -> Dict[str, Optional[str]]:
    """Each class named in a drawn tree (``├── Name`` / ``└── Name``) -> its parent there."""
    lines = text.split("\n")
    lines = lines[next(i for i, line in enumerate(lines) if line.strip() == "ApiError"):]
    indent = len(lines[0]) - len(lines[0].lstrip())
    parents: Dict[str, Optional[str]] = {"ApiError": None}
    path = ["ApiError"]
    for line in lines[1:]:
        m = re.match(r"^([ │]*)[├└]── (\w+)", line[indent:])
        if m is None:
            if line.strip() and not line.strip().startswith("│"):
                break  # past the tree
            continue
        depth = len(m.group(1)) // 4 + 1
        path = path[:depth] + [m.group(2)]
        parents[m.group(2)] = path[depth - 1]
    return parents


def test_the_error_tree_drawn_in_the_module_and_the_docs_is_the_class_tree() -> None:
    """Every error class appears once in the tree drawn in ``errors.py`` and in
    docs/errors.md, under one of its own bases (a second base is said in words)."""
    classes = {name: getattr(errors, name) for name in errors.__all__
               if isinstance(getattr(errors, name), type)
               and issubclass(getattr(errors, name), errors.ApiError)}
    page = (Path(__file__).resolve().parents[2] / "docs" / "errors.md").read_text()
    for drawn in (_drawn_tree(errors.__doc__ or ""), _drawn_tree(page)):
        assert set(drawn) == set(classes)
        for name, parent in drawn.items():
            if parent is not None:
                assert classes[parent] in classes[name].__bases__, (name, parent)
