"""Loopback networking shared by the servers, the tests and the benchmarks."""

from __future__ import annotations

import socket

#: Every local server here listens on loopback only.
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now. The OS picks it; nothing is reserved,
    so a caller that binds later can lose it to another process (the launcher retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])
