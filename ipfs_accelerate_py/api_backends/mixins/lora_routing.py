"""LoRA adapters across servers: which server has which adapter, and routing by it.

A request whose ``model`` is a LoRA adapter can be answered only by a server that has the
adapter loaded (another answers 404 "model does not exist"). The client keeps an
``AdapterBook``: per server (its base URL: two endpoints on one URL are one server), the
adapters loaded there, learned from

* ``/v1/models`` (``list_models``, ``refresh_lora_adapters``): an entry with a ``parent`` is
  an adapter of that base model; the list is the truth for that server;
* the client's own ``load_lora_adapter`` / ``unload_lora_adapter`` calls;
* its automatic loads (below), and replies: a 404 for an adapter request there means it is
  not (or no longer) loaded; a connection failure means the server may have restarted and
  lost what was loaded at run time, so its adapters are forgotten (a reload that finds the
  adapter there is answered 400 "already been loaded", and counts as loaded).

The routing (``route_submit``, and the ``routing`` setting's calls) orders an adapter's
request as llm-d's LoRA-affinity scorer scores pods (gateway-api-inference-extension:
adapter active > adapter being loaded > room to load it): the endpoints that have it loaded
first, in the strategy's order; then those where this client is loading it; then, only when
the client knows the adapter's path (the ``lora_paths`` setting, ``{name: path}``), the rest:
the first of them gets the adapter loaded (``POST /v1/load_lora_adapter``, one load per
server and adapter however many requests wait for it) before the request is sent. A server
that dies moves its requests to the next endpoint in that order, where the adapter is
loaded first if it is not there: no request is lost while one server can load it.

An adapter request with no endpoint named is routed even without the ``routing`` setting
(round-robin over the endpoints that have it), so ``lora_paths`` works with one endpoint too.
Streams on both faces are ordered the same way and load the adapter before opening where it
is missing (``_lora_load_wait``, awaited on the async face). Loading and unloading name their
endpoint (the default one when none is named): they are never routed.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from ..errors import BadRequestError, ConnectionError, NotFoundError
from ..operations import build_operation
from ._host import HostBase

__all__ = ["AdapterBook", "LoraRoutingMixin", "LoraLoadError", "ADAPTER_OPS"]

#: the operations whose ``model`` is not a served model (they name the adapter in ``lora_name``)
ADAPTER_OPS = frozenset({"load_lora_adapter", "unload_lora_adapter"})


class AdapterBook:
    """Which server has which LoRA adapter; every field is guarded by ``lock``."""

    def __init__(self, paths: Optional[Mapping[str, str]] = None) -> None:
        self.lock = threading.Lock()
        #: adapter name -> its path on the servers' machines (the ``lora_paths`` setting)
        self.paths: Dict[str, str] = dict(paths or {})
        #: every adapter seen -> its base model (None until a ``/v1/models`` names it)
        self.parents: Dict[str, Optional[str]] = {name: None for name in self.paths}
        #: server (base URL) -> adapters loaded there
        self.loaded: Dict[str, Set[str]] = {}
        #: (server, adapter) -> the load this client has in flight there
        self.loading: Dict[Tuple[str, str], "Future[Any]"] = {}
        #: loads this client made, by adapter (stats)
        self.loads: Counter = Counter()

    @property
    def active(self) -> bool:
        """Whether any adapter is known (else nothing is looked up per request)."""
        return bool(self.parents)

    def is_adapter(self, name: Optional[str]) -> bool:
        return name is not None and name in self.parents

    def has(self, server: str, name: str) -> bool:
        with self.lock:
            return name in self.loaded.get(server, ())

    def learn(self, server: str, models: Sequence[Mapping[str, Any]]) -> None:
        """``/v1/models`` of ``server``: its adapters are exactly those with a parent."""
        found = {str(m["id"]): m.get("parent") for m in models
                 if isinstance(m, Mapping) and m.get("parent") and "id" in m}
        with self.lock:
            self.loaded[server] = set(found)
            self.parents.update(found)

    def note(self, server: str, name: str, loaded: bool) -> None:
        with self.lock:
            names = self.loaded.setdefault(server, set())
            if loaded:
                names.add(name)
                self.parents.setdefault(name, None)
            else:
                names.discard(name)

    def forget_server(self, server: str) -> None:
        with self.lock:
            self.loaded.pop(server, None)


class LoraLoadError(Exception):
    """An adapter could not be loaded on one endpoint (a routed stream then tries the next);
    its ``__cause__`` is the load's error."""


