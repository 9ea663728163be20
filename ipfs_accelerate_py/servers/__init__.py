"""Local inference servers used by the tests and benchmarks (a real vLLM on CPU, and a fake).

``vllm_cpu`` launches the real server, ``fake_vllm`` is the fault-injecting test double;
:func:`free_port` is the one free-loopback-port helper the servers, tests and benchmarks share.
"""

from ._net import free_port

__all__ = ["free_port"]
