"""Read a server's Prometheus ``/metrics`` text: families, samples, histograms, quantiles.

Servers such as vLLM publish their own statistics only in the Prometheus text format, so
the client parses it instead of guessing from its own timings. This is a small reader of
the text exposition format (0.0.4, and the 1.0.0 variant where a name may be quoted inside
the braces): ``# HELP`` / ``# TYPE`` lines, samples with escaped label values, counters,
gauges, histograms (``_bucket`` / ``_sum`` / ``_count``) and ``_created`` series.
``histogram_quantile`` interpolates inside buckets the way Prometheus does.

Nothing here knows a particular server: ``prometheus_probe`` turns any gauge into a load
figure for routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from .transport import HttpRequest

__all__ = ["Sample", "MetricFamily", "Histogram", "Metrics", "PrometheusParseError",
           "parse_prometheus_text", "histogram_quantile", "prometheus_probe", "PrometheusProbe"]

#: Suffixes that attach a sample to its family (``x_bucket`` belongs to histogram ``x``).
_SUFFIXES = ("_bucket", "_count", "_sum", "_created", "_total", "_gcount", "_gsum", "_info")
_NAME_START = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_:")
_NAME_CHARS = _NAME_START | set("0123456789")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


class PrometheusParseError(ValueError):
    """The text is not in the Prometheus exposition format; says which line and why."""

    def __init__(self, message: str, line_no: int) -> None:
        super().__init__(f"line {line_no}: {message}")
        self.line_no = line_no


@dataclass(frozen=True)
class Sample:
    """One line of data: ``name{labels} value [timestamp]``."""

    name: str
    labels: Mapping[str, str]
    value: float
    timestamp: Optional[float] = None

    def matches(self, labels: Optional[Mapping[str, str]]) -> bool:
        return not labels or all(self.labels.get(k) == v for k, v in labels.items())


@dataclass
class MetricFamily:
    """Samples that share a ``# TYPE`` (``untyped`` when the text gave none)."""

    name: str
    type: str = "untyped"
    help: str = ""
    samples: List[Sample] = field(default_factory=list)


@dataclass
class Histogram:
    """Cumulative buckets ``[(upper bound, count <= bound)]`` sorted by bound, with sum/count."""

    buckets: List[Tuple[float, float]]
    count: float
    sum: float

    @property
    def mean(self) -> Optional[float]:
        return self.sum / self.count if self.count else None

    def quantile(self, q: float) -> Optional[float]:
        """The ``q``-quantile estimated from the buckets; None when there are no observations."""
        return histogram_quantile(q, self.buckets)

    def summary(self, quantiles: Sequence[float] = (0.5, 0.9, 0.99)) -> Dict[str, Any]:
        """``{"count", "sum", "mean", "p50", "p90", "p99"}`` (percentiles None when empty)."""
        out: Dict[str, Any] = {"count": int(self.count), "sum": self.sum, "mean": self.mean}
        for q in quantiles:
            out[f"p{round(q * 100):g}"] = self.quantile(q)
        return out


def histogram_quantile(q: float, buckets: Sequence[Tuple[float, float]]) -> Optional[float]:
    """Prometheus' estimate: find the bucket holding rank ``q * total``, interpolate linearly.

    The first bucket starts at 0 (when its bound is positive). A rank in the ``+Inf`` bucket
    returns the highest finite bound: the histogram cannot say more than "above that".
    """
    if not 0.0 <= q <= 1.0 or math.isnan(q):
        raise ValueError(f"quantile must be between 0 and 1, got {q}")
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        raise ValueError("a histogram needs a +Inf bucket")
    total = ordered[-1][1]
    if total <= 0:
        return None
    rank = q * total
    for i, (bound, count) in enumerate(ordered):
        if count < rank:
            continue
        if math.isinf(bound):
            return ordered[-2][0] if len(ordered) > 1 else None
        lower, lower_count = (0.0, 0.0) if i == 0 else ordered[i - 1]
        if i == 0 and bound <= 0:
            return bound
        if count == lower_count:
            return bound
        return lower + (bound - lower) * (rank - lower_count) / (count - lower_count)
    return None  # unreachable: the +Inf bucket holds the total


