"""Scripted faults: what each kind is, which request a fault takes, and the error it sends.

The fault kinds are listed in the package docstring. :class:`FaultScript` holds the faults a
test queued (and a random failure rate) and picks the one, if any, that takes a request; the
server applies it (``_server.py``, and ``_http.py`` for faults that fire mid-stream).
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Sequence

from ._wire import _UNAUTHORIZED, _Reply, _error_reply

FAULT_KINDS = frozenset(
    {
        "status",
        "drop",
        "reset",
        "stall",
        "gate",
        "retry_after",
        "bad_body",
        "stream_error",
        "stream_no_done",
        "stream_drop",
        "stream_raw",
        "list_first_only",
        "list_index_zero",
        "list_no_index",
        "list_early_done",
        "list_bad_usage",
    }
)
_STREAM_ONLY_KINDS = frozenset({"stream_error", "stream_no_done", "stream_drop", "stream_raw"})
#: Kinds that mishandle a prompt list: they take only ``/v1/completions`` requests whose
#: ``prompt`` is a list of 2+ prompts, complete or streamed; the route applies them to its reply.
LIST_KINDS = frozenset({"list_first_only", "list_index_zero", "list_no_index", "list_early_done", "list_bad_usage"})


def is_prompt_list(body: Any) -> bool:
    """Whether ``body`` asks for 2+ prompts in one ``prompt`` list (texts or token-id lists;
    a flat list of token ids is one prompt)."""
    prompt = body.get("prompt") if isinstance(body, dict) else None
    return (isinstance(prompt, list) and len(prompt) >= 2
            and (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)))

#: Upper bound for any sleep the double does, so a mistyped fault cannot hang a test run
#: (a ``gate`` the test forgot to release ends here, or at ``stop()``).
MAX_SLEEP_S = 600.0


def shuffled_order(count: int, seed: int) -> list[int]:
    """The order ``list_no_index`` sends ``count`` choices in: ``random.Random(seed)``'s shuffle,
    turned by one when it came out in order, so 2+ choices are never in their right order."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    if count > 1 and order == sorted(order):
        order = order[1:] + order[:1]
    return order


def hold_seconds(fault: "Fault") -> float:
    """How long ``fault`` holds its request: a ``gate`` until released (bounded by
    ``MAX_SLEEP_S``), a ``stall`` its ``seconds``."""
    return MAX_SLEEP_S if fault.kind == "gate" else fault.seconds


@dataclass
class Fault:
    """One scripted fault; see the module docstring for what each ``kind`` does.

    ``count`` is how many matching requests it applies to (a negative count: every matching
    request until :meth:`FakeVllmServer.clear_faults`). ``path`` matches a path prefix on any
    method; ``None`` matches any POST. ``headers`` are extra response headers for ``status``
    faults (for example a ``Retry-After`` on a 503). ``content_type`` overrides the
    ``application/json`` that ``bad_body`` claims. ``prompt``: only requests whose prompt (or
    an item of their prompt list) contains this text match (a prompt that breaks the server).
    ``seed``: the order ``list_no_index`` shuffles choices into (``random.Random(seed)``; never
    the right order).
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
    seed: int = 0

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
        if self.kind in LIST_KINDS and (path != "/v1/completions" or not is_prompt_list(body)):
            return False
        if self.prompt is not None:
            prompt = body.get("prompt") if isinstance(body, dict) else None
            prompts = prompt if isinstance(prompt, list) else [prompt]
            if not any(isinstance(p, str) and self.prompt in p for p in prompts):
                return False
        if self.path is None:
            return method == "POST"
        return path.startswith(self.path)


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


class FaultScript:
    """The faults queued on one server, and the choice of the one (if any) that takes a request.

    Why apart from the server: choosing a fault is one question per request with its own
    state (the queue, a random failure rate and its generator, the tally of what was injected)
    and its own lock, so a test can reason about it without the HTTP side.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._random_faults: tuple[float, list[Fault | str], random.Random, str | None] | None = None
        #: Faults applied, by kind (``"status503"`` for status faults).
        self.injected: Counter[str] = Counter()

    @property
    def armed(self) -> bool:
        """Whether any fault could apply; read without the lock, as a cheap check per request."""
        return bool(self._faults or self._random_faults)

    def add(self, fault: Fault) -> None:
        """Queue a copy of ``fault`` (a test may reuse its template); tried in the order added."""
        with self._lock:
            self._faults.append(dataclasses.replace(fault, headers=dict(fault.headers)))

    def clear(self) -> None:
        """Drop queued faults and switch off the random failure rate."""
        with self._lock:
            self._faults.clear()
            self._random_faults = None

    def pending(self) -> int:
        """How many queued faults are not used up."""
        with self._lock:
            return len(self._faults)

    def fail_rate(self, rate: float, kinds: Sequence[str | Fault], seed: int, path: str | None) -> None:
        """See :meth:`FakeVllmServer.fail_rate`."""
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

    def take(self, method: str, path: str, is_stream: bool, body: Any = None) -> Fault | None:
        """The fault that takes this request, counted as used and injected; None for none."""
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.matches(method, path, is_stream, body):
                    if fault.count > 0:
                        fault.count -= 1
                        if fault.count == 0:
                            del self._faults[i]
                    self.injected[fault.kind if fault.kind != "status" else f"status{fault.status}"] += 1
                    return fault
            if self._random_faults is None:
                return None
            rate, templates, rng, prefix = self._random_faults
            if (path.startswith(prefix) if prefix is not None else method == "POST") and rng.random() < rate:
                choice = templates[rng.randrange(len(templates))]
                fault = choice if isinstance(choice, Fault) else self._fault_from_name(choice)
                if fault.kind in _STREAM_ONLY_KINDS and not is_stream:
                    return None
                if fault.kind in LIST_KINDS and (path != "/v1/completions" or not is_prompt_list(body)):
                    return None
                name = choice if isinstance(choice, str) else fault.kind
                self.injected[name] += 1
                return fault
        return None
