"""Count what one ``run_inference`` does inside the package (issue "Architecture"):
project function calls, files entered and file-to-file hops, on every thread.

    python benchmarks/trace_calls.py

The profiler is set before the client exists, so its worker threads are traced too; the
warm-up call (pool, workers, first connection) is not counted, only a second call against
the test double. A hop is a call whose file differs from the previous call's on the same
thread. The double's own code is left out. A coroutine (or generator) is counted once, when
it starts: the profiler reports each resumption after an ``await`` as a call too.

It also prints, per thread, the ORDERED path of files the request passes (consecutive calls
in one file collapsed to one step), so a reader sees the path down and back: a step that
returns to a file already passed is a hop back into a layer.

Then the same call by LAYER (``LAYERS``: the architecture table's concerns): an entry is a
call whose caller is in another layer (or is the event loop itself: a callback or a task
the dispatcher scheduled). Value types and helpers every layer uses (``VALUES``: the request
and result types, settings, errors, the clock, the loop's scheduling helpers, and the
records ``Job`` and ``Headers``) are not layers. It checks that on each thread every layer
is entered at most twice, and that a layer entered twice is entered once before the request
reaches the transport (on the way down) and once after (on the way back).
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ipfs_accelerate_py  # noqa: E402
from ipfs_accelerate_py.api_backends import VllmClient  # noqa: E402
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer  # noqa: E402

PACKAGE = os.path.dirname(ipfs_accelerate_py.__file__)
#: code flags of frames that are resumed: each resumption is a profiler "call" event
_SUSPENDABLE = inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


#: file (relative to ``api_backends/``) -> the layer it belongs to
LAYERS: Dict[str, str] = {
    **dict.fromkeys(["base.py", "async_face.py", "handlers.py", "call_shapes.py", "limits.py",
                     "context.py", "request_format.py", "vllm/_client.py", "vllm/_framework.py",
                     "operations.py", "structured.py", "request_build.py"],
                    "face"),
    "mixins/queue.py": "queue", "_core/queue.py": "queue", "_core/dispatcher.py": "queue",
    "mixins/batching.py": "batch", "_core/batcher.py": "batch", "_core/retry.py": "retry", "reply_checks.py": "batch",
    "_streaming/stream_batching.py": "batch", "mixins/retry.py": "retry",
    "adapter.py": "adapter", "vllm/_adapter.py": "adapter", "vllm/_operations.py": "adapter", "mixins/attempt.py": "attempt",
    "_core/attempt.py": "attempt",
    "_core/breaker.py": "breaker", "mixins/circuit_breaker.py": "breaker",
    "_core/endpoint.py": "endpoint", "_core/inflight.py": "in-flight",
    **dict.fromkeys(["mixins/routing.py", "_routing/router.py", "_routing/state.py", "endpoint_load.py",
                     "_routing/prefix_affinity.py", "mixins/lora_routing.py"], "routing"),
    **dict.fromkeys(["_transports/aio.py", "_transports/headers.py", "_transports/tls.py",
                     "_transports/framing.py", "transport.py",
                     "mock_transport.py", "sse.py"],
                    "transport"),
    "mixins/metrics.py": "metrics", "_observability/recorder.py": "metrics",
    "tracing.py": "tracing", "_observability/otel.py": "tracing",
}
#: not layers: value types and helpers any layer uses (files, and qualified-name prefixes)
VALUES = {"models.py", "vllm/_models.py", "settings.py", "errors.py", "clock.py", "_core/loop.py",
          "media.py", "request_params.py", "wire_fields.py"}
VALUE_CLASSES = ("Job.", "Headers.")


def layer_of(frame: Any) -> str:
    """``frame``'s layer; "" for a value type or helper (see ``VALUES``); "?file" unmapped."""
    path = frame.f_code.co_filename
    rel = os.path.relpath(path, PACKAGE).replace(os.sep, "/").replace("api_backends/", "", 1)
    if rel in VALUES or frame.f_code.co_qualname.startswith(VALUE_CLASSES):
        return ""
    return LAYERS.get(rel, "?" + rel)


