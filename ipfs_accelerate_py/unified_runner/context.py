"""What a suite needs: the run's config, the backend's adapter, the server and its model."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, TextIO

from ..api_backends.adapter import BackendAdapter
from ..api_backends.base import BaseApiBackend
from .clients import SendCounter, make_client
from .config import RunnerConfig

__all__ = ["SuiteContext", "strings_in"]


@dataclass
class SuiteContext:
    """Shared by the suites of one run. ``samples`` stays None unless ``--store-prompts``."""

    config: RunnerConfig
    adapter: BackendAdapter
    base_url: str
    model: str
    listed_models: List[Dict[str, Any]] = field(default_factory=list)
    out: TextIO = field(default_factory=lambda: sys.stdout)
    samples: Optional[List[Dict[str, Any]]] = None

    @property
    def backend(self) -> str:
        return self.config.backend

    @property
    def timeout(self) -> float:
        return self.config.timeout

    def client(self, counter: Optional[SendCounter] = None, base_url: Optional[str] = None,
               **settings: Any) -> BaseApiBackend:
        """A fresh client of this run's backend (close it, or use ``with``)."""
        return make_client(self.backend, base_url or self.base_url, self.timeout, counter,
                           adapter=self.adapter, **settings)

    def model_record(self, model: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """The server's ``/v1/models`` entry for ``model`` (None if it is not listed)."""
        name = model or self.model
        return next((m for m in self.listed_models if m.get("id") == name), None)

    def sample(self, **fields: Any) -> None:
        """Keep a prompt/output pair, only when the run asked for ``--store-prompts``."""
        if self.samples is not None:
            self.samples.append(fields)


def strings_in(obj: Any) -> List[str]:
    """Every string value inside a decoded JSON document (to find parsed text in a raw reply)."""
    out: List[str] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return out
