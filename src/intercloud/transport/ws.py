"""The WebSocket layer: the only module that imports picows, its private parts included.

Everything above speaks in terms of this module: a :class:`Listener` base class for a tunnel's end
of a WebSocket, the message types and close codes it needs, :func:`dial_ws` to open one,
:func:`server_protocol` and :func:`upgrade_policy` for the accept side (``transport/tls_server.py``
owns the socket until the upgrade), a few helpers on an accepted connection, and
:func:`keep_dialing`, the one redial loop of the on-prem dialer and the cluster's peer links.

Keeping picows here means an upgrade of it (whose server-side protocol constructor is internal)
touches one file, and the rest of the code can be read without knowing its API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from picows import (
    WSAutoPingStrategy, WSCloseCode, WSError, WSListener, WSMsgType, WSUpgradeResponse,
    WSUpgradeResponseWithListener, ws_connect, ws_create_server,
)

SUBPROTOCOL = "intercloud.v1"
# Ciphertext the TLS engine keeps for a socket that takes no more (aiofastnet's outgoing BIO; its
# default is 257 KiB). It is one more queue in front of every frame a tunnel sends, which the transport's
# write-buffer limits do not count: at 20 Mbit/s, 257 KiB held an interactive frame 100 ms behind a bulk
# stream's data (docs/protocol.md §6.3). Four TLS records are enough to keep the socket busy. Dialed
# tunnels only: on the accept side the engine exists from the ClientHello on, and 64 KiB buffers (served
# from the heap, where 257 KiB ones are mmapped) left a flood of TLS handshakes 25+ MB more resident
# (tests/security/test_floods.py).
TLS_OUTGOING_BIO = 64 * 1024

# What a tunnel end needs from picows, under names of ours.
Listener = WSListener
MsgType = WSMsgType
CloseCode = WSCloseCode
WebSocketError = WSError
POLICY_VIOLATION = int(WSCloseCode.POLICY_VIOLATION)


# --- accept side ------------------------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    """An upgrade refused with an HTTP status and a one-line body for the client."""
    status: int
    body: str


def upgrade_policy(path: str, accept: Callable[[str | None, str | None], object],
                   refused: Callable[..., None]):
    """The listener factory picows calls with each upgrade request: a wrong path is refused with 404,
    an upgrade without our subprotocol with 400, anything else goes to ``accept(peer, source)``, which
    returns the listener (a Tunnel) or a :class:`Refusal`. ``refused(status, peer, source, why)`` logs
    the refusals (rate-limited by the caller: anyone can send upgrades)."""

    def factory(request, peer: str | None):
        source = peer.rsplit(":", 1)[0] if peer else None
        got = request.path.decode("latin-1").split("?", 1)[0]
        if got != path:
            refused(404, peer, source, f"path {got[:100]!r} (the endpoint is at {path!r})")
            return _refuse(Refusal(404, f"nothing at {got[:100]}; the intercloud endpoint is at {path}"))
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if SUBPROTOCOL not in offered:
            refused(400, peer, source, f"no subprotocol {SUBPROTOCOL}")
            return _refuse(Refusal(400, f"this is an intercloud endpoint; speak {SUBPROTOCOL}"))
        listener = accept(peer, source)
        if isinstance(listener, Refusal):
            return _refuse(listener)
        resp = WSUpgradeResponse.create_101_response(extra_headers={"Sec-WebSocket-Protocol": SUBPROTOCOL})
        return WSUpgradeResponseWithListener(resp, listener)

    return factory


def _refuse(r: Refusal):
    return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(r.status, f"{r.body}\n".encode()),
                                         None)


def server_protocol(listener_factory, handshake_timeout: float, max_frame_size: int):
    """``make(peer)``: the server-side picows protocol for one accepted socket, built exactly as
    ``picows.ws_create_server`` builds it, whose listener factory is called as
    ``listener_factory(request, peer)`` (so a refused upgrade can be logged with its source). None if
    this picows version's (internal) constructor differs: see :func:`fallback_server`."""
    try:
        from picows.picows import WSProtocol

        logger = logging.getLogger("picows.server")

        def make(peer):
            return WSProtocol(None, None, False, lambda request: listener_factory(request, peer), logger, True,
                              handshake_timeout, False, 20, 20, WSAutoPingStrategy.PING_WHEN_IDLE, True,
                              max_frame_size, None, 16 * 1024)

        make(None)  # fail here, at start-up, rather than on the first tunnel
    except (ImportError, TypeError):
        return None
    return make


