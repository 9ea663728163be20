"""The clients under test, each driven the same way for each workload.

W1 throughput: ``n`` prompts, ``concurrency`` callers (threads, or tasks for aiohttp), one
completion per prompt; the bare prompt-list rows send the same prompts as lists instead.
W2 latency: ``n`` sequential single requests from one caller.
W3 client CPU: ``n`` requests at ``concurrency`` against a no-op server; CPU seconds of
this process (every thread) divided by ``n``.

Every contender is built once and reused across rounds (pools stay warm, as in a
long-lived program); each run checks the replies, so a fast wrong answer cannot win.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence

import requests

try:  # optional peers (the ``bench`` extra)
    import openai
except ImportError:  # pragma: no cover
    openai = None  # type: ignore[assignment]
try:
    import aiohttp
except ImportError:  # pragma: no cover
    aiohttp = None  # type: ignore[assignment]

from ipfs_accelerate_py.api_backends import VllmClient
from ipfs_accelerate_py.api_backends import transport as transport_mod

TIMEOUT = 60.0


class Callers:
    """``n`` persistent caller threads; ``run(fn, items)`` calls ``fn`` on every item."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._pool = ThreadPoolExecutor(n, thread_name_prefix=f"bench-caller{n}")

    def run(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> List[Any]:
        out: List[Any] = [None] * len(items)
        work = iter(enumerate(items))  # next() on it is atomic under the GIL

        def loop() -> None:
            for i, item in work:
                out[i] = fn(item)

        for f in [self._pool.submit(loop) for _ in range(self.n)]:
            f.result()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Contender:
    """One client. ``one(prompt)`` -> completion tokens; ``w1``/``w2``/``w3`` drive it."""

    name = ""
    note = ""

    def __init__(self, url: str, model: str, params: Dict[str, Any], chat: bool = False) -> None:
        self.url = url
        self.model = model
        self.params = params
        #: W4: each prompt goes out as a one-message chat conversation
        self.chat = chat
        #: completion tokens each reply must report (None against the no-op server, whose
        #: fixed reply is not an answer to a prompt list)
        self.expect: Optional[int] = params.get("max_tokens")
        self.info: Dict[str, Any] = {}

    def one(self, prompt: str) -> int:
        raise NotImplementedError

    def body(self, prompt: str) -> Dict[str, Any]:
        """The JSON body for one prompt: a completion, or (``chat``) a chat request."""
        if self.chat:
            return {"model": self.model, "messages": conversation(prompt), **self.params}
        return {"model": self.model, "prompt": prompt, **self.params}

    def throughput(self, callers: Callers, prompts: Sequence[str]) -> Dict[str, Any]:
        t0 = time.perf_counter()
        toks = callers.run(self.one, prompts)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "tokens": sum(toks), "prompts": len(prompts)}

    def latencies(self, prompts: Sequence[str]) -> List[float]:
        out = []
        for p in prompts:
            t0 = time.perf_counter()
            self.one(p)
            out.append(time.perf_counter() - t0)
        return out

    def cpu(self, callers: Callers, prompts: Sequence[str]) -> Dict[str, Any]:
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        callers.run(self.one, prompts)
        return {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0}

    def reset(self) -> None:
        """Called before each timed run (e.g. clears the project's metrics)."""

    def close(self) -> None:
        pass