def caller_layer(frame: Any) -> str:
    """The layer of the nearest calling frame that is in one; "(outside)" when the event loop
    (a callback or task it scheduled) or the caller's program called it."""
    back = frame.f_back
    while back is not None:
        if back.f_code.co_filename.startswith(PACKAGE):
            layer = layer_of(back)
            if layer:
                return layer
        else:
            return "(outside)"
        back = back.f_back
    return "(outside)"


def check_layers(entries: List[Tuple[str, str, str]]) -> List[str]:
    """What breaks "each layer once down and once back" in one thread's ``entries``
    (caller layer, layer, function); entries from the loop itself do not count."""
    counted = [(i, layer) for i, (caller, layer, _) in enumerate(entries) if caller != "(outside)"]
    wire = next((i for i, layer in counted if layer == "transport"), None)
    problems = []
    for layer, n in Counter(layer for _, layer in counted).items():
        at = [i for i, l in counted if l == layer]
        if n > 2:
            problems.append(f"{layer} entered {n} times")
        elif n == 2 and wire is not None and not (at[0] <= wire < at[1]):
            problems.append(f"{layer} entered twice on one side of the transport")
    return problems


def ordered_path(paths: List[str]) -> List[str]:
    """``paths`` with each run of consecutive equal entries collapsed to one."""
    steps: List[str] = []
    for path in paths:
        if not steps or steps[-1] != path:
            steps.append(path)
    return steps


def main() -> int:
    events: List[Tuple[int, str]] = []
    entries: Dict[int, List[Tuple[str, str, str]]] = {}  # thread -> (caller, layer, function)
    counting = [False]

    entered: Set[int] = set()  # coroutine / generator frames already counted (by id)
    held: List[Any] = []  # ... kept alive, so that an id is not reused meanwhile

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call" or not counting[0]:
            return
        path = frame.f_code.co_filename
        if not path.startswith(PACKAGE) or "fake_vllm" in path:
            return
        if frame.f_code.co_flags & _SUSPENDABLE:  # a coroutine resumed is not a new call
            if id(frame) in entered:
                return
            entered.add(id(frame))
            held.append(frame)
        events.append((threading.get_ident(), os.path.relpath(path, PACKAGE)))
        layer = layer_of(frame)
        if layer:
            caller = caller_layer(frame)
            if caller != layer:
                entries.setdefault(threading.get_ident(), []).append(
                    (caller, layer, frame.f_code.co_name))

    server = FakeVllmServer().start()
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        with VllmClient(base_url=server.base_url, model="tiny-llama") as client:
            client.run_inference(None, "warm up", {"max_tokens": 2})
            counting[0] = True
            client.run_inference(None, "hello", {"max_tokens": 2})
            counting[0] = False
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        server.stop()
    hops, last = 0, {}
    for thread, path in events:
        hops += thread in last and last[thread] != path
        last[thread] = path
    print(f"calls {len(events)}, files {len({p for _, p in events})}, hops {hops}")
    for path, n in Counter(p for _, p in events).most_common():
        print(f"  {n:4d}  {path}")
    threads: Dict[int, List[str]] = {}
    for thread, path in events:
        threads.setdefault(thread, []).append(path.replace("api_backends/", ""))
    for i, paths in enumerate(threads.values()):
        steps = ordered_path(paths)
        name = "caller thread" if i == 0 else f"thread {i} (the client's loop)"
        print(f"path, {name}: {len(paths)} calls, {len(steps) - 1} hops")
        print("  " + " -> ".join(steps))
    failed = False
    for i, (thread, seen) in enumerate(entries.items()):
        name = "caller thread" if i == 0 else f"thread {i} (the client's loop)"
        print(f"layers, {name}: {len(seen)} entries")
        for caller, layer, function in seen:
            print(f"  {caller:>10} -> {layer:<10} {function}")
        problems = check_layers(seen)
        failed = failed or bool(problems)
        print("  each layer once down and once back: " + ("; ".join(problems) or "yes"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
