"""Incremental Server-Sent Events decoding (bytes in any split -> event payloads).

vLLM frames every event as ``data: <json>\\n\\n`` and ends with ``data: [DONE]``, but a
proxy may re-chunk bytes anywhere, use ``\\r\\n``, or add ``: keep-alive`` comments; the
decoder handles all of those, and bounds an event's size so a hostile stream cannot grow
memory without limit.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List

from .errors import ResponseError

__all__ = ["SSEDecoder", "iter_sse_data", "MAX_EVENT_BYTES"]

#: Largest single event accepted (a full-context logprobs chunk stays far below this).
MAX_EVENT_BYTES = 32 * 1024 * 1024


class SSEDecoder:
    """Feed bytes, get the ``data`` payload of every complete event (comments dropped)."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buf = bytearray()
        self._data: List[bytes] = []
        self._size = 0
        self._max = max_event_bytes
        self._pending_cr = False

    def feed(self, chunk: bytes) -> List[str]:
        """Consume ``chunk``; return the payloads of events it completed."""
        if self._buf or self._data or self._pending_cr or b"\r" in chunk:
            return self._feed_lines(chunk)
        # The common framing, with nothing left over from the last read: whole events of one
        # ``data: `` line each, split at their blank lines in C rather than line by line
        # (what does not look like that goes the general way, from a clean state).
        out: List[str] = []
        blocks = chunk.split(b"\n\n")
        tail = blocks.pop()  # after the last blank line: the start of an unfinished event
        for block in blocks:
            if block.startswith(b"data: ") and b"\n" not in block:
                if len(block) - 6 > self._max:
                    raise ResponseError(f"stream event larger than {self._max} bytes")
                out.append(block[6:].decode("utf-8", errors="replace"))
            else:
                out += self._feed_lines(block + b"\n\n")
        if tail:
            out += self._feed_lines(tail)
        return out

    def _feed_lines(self, chunk: bytes) -> List[str]:
        """``feed``, line by line (any framing, any split, state carried across reads)."""
        out: List[str] = []
        if not chunk:
            return out  # an empty read must not forget a CR still waiting for its LF
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the \n of a \r\n split across two chunks
        self._pending_cr = False
        self._buf += chunk
        buf = self._buf
        start = 0
        n = len(buf)
        while start < n:
            nl = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, nl if nl >= 0 else n)
            if cr >= 0:
                end, nxt = cr, cr + 1
                if nxt < n and buf[nxt] == 0x0A:
                    nxt += 1
                elif nxt == n:
                    self._pending_cr = True
            elif nl >= 0:
                end, nxt = nl, nl + 1
            else:
                break
            self._line(bytes(buf[start:end]), out)
            start = nxt
        del buf[:start]
        if len(buf) + self._size > self._max:
            raise ResponseError(f"stream event larger than {self._max} bytes")
        return out

    def _line(self, line: bytes, out: List[str]) -> None:
        if not line:
            if self._data:
                out.append(b"\n".join(self._data).decode("utf-8", errors="replace"))
            self._data = []
            self._size = 0
            return
        if line.startswith(b":"):
            return  # comment / keep-alive
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._size += len(value)
            if self._size > self._max:
                raise ResponseError(f"stream event larger than {self._max} bytes")
            self._data.append(value)
        # "event", "id", "retry" are not used by vLLM; ignored.

    def flush(self) -> List[str]:
        """At end of stream: an event not closed by a blank line still counts."""
        out: List[str] = []
        if self._buf:
            self._line(bytes(self._buf), out)
            self._buf.clear()
        if self._data:
            out.append(b"\n".join(self._data).decode("utf-8", errors="replace"))
            self._data = []
        return out


def iter_sse_data(chunks: Iterable[bytes], max_event_bytes: int = MAX_EVENT_BYTES) -> Iterator[str]:
    """Yield event payloads from a byte-chunk iterator."""
    dec = SSEDecoder(max_event_bytes)
    for chunk in chunks:
        yield from dec.feed(chunk)
    yield from dec.flush()