class Metrics:
    """A parsed exposition. Look-ups sum over every series whose labels match."""

    def __init__(self, families: Dict[str, MetricFamily]) -> None:
        self.families = families
        self._by_name: Dict[str, List[Sample]] = {}
        for fam in families.values():
            for s in fam.samples:
                self._by_name.setdefault(s.name, []).append(s)

    def __contains__(self, sample_name: str) -> bool:
        return sample_name in self._by_name

    def sample_names(self) -> List[str]:
        return sorted(self._by_name)

    def samples(self, name: str, labels: Optional[Mapping[str, str]] = None) -> List[Sample]:
        """Samples called exactly ``name`` whose labels include ``labels``."""
        return [s for s in self._by_name.get(name, ()) if s.matches(labels)]

    def value(self, name: str, labels: Optional[Mapping[str, str]] = None) -> Optional[float]:
        """Sum of the matching samples (e.g. over engines); None when none match."""
        found = self.samples(name, labels)
        return math.fsum(s.value for s in found) if found else None

    def by_label(self, name: str, label: str,
                 labels: Optional[Mapping[str, str]] = None) -> Dict[str, float]:
        """``{label value: summed value}`` for one sample name, e.g. successes by reason."""
        out: Dict[str, float] = {}
        for s in self.samples(name, labels):
            key = s.labels.get(label, "")
            out[key] = out.get(key, 0.0) + s.value
        return out

    def label_values(self, label: str, prefix: str = "") -> Set[str]:
        """Every value of ``label`` on samples whose name starts with ``prefix``."""
        return {s.labels[label] for n, ss in self._by_name.items() if n.startswith(prefix)
                for s in ss if label in s.labels}

    def histogram(self, name: str, labels: Optional[Mapping[str, str]] = None) -> Optional[Histogram]:
        """The histogram family ``name`` summed over matching series; None if absent."""
        buckets: Dict[float, float] = {}
        for s in self.samples(name + "_bucket", labels):
            le = s.labels.get("le")
            if le is None:
                continue
            bound = float(le)
            buckets[bound] = buckets.get(bound, 0.0) + s.value
        if not buckets:
            return None
        count = self.value(name + "_count", labels)
        total = self.value(name + "_sum", labels)
        ordered = sorted(buckets.items())
        if not math.isinf(ordered[-1][0]):
            return None
        return Histogram(ordered, count if count is not None else ordered[-1][1], total or 0.0)


def _unescape(text: str, help_text: bool = False) -> str:
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and (text[i + 1] in _ESCAPES and
                                                 (not help_text or text[i + 1] != '"')):
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _read_name(line: str, i: int, line_no: int) -> Tuple[str, int]:
    if i >= len(line) or line[i] not in _NAME_START:
        raise PrometheusParseError(f"expected a name at column {i + 1}: {line[:120]!r}", line_no)
    j = i + 1
    while j < len(line) and line[j] in _NAME_CHARS:
        j += 1
    return line[i:j], j


def _read_quoted(line: str, i: int, line_no: int) -> Tuple[str, int]:
    """A double-quoted string starting at ``line[i] == '"'``; returns (text, index after)."""
    out: List[str] = []
    j = i + 1
    while j < len(line):
        c = line[j]
        if c == "\\":
            if j + 1 >= len(line) or line[j + 1] not in _ESCAPES:
                raise PrometheusParseError(f"bad escape at column {j + 1}", line_no)
            out.append(_ESCAPES[line[j + 1]])
            j += 2
        elif c == '"':
            return "".join(out), j + 1
        else:
            out.append(c)
            j += 1
    raise PrometheusParseError("unterminated label value", line_no)


def _skip_blanks(line: str, i: int) -> int:
    while i < len(line) and line[i] in " \t":
        i += 1
    return i


def _read_labels(line: str, i: int, line_no: int) -> Tuple[Optional[str], Dict[str, str], int]:
    """Parse ``{...}`` at ``line[i]``; returns (quoted metric name or None, labels, index after)."""
    labels: Dict[str, str] = {}
    quoted_name: Optional[str] = None
    j = i + 1
    while True:
        j = _skip_blanks(line, j)
        if j >= len(line):
            raise PrometheusParseError("unterminated label set", line_no)
        if line[j] == "}":
            return quoted_name, labels, j + 1
        if line[j] == '"':  # 1.0.0 format: a quoted name, either the metric's or a label's
            text, j = _read_quoted(line, j, line_no)
            after = _skip_blanks(line, j)
            if after < len(line) and line[after] == "=":
                key = text
            else:
                quoted_name = text
                key = ""
        else:
            key, j = _read_name(line, j, line_no)
        if key:
            j = _skip_blanks(line, j)
            if j >= len(line) or line[j] != "=":
                raise PrometheusParseError(f"expected '=' after label {key!r}", line_no)
            j = _skip_blanks(line, j + 1)
            if j >= len(line) or line[j] != '"':
                raise PrometheusParseError(f"label {key!r} value must be quoted", line_no)
            value, j = _read_quoted(line, j, line_no)
            labels[key] = value
        j = _skip_blanks(line, j)
        if j < len(line) and line[j] == ",":
            j += 1
        elif j < len(line) and line[j] != "}":
            raise PrometheusParseError(f"expected ',' or '}}' at column {j + 1}", line_no)