def conversation(prompt: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _check(tokens: Any, expect: Optional[int]) -> int:
    if expect is not None and tokens != expect:
        raise AssertionError(f"expected {expect} completion tokens, got {tokens!r}")
    return tokens


# --------------------------------------------------------------------------- raw requests
class RawRequests(Contender):
    name = "requests"
    note = "requests.Session per thread, defaults (trust_env on)"
    trust_env = True

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self._local = threading.local()
        self._sessions: List[requests.Session] = []
        self._endpoint = self.url + ("/v1/chat/completions" if self.chat else "/v1/completions")

    def _session(self) -> requests.Session:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = requests.Session()
            s.trust_env = self.trust_env
            self._sessions.append(s)
        return s

    def one(self, prompt: str) -> int:
        r = self._session().post(self._endpoint, json=self.body(prompt), timeout=TIMEOUT)
        r.raise_for_status()
        return _check(r.json()["usage"]["completion_tokens"], self.expect)

    def close(self) -> None:
        for s in self._sessions:
            s.close()


class RawRequestsNoEnv(RawRequests):
    name = "requests (trust_env off)"
    note = "requests.Session per thread, Session.trust_env = False"
    trust_env = False


# --------------------------------------------------------------------------- openai SDK
class OpenAISDK(Contender):
    name = "openai SDK"
    note = "one OpenAI client shared by the threads, SDK defaults"

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self._client = openai.OpenAI(base_url=self.url + "/v1", api_key="EMPTY", timeout=TIMEOUT)
        extra = {k: v for k, v in self.params.items() if k not in ("max_tokens", "temperature")}
        self._kw = {"max_tokens": self.params["max_tokens"],
                    "temperature": self.params.get("temperature"), "extra_body": extra}

    def one(self, prompt: str) -> int:
        if self.chat:
            r = self._client.chat.completions.create(model=self.model,
                                                     messages=conversation(prompt),  # type: ignore[arg-type]
                                                     **self._kw)
        else:
            r = self._client.completions.create(model=self.model, prompt=prompt, **self._kw)
        return _check(r.usage.completion_tokens, self.expect)

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------------- one event loop
async def on_tasks(one: Callable[[str], Any], prompts: Sequence[str], concurrency: int) -> List[int]:
    """``concurrency`` tasks on the running loop, each awaiting ``one(prompt)`` in turn."""
    out: List[int] = [0] * len(prompts)
    work = iter(enumerate(prompts))

    async def worker() -> None:
        for i, p in work:
            out[i] = await one(p)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def loop_cpu(loop: asyncio.AbstractEventLoop, run: Any) -> Dict[str, Any]:
    """CPU seconds (every thread of this process) and wall seconds of running ``run``."""
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    loop.run_until_complete(run)
    return {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- aiohttp
class AioHttp(Contender):
    name = "aiohttp"
    note = "one ClientSession, N tasks on one event loop"

    def __init__(self, url: str, model: str, params: Dict[str, Any], concurrency: int) -> None:
        super().__init__(url, model, params)
        self._loop = asyncio.new_event_loop()
        self._endpoint = self.url + "/v1/completions"

        async def make() -> Any:
            # keep-alive below uvicorn's 5 s, so that a pool idle between rounds is not
            # reused after the server closed it (aiohttp would fail the request)
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                limit=max(concurrency, 1), keepalive_timeout=4.0))
        self._session = self._loop.run_until_complete(make())

    async def _one(self, prompt: str) -> int:
        async with self._session.post(self._endpoint, json={"model": self.model, "prompt": prompt,
                                                            **self.params}) as r:
            r.raise_for_status()
            data = await r.json()
        return _check(data["usage"]["completion_tokens"], self.expect)

    async def _many(self, prompts: Sequence[str], concurrency: int) -> List[int]:
        return await on_tasks(self._one, prompts, concurrency)

    def throughput(self, callers: Callers, prompts: Sequence[str]) -> Dict[str, Any]:
        t0 = time.perf_counter()
        toks = self._loop.run_until_complete(self._many(prompts, callers.n))
        return {"wall_s": time.perf_counter() - t0, "tokens": sum(toks), "prompts": len(prompts)}

    def latencies(self, prompts: Sequence[str]) -> List[float]:
        async def go() -> List[float]:
            out = []
            for p in prompts:
                t0 = time.perf_counter()
                await self._one(p)
                out.append(time.perf_counter() - t0)
            return out
        return self._loop.run_until_complete(go())

    def cpu(self, callers: Callers, prompts: Sequence[str]) -> Dict[str, Any]:
        return loop_cpu(self._loop, self._many(prompts, callers.n))

    def one(self, prompt: str) -> int:  # not used: the loop is driven directly
        return self._loop.run_until_complete(self._one(prompt))

    def close(self) -> None:
        self._loop.run_until_complete(self._session.close())
        self._loop.run_until_complete(asyncio.sleep(0.01))  # let the connector close sockets
        self._loop.close()


# --------------------------------------------------------------------------- the project
TRANSPORTS = {
    "default": None,  # whatever the project uses by default (aiohttp: AioTransport)
    "requests": "RequestsTransport",  # a sync transport given through transport_factory
}


def transport_factory(kind: str) -> Optional[Callable[[Any], Any]]:
    cls_name = TRANSPORTS[kind]
    if cls_name is None:
        return None
    cls = getattr(transport_mod, cls_name)

    def factory(settings: Any) -> Any:
        verify = settings.ca_bundle or settings.verify_tls
        return cls(settings.base_url, settings.api_key_value,
                   pool_size=max(settings.max_concurrent_requests, 10), verify=verify,
                   trust_env=settings.trust_env, proxies=settings.proxies,
                   extra_headers=settings.extra_headers)
    return factory


