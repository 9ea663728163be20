"""The plugin manager: loads the entry-point group, then the built-ins the same way.

Built-in backends are listed in the same ``ipfs_accelerate_py.backends`` entry-point group
as third-party ones (see setup.cfg). When the package runs from a source tree that was
never installed, the built-ins are registered from ``DEFAULT_PLUGINS`` instead (every module
of ``default_plugins/``), so the result is the same either way.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import Dict, Optional

import pluggy

from . import default_plugins, hookspecs
from .adapter import BackendAdapter
from .errors import ConfigurationError

__all__ = ["ENTRY_POINT_GROUP", "DEFAULT_PLUGINS", "get_plugin_manager", "get_backends",
           "get_backend", "reset_plugin_manager"]

ENTRY_POINT_GROUP = "ipfs_accelerate_py.backends"
#: the built-in plugin modules: every module in ``default_plugins/``, so the base names none
DEFAULT_PLUGINS = tuple(f"{default_plugins.__name__}.{m.name}"
                        for m in pkgutil.iter_modules(default_plugins.__path__))

_lock = threading.Lock()
_pm: Optional[pluggy.PluginManager] = None
_backends: Optional[Dict[str, BackendAdapter]] = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built once, thread-safe)."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager("ipfs_accelerate_py")
            pm.add_hookspecs(hookspecs)
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            for name in DEFAULT_PLUGINS:
                module = importlib.import_module(name)
                if not pm.is_registered(module):
                    pm.register(module, name=name)
            _pm = pm
        return _pm


def get_backends() -> Dict[str, BackendAdapter]:
    """Every registered backend adapter by name, asked once through the discovery hook."""
    global _backends
    pm = get_plugin_manager()
    with _lock:
        if _backends is None:
            found: Dict[str, BackendAdapter] = {}

            def register(adapter: BackendAdapter) -> None:
                if not isinstance(adapter, BackendAdapter):
                    raise TypeError(f"register() takes a BackendAdapter, got {type(adapter).__name__}")
                if adapter.name in found:
                    raise ValueError(f"backend {adapter.name!r} registered twice")
                found[adapter.name] = adapter

            pm.hook.iap_register_backends(register=register)
            _backends = dict(sorted(found.items()))
        return _backends


def get_backend(name: str) -> BackendAdapter:
    """The adapter registered as ``name``; a ConfigurationError lists what exists."""
    backends = get_backends()
    try:
        return backends[name]
    except KeyError:
        raise ConfigurationError(f"no backend named {name!r}; registered: {sorted(backends)}",
                                 field="backend") from None


def reset_plugin_manager() -> None:
    """Forget the manager so the next call rediscovers plugins (after installing one)."""
    global _pm, _backends
    with _lock:
        _pm = None
        _backends = None
