"""Free loopback ports for the benchmark scripts (each run starts several servers)."""

from __future__ import annotations

import socket

_ports: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this run (the kernel may offer one twice)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports:
            _ports.add(port)
            return port
