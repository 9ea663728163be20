"""``--standard``: the client's API, checked against a server with real assertions.

Each check sends real requests through the backend's client (``BaseApiBackend`` around the
plugin's adapter) and asserts on what comes back: handler creation, request formatting,
response parsing, error handling, model metadata, inference, batch processing and the
client's own metrics. A counting transport proves that invalid input fails *before*
anything is sent and that a 404 is not retried.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Dict, List, Tuple

from ..api_backends.base import BaseApiBackend, build_request, default_transport
from ..api_backends.errors import NotFoundError, ResponseError, ValidationError
from ..api_backends.models import CompletionResult
from ..api_backends.transport import HttpResponse
from .checks import CheckFn, CheckRecorder
from .clients import SendCounter
from .config import prompts
from .context import SuiteContext, strings_in

__all__ = ["run_standard", "StandardChecks"]

#: sampling parameters of the checks: short and greedy, so any server answers fast
SHORT = {"max_tokens": 8, "temperature": 0.0}
#: keys that belong to the framework's call, never to the server's request body
FRAMEWORK_ONLY_KEYS = {"model_id", "inputs", "parameters", "endpoint_id"}
#: an id no server serves (the unknown-model check)
MISSING_MODEL = "iap-unified-runner-no-such-model"


def _expect(exc_type: type, fn: Callable[[], Any], what: str) -> Any:
    """Call ``fn``; return the ``exc_type`` it raised, or fail saying ``what`` was expected."""
    try:
        value = fn()
    except exc_type as exc:
        return exc
    raise AssertionError(f"{what}: expected {exc_type.__name__}, got a result "
                         f"({type(value).__name__})")


class StandardChecks:
    """The checks, bound to one client and the counter of what that client sent."""

    def __init__(self, ctx: SuiteContext, client: BaseApiBackend, counter: SendCounter) -> None:
        self.ctx = ctx
        self.client = client
        self.counter = counter
        self.adapter = ctx.adapter
        self.model = ctx.model

    def all(self) -> List[Tuple[str, CheckFn]]:
        return [
            ("handler_creation", self.handler_creation),
            ("request_formatting", self.request_formatting),
            ("response_parsing", self.response_parsing),
            ("error_handling", self.error_handling),
            ("model_metadata", self.model_metadata),
            ("inference", self.inference),
            ("batch_processing", self.batch_processing),
            ("client_metrics", self.client_metrics),
        ]

    # ------------------------------------------------------------------ checks
    def handler_creation(self, d: Dict[str, Any]) -> None:
        handler = self.client.create_endpoint_handler(self.model, dict(SHORT))
        assert callable(handler), "create_endpoint_handler did not return a callable"
        out = handler("Say hello.")
        assert isinstance(out, dict), f"the handler returned {type(out).__name__}, not a dict"
        assert "error" not in out, f"the handler returned an error: {out.get('error')}"
        assert isinstance(out.get("text"), str), "the handler's result has no 'text' string"
        tokens = out["usage"]["completion_tokens"]
        assert 0 < tokens <= SHORT["max_tokens"], f"completion_tokens {tokens} outside 1..8"
        # per-call parameters override the handler's defaults
        out = handler({"prompt": "Say hello.", "parameters": {"max_tokens": 3}})
        assert "error" not in out, f"the handler returned an error: {out.get('error')}"
        assert out["usage"]["completion_tokens"] <= 3, "a per-call max_tokens was ignored"
        # a typo in the defaults fails when the handler is made, not on first use
        _expect(ValidationError, lambda: self.client.create_endpoint_handler(
            self.model, {"max_tokenz": 8}), "an unknown handler parameter")
        self.ctx.sample(check="handler_creation", prompt="Say hello.", output=out["text"])
        d.update(completion_tokens=tokens, result_keys=sorted(out))

    def request_formatting(self, d: Dict[str, Any]) -> None:
        request = build_request("Format me.", self.model, dict(SHORT))
        http = self.adapter.format_request(request, request_id="iap-runner-format")
        assert http.method == "POST", f"method {http.method}, expected POST"
        assert http.path.startswith("/"), f"path {http.path!r} is not absolute"
        body = http.json
        assert isinstance(body, dict), "the request body is not a JSON object"
        assert http.encoded(), "the request body does not encode as JSON"
        nulls = sorted(k for k, v in body.items() if v is None)
        assert not nulls, f"null fields are sent: {nulls}"
        leaked = sorted(FRAMEWORK_ONLY_KEYS & set(body))
        assert not leaked, f"framework-only keys are sent to the server: {leaked}"
        assert body.get("model") == self.model, f"model {body.get('model')!r} in the body"
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        assert limit == SHORT["max_tokens"], f"max_tokens {limit!r} in the body, expected 8"
        assert body.get("temperature") == 0.0, "temperature 0 was not sent"
        assert "Format me." in strings_in(body), "the prompt text is not in the body"
        chat = build_request([{"role": "user", "content": "Hi there"}], self.model, dict(SHORT))
        chat_http = self.adapter.format_request(chat)
        messages = (chat_http.json or {}).get("messages")
        assert isinstance(messages, list) and messages, "a chat request has no messages"
        assert messages[-1].get("content") == "Hi there", "the chat message was altered"
        d.update(completion_path=http.path, chat_path=chat_http.path, body_keys=sorted(body))
        if self.adapter.supports_streaming:
            stream = build_request("Stream me.", self.model, {"max_tokens": 4}, stream=True)
            stream_http = self.adapter.format_request(stream)
            assert stream_http.stream, "a streaming request is not marked as a stream"
            assert (stream_http.json or {}).get("stream") is True, "stream: true is not sent"

    def response_parsing(self, d: Dict[str, Any]) -> None:
        request = build_request("Parse this.", self.model, dict(SHORT))
        http = self.adapter.format_request(request)
        transport = default_transport(self.client.settings)
        try:
            reply = transport.send(http, (self.ctx.timeout, self.ctx.timeout))
        finally:
            transport.close()
        assert reply.status == 200, f"the server answered {reply.status}: {reply.text()[:200]}"
        raw = json.loads(reply.body)
        result = self.adapter.parse_response(request, reply)
        assert isinstance(result, CompletionResult), f"parsed to {type(result).__name__}"
        assert result.choices, "no choices parsed"
        found = strings_in(raw)
        assert result.text in found, "the parsed text is not in the server's reply"
        if result.finish_reason is not None:
            assert result.finish_reason in found, "the parsed finish_reason is not in the reply"
        usage = raw.get("usage") if isinstance(raw, dict) else None
        if isinstance(usage, dict) and "completion_tokens" in usage:
            assert result.usage.completion_tokens == usage["completion_tokens"], (
                f"usage parsed as {result.usage.completion_tokens}, reply says "
                f"{usage['completion_tokens']}")
        # a reply that is not what it should be raises ResponseError, never returns junk
        for bad in (b"<html><body>Bad Gateway</body></html>", b"", b'{"unexpected": true}'):
            _expect(ResponseError, lambda bad=bad: self.adapter.parse_response(
                request, HttpResponse(200, {"content-type": "application/json"}, bad)),
                f"parsing {bad[:20]!r}")
        if self.adapter.supports_streaming:
            assert self.adapter.parse_stream_event(request, "[DONE]") is None, (
                "the end-of-stream marker was not recognised")
        d.update(finish_reason=result.finish_reason,
                 completion_tokens=result.usage.completion_tokens, reply_bytes=len(reply.body))

    def error_handling(self, d: Dict[str, Any]) -> None:
        before = self.counter.total
        exc = _expect(NotFoundError, lambda: self.client.run_inference(
            MISSING_MODEL, "Hi", {"max_tokens": 4}), "an unknown model")
        assert exc.status_code == 404, f"status {exc.status_code}, expected 404"
        sent = self.counter.total - before
        assert sent == 1, f"the 404 request was sent {sent} times (4xx must not be retried)"
        d["unknown_model"] = {"error": type(exc).__name__, "status_code": exc.status_code}

        for params, field in (({"temperature": -1.0}, "temperature"),
                              ({"max_tokenz": 8}, "max_tokenz"),
                              ({"max_tokens": 0}, "max_tokens")):
            before = self.counter.total
            err = _expect(ValidationError, lambda p=params: self.client.run_inference(
                self.model, "Hi", p), f"parameters {params}")
            assert field in (err.field or ""), f"the error names {err.field!r}, not {field!r}"
            assert self.counter.total == before, f"{params} reached the server before failing"
        before = self.counter.total
        _expect(ValidationError, lambda: self.client.run_inference(self.model, 12345),
                "a number as input")
        assert self.counter.total == before, "an invalid input reached the server"
        d["validated_before_sending"] = ["temperature", "unknown parameter", "max_tokens", "inputs"]

        record = self.ctx.model_record()
        limit = record.get("max_model_len") if record else None
        if isinstance(limit, int) and limit > 0:
            # the client read max_model_len from /v1/models: it refuses without sending
            self.client.list_models()
            before = self.counter.total
            err = _expect(ValidationError, lambda: self.client.run_inference(
                self.model, "Hi", {"max_tokens": limit + 1}), "max_tokens above max_model_len")
            assert str(limit) in str(err) and str(limit + 1) in str(err), str(err)
            assert self.counter.total == before, "a max_tokens above the context reached the server"
            d["context_checked_before_sending"] = {"max_model_len": limit, "field": err.field}

        handler = self.client.create_endpoint_handler(MISSING_MODEL, {"max_tokens": 4})
        out = handler("Hi")
        assert isinstance(out, dict) and out.get("error_type") == "NotFoundError", (
            f"the framework handler returned {out!r} for an unknown model")

    def model_metadata(self, d: Dict[str, Any]) -> None:
        models = self.client.list_models()
        assert isinstance(models, list) and models, "the server lists no models"
        ids = [m.get("id") for m in models]
        assert all(isinstance(i, str) and i for i in ids), f"a model without an id: {ids}"
        listed = self.model in ids
        record = next((m for m in models if m.get("id") == self.model), None)
        if record is not None and "max_model_len" in record:
            limit = record["max_model_len"]
            assert isinstance(limit, int) and limit > 0, f"max_model_len {limit!r}"
            d["max_model_len"] = limit
        if not listed:
            # served under an alias that /v1/models does not list: it must still answer
            result = self.client.run_inference(self.model, "Hi", {"max_tokens": 2})
            assert result.choices, f"model {self.model!r} is neither listed nor answering"
        d.update(models=ids, model=self.model, model_listed=listed)

    def inference(self, d: Dict[str, Any]) -> None:
        params = {"max_tokens": 16, "temperature": 0.0}
        result = self.client.run_inference(self.model, "What is machine learning?", params)
        tokens = result.usage.completion_tokens
        assert isinstance(result.text, str), "the result has no text"
        assert 1 <= tokens <= 16, f"completion_tokens {tokens} outside 1..16"
        assert result.finish_reason in ("length", "stop"), f"finish_reason {result.finish_reason!r}"
        if result.finish_reason == "length":
            assert tokens == 16, f"finish_reason 'length' after {tokens} of 16 tokens"
        text = self.client.generate_text("Tell me about Python.", self.model, **SHORT)
        assert isinstance(text, str), "generate_text did not return a string"
        chat = self.client.chat_completion([{"role": "user", "content": "Hello!"}], self.model,
                                           **SHORT)
        assert chat.usage.completion_tokens >= 1, "the chat reply has no tokens"
        for priority in (0, 2):
            r = self.client.run_inference(self.model, "Hi", {"max_tokens": 2}, priority=priority)
            assert r.choices, f"no result at priority {priority}"
        r = asyncio.run(self.client.arun_inference(self.model, "Hi", {"max_tokens": 2}))
        assert r.choices, "arun_inference returned no choices"
        self.ctx.sample(check="inference", prompt="What is machine learning?", output=result.text)
        d.update(completion_tokens=tokens, finish_reason=result.finish_reason,
                 chat_completion_tokens=chat.usage.completion_tokens)

    def batch_processing(self, d: Dict[str, Any]) -> None:
        batch = prompts(4, "batch-")
        if self.adapter.supports_prompt_list:
            before = self.counter.total
            result = self.client.run_inference(self.model, batch, dict(SHORT))
            sent = self.counter.total - before
            assert sent == 1, f"a list of 4 prompts took {sent} HTTP requests, expected 1"
            groups = result.texts_by_prompt()
            assert len(groups) == 4, f"{len(groups)} results for 4 prompts"
            tokens = result.usage.completion_tokens
            assert 4 <= tokens <= 32, f"completion_tokens {tokens} for 4 prompts x 8 tokens"
            d["mode"] = "prompt_list"
        else:
            before = self.counter.total
            _expect(ValidationError, lambda: self.client.run_inference(
                self.model, batch, dict(SHORT)), "a prompt list on a backend without one")
            assert self.counter.total == before, "an unsupported prompt list reached the server"
            d["mode"] = "concurrent_requests"
        handler = self.client.create_endpoint_handler(self.model, dict(SHORT))
        out = handler({"inputs": batch})
        assert isinstance(out, list), f"handler({{'inputs': [...]}}) returned {type(out).__name__}"
        assert len(out) == 4, f"{len(out)} results for 4 inputs"
        errors = [o.get("error") for o in out if "error" in o]
        assert not errors, f"batch items failed: {errors}"
        futures = [self.client.submit_inference(self.model, p, dict(SHORT)) for p in batch]
        results = [f.result(self.ctx.timeout * 2) for f in futures]
        assert all(r.choices for r in results), "a concurrently submitted request has no result"
        for p, o in zip(batch, out):
            self.ctx.sample(check="batch_processing", prompt=p, output=o["text"])
        d["handler_results"] = len(out)

    def client_metrics(self, d: Dict[str, Any]) -> None:
        metrics = self.client.get_metrics()
        requests, ok, failed = metrics["requests"], metrics["successes"], metrics["failures"]
        assert requests > 0, "the client counted no requests"
        assert requests == ok + failed, f"{requests} requests != {ok} ok + {failed} failed"
        assert metrics["failures_by_type"].get("NotFoundError", 0) >= 1, (
            "the unknown-model failures were not counted by type")
        usage = metrics["gen_ai.client.token.usage"]
        assert usage["output"] > 0, "no output tokens counted"
        duration = metrics["gen_ai.client.operation.duration"]
        assert duration["count"] == requests, "latency samples != requests"
        assert 0 < duration["min"] <= duration["p50"] <= duration["max"], "latency percentiles"
        d.update(requests=requests, successes=ok, failures=failed,
                 output_tokens=usage["output"], p50_seconds=duration["p50"])


def run_standard(ctx: SuiteContext) -> CheckRecorder:
    """Run every standard check against ``ctx.base_url``; the recorder holds the verdicts."""
    recorder = CheckRecorder(ctx.out)
    counter = SendCounter()
    with ctx.client(counter=counter) as client:
        for name, fn in StandardChecks(ctx, client, counter).all():
            recorder.run(name, fn)
    return recorder
