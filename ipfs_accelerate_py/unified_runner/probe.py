"""Plain HTTP looks at a server, outside the client under test.

Health, version and the Prometheus ``/metrics`` page are read with ``requests`` directly:
they are facts about the server that the checks compare the client against, so they
must not go through the client's own retries, breaker or parsing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import requests

from ..api_backends.server_metrics import Metrics, PrometheusParseError, parse_prometheus_text

__all__ = ["Reply", "get", "reachability", "server_version", "scrape", "scrape_counter"]


@dataclass
class Reply:
    """A reply: status, body bytes, headers."""

    status: int
    body: bytes
    headers: Dict[str, str]


def get(base_url: str, path: str, timeout: float) -> Reply:
    """GET ``base_url + path``; raises ``requests.RequestException`` when nothing answers."""
    connect = min(timeout, 5.0)
    resp = requests.get(base_url.rstrip("/") + path, timeout=(connect, timeout),
                        allow_redirects=False)
    return Reply(resp.status_code, resp.content, dict(resp.headers))


def reachability(base_url: str, path: str, timeout: float) -> Tuple[bool, str]:
    """(True, "") if any HTTP reply comes back from ``path``, else (False, a short reason)."""
    try:
        get(base_url, path, timeout)
    except requests.ConnectionError as exc:
        text = str(exc)
        reason = "connection refused" if "refused" in text.lower() else _short(text)
        return False, reason
    except requests.Timeout:
        return False, f"no answer within {timeout:g} s"
    except requests.RequestException as exc:
        return False, _short(f"{type(exc).__name__}: {exc}")
    return True, ""


def _short(text: str, limit: int = 160) -> str:
    """One line, bounded: reasons are printed as a single line."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def server_version(base_url: str, timeout: float) -> Optional[str]:
    """vLLM's ``GET /version``; None for servers that do not have it."""
    try:
        reply = get(base_url, "/version", timeout)
        if reply.status == 200:
            data = json.loads(reply.body)
            if isinstance(data, dict) and data.get("version"):
                return str(data["version"])
    except (requests.RequestException, ValueError):
        pass
    return None


def scrape(base_url: str, timeout: float) -> Optional[Metrics]:
    """The server's parsed ``/metrics`` page; None if it has none (or it does not parse)."""
    try:
        reply = get(base_url, "/metrics", timeout)
    except requests.RequestException:
        return None
    if reply.status != 200:
        return None
    try:
        return parse_prometheus_text(reply.body.decode("utf-8", "replace"))
    except PrometheusParseError:
        return None


def scrape_counter(base_url: str, metric: str, timeout: float) -> Optional[float]:
    """The current total of ``metric`` (summed over label sets: engines, served names);
    None if the server has no ``/metrics`` page or no such metric."""
    metrics = scrape(base_url, timeout)
    return metrics.value(metric) if metrics is not None else None
