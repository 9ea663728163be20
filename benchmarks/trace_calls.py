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


def ordered_path(paths: List[str]) -> List[str]:
    """``paths`` with each run of consecutive equal entries collapsed to one."""
    steps: List[str] = []
    for path in paths:
        if not steps or steps[-1] != path:
            steps.append(path)
    return steps


def main() -> int:
    events: List[Tuple[int, str]] = []
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
