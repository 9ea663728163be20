"""Contract test: the vLLM test double answers like the real vLLM server, field by field.

Why: every client test that runs against :class:`FakeVllmServer` is only as good as the
double's likeness to the real server. Here the same requests go to both, and the replies are
compared: status, content type, and the JSON structure at every level (same keys in the same
order, same types). Values must be equal too, except where they are random or model output:
ids, ``created``, the fingerprint's hash, generated text, token ids and logprob numbers. For
SSE the framing (``data: <json>\\n\\n`` ... ``data: [DONE]\\n\\n``) and each kind of chunk
(role, content, final, usage) are compared; the real server may put several tokens in one
chunk, so chunk counts may differ.

Usage numbers: ``completion_tokens`` must be equal. ``prompt_tokens`` depends on the tokenizer
(the double counts GPT-2-style pre-tokens; the real tiny model's BPE splits words further), so
each server's ``prompt_tokens`` must equal what its own ``/tokenize`` says for the same prompt
or messages: the double must count the way vLLM counts, on whatever tokenizer it has.
Cases whose outcome hangs on the exact count (context overflow, clipping) use token-id prompts.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest

from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer
from support import REAL_SERVER_API_KEY as API_KEY

pytestmark = pytest.mark.real_server

_USER_HELLO = [{"role": "user", "content": "Hello"}]


@dataclass(frozen=True)
class Case:
    """One request to send to both servers; ``loose`` names dotted paths whose values may differ."""

    name: str
    method: str
    path: str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    loose: frozenset[str] = frozenset()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def _c(name: str, body: Any, path: str = "/v1/completions", **kw: Any) -> Case:
    return Case(name, "POST", path, body, **kw)


_STOP_LOOSE = frozenset({"usage.completion_tokens", "usage.total_tokens"})
_TOKENIZER_LOOSE = frozenset({"count"})

CASES = [
    # -- info routes
    Case("health", "GET", "/health"),
    Case("ping_get", "GET", "/ping"),
    Case("ping_post", "POST", "/ping"),
    Case("version", "GET", "/version"),
    Case("models", "GET", "/v1/models"),
    # -- completions
    _c("completion_single", {"model": "tiny-llama", "prompt": "Tell me a story", "max_tokens": 16, "temperature": 0}),
    _c("completion_prompt_list", {"model": "tiny-llama", "prompt": ["Tell me a story", "Hello", "word word word"],
                                  "max_tokens": 8, "temperature": 0}),
    _c("completion_n2_seed", {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 8, "n": 2, "temperature": 1.0,
                              "seed": 42}),
    _c("completion_token_ids", {"model": "tiny-llama", "prompt": [1, 20, 30, 40], "max_tokens": 4, "temperature": 0}),
    _c("completion_logprobs", {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 3, "temperature": 0, "logprobs": 2}),
    _c("completion_stop", {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 30, "temperature": 0, "stop": ["e"]},
       loose=_STOP_LOOSE),
    _c("completion_echo", {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 3, "temperature": 0, "echo": True}),
    _c("completion_echo_logprobs", {"prompt": [1, 20, 30], "max_tokens": 2, "temperature": 0, "echo": True,
                                    "logprobs": 1}),
    _c("completion_clipped_max_tokens", {"model": "tiny-llama", "prompt": [1, 20, 30], "max_tokens": 512,
                                         "temperature": 0}),
    _c("completion_model_omitted", {"prompt": "Hello", "max_tokens": 2, "temperature": 0}),
    _c("completion_alias", {"model": "meta-llama/Llama-2-7b-chat-hf", "prompt": "Hello", "max_tokens": 2, "temperature": 0}),
    _c("completion_priority_fcfs", {"prompt": "Hello", "max_tokens": 2, "temperature": 0, "priority": 5}),
    _c("completion_best_of_ignored", {"prompt": "Hello", "max_tokens": 2, "temperature": 0, "best_of": 2}),
    _c("completion_request_id", {"prompt": "Hello", "max_tokens": 2, "temperature": 0},
       headers={"X-Request-Id": "contract-1"}),
    _c("completion_return_token_ids", {"prompt": ["Hello", "Tell me a story"], "max_tokens": 3, "temperature": 0,
                                       "return_token_ids": True}),
    _c("completion_stream_return_token_ids", {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True,
                                              "return_token_ids": True}),
    _c("completion_stream", {"model": "tiny-llama", "prompt": "Tell me a story", "max_tokens": 6, "temperature": 0,
                             "stream": True}),
    _c("completion_stream_usage", {"model": "tiny-llama", "prompt": "Tell me a story", "max_tokens": 4, "temperature": 0,
                                   "stream": True, "stream_options": {"include_usage": True}}),
    _c("completion_stream_n2", {"prompt": "Hello", "max_tokens": 2, "temperature": 1, "seed": 3, "n": 2, "stream": True}),
    # -- chat
    _c("chat", {"model": "tiny-llama", "messages": [{"role": "system", "content": "Hello"}, *_USER_HELLO],
                "max_tokens": 5, "temperature": 0}, "/v1/chat/completions"),
    _c("chat_max_completion_tokens", {"messages": _USER_HELLO, "max_completion_tokens": 3, "temperature": 0},
       "/v1/chat/completions"),
    _c("chat_logprobs", {"messages": _USER_HELLO, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2},
       "/v1/chat/completions"),
    _c("chat_stop", {"messages": _USER_HELLO, "max_tokens": 30, "temperature": 0, "stop": ["a"]},
       "/v1/chat/completions", loose=_STOP_LOOSE),
    _c("chat_stream_usage", {"model": "tiny-llama", "messages": _USER_HELLO, "max_tokens": 5, "temperature": 0,
                             "stream": True, "stream_options": {"include_usage": True}}, "/v1/chat/completions"),
    _c("chat_stream_n2", {"messages": _USER_HELLO, "max_tokens": 2, "temperature": 1, "seed": 3, "n": 2, "stream": True},
       "/v1/chat/completions"),
    _c("chat_return_token_ids", {"messages": _USER_HELLO, "max_tokens": 3, "temperature": 0, "return_token_ids": True},
       "/v1/chat/completions"),
    _c("chat_stream_return_token_ids", {"messages": _USER_HELLO, "max_tokens": 3, "temperature": 0, "stream": True,
                                        "return_token_ids": True}, "/v1/chat/completions"),
    _c("chat_request_id", {"messages": _USER_HELLO, "max_tokens": 2}, "/v1/chat/completions",
       headers={"X-Request-Id": "contract-2"}),
    _c("chat_batch", {"model": "tiny-llama", "messages": [_USER_HELLO, [{"role": "user", "content": "Tell me a story"}]],
                      "max_tokens": 3, "temperature": 0}, "/v1/chat/completions/batch"),
    # -- tokenizer routes
    _c("tokenize_prompt", {"model": "tiny-llama", "prompt": "Tell me a story"}, "/tokenize", loose=_TOKENIZER_LOOSE),
    _c("tokenize_prompt_strs", {"prompt": "Hello world", "return_token_strs": True}, "/tokenize", loose=_TOKENIZER_LOOSE),
    _c("tokenize_messages", {"model": "tiny-llama", "messages": _USER_HELLO, "add_generation_prompt": True}, "/tokenize",
       loose=_TOKENIZER_LOOSE),
    _c("detokenize", {"model": "tiny-llama", "tokens": [1, 300, 301, 302]}, "/detokenize"),
    # -- errors
    _c("err_unknown_model", {"model": "no-such-model", "prompt": "Hi", "max_tokens": 4}),
    _c("err_unknown_model_chat", {"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]},
       "/v1/chat/completions"),
    _c("err_max_tokens_too_big", {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 100000}),
    _c("err_max_tokens_too_big_stream", {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 100000, "stream": True}),
    _c("err_max_tokens_too_big_chat", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100000},
       "/v1/chat/completions"),
    _c("err_max_tokens_negative", {"model": "tiny-llama", "prompt": "Hi", "max_tokens": -3}),
    _c("err_no_room_for_output", {"prompt": [5] * 512, "max_tokens": 4}),
    _c("err_prompt_too_long_ids_513", {"prompt": [5] * 513, "max_tokens": 4}),
    _c("err_prompt_too_long_ids_600", {"prompt": [5] * 600, "max_tokens": 4}),
    _c("err_temperature_negative", {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 4, "temperature": -1}),
    _c("err_n_zero", {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 4, "n": 0}),
    _c("err_greedy_n2", {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "n": 2},
       "/v1/chat/completions"),
    _c("err_logprobs_100", {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 4, "logprobs": 100}),
    _c("err_top_logprobs_30", {"messages": _USER_HELLO, "max_tokens": 2, "logprobs": True, "top_logprobs": 30},
       "/v1/chat/completions"),
    _c("err_top_logprobs_without_logprobs", {"messages": _USER_HELLO, "max_tokens": 2, "top_logprobs": 3},
       "/v1/chat/completions"),
    _c("err_missing_prompt", {"model": "tiny-llama", "max_tokens": 4}),
    _c("err_empty_prompt_list", {"prompt": [], "max_tokens": 2}),
    _c("err_prompt_too_long", {"model": "tiny-llama", "prompt": "word " * 600, "max_tokens": 4}),
    _c("err_bad_json", b'{"model":"tiny-llama","prompt":"Hi", "max_tokens": 4,'),
    _c("err_empty_body", b""),
    _c("err_body_not_object", b"[]"),
    _c("err_temperature_not_number", {"prompt": "Hi", "max_tokens": 2, "temperature": "abc"}),
    _c("err_max_tokens_fraction", {"prompt": "Hi", "max_tokens": 2.5}),
    _c("err_prompt_wrong_type", {"prompt": 5}),
    _c("err_messages_not_list", {"model": "tiny-llama", "messages": "not a list"}, "/v1/chat/completions"),
    _c("err_messages_missing", {"model": "tiny-llama"}, "/v1/chat/completions"),
    _c("err_message_not_object", {"messages": ["hi"]}, "/v1/chat/completions"),
    _c("err_message_without_role", {"messages": [{"content": "hi"}]}, "/v1/chat/completions"),
    _c("err_messages_empty", {"messages": [], "max_tokens": 2}, "/v1/chat/completions"),
    _c("err_batch_n2", {"messages": [_USER_HELLO], "max_tokens": 2, "n": 2}, "/v1/chat/completions/batch"),
    _c("err_truncate_prompt_tokens_zero", {"prompt": "Hi", "max_tokens": 2, "truncate_prompt_tokens": 0}),
    _c("err_truncate_prompt_tokens_zero_chat", {"messages": _USER_HELLO, "max_tokens": 2, "truncate_prompt_tokens": "0"},
       "/v1/chat/completions"),
    # vLLM reaches this check inside the stream's generator: a 200 whose one event is the error
    _c("err_truncate_prompt_tokens_zero_stream", {"prompt": ["Hi", "Hello"], "max_tokens": 2, "stream": True,
                                                  "truncate_prompt_tokens": 0}),
    _c("err_truncate_prompt_tokens_zero_stream_chat", {"messages": _USER_HELLO, "max_tokens": 2, "stream": True,
                                                       "truncate_prompt_tokens": 0}, "/v1/chat/completions"),
    _c("err_truncate_prompt_tokens_not_int", {"prompt": "Hi", "max_tokens": 2, "truncate_prompt_tokens": "abc"}),
    _c("err_tokenize_empty", {}, "/tokenize"),
    _c("err_detokenize_not_list", {"tokens": "x"}, "/detokenize"),
    Case("err_unknown_route", "GET", "/v1/no-such-endpoint"),
    Case("err_wrong_method", "GET", "/v1/completions"),
    Case("err_wrong_method_health", "POST", "/health"),
    Case("err_head_health", "HEAD", "/health"),
    Case("redirect_trailing_slash", "GET", "/v1/models/"),
]

AUTH_CASES = [
    Case("auth_missing_models", "GET", "/v1/models"),
    Case("auth_wrong_key_models", "GET", "/v1/models", headers={"Authorization": "Bearer wrong"}),
    Case("auth_not_bearer", "GET", "/v1/models", headers={"Authorization": API_KEY}),
    Case("auth_missing_completions", "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
    Case("auth_missing_unknown_v1_route", "GET", "/v1/no-such-endpoint"),
    Case("auth_ok_models", "GET", "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}),
    Case("auth_ok_completion", "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "temperature": 0},
         headers={"Authorization": f"Bearer {API_KEY}"}),
    Case("auth_open_health", "GET", "/health"),
    Case("auth_open_version", "GET", "/version"),
    Case("auth_open_tokenize", "POST", "/tokenize", {"prompt": "Hello"}, loose=_TOKENIZER_LOOSE),
]


# --------------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------------


def exchange(base_url: str, case: Case, timeout: float = 60.0) -> Reply:
    """Send ``case`` on a fresh connection; bytes bodies go out verbatim."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    body = case.body if isinstance(case.body, bytes) or case.body is None else json.dumps(case.body).encode()
    headers = dict(case.headers)
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
    try:
        conn.request(case.method, case.path, body=body, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------

#: Keys whose values are model output or random: only the type must match.
_FREE_STRINGS = frozenset({"text", "content", "root", "prompt", "token"})
#: Subtrees that hold model output: structure and types must match, values may not.
_FREE_TREES = frozenset({"logprobs", "top_logprobs", "token_logprobs", "text_offset"})
#: Keys whose values are model or tokenizer output of any length: only the type must match
#: (token id lists are checked against the usage numbers instead, in ``check_usage``).
_FREE_ANY = frozenset({"bytes", "tokens", "token_strs", "token_ids", "prompt_token_ids"})


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "int" if isinstance(value, int) else "float"
    return type(value).__name__


def compare_json(real: Any, fake: Any, path: str = "", loose: frozenset[str] = frozenset(),
                 free: bool = False, request_id: str | None = None) -> list[str]:
    """Differences between two JSON values, as readable lines (empty when they match)."""
    where = path or "$"
    key = path.rsplit(".", 1)[-1]
    if key in _FREE_TREES:
        free = True
    if _kind(real) != _kind(fake) and not (free and {_kind(real), _kind(fake)} <= {"int", "float"}):
        return [f"{where}: type {_kind(real)} (real) != {_kind(fake)} (fake): {real!r} vs {fake!r}"]
    if key in _FREE_ANY:
        return []
    if isinstance(real, dict):
        parts = path.split(".")
        if key.isdigit() and (parts[-3:-1] == ["logprobs", "top_logprobs"] or parts[-2] == "prompt_logprobs"):
            # these map token text (or id) -> score: the keys are model output
            if len(real) != len(fake):
                return [f"{where}: {len(real)} entries (real) != {len(fake)} (fake)"]
            return [d for r, f in zip(real.values(), fake.values()) for d in compare_json(r, f, path + ".*", loose, True)]
        if list(real) != list(fake):
            return [f"{where}: keys {list(real)} (real) != {list(fake)} (fake)"]
        return [d for k in real for d in compare_json(real[k], fake[k], f"{path}.{k}" if path else k, loose, free, request_id)]
    if isinstance(real, list):
        if len(real) != len(fake):
            return [f"{where}: length {len(real)} (real) != {len(fake)} (fake)"]
        return [d for i, (r, f) in enumerate(zip(real, fake)) for d in compare_json(r, f, f"{path}.{i}", loose, free, request_id)]
    if free or key in _FREE_STRINGS or path in loose or key == "created":
        return []
    if key == "id":
        if request_id is not None and real.endswith(request_id):
            return [] if fake == real else [f"{where}: {fake!r} should be {real!r}"]
        prefix = real.rsplit("-", 1)[0]
        return [] if fake.rsplit("-", 1)[0] == prefix else [f"{where}: id prefix of {fake!r} != {real!r}"]
    if key == "system_fingerprint":
        return [] if fake.rsplit("-", 1)[0] == real.rsplit("-", 1)[0] else [f"{where}: {fake!r} vs {real!r}"]
    return [] if real == fake else [f"{where}: {real!r} (real) != {fake!r} (fake)"]


def sse_events(body: bytes) -> list[Any]:
    """Events of an SSE body, after checking vLLM's exact framing."""
    text = body.decode("utf-8")
    assert "\r" not in text, "SSE must not contain \\r"
    assert re.fullmatch(r"(data: [^\n]+\n\n)+", text), f"bad SSE framing: {text[:200]!r}"
    return [e if e == "[DONE]" else json.loads(e) for e in (b[len("data: "):] for b in text.split("\n\n") if b)]


def _chunk_kind(chunk: dict[str, Any]) -> str:
    if not chunk["choices"]:
        return "usage"
    choice = chunk["choices"][0]
    if "role" in choice.get("delta", {}):
        return "role"
    return "final" if choice["finish_reason"] is not None else "content"


def compare_stream(real: bytes, fake: bytes, loose: frozenset[str], request_id: str | None) -> list[str]:
    real_events, fake_events = sse_events(real), sse_events(fake)
    if any(isinstance(e, dict) and "error" in e for e in real_events):  # nothing random in an error stream
        return [] if real == fake else [f"error stream {real[:300]!r} (real) != {fake[:300]!r} (fake)"]
    diffs = []
    if real_events[-1] != "[DONE]" or fake_events[-1] != "[DONE]":
        diffs.append("stream must end with data: [DONE]")
    real_chunks = [e for e in real_events if e != "[DONE]"]
    fake_chunks = [e for e in fake_events if e != "[DONE]"]
    # A completion choice's first chunk carries prompt_token_ids (echo, return_token_ids). Which
    # chunk kind that is depends on how the real server grouped tokens, so check it here and
    # blank it out for the per-kind comparison.
    firsts = []
    for chunks in (real_chunks, fake_chunks):
        seen: dict[int, str] = {}
        for c in chunks:
            if c["choices"] and "text" in c["choices"][0]:
                seen.setdefault(c["choices"][0]["index"], _kind(c["choices"][0]["prompt_token_ids"]))
                c["choices"][0]["prompt_token_ids"] = None
        firsts.append(seen)
    if firsts[0] != firsts[1]:
        diffs.append(f"prompt_token_ids in each choice's first chunk: {firsts[0]} (real) != {firsts[1]} (fake)")
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for c in real_chunks:
        by_kind.setdefault(_chunk_kind(c), []).append(c)
    fake_kinds: dict[str, list[dict[str, Any]]] = {}
    for c in fake_chunks:
        fake_kinds.setdefault(_chunk_kind(c), []).append(c)
    # Under load the real server may put every token into the final chunk, so "content"
    # chunks are optional on the real side; the double always sends one token per chunk.
    if set(by_kind) - {"content"} != set(fake_kinds) - {"content"} or ("content" in by_kind) > ("content" in fake_kinds):
        return diffs + [f"chunk kinds {sorted(by_kind)} (real) != {sorted(fake_kinds)} (fake)"]
    for kind in ("role", "final", "usage"):  # one per choice (role, final) or per stream (usage)
        if kind in by_kind:
            real_idx = sorted(c["choices"][0]["index"] for c in by_kind[kind]) if kind != "usage" else [len(by_kind[kind])]
            fake_idx = sorted(c["choices"][0]["index"] for c in fake_kinds[kind]) if kind != "usage" else [len(fake_kinds[kind])]
            if real_idx != fake_idx:
                diffs.append(f"{kind} chunks: {real_idx} (real) != {fake_idx} (fake)")
    for kind, chunks in fake_kinds.items():
        if kind not in by_kind:
            continue
        # content chunks compare by shape only: the real server may group tokens differently
        reference = {c["choices"][0]["index"] if c["choices"] else 0: c for c in by_kind[kind]}
        for chunk in chunks:
            idx = chunk["choices"][0]["index"] if chunk["choices"] else 0
            ref, ref_loose = reference.get(idx), loose
            if ref is None:  # the real server coalesced this choice's tokens: borrow another's shape
                ref, ref_loose = by_kind[kind][0], loose | {"choices.0.index"}
            diffs += [f"{kind} chunk: {d}" for d in compare_json(ref, chunk, "", ref_loose, request_id=request_id)]
    return diffs


def _tokenize_count(base_url: str, body: dict[str, Any], headers: dict[str, str]) -> int:
    reply = exchange(base_url, Case("tokenize", "POST", "/tokenize", body, headers=headers))
    assert reply.status == 200, reply.body
    return int(json.loads(reply.body)["count"])


def expected_prompt_tokens(base_url: str, case: Case) -> int | None:
    """What ``usage.prompt_tokens`` must be on this server, from its own ``/tokenize``.

    ``None`` where the count does not depend on the tokenizer (token-id prompts) or the case
    has no usage.
    """
    body = case.body
    if not isinstance(body, dict):
        return None
    headers = {k: v for k, v in case.headers.items() if k.lower() == "authorization"}
    if case.path == "/v1/completions":
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts or not all(isinstance(p, str) for p in prompts):
            return None
        return sum(_tokenize_count(base_url, {"prompt": p}, headers) for p in prompts)
    if case.path == "/v1/chat/completions" and isinstance(body.get("messages"), list):
        return _tokenize_count(base_url, {"messages": body["messages"]}, headers)
    if case.path == "/v1/chat/completions/batch" and isinstance(body.get("messages"), list):
        return sum(_tokenize_count(base_url, {"messages": conv}, headers) for conv in body["messages"])
    return None


def usage_of(reply: Reply) -> dict[str, Any] | None:
    """The usage object of a JSON reply or of an SSE stream's usage chunk."""
    if reply.status != 200:
        return None
    if (reply.headers.get("content-type") or "").startswith("text/event-stream"):
        chunks = [e for e in sse_events(reply.body) if e != "[DONE]" and not e.get("choices") and "usage" in e]
        return chunks[-1]["usage"] if chunks else None
    if reply.headers.get("content-type") == "application/json":
        body = json.loads(reply.body)
        return body.get("usage") if isinstance(body, dict) else None
    return None


_TOKENIZER_DEPENDENT = frozenset({"usage.prompt_tokens", "usage.total_tokens"})


def check_usage(real: Reply, fake: Reply, real_expected: int | None, fake_expected: int | None, case: Case) -> None:
    """Each side's prompt_tokens agrees with its own tokenizer; totals add up on both sides."""
    for side, reply, expected in (("real", real, real_expected), ("fake", fake, fake_expected)):
        usage = usage_of(reply)
        if usage is None or expected is None:
            continue
        assert usage["prompt_tokens"] == expected, f"{case.name}: {side} prompt_tokens {usage['prompt_tokens']} != {expected}"
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], f"{case.name}: {side}"
        if reply.headers.get("content-type") != "application/json":
            continue
        body = json.loads(reply.body)
        choices = body.get("choices", [])
        if choices and all(isinstance(c.get("token_ids"), list) for c in choices):  # return_token_ids
            assert sum(len(c["token_ids"]) for c in choices) == usage["completion_tokens"], f"{case.name}: {side}"
            prompt_ids = ([c["prompt_token_ids"] for c in choices] if "prompt_token_ids" in choices[0]
                          else [body["prompt_token_ids"]])
            assert sum(len(ids) for ids in prompt_ids) == usage["prompt_tokens"], f"{case.name}: {side}"