async def fallback_server(listener_factory, host: str, port: int, ssl_ctx, *, handshake_timeout: float,
                          max_frame_size: int, backlog: int):
    """picows' own server, for a picows whose protocol cannot be built here: no handshake limits."""
    return await ws_create_server(
        lambda request: listener_factory(request, None), host, port, ssl=ssl_ctx,
        websocket_handshake_timeout=handshake_timeout, max_frame_size=max_frame_size, reuse_address=True,
        backlog=backlog, use_aiofastnet=True, ssl_handshake_timeout=handshake_timeout if ssl_ctx else None)


async def upgraded(proto):
    """Wait for the upgrade of an accepted connection; its listener, or None when it was refused or
    the connection closed first."""
    await proto.wait_until_handshake_complete()
    listener = proto.listener
    if listener is None or proto.transport.is_disconnected:
        return None
    return listener


def refused_by_picows(proto) -> bool:
    """The upgrade never reached our listener factory (not HTTP, too large, closed half-way)."""
    return getattr(proto.transport, "request", None) is None


def close_accepted(proto, why: str, loop: asyncio.AbstractEventLoop) -> bool:
    """Close an accepted connection's WebSocket with 1008 and ``why``; False if there is none to
    close (the caller resets the socket)."""
    ws = getattr(proto, "transport", None) if proto is not None else None
    if ws is None or ws.is_disconnected:
        underlying = getattr(ws, "underlying_transport", None)
        if underlying is not None:
            underlying.abort()
        return False
    listener = proto.listener
    if listener is not None and hasattr(listener, "close_reason") and not listener.close_reason:
        listener.close_reason = why
    ws.send_close(WSCloseCode.POLICY_VIOLATION, why.encode()[:120])
    ws.disconnect(graceful=True)
    loop.call_later(1.0, ws.disconnect, False)  # a peer that does not read cannot hold it
    return True


# --- dial side --------------------------------------------------------------------------
async def dial_ws(make_listener, url: str, ssl_ctx, *, handshake_timeout: float, max_frame_size: int,
                  socket_factory=None, **tls):
    """Open a WebSocket to ``url`` with our subprotocol; the listener ``make_listener()`` built, or
    None when the connection closed before the upgrade answer (with TLS 1.3, how a server refuses our
    client certificate: its alert comes after our side of the handshake and picows drops it)."""
    _transport, listener = await ws_connect(
        make_listener, url, ssl_context=ssl_ctx, websocket_handshake_timeout=handshake_timeout,
        max_frame_size=max_frame_size, extra_headers={"Sec-WebSocket-Protocol": SUBPROTOCOL},
        socket_factory=socket_factory, use_aiofastnet=True,
        **({"ssl_outgoing_bio_size": TLS_OUTGOING_BIO} if ssl_ctx else {}), **tls)
    return listener


class StopDialing(Exception):
    """Raised by a ``dial`` of :func:`keep_dialing`: this target is not to be dialed again."""


async def keep_dialing(dial: Callable[[], Awaitable], on_up: Callable[[object], Awaitable],
                       on_error: Callable[[BaseException], None], *, delays: Callable[[], Iterator[float]],
                       keep_going: Callable[[], bool], stable_after: float,
                       wait: Callable[[float], Awaitable[bool]] | None = None,
                       errors: tuple[type[BaseException], ...] = (Exception,)) -> None:
    """Keep one connection up: ``dial()``, then ``on_up(conn)`` (which returns when it is gone, False
    if it was refused by the peer), then wait the next backoff delay and dial again, while ``keep_going()``.

    A connection that stayed up ``stable_after`` seconds starts the backoff afresh; a failed dial
    (one of ``errors``) goes to ``on_error`` and waits the next, longer delay. ``wait(delay)`` may end a
    wait early (it returns True when woken, e.g. a member came back): the backoff then starts afresh.
    A dial that raises :class:`StopDialing` ends the loop."""
    pacing = delays()
    while keep_going():
        started = time.monotonic()
        try:
            conn = await dial()
        except StopDialing:
            return
        except errors as exc:
            on_error(exc)
        else:
            stable = await on_up(conn)  # False: it ended in a way that must not reset the backoff
            if stable is not False and time.monotonic() - started > stable_after:
                pacing = delays()
        if not keep_going():
            return
        delay = next(pacing)
        if wait is None:
            await asyncio.sleep(delay)
        elif await wait(delay):
            pacing = delays()