class Project(Contender):
    """``VllmClient``: queue, breaker, retry, metrics all on; batching as named."""

    name = "project"

    def __init__(self, url: str, model: str, params: Dict[str, Any], *, batching: bool,
                 transport: str = "default", label: str = "", chat: bool = False,
                 **settings: Any) -> None:
        super().__init__(url, model, params, chat)
        self.name = label or f"project (batching {'on' if batching else 'off'})"
        kw: Dict[str, Any] = dict(settings)
        tf = transport_factory(transport)
        if tf is not None:
            kw["transport_factory"] = tf
        self.client = VllmClient(base_url=url, model=model, batch_enabled=batching, **kw)
        s = self.client.settings
        assert s.queue_enabled and s.circuit_breaker_enabled and s.max_retries > 0 and s.metrics_enabled
        ep = self.client._endpoint(None)  # for the report: what moves the bytes
        moved_by = getattr(ep.transport, "transport", ep.transport)  # a given one, adapted
        self.info = {"transport": type(moved_by).__name__, "batch_enabled": s.batch_enabled,
                     "max_batch_size": s.max_batch_size, "batch_linger": s.batch_linger,
                     "batch_timeout": s.batch_timeout, "batch_chat": s.batch_chat,
                     "max_concurrent_requests": s.max_concurrent_requests}
        self.note = ", ".join(f"{k}={v}" for k, v in self.info.items())

    def one(self, prompt: str) -> int:
        if self.chat:
            r = self.client.chat_completion(conversation(prompt), self.model, **self.params)
        else:
            r = self.client.run_inference(self.model, prompt, self.params)
        return _check(r.usage.completion_tokens, self.expect)

    def reset(self) -> None:
        self.client.get_metrics(reset=True)

    def http_calls(self) -> Dict[str, int]:
        m = self.client.get_metrics()
        singles = m["requests"] - m["batched_requests"]
        return {"requests": m["requests"], "batches": m["batches"],
                "batched_requests": m["batched_requests"], "http_calls": m["batches"] + singles,
                "failures": m["failures"], "retries": m["retries"]}

    def close(self) -> None:
        self.client.close()


class ProjectAsync(Project):
    """``VllmClient``'s async face: N tasks on one event loop awaiting ``arun_inference``
    (queued and sent by the client's workers as a sync call is; no thread waits for a
    caller), beside bare aiohttp's N tasks on one loop."""

    def __init__(self, url: str, model: str, params: Dict[str, Any], concurrency: int,
                 label: str = "project (async)", **kw: Any) -> None:
        super().__init__(url, model, params, label=label, **kw)
        self._loop = asyncio.new_event_loop()

    async def _one(self, prompt: str) -> int:
        r = await self.client.arun_inference(self.model, prompt, self.params)
        return _check(r.usage.completion_tokens, self.expect)

    async def _many(self, prompts: Sequence[str], concurrency: int) -> List[int]:
        return await on_tasks(self._one, prompts, concurrency)

    def cpu(self, callers: Callers, prompts: Sequence[str]) -> Dict[str, Any]:
        return loop_cpu(self._loop, self._many(prompts, callers.n))

    def one(self, prompt: str) -> int:
        return self._loop.run_until_complete(self._one(prompt))

    def close(self) -> None:
        super().close()
        self._loop.close()


class ProjectSubmitAll(Project):
    """Every prompt submitted at once from one thread (``submit_inference``), then awaited."""

    def throughput(self, callers: Callers, prompts: Sequence[str]) -> Dict[str, Any]:
        t0 = time.perf_counter()
        futs = [self.client.submit_inference(self.model, p, self.params) for p in prompts]
        toks = [_check(f.result(TIMEOUT).usage.completion_tokens, self.expect)
                for f in futs]
        return {"wall_s": time.perf_counter() - t0, "tokens": sum(toks), "prompts": len(prompts)}


