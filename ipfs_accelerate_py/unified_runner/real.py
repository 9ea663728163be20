"""``--real``: the live server at ``--api-url``: health, models, inference, streaming, batch.

These checks are about the *server* as much as the client: ``/health`` must answer 200
with an empty body, the model must be served, and generation must work plainly, as a
stream (including closing a stream early, which makes vLLM abort the request) and as a
batch.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

from ..api_backends.base import BaseApiBackend, build_request
from ..api_backends.errors import ValidationError
from .checks import CheckFn, CheckRecorder, SkipCheck
from .config import prompts
from .context import SuiteContext
from .probe import get

__all__ = ["run_real", "RealChecks"]


class RealChecks:
    """The live-server checks; ``health_status`` and ``models`` are kept for the result file."""

    def __init__(self, ctx: SuiteContext, client: BaseApiBackend) -> None:
        self.ctx = ctx
        self.client = client
        self.model = ctx.model
        self.health_status: Optional[int] = None
        self.models: List[str] = []
        self._plain_text: Optional[str] = None

    def all(self) -> List[Tuple[str, CheckFn]]:
        return [
            ("server_health", self.server_health),
            ("model_availability", self.model_availability),
            ("inference", self.inference),
            ("streaming", self.streaming),
            ("batch", self.batch),
        ]

    def server_health(self, d: Dict[str, Any]) -> None:
        path = self.ctx.adapter.health_request().path
        start = time.perf_counter()
        reply = get(self.ctx.base_url, path, self.ctx.timeout)
        self.health_status = reply.status
        d.update(path=path, status_code=reply.status, body_bytes=len(reply.body),
                 latency_seconds=time.perf_counter() - start)
        assert reply.status == 200, f"GET {path} answered {reply.status}"
        assert reply.body == b"", f"GET {path} answered with a body: {reply.body[:80]!r}"

    def model_availability(self, d: Dict[str, Any]) -> None:
        models = self.client.list_models()
        self.models = [str(m.get("id")) for m in models]
        d.update(models=self.models, model=self.model, model_listed=self.model in self.models)
        assert self.models, "the server lists no models"
        if self.model not in self.models:
            result = self.client.run_inference(self.model, "Hi", {"max_tokens": 2})
            assert result.choices, f"{self.model!r} is not listed and does not answer"
            d["served_as_alias"] = True

    def inference(self, d: Dict[str, Any]) -> None:
        params = {"max_tokens": 16, "temperature": 0.0}
        start = time.perf_counter()
        result = self.client.run_inference(self.model, "What is machine learning?", params)
        d["latency_seconds"] = time.perf_counter() - start
        tokens = result.usage.completion_tokens
        assert 1 <= tokens <= 16, f"completion_tokens {tokens} outside 1..16"
        assert result.finish_reason in ("length", "stop"), f"finish_reason {result.finish_reason!r}"
        self._plain_text = result.text
        chat = self.client.chat_completion([{"role": "user", "content": "Hello!"}], self.model,
                                           max_tokens=8, temperature=0.0)
        assert chat.usage.completion_tokens >= 1, "the chat reply has no tokens"
        self.ctx.sample(check="real.inference", prompt="What is machine learning?",
                        output=result.text)
        d.update(completion_tokens=tokens, finish_reason=result.finish_reason,
                 model_in_reply=result.model)

    def streaming(self, d: Dict[str, Any]) -> None:
        if not self.ctx.adapter.supports_streaming:
            raise SkipCheck(f"backend {self.ctx.backend!r} does not stream")
        request = build_request("What is machine learning?", self.model,
                                {"max_tokens": 16, "temperature": 0.0,
                                 "stream_options": {"include_usage": True}}, stream=True)
        start = time.perf_counter()
        first: Optional[float] = None
        pieces = 0
        with self.client.stream(request) as stream:
            for chunk in stream:
                if chunk.text:
                    pieces += 1
                    if first is None:
                        first = time.perf_counter() - start
            text, usage = stream.text, stream.usage
        assert pieces > 0 and text, "the stream carried no text"
        assert first is not None
        if usage is not None:
            assert usage.completion_tokens >= 1, "the stream's usage reports no tokens"
        d.update(chunks=pieces, time_to_first_token_seconds=first,
                 total_seconds=time.perf_counter() - start,
                 completion_tokens=usage.completion_tokens if usage else None,
                 matches_non_streamed=(text == self._plain_text) if self._plain_text else None)
        # closing a stream early must be clean, and the server must stay healthy
        early = build_request("Tell me a long story.", self.model, {"max_tokens": 200},
                              stream=True)
        with self.client.stream(early) as stream:
            next(iter(stream))
        reply = get(self.ctx.base_url, self.ctx.adapter.health_request().path, self.ctx.timeout)
        assert reply.status == 200, f"the server is unhealthy after an early close ({reply.status})"
        d["early_close_ok"] = True

    def batch(self, d: Dict[str, Any]) -> None:
        batch = prompts(3, "real-")
        params = {"max_tokens": 8, "temperature": 0.0}
        start = time.perf_counter()
        if self.ctx.adapter.supports_prompt_list:
            result = self.client.run_inference(self.model, batch, params)
            groups = result.texts_by_prompt()
            assert len(groups) == 3, f"{len(groups)} results for 3 prompts"
            d["mode"] = "prompt_list"
        else:
            try:
                self.client.run_inference(self.model, batch, params)
            except ValidationError:
                pass
            else:
                raise AssertionError("a prompt list was accepted by a backend without one")
            futures = [self.client.submit_inference(self.model, p, params) for p in batch]
            results = [f.result(self.ctx.timeout * 2) for f in futures]
            assert all(r.choices for r in results), "a batch item has no result"
            d["mode"] = "concurrent_requests"
        d["wall_time_seconds"] = time.perf_counter() - start


def run_real(ctx: SuiteContext) -> Tuple[CheckRecorder, RealChecks]:
    """Run the live-server checks against ``ctx.base_url``."""
    recorder = CheckRecorder(ctx.out)
    with ctx.client() as client:
        checks = RealChecks(ctx, client)
        for name, fn in checks.all():
            recorder.run(name, fn)
    return recorder, checks
