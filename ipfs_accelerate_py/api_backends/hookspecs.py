"""The plugin hooks, one line each. Hook names carry the project prefix ``iap_``."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("ipfs_accelerate_py")
hookimpl = pluggy.HookimplMarker("ipfs_accelerate_py")


@hookspec
def iap_register_backends(register):  # type: ignore[no-untyped-def]
    """Register API backends: call ``register(adapter)`` once per ``BackendAdapter``."""