# --------------------------------------------------------------------------- bare prompt lists
class BarePromptList(Contender):
    """The same prompts as prompt lists on the wire (requests.Session), ``per_request`` each,
    one request at a time (so as many prompts are in flight as with ``per_request`` callers)."""

    def __init__(self, url: str, model: str, params: Dict[str, Any], per_request: int,
                 chat: bool = False) -> None:
        super().__init__(url, model, params, chat)
        self.per_request = per_request
        kind = "chat batches" if chat else "prompt lists"
        self.name = f"bare {kind} ({per_request}/request)"
        self.note = f"hand-made {kind} with requests.Session, sent one after another"
        self._s = requests.Session()
        self._endpoint = self.url + ("/v1/chat/completions/batch" if chat else "/v1/completions")

    def throughput(self, callers: Callers, prompts: Sequence[str]) -> Dict[str, Any]:
        t0 = time.perf_counter()
        toks = 0
        for i in range(0, len(prompts), self.per_request):
            chunk = list(prompts[i:i + self.per_request])
            many: Dict[str, Any] = ({"messages": [conversation(p) for p in chunk]} if self.chat
                                    else {"prompt": chunk})
            r = self._s.post(self._endpoint, json={"model": self.model, **many, **self.params},
                             timeout=TIMEOUT)
            r.raise_for_status()
            data = r.json()
            if len(data["choices"]) != len(chunk):
                raise AssertionError("prompt list answered with the wrong number of choices")
            toks += data["usage"]["completion_tokens"]
        _check(toks, self.params["max_tokens"] * len(prompts))
        return {"wall_s": time.perf_counter() - t0, "tokens": toks, "prompts": len(prompts)}

    def close(self) -> None:
        self._s.close()


# --------------------------------------------------------------------------- W7: embeddings
class EmbedOpenAISDK(Contender):
    """openai-python's ``embeddings.create``, one text per call (its default encoding,
    base64, decoded by the SDK), one client shared by the caller threads."""

    name = "openai SDK embeddings.create"
    note = "one OpenAI client shared by the threads, one text per call, SDK defaults"

    def __init__(self, url: str, model: str) -> None:
        super().__init__(url, model, {})
        self._client = openai.OpenAI(base_url=self.url + "/v1", api_key="EMPTY", timeout=TIMEOUT)

    def one(self, text: str) -> int:
        r = self._client.embeddings.create(model=self.model, input=text)
        if len(r.data) != 1 or not r.data[0].embedding:
            raise AssertionError("an embedding reply without its vector")
        return 1

    def close(self) -> None:
        self._client.close()


class EmbedAioHttp(AioHttp):
    """Bare aiohttp: one ClientSession, N tasks on one loop, one text per POST
    ``/v1/embeddings`` (float vectors in JSON, the server's default)."""

    name = "aiohttp embeddings"

    def __init__(self, url: str, model: str, concurrency: int) -> None:
        super().__init__(url, model, {}, concurrency)
        self._endpoint = self.url + "/v1/embeddings"

    async def _one(self, text: str) -> int:
        async with self._session.post(self._endpoint, json={"model": self.model, "input": text}) as r:
            r.raise_for_status()
            data = await r.json()
        if len(data["data"]) != 1 or not data["data"][0]["embedding"]:
            raise AssertionError("an embedding reply without its vector")
        return 1


class EmbedProject(Project):
    """``VllmClient.embed(text)`` from N caller threads, one text each (concurrent callers
    share calls when batching is on; base64 on the wire, numpy rows back)."""

    def __init__(self, url: str, model: str, *, batching: bool, label: str, **kw: Any) -> None:
        super().__init__(url, model, {}, batching=batching, label=label, **kw)

    def one(self, text: str) -> int:
        r = self.client.embed(text, self.model)
        if r.vectors.shape[0] != 1:
            raise AssertionError("embed() without its one vector")
        return 1


class EmbedProjectAsync(ProjectAsync):
    """``aembed(text)`` from N tasks on one event loop."""

    def __init__(self, url: str, model: str, concurrency: int, **kw: Any) -> None:
        super().__init__(url, model, {}, concurrency, batching=True, **kw)
        self.name = "project embed (async)"

    async def _one(self, text: str) -> int:
        r = await self.client.aembed(text, self.model)
        if r.vectors.shape[0] != 1:
            raise AssertionError("aembed() without its one vector")
        return 1

    def throughput(self, callers: Callers, prompts: Sequence[str]) -> Dict[str, Any]:
        t0 = time.perf_counter()
        n = sum(self._loop.run_until_complete(self._many(prompts, callers.n)))
        return {"wall_s": time.perf_counter() - t0, "tokens": n, "prompts": len(prompts)}