def assert_same_reply(real: Reply, fake: Reply, case: Case) -> None:
    where = f"{case.name}: {case.method} {case.path}"
    assert fake.status == real.status, f"{where}: status {fake.status}, real {real.status}: {real.body[:300]!r}"
    for header in ("content-type", "transfer-encoding", "allow"):
        assert fake.headers.get(header) == real.headers.get(header), f"{where}: {header} differs"
    assert ("content-length" in fake.headers) == ("content-length" in real.headers), where
    if "location" in real.headers:  # same target path; the host:port differs by construction
        assert urlsplit(fake.headers.get("location", ""))[2:] == urlsplit(real.headers["location"])[2:], where
    request_id = case.headers.get("X-Request-Id")
    content_type = real.headers.get("content-type") or ""
    if case.method == "HEAD":
        diffs = [] if real.body == fake.body == b"" else ["HEAD replies must have no body"]
    elif content_type.startswith("text/event-stream"):
        diffs = compare_stream(real.body, fake.body, case.loose, request_id)
    elif content_type == "application/json":
        diffs = compare_json(json.loads(real.body), json.loads(fake.body), "", case.loose, request_id=request_id)
    else:
        diffs = [] if real.body == fake.body else [f"body {real.body[:200]!r} (real) != {fake.body[:200]!r} (fake)"]
    assert not diffs, f"{where}:\n  " + "\n  ".join(diffs)


