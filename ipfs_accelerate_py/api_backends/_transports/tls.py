"""TLS trust from the ``verify_tls`` / ``ca_bundle`` settings, read as ``requests`` reads
``verify``: one place, so the aiohttp transport and ``RequestsTransport`` trust the same
certificates for the same settings (certifi's bundle by default, not the system store).
"""

from __future__ import annotations

import os
import ssl
from typing import Any

__all__ = ["tls_context"]


def tls_context(verify: Any) -> ssl.SSLContext:
    """``verify``: True (certifi's bundle, like requests), False (no verification), or the
    path of a CA bundle file or directory."""
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if isinstance(verify, (str, os.PathLike)):
        path = os.fspath(verify)
        if os.path.isdir(path):
            return ssl.create_default_context(capath=path)
        return ssl.create_default_context(cafile=path)
    try:
        import certifi  # requests' own CA bundle: the same trust as RequestsTransport
    except ImportError:  # pragma: no cover - requests depends on certifi
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())
