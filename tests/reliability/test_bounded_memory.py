"""Bounded memory: 100 000 requests leave the client's resident memory where it was.

The client keeps only bounded state: metrics are counters plus fixed-size latency rings,
``recent_requests`` is a deque with a ``maxlen``, the queue is bounded and empties, batch
buffers are per call. So after a warm-up of 1 000 requests (imports, sockets, worker stacks,
first allocations) the next 99 000 must not grow ``VmRSS`` by more than 50 MB.

The double runs in a process of its own (``DoubleProcess``; it remembers every request id
it saw, which would otherwise count against the client), stopped by its PID. 8 threads
keep 32 ``submit_inference`` futures each in flight (the futures are dropped as they
resolve), with 1 % of calls failing (500 or a dropped socket) so the retry and error paths
run too, and one stream per window. Two runs: batching on with the default transport
(prompt lists on the wire), and batching off on it (one HTTP call per request; the
hand-written ``http.client`` transport this run used to take is gone).
"""

from __future__ import annotations

import concurrent.futures
import gc
import threading
import time
from collections import Counter
from typing import Dict, List

import pytest

from ipfs_accelerate_py.api_backends import errors

from reliability_support import rss_bytes

N_REQUESTS = 100_000
WARMUP = 1_000
N_THREADS = 8
WINDOW = 32
MAX_GROWTH = 50 * 1024 * 1024
BUDGET_S = 300.0  # a hard bound; a run takes 15-60 s on 2 shared cores
PARAMS = {"max_tokens": 1, "temperature": 0}


def drive(client, n: int, first: int, outcomes: Counter, deadline: float) -> int:
    """Send requests ``first .. first+n-1`` from 8 threads, 32 futures in flight per thread,
    plus one stream per window; returns how many streams ran."""
    streams = [0] * N_THREADS
    lock = threading.Lock()
    errors_seen: List[BaseException] = []

    def worker(t: int) -> None:
        local: Counter = Counter()
        try:
            for start in range(first + t * WINDOW, first + n, N_THREADS * WINDOW):
                futures = [client.submit_inference(None, f"memory {i}", PARAMS)
                           for i in range(start, min(start + WINDOW, first + n))]
                for f in futures:
                    try:
                        f.result(timeout=max(0.1, deadline - time.monotonic()))
                        local["ok"] += 1
                    except concurrent.futures.TimeoutError:
                        local["HUNG"] += 1
                    except errors.ApiError as exc:
                        local[type(exc).__name__] += 1
                del futures
                text = "".join(client.stream_generation(f"stream {start}", max_tokens=2,
                                                        temperature=0))
                assert text
                streams[t] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors_seen.append(exc)
        finally:
            with lock:
                outcomes.update(local)

    threads = [threading.Thread(target=worker, args=(t,), name=f"memory-driver-{t}")
               for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(max(0.1, deadline - time.monotonic()))
    assert not any(th.is_alive() for th in threads), "a driver thread hung"
    assert not errors_seen, errors_seen[0]
    return sum(streams)


def settled_rss() -> int:
    gc.collect()
    return rss_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("batching, transport", [(True, None), (False, None)],
                         ids=["batching-on-default-transport", "batching-off-default-transport"])
def test_100k_requests_keep_resident_memory_bounded(double_process, make_client, batching,
                                                    transport):
    client = make_client(double_process.base_url, transport, max_concurrent_requests=8,
                         queue_size=N_THREADS * WINDOW * 2, batch_enabled=batching,
                         max_retries=3, failure_threshold=10_000, failure_rate_threshold=1.0)
    deadline = time.monotonic() + BUDGET_S
    outcomes: Counter = Counter()
    streams = drive(client, WARMUP, 0, outcomes, deadline)
    base = settled_rss()
    samples: Dict[int, int] = {WARMUP: base}

    t0 = time.monotonic()
    done = WARMUP
    step = 11_000
    while done < N_REQUESTS:
        n = min(step, N_REQUESTS - done)
        streams += drive(client, n, done, outcomes, deadline)
        done += n
        samples[done] = settled_rss()
    elapsed = time.monotonic() - t0
    final = samples[N_REQUESTS]

    m = client.get_metrics()
    curve = " ".join(f"{k // 1000}k:{v / 2**20:.1f}" for k, v in samples.items())
    summary = (f"batching={batching} transport={transport or 'default'}: "
               f"{N_REQUESTS - WARMUP} requests + {streams} streams in {elapsed:.1f}s "
               f"({(N_REQUESTS - WARMUP) / elapsed:.0f} req/s); RSS MiB after {curve}; "
               f"growth {(final - base) / 2**20:+.1f} MiB; outcomes={dict(outcomes)}; "
               f"retries={m['retries']} batches={m['batches']}")
    print("\n" + summary)

    # Every request ended, and the books balance.
    assert outcomes["HUNG"] == 0, summary
    assert sum(outcomes.values()) == N_REQUESTS, summary
    assert set(outcomes) - {"ok"} <= {"ServerError", "ConnectionError"}, summary
    assert outcomes["ok"] >= N_REQUESTS * 0.999, summary
    assert m["requests"] == N_REQUESTS + streams == m["successes"] + m["failures"], summary
    assert (m["batches"] > 0) == batching
    # What the client keeps is bounded, whatever the volume.
    assert len(client.recent_requests) <= client.settings.recent_requests_size
    assert len(client.request_queue) == 0 and client.current_requests == 0
    # The memory itself.
    assert final - base < MAX_GROWTH, summary
