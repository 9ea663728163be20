"""Header values: the check every header that goes on the wire passes, and reply headers.

Kept apart from the transports because both the aiohttp transport and anything else that
builds a request head must refuse the same things: a header name or value that carries a
line break or NUL could smuggle a second header (or a second request) onto the wire, so it
is refused before sending, as a ``ValidationError`` naming ``headers``.
"""

from __future__ import annotations

import re
from typing import Any

from .. import errors

__all__ = ["Headers", "check_header"]


class Headers(dict):
    """Reply headers: a plain ``dict`` with lower-case names, looked up case-insensitively
    (a ``dict`` so that code reading replies, and tests building them, need nothing else)."""

    __slots__ = ()

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, key.lower(), default)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key.lower() if isinstance(key, str) else key)


_BAD_NAME = re.compile("[\r\n: \t\0]")
_BAD_VALUE = re.compile("[\r\n\0]")


def check_header(name: str, value: str) -> None:
    """Refuse a header that could break the request head (see the module docstring)."""
    if not name or _BAD_NAME.search(name) or _BAD_VALUE.search(value):
        raise errors.ValidationError(f"invalid header {name!r}", field="headers")
