#!/usr/bin/env python3
"""The client's own CPU per request, with the network taken out (issue 26).

    python benchmarks/pipeline_cpu.py                    # async face, batching off
    python benchmarks/pipeline_cpu.py --face sync
    python benchmarks/pipeline_cpu.py --without parse,format,build,metrics

Every request goes through the whole pipeline (validation, queue or served-here path,
breaker, in-flight slot, retries, metrics, tracing hooks, parsing) to a transport that
answers at once with a fixed vLLM-shaped reply, so the CPU measured is the client's alone.
``--without`` adds one contender per named part with that part stubbed out (the reply parsed
once and reused, a wire body formatted once, a request built once, no metrics), run
interleaved with the whole pipeline in the same process: each one's ratio to the whole is
an upper bound of what cutting that part could save. Medians and ranges over ``--rounds``.

For a figure that ignores the machine's load, count instructions instead:
``valgrind --tool=callgrind python benchmarks/pipeline_cpu.py --rounds 1 --requests N`` for
two values of N; the difference of the totals over the difference of N is per request.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipfs_accelerate_py.api_backends import VllmClient  # noqa: E402
from ipfs_accelerate_py.api_backends.request_build import build_request  # noqa: E402
from ipfs_accelerate_py.api_backends.transport import HttpRequest, HttpResponse  # noqa: E402

PARAMS = {"max_tokens": 16}
BODY = json.dumps({
    "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny-llama",
    "choices": [{"index": 0, "text": " a b c d e f g h i j k l m n o p", "logprobs": None,
                 "finish_reason": "length", "stop_reason": None, "prompt_logprobs": None}],
    "usage": {"prompt_tokens": 4, "total_tokens": 20, "completion_tokens": 16,
              "prompt_tokens_details": None}}).encode()
HEADERS = {"content-type": "application/json", "content-length": str(len(BODY))}


class AnswersAtOnce:
    """An async transport that encodes the request (as a real one must) and answers it."""

    async def send(self, request: HttpRequest, timeout: Any, headers: Any = None) -> HttpResponse:
        request.encoded()
        return HttpResponse(200, HEADERS, BODY)

    async def open_stream(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("complete requests only")

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def make_client(without: str = "") -> VllmClient:
    client = VllmClient(base_url="http://127.0.0.1:9", model="tiny-llama", batch_enabled=False)
    client._endpoint(None).transport = AnswersAtOnce()  # type: ignore[assignment]
    adapter = type(client._adapter)()  # a copy of its own, so a stub touches this client only
    client._use_adapter(adapter)  # the client and its parts (attempt, batcher) alike
    if without == "parse":
        request = build_request("x", "tiny-llama", PARAMS, adapter=adapter)
        parsed = adapter.parse_response(request, HttpResponse(200, HEADERS, BODY))
        adapter.parse_response = lambda *a, **k: parsed  # type: ignore[method-assign]
    elif without == "format":
        request = build_request("x", "tiny-llama", PARAMS, adapter=adapter)
        http = adapter.format_request(request)
        adapter.format_request = lambda *a, **k: HttpRequest(  # type: ignore[method-assign]
            http.method, http.path, json=http.json, headers=dict(http.headers))
    elif without == "metrics":
        client._metrics.record_request = lambda *a, **k: None  # type: ignore[method-assign]
    return client


def async_runner(client: VllmClient, prebuilt: bool, concurrency: int) -> Callable[[int], None]:
    loop = asyncio.new_event_loop()
    request = build_request("p", None, PARAMS, adapter=client._adapter)

    async def many(n: int) -> None:
        it = iter(range(n))

        async def caller() -> None:
            for i in it:
                if prebuilt:
                    await client.asubmit(request)
                else:
                    await client.arun_inference(None, f"p {i}", PARAMS)
        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return lambda n: loop.run_until_complete(many(n))


def sync_runner(client: VllmClient, prebuilt: bool, concurrency: int) -> Callable[[int], None]:
    pool = ThreadPoolExecutor(concurrency)
    request = build_request("p", None, PARAMS, adapter=client._adapter)

    def many(n: int) -> None:
        it = iter(range(n))
        lock = threading.Lock()

        def caller() -> None:
            while True:
                with lock:
                    i = next(it, None)
                if i is None:
                    return
                if prebuilt:
                    client.execute(request)
                else:
                    client.run_inference(None, f"p {i}", PARAMS)
        for f in [pool.submit(caller) for _ in range(concurrency)]:
            f.result()
    return many


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--face", choices=["async", "sync"], default="async")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--without", default="", help="comma-separated: parse,format,build,metrics")
    args = ap.parse_args()
    runner = async_runner if args.face == "async" else sync_runner
    rows: Dict[str, Callable[[int], None]] = {"whole": runner(make_client(), False,
                                                              args.concurrency)}
    for part in filter(None, args.without.split(",")):
        if part not in ("parse", "format", "build", "metrics"):
            ap.error(f"unknown part {part!r}")
        rows[f"without {part}"] = runner(make_client(part), part == "build", args.concurrency)
    for run in rows.values():
        run(min(1000, args.requests))  # warm: sessions, caches, the loop
    results: Dict[str, List[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, run in rows.items():
            gc.collect()
            t0 = time.process_time()
            run(args.requests)
            results[name].append((time.process_time() - t0) / args.requests * 1e6)
    print(f"{args.face} face, batching off, {args.concurrency} callers, "
          f"{args.requests} requests x {args.rounds} rounds (client CPU per request)")
    for name, values in results.items():
        ratios = [a / b for a, b in zip(values, results["whole"])]
        print(f"  {name:18s} {statistics.median(values):7.1f} us [{min(values):.1f}-"
              f"{max(values):.1f}]  ratio to whole {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
