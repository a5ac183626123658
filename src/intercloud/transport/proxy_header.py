"""An accepted service connection that starts with a PROXY protocol header (``accept_proxy_protocol``,
docs/operations.md §10.1): read the header, then hand the socket, its real client address and any
bytes that came after the header to the service's LocalStream, which goes on as if the client had
connected to us directly.

The peer is checked against ``trusted_proxies`` before a byte is read; a header is awaited for at most
``HEADER_TIMEOUT`` and at most ``proxy_protocol.MAX_V2`` bytes of it are held. Every refusal resets the
connection and goes through ``refused`` (one log line naming the peer and the rule, a metric, the
audit log), never a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .. import proxy_protocol
from ..tunnel.stream import LocalStream, reset

#: How long a trusted load balancer may take to send its header. It sends it with the connection's
#: first segment; a connection silent this long is not a load balancer doing its job.
HEADER_TIMEOUT = 10.0


class ProxyHeaderReader(asyncio.Protocol):
    """Stands in for the LocalStream while the header arrives, then hands over with set_protocol."""

    def __init__(self, make_stream: Callable[[str], LocalStream], refusal: Callable[[str], object | None],
                 refused: Callable[[str, str, str], None]):
        self._make_stream = make_stream  # client text -> the service's LocalStream
        self._refusal = refusal  # peer text -> admission.Refusal if the peer is not a trusted proxy
        self._refused = refused  # (peer, why, rule): count, log, audit
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._peer = "?"
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        refusal = self._refusal(self._peer)
        if refusal is not None:
            self._refuse(refusal.why, refusal.rule)
            return
        self._timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self._expired)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        self._buf += data
        try:
            header = proxy_protocol.parse(self._buf)
        except proxy_protocol.ProxyHeaderError as exc:
            self._refuse(f"bad PROXY header from trusted proxy {self._peer}: {exc}", "accept_proxy_protocol")
            return
        if header is None:
            return
        self._cancel_timer()
        transport, self._transport = self._transport, None
        stream = self._make_stream(header.client or self._peer)  # LOCAL/UNKNOWN: the proxy's own connection
        stream.preload(bytes(self._buf[header.length:]))
        self._buf = bytearray()
        transport.set_protocol(stream)
        stream.connection_made(transport)

    def eof_received(self) -> bool:
        got = f"after {len(self._buf)} bytes of it" if self._buf else "before any byte of it"
        self._refuse(f"trusted proxy {self._peer} closed the connection {got} (no complete PROXY header)",
                     "accept_proxy_protocol")
        return False

    def connection_lost(self, exc) -> None:
        self._cancel_timer()
        self._transport = None

    def _expired(self) -> None:
        self._timer = None
        self._refuse(f"no complete PROXY header from trusted proxy {self._peer} within {HEADER_TIMEOUT:g}s "
                     f"({len(self._buf)} bytes came); check that the load balancer sends one (nginx: "
                     "proxy_protocol on; haproxy: send-proxy)", "accept_proxy_protocol")

    def _refuse(self, why: str, rule: str) -> None:
        self._cancel_timer()
        transport, self._transport = self._transport, None
        if transport is not None:
            reset(transport)
        self._refused(self._peer, why, rule)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
