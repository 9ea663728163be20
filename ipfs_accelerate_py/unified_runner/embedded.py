"""Which server the suites talk to: the one at ``--api-url``, or one started here.

If anything answers HTTP at ``--api-url`` it is used as is ("external"). Otherwise, for
the suites that only need *a* server (``--standard``, ``--performance``), the runner
starts the embedded default and says which one:

* ``vllm-cpu``: the project's real vLLM server on the CPU with a tiny local model
  (``ipfs_accelerate_py.servers.vllm_cpu``), when its virtualenv is installed;
* ``fake``: the in-process vLLM test double (``ipfs_accelerate_py.servers.fake_vllm``)
  otherwise; it speaks the same wire format, so every check still means something, but
  its timings are not a vLLM's.

``--real`` never gets an embedded server: it exists to test the user's live server.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from ..servers import vllm_cpu
from ..servers.fake_vllm import FakeVllmServer
from .config import EmbeddedChoice
from .probe import reachability
from .results import ServerKind

__all__ = ["NoServerError", "ServerTarget", "probe_external", "start_embedded"]

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class NoServerError(RuntimeError):
    """No server could be found or started; the message is one line, fit for a user."""


@dataclass
class ServerTarget:
    """A server the suites use; ``stop()`` ends it only if this run started it."""

    base_url: str
    kind: ServerKind
    note: str
    _stoppers: List[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def embedded(self) -> bool:
        return self.kind != "external"

    def stop(self) -> None:
        while self._stoppers:
            self._stoppers.pop()()


def probe_external(api_url: str, health_path: str,
                   timeout: float) -> "tuple[Optional[ServerTarget], str]":
    """The server at ``api_url`` if it answers HTTP at all, else (None, why not)."""
    ok, reason = reachability(api_url, health_path, timeout)
    if ok:
        return ServerTarget(api_url, "external", f"using the server at {api_url}"), ""
    return None, reason


def start_embedded(choice: EmbeddedChoice, why: str, log: Log = _stderr) -> ServerTarget:
    """Start the embedded server ``choice`` asks for (``auto``: vllm-cpu if installed, else
    the fake). ``why`` says why none was found (it goes into the note)."""
    if choice == "none":
        raise NoServerError(f"{why}; not starting an embedded server (--embedded none)")
    failure = ""
    if choice in ("auto", "vllm-cpu"):
        if vllm_cpu.is_installed():
            server = vllm_cpu.VllmCpuServer(log=log)
            log(f"[runner] {why}; starting the embedded vllm-cpu server (takes ~20 s)")
            try:
                server.start()
            except Exception as exc:  # noqa: BLE001 - reported, then maybe the fake
                server.stop()
                failure = f"vllm-cpu failed to start ({str(exc).splitlines()[0][:120]})"
                if choice == "vllm-cpu":
                    raise NoServerError(failure) from None
            else:
                return ServerTarget(server.base_url, "embedded-vllm-cpu",
                                    f"{why}; using the embedded vllm-cpu server (real vLLM, "
                                    f"tiny model) at {server.base_url}", [server.stop])
        elif choice == "vllm-cpu":
            raise NoServerError("vllm-cpu is not installed; run "
                                "`python -m ipfs_accelerate_py.servers.vllm_cpu install`")
        else:
            failure = "vllm-cpu is not installed"
    fake = FakeVllmServer().start()
    extra = f" ({failure})" if failure else ""
    return ServerTarget(fake.base_url, "embedded-fake",
                        f"{why}; using the embedded vLLM test double{extra} at {fake.base_url} "
                        f"(wire-compatible; its timings are not a real vLLM's)", [fake.stop])
