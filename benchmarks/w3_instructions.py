#!/usr/bin/env python3
"""W3 counted in instructions: the client's user-space work per request, whatever the load.

    python benchmarks/w3_instructions.py                      # aiohttp, async off, sync off
    python benchmarks/w3_instructions.py --rows aiohttp,async_off --requests 2000

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
from typing import Dict

HERE = Path(__file__).resolve().parent
ROWS = {"aiohttp": "bare aiohttp, 8 tasks on one loop",
        "async_off": "the async face, batching off, 8 tasks",
        "sync_off": "the sync face, batching off, 8 threads",
        "async_on": "the async face, default settings (batching on), 8 tasks",
        "sync_on": "the sync face, default settings (batching on), 8 threads",
        "requests": "raw requests.Session, 8 threads"}


def _one(row: str, requests: int, port: int) -> None:
    """The child: warm up, then ``requests`` requests (run under callgrind)."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import contenders as C  # noqa: E402 - a benchmark's sibling module

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
    server = subprocess.Popen([sys.executable, str(HERE / "noop_server.py"), "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline() if server.stdout else ""
        port = int(line.split()[1])
        small, large = max(1, args.requests // 4), args.requests
        per: Dict[str, float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for row in rows:
                a, b = _count(row, small, port, tmp), _count(row, large, port, tmp)
                per[row] = (b - a) / (large - small)
    finally:
        server.terminate()
        server.wait(10)
    base = per.get("aiohttp")
    print(f"W3 in user-space instructions per request ({small} and {large} requests, "
          "callgrind; the no-op server not counted)")
    for row, value in per.items():
        ratio = f"  {value / base:.2f}x bare aiohttp" if base else ""
        print(f"  {row:10s} {value / 1000:8.0f} k{ratio}   ({ROWS[row]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
