"""Free loopback ports.

Why: tests must never collide with each other or with services on the machine, so they never
hard-code ports. In-process servers bind port 0 directly; these helpers exist for the cases
where another process (a gateway, squid, nginx) has to be told a port in its config.
There is an unavoidable race between closing the probe socket and the other process binding;
callers that start a process on such a port should retry on "address in use".
"""

from __future__ import annotations

import socket

__all__ = ["free_port", "free_ports"]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """Bind port 0 on ``host``, read the kernel's choice back, close, return it."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``n`` distinct free ports (all probe sockets are held open together)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(_family(host), socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