def _already_loaded(exc: BaseException) -> bool:
    """vLLM's 400 for a load of an adapter the server has: it is there, which is the point."""
    return isinstance(exc, BadRequestError) and "already been loaded" in str(exc)


class LoraRoutingMixin(HostBase):
    """The adapter book and the routing's adapter hooks (see the module docstring)."""

    _lora_book: AdapterBook

    def _init_lora(self) -> None:
        self._lora_book = AdapterBook(getattr(self._settings, "lora_paths", None))

    def _server_of(self, endpoint_id: Optional[str]) -> str:
        return self._endpoint(endpoint_id).settings.base_url

    # ------------------------------------------------------------------ what is known
    def _lora_name(self, request: Any) -> Optional[str]:
        """The adapter ``request`` asks for, or None (a base model, or nothing known)."""
        book = self._lora_book
        if not book.active or getattr(request, "operation", None) in ADAPTER_OPS:
            return None
        model = getattr(request, "model", None)
        return model if book.is_adapter(model) else None

    def _lora_learn(self, endpoint_id: Optional[str], models: Sequence[Mapping[str, Any]]) -> None:
        """A ``/v1/models`` reply of ``endpoint_id`` (``list_models`` calls this)."""
        self._lora_book.learn(self._server_of(endpoint_id), models)

    def _lora_after_op(self, request: Any, endpoint_id: Optional[str]) -> None:
        """A successful ``load_lora_adapter`` / ``unload_lora_adapter`` of this client."""
        op = getattr(request, "operation", None)
        if op in ADAPTER_OPS:
            self._lora_book.note(self._server_of(endpoint_id), request.lora_name,
                                 op == "load_lora_adapter")

    def lora_adapters(self) -> Dict[str, Dict[str, Any]]:
        """Every adapter the client knows: its ``parent`` (base model, when a ``/v1/models``
        named it), its ``path`` (``lora_paths``), the ``endpoints`` that have it loaded and
        the ``loads`` this client made."""
        book = self._lora_book
        by_server: Dict[str, List[str]] = {}
        # the endpoints routing goes over (the default one left out when another is its server)
        for eid in self._router.routing_candidates():
            by_server.setdefault(self._server_of(eid), []).append(eid)
        with book.lock:
            return {name: {"parent": parent, "path": book.paths.get(name),
                           "endpoints": sorted(eid for server, names in book.loaded.items()
                                               if name in names
                                               for eid in by_server.get(server, ())),
                           "loads": book.loads[name]}
                    for name, parent in book.parents.items()}

    def refresh_lora_adapters(self) -> Dict[str, Dict[str, Any]]:
        """Ask every server (``/v1/models``) which adapters it has; a server that does not
        answer is left as it was. Returns ``lora_adapters()``."""
        seen: Set[str] = set()
        for eid in self.endpoint_ids:
            server = self._server_of(eid)
            if server in seen:
                continue
            seen.add(server)
            try:
                self.list_models(eid)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - a server down now is learned later
                continue
        return self.lora_adapters()

    # ------------------------------------------------------------------ routing hooks
    def _lora_order(self, name: str, order: List[str]) -> List[str]:
        """``order`` by affinity for adapter ``name``: loaded there, being loaded there, then
        (only when its path is known) the rest. Unchanged when none has it and no path is
        known (the book may be stale; the server's 404 says so)."""
        book = self._lora_book
        servers = {eid: self._server_of(eid) for eid in order}
        with book.lock:
            active = [e for e in order if name in book.loaded.get(servers[e], ())]
            waiting = [e for e in order if e not in active and (servers[e], name) in book.loading]
            can_load = name in book.paths
        rest = [e for e in order if e not in active and e not in waiting] if can_load else []
        ranked = active + waiting + rest
        return ranked if ranked else order

    def _lora_needs_load(self, eid: str, name: str) -> bool:
        book = self._lora_book
        return name in book.paths and not book.has(self._server_of(eid), name)

    def _lora_load(self, eid: str, name: str, priority: int,
                   then: Callable[[Optional[BaseException]], None]) -> None:
        """Load adapter ``name`` on ``eid`` (or join the load under way there), then call
        ``then(None)``, or ``then(error)`` when it could not be loaded there."""
        book = self._lora_book
        server = self._server_of(eid)
        with book.lock:
            fut = book.loading.get((server, name))
            start = fut is None
            if start:
                fut = Future()
                book.loading[(server, name)] = fut
                book.loads[name] += 1
        assert fut is not None
        fut.add_done_callback(lambda f: then(f.exception()))
        if not start:
            return

        def settle(error: Optional[BaseException]) -> None:
            if error is None or _already_loaded(error):
                book.note(server, name, True)
                error = None
            with book.lock:
                book.loading.pop((server, name), None)
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

        try:
            request = build_operation(self._adapter, "load_lora_adapter",
                                      {"lora_name": name, "lora_path": book.paths[name]})
            sent = self.submit(request, priority, eid, None, True)
        except Exception as exc:  # noqa: BLE001 - this endpoint cannot load it: the next may
            settle(exc)
            return
        sent.add_done_callback(lambda f: settle(
            f.exception() if not f.cancelled() else ConnectionError("the load was cancelled")))

    def _lora_load_future(self, eid: str, name: str, priority: int) -> "Future[Any]":
        """``_lora_load`` as a future: its result None once loaded there, or its error."""
        done: "Future[Any]" = Future()

        def then(error: Optional[BaseException]) -> None:
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
        self._lora_load(eid, name, priority, then)
        return done

    def _lora_load_wait(self, eid: str, name: str, priority: int,
                        timeout: Optional[float]) -> None:
        """Load ``name`` on ``eid`` and wait (a sync stream's opening); ``LoraLoadError``."""
        limit = timeout if timeout is not None else self._endpoint(eid).settings.effective_deadline
        try:
            self._lora_load_future(eid, name, priority).result(limit + 1.0)
        except Exception as exc:  # noqa: BLE001 - named by the stream's opening
            raise LoraLoadError(f"loading adapter {name!r}: {type(exc).__name__}: {exc}") from exc

    async def _alora_load_wait(self, eid: str, name: str, priority: int,
                               timeout: Optional[float]) -> None:
        """``_lora_load_wait`` for coroutines (no thread waits)."""
        limit = timeout if timeout is not None else self._endpoint(eid).settings.effective_deadline
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._lora_load_future(eid, name, priority)),
                                   limit + 1.0)
        except Exception as exc:  # noqa: BLE001
            raise LoraLoadError(f"loading adapter {name!r}: {type(exc).__name__}: {exc}") from exc

    def _lora_failed(self, eid: str, name: str, exc: BaseException) -> bool:
        """An adapter request failed at ``eid``: update the book; True when another endpoint
        should get the request (the adapter is not there: a 404)."""
        book = self._lora_book
        if isinstance(exc, NotFoundError):
            book.note(self._server_of(eid), name, False)
            return True
        if isinstance(exc, ConnectionError):
            book.forget_server(self._server_of(eid))  # restarted servers lose run-time loads
        return False
