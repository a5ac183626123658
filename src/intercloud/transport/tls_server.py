"""The cloud's TLS WebSocket listener, with one log line for every failed TLS handshake.

asyncio and uvloop run a server's TLS handshake inside their SSL protocol and, when it fails, drop
the error unless the loop is in debug mode (an ``ssl.SSLError`` is an ``OSError``, which they never
pass to the loop's exception handler). A client whose certificate is from another CA or has expired,
a client without a certificate, plain HTTP or garbage on the tunnel port would leave no trace at all.

So this listener accepts TCP itself and hands each socket to ``aiofastnet.connect_accepted_socket``
(the transport picows uses on the dialing side too, docs/performance.md) with the TLS context: a failed handshake is raised right here, where the peer address is known, and is
logged once (event ``tunnel.tls_failed``), without a traceback. A completed handshake goes to the
same picows WebSocket protocol that ``picows.ws_create_server`` would have used.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import aiofastnet
from picows import WSAutoPingStrategy, ws_create_server

log = logging.getLogger("intercloud.cloud")


def _ws_protocol_factory(listener_factory, handshake_timeout: float, max_frame_size: int):
    """The server-side picows protocol, built exactly as ``picows.ws_create_server`` builds it.
    Returns None if this picows version's (internal) constructor differs."""
    try:
        from picows.picows import WSProtocol

        def make():
            return WSProtocol(None, None, False, listener_factory, logging.getLogger("picows.server"), True,
                              handshake_timeout, False, 20, 20, WSAutoPingStrategy.PING_WHEN_IDLE, True,
                              max_frame_size, None, 16 * 1024)

        make()  # fail here, at start-up, rather than on the first tunnel
    except (ImportError, TypeError):
        return None
    return make


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """(log level, what went wrong and what to do) for a failed server-side TLS handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return logging.WARNING, (f"client certificate refused: {exc.verify_message}; an on-prem gateway must "
                                 "present a valid (unexpired) certificate signed by a CA in tls.ca")
    closed = ("the client closed the connection during the handshake; if it is an on-prem gateway, its log "
              "says why (often: it does not trust this gateway's certificate or expected another name)")
    if isinstance(exc, ssl.SSLEOFError):
        return logging.INFO, closed
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        up = reason.upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in up or "CERTIFICATE_REQUIRED" in up:
            hint = "an on-prem gateway must present one (tls.cert and tls.key)"
        elif "HTTP_REQUEST" in up or "HTTPS_PROXY_REQUEST" in up:
            hint = "the client sent plain HTTP; tunnels need wss:// (TLS)"
        elif "ALERT" in up:
            hint = ("the client aborted the handshake; it likely does not trust this gateway's certificate "
                    "(tls.cert) or expected another name")
        else:
            hint = "the client does not speak TLS 1.2+ as an intercloud on-prem gateway does"
        return logging.WARNING, f"{reason.lower().replace('_', ' ')}; {hint}"
    if isinstance(exc, ConnectionAbortedError) and "handshake" in str(exc):
        return logging.WARNING, f"{exc} (tunnel.handshake_timeout)"
    if isinstance(exc, (ConnectionError, EOFError)):
        return logging.INFO, closed
    return logging.WARNING, f"{type(exc).__name__}: {exc}"


class TlsWsServer:
    """Listening sockets plus their accept loops; ``close()`` stops accepting (like asyncio.Server)."""

    def __init__(self, socks: list[socket.socket], protocol_factory, ssl_ctx: ssl.SSLContext, handshake_timeout):
        self._socks = socks
        self._factory = protocol_factory
        self._ssl = ssl_ctx
        self._timeout = handshake_timeout
        self._tasks: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        self._accepting = [loop.create_task(self._accept_loop(s)) for s in socks]

    def set_ssl(self, ssl_ctx: ssl.SSLContext) -> None:
        """New handshakes use ``ssl_ctx`` (certificate rotation on SIGHUP); live tunnels are untouched."""
        self._ssl = ssl_ctx

    def close(self) -> None:
        for t in self._accepting:
            t.cancel()
        for s in self._socks:
            s.close()

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(lsock)
            except OSError as exc:  # EMFILE and friends: say so, keep serving
                log.error("tunnel endpoint cannot accept: %s; raise the open-files limit (ulimit -n)",
                          exc.strerror or exc, extra={"event": "tunnel.accept_failed"})
                await asyncio.sleep(0.5)
                continue
            task = loop.create_task(self._handshake(sock, addr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handshake(self, sock: socket.socket, addr) -> None:
        peer = f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
        try:
            await aiofastnet.connect_accepted_socket(
                asyncio.get_running_loop(), self._factory, sock, ssl=self._ssl, ssl_handshake_timeout=self._timeout)
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is one log line, never a traceback
            sock.close()  # no-op when the transport already released it
            level, why = describe_failure(exc)
            log.log(level, "TLS handshake from %s failed: %s", peer, why,
                    extra={"event": "tunnel.tls_failed", "peer_addr": peer, "reason": why})


async def create_server(listener_factory, host: str, port: int, ssl_ctx: ssl.SSLContext, *,
                        handshake_timeout: float, max_frame_size: int, backlog: int = 1024):
    """Listen on host:port for TLS WebSocket tunnels. Raises OSError when it cannot listen."""
    factory = _ws_protocol_factory(listener_factory, handshake_timeout, max_frame_size)
    if factory is None:  # another picows: keep working, only without the handshake log lines
        log.warning("this picows version cannot hand over accepted sockets; failed TLS handshakes will "
                    "not be logged", extra={"event": "tunnel.tls_logging_unavailable"})
        return await ws_create_server(
            listener_factory, host, port, ssl=ssl_ctx, websocket_handshake_timeout=handshake_timeout,
            max_frame_size=max_frame_size, reuse_address=True, backlog=backlog, use_aiofastnet=True,
            ssl_handshake_timeout=handshake_timeout)
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _name, sockaddr in dict.fromkeys(infos):
            s = socket.socket(family, type_, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(sockaddr)
            s.listen(backlog)
            s.setblocking(False)
    except OSError:
        for s in socks:
            s.close()
        raise
    return TlsWsServer(socks, factory, ssl_ctx, handshake_timeout)