# --------------------------------------------------------------------------------------------
# Tests (the mirrored doubles are fixtures in conftest.py)
# --------------------------------------------------------------------------------------------


def compare_servers(real_url: str, fake_url: str, case: Case) -> None:
    real, fake = exchange(real_url, case), exchange(fake_url, case)
    real_expected = expected_prompt_tokens(real_url, case) if real.status == 200 else None
    fake_expected = expected_prompt_tokens(fake_url, case) if fake.status == 200 else None
    if real_expected is not None or fake_expected is not None:
        check_usage(real, fake, real_expected, fake_expected, case)
        case = dataclasses.replace(case, loose=case.loose | _TOKENIZER_DEPENDENT)
    assert_same_reply(real, fake, case)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fake_matches_real(case: Case, real_vllm_server: Any, mirrored_fake: FakeVllmServer) -> None:
    compare_servers(real_vllm_server.base_url, mirrored_fake.base_url, case)


@pytest.mark.parametrize("case", AUTH_CASES, ids=[c.name for c in AUTH_CASES])
def test_fake_matches_real_with_api_key(case: Case, real_vllm_server_with_key: Any,
                                        mirrored_fake_with_key: FakeVllmServer) -> None:
    compare_servers(real_vllm_server_with_key.base_url, mirrored_fake_with_key.base_url, case)