def _parse_sample(line: str, line_no: int) -> Sample:
    if line.startswith("{"):
        quoted, labels, j = _read_labels(line, 0, line_no)
        if quoted is None:
            raise PrometheusParseError("a sample needs a metric name", line_no)
        name = quoted
    else:
        name, j = _read_name(line, 0, line_no)
        labels = {}
        if line[_skip_blanks(line, j):].startswith("{"):
            j = _skip_blanks(line, j)
        if j < len(line) and line[j] == "{":
            quoted, labels, j = _read_labels(line, j, line_no)
    rest = line[j:].split()
    if not rest or len(rest) > 2:
        raise PrometheusParseError(f"expected 'value [timestamp]' after {name!r}", line_no)
    try:
        value = float(rest[0])
        timestamp = float(rest[1]) if len(rest) == 2 else None
    except ValueError:
        raise PrometheusParseError(f"not a number: {' '.join(rest)!r}", line_no) from None
    return Sample(name, labels, value, timestamp)


def _family_of(sample_name: str, families: Dict[str, MetricFamily]) -> MetricFamily:
    fam = families.get(sample_name)
    if fam is not None:
        return fam
    for suffix in _SUFFIXES:
        if sample_name.endswith(suffix):
            fam = families.get(sample_name[: -len(suffix)])
            if fam is not None:
                return fam
    fam = families[sample_name] = MetricFamily(sample_name)
    return fam


def parse_prometheus_text(text: str) -> Metrics:
    """Parse a ``/metrics`` body; raise ``PrometheusParseError`` naming the bad line."""
    families: Dict[str, MetricFamily] = {}
    for line_no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line[1:].strip().split(None, 2)
            if len(parts) >= 2 and parts[0] in ("HELP", "TYPE"):
                name = parts[1]
                if name.startswith('"') and name.endswith('"') and len(name) > 1:
                    name = name[1:-1]
                fam = families.setdefault(name, MetricFamily(name))
                arg = parts[2] if len(parts) > 2 else ""
                if parts[0] == "TYPE":
                    fam.type = arg.strip() or "untyped"
                else:
                    fam.help = _unescape(arg, help_text=True)
            continue  # other comments (and "# EOF") carry no data
        sample = _parse_sample(line, line_no)
        _family_of(sample.name, families).samples.append(sample)
    return Metrics(families)


class PrometheusProbe:
    """A load probe (see ``prometheus_probe``): call it with an endpoint; ``metric`` names
    the gauge it sums."""

    def __init__(self, metric: str, path: str, timeout: float,
                 labels: Optional[Mapping[str, str]]) -> None:
        self.metric = metric
        self.path = path
        self.timeout = timeout
        self.labels = labels

    def __call__(self, endpoint: Any) -> Optional[float]:
        connect = min(self.timeout, endpoint.settings.connect_timeout)
        request, timeout = HttpRequest("GET", self.path), (connect, self.timeout)
        try:
            fetch = getattr(endpoint, "fetch", None)
            # a client's endpoint sends it through its transport on the client's loop; any
            # other object with a sync ``transport`` sends it itself
            resp = fetch(request, timeout) if fetch is not None else endpoint.transport.send(
                request, timeout)
        except Exception:  # noqa: BLE001 - unreachable: no figure, not an error
            return None
        if resp.status != 200:
            return None
        try:
            return parse_prometheus_text(resp.body.decode("utf-8", "replace")).value(
                self.metric, self.labels)
        except PrometheusParseError:
            return None


def prometheus_probe(metric: str, path: str = "/metrics", timeout: float = 2.0,
                     labels: Optional[Mapping[str, str]] = None) -> PrometheusProbe:
    """A load probe for routing: GET ``path`` on an endpoint and sum gauge ``metric``.

    The returned callable takes an endpoint (a client's, whose ``fetch`` sends the request
    through the endpoint's transport on the client's loop; or anything with a sync
    ``transport`` and ``settings``) and answers None when the server is unreachable, says
    no, or lacks the series: a load probe must never fail a request, and routing falls back
    to the client's own counts. One attempt, short timeouts, no retries; the caller's thread
    waits for it.
    """
    return PrometheusProbe(metric, path, timeout, labels)

