#!/usr/bin/env python3
"""W3 (and W6) counted in instructions: the client's user-space work per request, whatever
the load.

    python benchmarks/w3_instructions.py                      # aiohttp, async off, sync off
    python benchmarks/w3_instructions.py --rows aiohttp,async_off --requests 2000
    python benchmarks/w3_instructions.py --rows w6_bare,w6_async,w6_sync   # shared streams

The ``w6_`` rows are W6's shape (32 callers streaming 256 prompts, ``max_tokens`` 16, usage
asked) against the test double (``servers.fake_vllm``, its own process): per prompt, bare
aiohttp prompt-list streams of 32 against the project's shared streams on either face; the
counts are of one and of three rounds of 256 prompts (``--requests`` does not apply).

Timed W3 rows (``benchmarks/run.py``) move 15 % and more on this shared machine; an
instruction count does not. Each contender runs under ``valgrind --tool=callgrind`` twice,
against the no-op server (``noop_server.py``, started here, its own process, never
counted), after the same warm-up, with two request counts: the difference of the two totals
over the difference of the counts is the instructions one request costs the client, every
thread of it, in user space (the kernel's socket work, the same for every contender, is not
counted). Ratios to bare aiohttp are printed beside it.

What it does not show: time. A contender whose code misses caches more, or that hands work
between threads (the sync face), costs more time per instruction; the timed rows stay the
measure of record, this the load-proof view of what a code change removed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

HERE = Path(__file__).resolve().parent
ROWS = {"aiohttp": "bare aiohttp, 8 tasks on one loop",
        "async_off": "the async face, batching off, 8 tasks",
        "sync_off": "the sync face, batching off, 8 threads",
        "async_on": "the async face, default settings (batching on), 8 tasks",
        "sync_on": "the sync face, default settings (batching on), 8 threads",
        "requests": "raw requests.Session, 8 threads",
        "w6_bare": "W6: bare aiohttp prompt-list streams of 32, one at a time",
        "w6_async": "W6: the async face's shared streams, 32 tasks",
        "w6_sync": "W6: the sync face's shared streams, 32 threads"}
#: the test double in a process of its own, its port on the first line (the w6_ rows)
_DOUBLE = ("import signal, sys\n"
           "from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer\n"
           "s = FakeVllmServer(port=0); s.start(); print('port', s.port, flush=True)\n"
           "signal.sigwait({signal.SIGTERM}); s.stop()\n")


def _one(row: str, requests: int, port: int) -> None:
    """The child: warm up, then ``requests`` requests (run under callgrind); a ``w6_`` row:
    ``requests`` rounds of W6's 256 streamed prompts."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import contenders as C  # noqa: E402 - a benchmark's sibling module
    if row.startswith("w6_"):
        _streams(row, requests, f"http://127.0.0.1:{port}", C)
        return

    url, params = f"http://127.0.0.1:{port}", {"max_tokens": 16}
    made = {"aiohttp": lambda: C.AioHttp(url, "tiny-llama", params, 8),
            "async_off": lambda: C.ProjectAsync(url, "tiny-llama", params, 8, batching=False),
            "sync_off": lambda: C.Project(url, "tiny-llama", params, batching=False),
            "async_on": lambda: C.ProjectAsync(url, "tiny-llama", params, 8, batching=True),
            "sync_on": lambda: C.Project(url, "tiny-llama", params, batching=True),
            "requests": lambda: C.RawRequests(url, "tiny-llama", params)}[row]()
    made.expect = None  # the no-op server's fixed reply
    prompts = [f"prompt number {i} " * 3 for i in range(requests + 300)]
    made.cpu(C.Callers(8), prompts[:300])
    made.cpu(C.Callers(8), prompts[300:])
    made.close()


def _streams(row: str, rounds: int, url: str, C: Any) -> None:
    import openloop as OL  # noqa: E402 - a benchmark's sibling module
    params = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}
    made = {"w6_bare": lambda: OL.BareListStream(url, "tiny-llama", params, 32),
            "w6_async": lambda: OL.ProjectAsyncStream(
                url, "tiny-llama", params, batching=True, max_batch_size=32,
                max_concurrent_requests=32, label=row),
            "w6_sync": lambda: OL.ProjectStream(
                url, "tiny-llama", params, batching=True, max_batch_size=32,
                max_concurrent_requests=32, label=row)}[row]()
    callers = C.Callers(32)
    prompts = [f"w6 prompt {i:04d} about the sea and its ships" for i in range(256)]
    made.throughput(callers, prompts[:64])
    for _ in range(rounds):
        made.throughput(callers, prompts)
    made.close()


def _count(row: str, requests: int, port: int, tmp: str) -> int:
    out = os.path.join(tmp, f"{row}.{requests}.out")
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
         __file__, "--child", row, "--requests", str(requests), "--port", str(port)],
        capture_output=True, text=True, timeout=1800)
    found = re.search(r"Collected : ([\d,]+)", run.stderr)
    if run.returncode != 0 or found is None:
        raise SystemExit(f"{row}: callgrind run failed:\n{run.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="aiohttp,async_off,sync_off")
    ap.add_argument("--requests", type=int, default=2000,
                    help="the larger run's requests (the smaller has a quarter)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _one(args.child, args.requests, args.port)
        return 0
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if shutil.which("valgrind") is None:
        ap.error("valgrind is not installed")
    small, large = max(1, args.requests // 4), args.requests
    per: Dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("w3", "w6"):
            mine = [r for r in rows if r.startswith("w6_") == (kind == "w6")]
            if not mine:
                continue
            command = ([sys.executable, str(HERE / "noop_server.py"), "--port", "0"]
                       if kind == "w3" else [sys.executable, "-c", _DOUBLE])
            server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            try:
                line = server.stdout.readline() if server.stdout else ""
                port = int(line.split()[1])
                for row in mine:
                    if kind == "w3":
                        a, b = _count(row, small, port, tmp), _count(row, large, port, tmp)
                        per[row] = (b - a) / (large - small)
                    else:  # one round of 256 prompts, then three
                        a, b = _count(row, 1, port, tmp), _count(row, 3, port, tmp)
                        per[row] = (b - a) / 512
            finally:
                server.terminate()
                server.wait(10)
    base = per.get("aiohttp")
    print(f"W3 in user-space instructions per request ({small} and {large} requests, "
          "callgrind; the no-op server not counted); W6 rows per streamed prompt")
    for row, value in per.items():
        ref = per.get("w6_bare") if row.startswith("w6_") else base
        label = "bare list streams" if row.startswith("w6_") else "bare aiohttp"
        ratio = f"  {value / ref:.2f}x {label}" if ref else ""
        print(f"  {row:10s} {value / 1000:8.0f} k{ratio}   ({ROWS[row]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
