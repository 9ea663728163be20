#!/usr/bin/env python3
"""A no-op OpenAI-compatible server: every request gets the same small completion JSON.

It does no work, so a client's CPU per request can be measured against it (workload W3).
A prompt list of k prompts (``n`` choices each) is answered as vLLM answers it, with k x n
choices numbered ``prompt_i * n + j`` and usage summed: the client verifies a shared call's
reply before it splits it, and refuses one choice for k prompts (nginx's fixed reply can
answer only single prompts, so the benchmark uses this server by default). An asyncio raw-socket server in its own process (the
benchmark's CPU clock never sees it), HTTP/1.1 keep-alive, loopback only.

    python benchmarks/noop_server.py [--port 0]     # prints "PORT <n>" once listening
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

BODY = json.dumps({
    "id": "cmpl-noop", "object": "text_completion", "created": 1, "model": "tiny-llama",
    "choices": [{"index": 0, "text": " hello world", "logprobs": None, "finish_reason": "length",
                 "stop_reason": None}],
    "usage": {"prompt_tokens": 8, "total_tokens": 24, "completion_tokens": 16},
}, separators=(",", ":")).encode()
REPLY = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
         % len(BODY)) + BODY
MAX_HEAD = 64 * 1024
_LIST_REPLIES: dict = {}


def list_reply(body: bytes) -> bytes:
    """The reply to a request: the fixed one, or for a prompt list one choice per prompt
    and ``n`` (kept per shape, so a list costs one JSON parse of the request)."""
    if b'"prompt":[' not in body and b'"prompt": [' not in body:
        return REPLY
    try:
        request = json.loads(body)
    except ValueError:
        return REPLY
    prompt = request.get("prompt")
    if not isinstance(prompt, list) or not prompt or isinstance(prompt[0], int):
        return REPLY
    shape = (len(prompt), int(request.get("n") or 1))
    reply = _LIST_REPLIES.get(shape)
    if reply is None:
        k, n = shape
        body_out = json.dumps({
            "id": "cmpl-noop", "object": "text_completion", "created": 1, "model": "tiny-llama",
            "choices": [{"index": i, "text": " hello world", "logprobs": None,
                         "finish_reason": "length", "stop_reason": None} for i in range(k * n)],
            "usage": {"prompt_tokens": 8 * k, "total_tokens": 8 * k + 16 * k * n,
                      "completion_tokens": 16 * k * n},
        }, separators=(",", ":")).encode()
        reply = _LIST_REPLIES[shape] = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % len(body_out)) + body_out
    return reply


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                break
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip() or 0)
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            reply = REPLY
            if length:
                reply = list_reply(await reader.readexactly(length))
            if close:
                reply = reply.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
            writer.write(reply)
            if close:
                await writer.drain()
                break
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=512, limit=MAX_HEAD)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with server:
        await stop


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    try:
        asyncio.run(main(args.port))
    except KeyboardInterrupt:
        sys.exit(0)
