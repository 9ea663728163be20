"""Reading the batch input: vLLM run-batch / OpenAI batch lines, streamed and checked.

A line is ``{"custom_id": str, "method": "POST", "url": ROUTE, "body": {...}}``. The whole
file is checked before anything is sent (``check_input``): a line that is not a JSON object,
a method other than POST, a route the job does not know, a missing custom id, or a custom id
seen on an earlier line refuses the file, naming the lines. What a body holds is the server's
business, and the client's: a body the client refuses becomes that line's error line.

Memory stays flat in the number of lines: the file is read one line at a time, and the
duplicate check keeps 8 bytes per line (a 64-bit hash of each custom id, sorted once); the
lines behind a hash seen twice are read again to compare the ids themselves, so a hash
collision never refuses a good file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

__all__ = ["ROUTES", "InputError", "BatchLine", "id_hash", "check_input", "read_lines"]

#: The routes a batch line may name (the same set vLLM's run-batch reads).
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")

#: At most this many problems are listed in the refusal (the count is always given).
MAX_LISTED = 20


class InputError(ValueError):
    """The input file is refused; ``problems`` are ``(line number, why)`` pairs."""

    def __init__(self, path: str, problems: List[Tuple[int, str]], count: int) -> None:
        self.problems = problems
        self.count = count
        listed = "\n".join(f"  line {n}: {why}" for n, why in problems)
        more = f"\n  ... and {count - len(problems)} more" if count > len(problems) else ""
        super().__init__(f"{path}: {count} bad line(s), nothing was sent:\n{listed}{more}")


@dataclass
class BatchLine:
    """One request of the file: where it is, its id, its route and its body."""

    number: int
    custom_id: str
    url: str
    body: Dict[str, Any]


def id_hash(custom_id: str) -> int:
    """The 64-bit key a custom id is tracked by (duplicates, answered ids)."""
    return int.from_bytes(hashlib.blake2b(custom_id.encode("utf-8"), digest_size=8).digest(),
                          "little")


def _parse(number: int, raw: bytes) -> "Tuple[Optional[BatchLine], str]":
    """The line, or (None, why it is refused); (None, "") for a blank line (skipped)."""
    if not raw.strip():
        return None, ""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return None, f"not JSON ({exc.__class__.__name__}: {str(exc)[:80]})"
    if not isinstance(data, dict):
        return None, f"not a JSON object but {type(data).__name__}"
    cid = data.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return None, "custom_id must be a non-empty string"
    if data.get("method") != "POST":
        return None, f"method must be \"POST\", got {data.get('method')!r}"
    url = data.get("url")
    if url not in ROUTES:
        return None, f"url must be one of {', '.join(ROUTES)}; got {url!r}"
    body = data.get("body")
    if not isinstance(body, dict):
        return None, "body must be a JSON object"
    return BatchLine(number, cid, url, body), ""


def read_lines(path: str) -> Iterator[BatchLine]:
    """Every request of a checked file, in order, one line in memory at a time."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line, why = _parse(number, raw)
            if line is not None:
                yield line
            elif why:  # the file changed since it was checked
                raise InputError(path, [(number, why)], 1)


def check_input(path: str) -> int:
    """Check every line of ``path`` (see the module docstring); return how many requests it
    holds. Raises ``InputError`` naming the bad lines."""
    problems: List[Tuple[int, str]] = []
    count = 0
    hashes = np.empty(1 << 16, dtype=np.uint64)
    n = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line, why = _parse(number, raw)
            if line is None:
                if why:
                    count += 1
                    if len(problems) < MAX_LISTED:
                        problems.append((number, why))
                continue
            if n == len(hashes):
                hashes = np.resize(hashes, len(hashes) * 2)
            hashes[n] = id_hash(line.custom_id)
            n += 1
    dupes = _duplicates(path, hashes[:n])
    for cid, numbers in dupes:
        count += 1
        if len(problems) < MAX_LISTED:
            problems.append((numbers[-1], f"custom_id {cid!r} is also on line(s) "
                                          f"{', '.join(map(str, numbers[:-1]))}"))
    if count:
        problems.sort()
        raise InputError(path, problems, count)
    return n


def _duplicates(path: str, hashes: "np.ndarray") -> List[Tuple[str, List[int]]]:
    """(custom id, its line numbers) for every id on more than one line."""
    if len(hashes) < 2:
        return []
    ordered = np.sort(hashes)
    twice = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not twice:
        return []
    seen: Dict[str, List[int]] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line, _ = _parse(number, raw)
            if line is not None and id_hash(line.custom_id) in twice:
                seen.setdefault(line.custom_id, []).append(line.number)
    return [(cid, nums) for cid, nums in seen.items() if len(nums) > 1]
