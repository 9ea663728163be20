"""The job on Ray Data (``--ray [ADDRESS]``): the same lines, the same exactly-once file.

The pipeline: ``read_text(INPUT)`` -> ``map_batches`` over a pool of ``_Sender`` actors,
each holding its own ``VllmClient`` that routes over the same endpoints, sending a block's
requests concurrently on the client's async face -> one *part file* per block, written to a
temporary name, fsynced and renamed (so a part is whole or absent) -> the driver merges the
parts into OUTPUT and deletes them.

Exactly once: before the run, leftover parts of a stopped run are merged first; ids already
in OUTPUT (or in a leftover part) are skipped by the actors; the merge appends a part's line
only if its id is not in OUTPUT yet, so a block that Ray ran twice (an actor lost after its
part was renamed) still gives one line per id. A crash during the merge leaves the parts,
and the next run merges them again, deduplicated the same way.

Stopping (SIGINT / SIGTERM): no more blocks are taken; the parts written so far are merged;
blocks under way are lost and run again on resume (no grace period on Ray).
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import signal
import time
import uuid
from typing import Any, Dict, List, Optional, Set

import numpy as np

from ..api_backends import errors
from ._checkpoint import Answered, Writer, fsync_dir, open_checkpoint, scan_lines
from ._endpoints import make_client
from ._input import check_input, id_hash
from ._local import JobOptions
from ._progress import Progress, Summary, write_summary
from ._replies import error_line, error_of, ok_line, send

__all__ = ["run_ray", "merge_parts", "ACTOR_CPUS"]

#: CPUs Ray reserves per actor: it waits on the network, and reading needs CPUs too.
ACTOR_CPUS = 0.5

_SKIPPED, _OK, _ERROR, _UNANSWERED = 0, 1, 2, 3


def parts_dir(output: str) -> str:
    return output + ".parts"


class _Sender:
    """A Ray Data actor: one client over the endpoints; one part file per block."""

    def __init__(self, endpoints: List[str], answered: "np.ndarray", parts: str,
                 max_in_flight: int) -> None:
        self._client = make_client(endpoints, queue_size=max(1000, 2 * max_in_flight))
        self._answered = Answered(answered)
        self._parts = parts
        self._max_in_flight = max_in_flight

    def __call__(self, batch: Dict[str, "np.ndarray"]) -> Dict[str, "np.ndarray"]:
        texts = [str(t) for t in batch["text"]]
        return asyncio.run(self._block(texts))

    async def _block(self, texts: List[str]) -> Dict[str, "np.ndarray"]:
        n = len(texts)
        state = np.zeros(n, dtype=np.int8)
        kinds = np.array([""] * n, dtype=object)
        ptok = np.zeros(n, dtype=np.int64)
        ctok = np.zeros(n, dtype=np.int64)
        lines: List[Optional[bytes]] = [None] * n
        slots = asyncio.Semaphore(self._max_in_flight)

        async def one(i: int, data: Dict[str, Any]) -> None:
            async with slots:
                cid = data["custom_id"]
                try:
                    reply = await send(self._client, data["url"], data["body"])
                except errors.ClientClosedError:
                    state[i] = _UNANSWERED  # no line: it runs again on resume
                    return
                except Exception as exc:  # noqa: BLE001 - the line's error object
                    lines[i] = error_line(cid, exc)
                    state[i], kinds[i] = _ERROR, error_of(exc)[1]["type"]
                else:
                    lines[i] = ok_line(cid, reply)
                    usage = reply.get("usage") or {}
                    state[i] = _OK
                    ptok[i] = usage.get("prompt_tokens") or 0
                    ctok[i] = usage.get("completion_tokens") or 0

        todo = []
        for i, text in enumerate(texts):
            if not text.strip():
                continue  # a blank line is no request (the driver's check skips them too)
            data = json.loads(text)  # the driver checked every line
            if not self._answered.has_hash(id_hash(data["custom_id"])):
                todo.append(one(i, data))
        await asyncio.gather(*todo)
        written = [line for line in lines if line is not None]
        if written:
            _write_part(self._parts, written)
        return {"state": state, "error_type": kinds, "prompt_tokens": ptok,
                "completion_tokens": ctok}


def _write_part(folder: str, lines: List[bytes]) -> str:
    """A part file, whole or absent: written under a temporary name, fsynced, renamed."""
    name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
    final = os.path.join(folder, name)
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"".join(lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final)
    return final


def merge_parts(output: str, folder: str, answered: Answered) -> "tuple[Answered, int]":
    """Append every part's lines whose id ``output`` lacks; delete the parts. Returns the
    ids answered afterwards and how many lines were appended."""
    parts = sorted(glob.glob(os.path.join(folder, "part-*.jsonl")))
    if not parts:
        return answered, 0
    writer = Writer(output, group=4096, interval=3600.0)
    appended = 0
    recent: Set[int] = set()  # ids merged since ``answered`` last took them in

    def settle() -> Answered:
        merged = answered.union(Answered(np.fromiter(recent, dtype=np.uint64, count=len(recent))))
        recent.clear()
        return merged

    try:
        for part in parts:
            scan = scan_lines(part)
            with open(part, "rb") as f:
                offset = 0
                for raw in f:
                    offset += len(raw)
                    if offset > scan.good_end:
                        break
                    h = id_hash(json.loads(raw)["custom_id"])
                    if h in recent or answered.has_hash(h):
                        continue  # a block Ray ran twice, or an id merged before
                    recent.add(h)
                    writer.write(raw)
                    appended += 1
            writer.commit()
            if len(recent) >= 65536:
                answered = settle()
        answered = settle()
    finally:
        writer.close()
    for part in parts:  # only once every line is in OUTPUT, fsynced
        os.unlink(part)
    for tmp in glob.glob(os.path.join(folder, "part-*.tmp")):
        os.unlink(tmp)  # a part an actor never finished: its block runs again
    fsync_dir(os.path.join(folder, "x"))
    return answered, appended


def run_ray(opts: JobOptions, address: Optional[str] = None, actors: int = 2,
            block_lines: int = 1024) -> Summary:
    """Run the job on Ray: ``address`` None starts a local Ray (stopped at the end), else
    joins that cluster (``"auto"``, ``"ray://host:10001"``)."""
    import ray
    import ray.data

    summary = Summary("ray", opts.input, opts.output, list(opts.endpoints))
    t0 = time.monotonic()
    summary.requests_in_file = (opts.checked_count if opts.checked_count is not None
                                else check_input(opts.input))
    folder = parts_dir(opts.output)
    os.makedirs(folder, exist_ok=True)
    ckpt = open_checkpoint(opts.output)
    answered, _ = merge_parts(opts.output, folder, ckpt.answered)
    summary.torn_bytes_repaired = ckpt.torn_bytes
    if opts.retry_errors:
        ckpt = open_checkpoint(opts.output, retry_errors=True)
        answered = ckpt.answered
        summary.error_lines_dropped = ckpt.errors_dropped
    started_here = not ray.is_initialized()
    if started_here:
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    stopping: List[str] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, lambda num, frame: stopping.append(signal.Signals(num).name))
    progress = Progress(summary.requests_in_file, summary, opts.progress)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.read_text(opts.input).map_batches(
            _Sender, batch_size=block_lines, num_cpus=ACTOR_CPUS,
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs=dict(endpoints=list(opts.endpoints),
                                       answered=answered.hashes, parts=folder,
                                       max_in_flight=opts.max_in_flight))
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            state = batch["state"]
            summary.already_answered += int((state == _SKIPPED).sum())
            summary.sent += int((state != _SKIPPED).sum())
            for i in np.nonzero(state == _ERROR)[0]:
                summary.record(False, str(batch["error_type"][i]))
            summary.ok += int((state == _OK).sum())
            summary.unfinished += int((state == _UNANSWERED).sum())
            summary.prompt_tokens += int(batch["prompt_tokens"].sum())
            summary.completion_tokens += int(batch["completion_tokens"].sum())
            progress.advance(len(state))
            if stopping:
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        progress.close()
        if started_here:
            ray.shutdown()
        merge_parts(opts.output, folder, open_checkpoint(opts.output).answered)
        summary.stopped_by = stopping[0] if stopping else None
        summary.wall_s = time.monotonic() - t0
        if opts.summary_dir:
            write_summary(summary, opts.summary_dir)
    return summary
