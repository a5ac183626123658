"""HTTP CONNECT through a forward proxy (issue 2 item 5).

Hand-written (about 60 lines) rather than python-socks so that every failure says which proxy refused
what and why, and the password can never reach a log line, an exception text or a traceback: it only
ever exists inside the base64 header built in ``_request``.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from dataclasses import dataclass


class ProxyError(ConnectionError):
    """The forward proxy could not give us a tunnel. The message is safe to log."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    username: str | None = None
    password: object = None  # intercloud.config Secret, or str from the environment

    def __str__(self) -> str:
        user = f"{self.username}:***@" if self.username else ""
        return f"http://{user}{self.host}:{self.port}"

    __repr__ = __str__

    def _password(self) -> str:
        p = self.password
        return p.reveal() if hasattr(p, "reveal") else (p or "")


def _request(proxy: Proxy, host: str, port: int) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.username is not None:
        token = base64.b64encode(f"{proxy.username}:{proxy._password()}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_tunnel(proxy: Proxy, host: str, port: int, timeout: float) -> socket.socket:
    """A non-blocking socket connected through ``proxy`` to host:port, ready for TLS."""
    loop = asyncio.get_running_loop()
    where = f"forward proxy {proxy}"
    try:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ProxyError(f"{where}: cannot resolve {proxy.host!r}: {exc}; check tunnel.proxy") from None
    sock = socket.socket(infos[0][0], socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            try:
                await loop.sock_connect(sock, infos[0][4])
            except OSError as exc:
                raise ProxyError(f"{where} is unreachable: {exc.strerror or exc}; check tunnel.proxy or HTTPS_PROXY") from None
            await loop.sock_sendall(sock, _request(proxy, host, port))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    raise ProxyError(f"{where} closed the connection before answering CONNECT {host}:{port}")
                head += chunk
                if len(head) > 65536:
                    raise ProxyError(f"{where} sent an answer larger than 64 KiB to CONNECT")
    except TimeoutError:
        sock.close()
        raise ProxyError(f"{where} did not answer CONNECT {host}:{port} within {timeout:g}s") from None
    except BaseException:
        sock.close()
        raise
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = status_line.split(" ", 2)
    code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if code != 200:
        sock.close()
        hint = {
            407: "the proxy wants credentials: put user:password in tunnel.proxy (http://user:pass@host:port)",
            403: f"the proxy's policy forbids CONNECT to {host}:{port}: allow it (squid: http_access / SSL_ports)",
        }.get(code, "check the proxy's access log")
        raise ProxyError(f"{where} refused CONNECT {host}:{port}: {status_line!r}; {hint}")
    rest = head.split(b"\r\n\r\n", 1)[1]
    if rest:
        sock.close()
        raise ProxyError(f"{where} sent data after its CONNECT answer; it is not a plain CONNECT proxy")
    return sock