def test_fake_metrics_are_a_subset_of_real(real_vllm_server: Any, mirrored_fake: FakeVllmServer) -> None:
    """Every series the double exports exists on the real server, with the same type and labels."""
    case = Case("metrics", "GET", "/metrics")
    real, fake = exchange(real_vllm_server.base_url, case), exchange(mirrored_fake.base_url, case)
    assert (real.status, fake.status) == (200, 200)
    assert fake.headers["content-type"] == real.headers["content-type"]
    real_text, fake_text = real.body.decode(), fake.body.decode()
    fake_types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", fake_text, re.M))
    real_types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", real_text, re.M))
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        assert name in fake_types, name
    for name, kind in fake_types.items():
        assert real_types.get(name) == kind, f"{name}: {kind} (fake) vs {real_types.get(name)} (real)"
    sample = re.compile(r"^(vllm:[^{\s]+)\{([^}]*)\} \S+$", re.M)
    real_series = {(n, re.sub(r'="[^"]*"', "", labels)) for n, labels in sample.findall(real_text)}
    for n, labels in sample.findall(fake_text):
        assert (n, re.sub(r'="[^"]*"', "", labels)) in real_series, f"{n}{{{labels}}} has no real counterpart"
    for series in re.findall(r"^(vllm:\S+_bucket\{[^}]*\})", fake_text, re.M):
        assert series in real_text, f"bucket {series} differs from the real server's"
