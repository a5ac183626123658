"""One proxied TCP connection bound to one stream of one tunnel (docs/protocol.md §4, §6).

Hot path, both directions, per read:
- local socket -> tunnel: asyncio's BufferedProtocol reads straight into the tunnel's send buffer
  behind room for the WebSocket and intercloud headers, capped by the stream's credit, so the
  payload is copied once by the kernel and once more by TLS (``Tunnel.send_data``).
- tunnel -> local socket: the payload memoryview picows hands us is written with ``os.write`` when
  nothing is queued (no copy); only what the kernel does not take is copied into the transport's
  buffer, and its credit is returned once that buffer drains (protocol §6.2).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING

from ..protocol import State
from ..protocol.frames import Reason

if TYPE_CHECKING:
    from .tunnel import Tunnel

log = logging.getLogger("intercloud.stream")
_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(transport) -> None:
    """Close with a TCP RST, not a FIN: a client must be able to tell a cut stream from a finished one.
    ``transport.abort()`` alone sends FIN unless unread bytes happen to be queued."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    transport.abort()


class LocalStream(asyncio.BufferedProtocol):
    """The local TCP side of a stream. ``side`` is "accept" (a client came to our listener) or
    "connect" (we dialed a target for the peer)."""

    def __init__(self, service: str, side: str, client: str = "", target: str = "", on_accept=None,
                 tenant: str = "default"):
        self.service = service
        self.tenant = tenant
        self.counted = False
        self.on_accept = on_accept
        self.side = side
        self.client = client
        self.target = target
        self.tunnel: Tunnel | None = None
        self.sid = 0
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        self.started = time.monotonic()
        self.bytes_up = 0  # local socket -> tunnel
        self.bytes_down = 0  # tunnel -> local socket
        self.undelivered = 0  # bytes queued in the transport, credit not yet returned
        self.credit_paused = True  # no credit yet: nothing is read before OPEN_OK
        self.tunnel_paused = False
        self.reading = False
        self.local_eof = False
        self.finished = False
        self.connected = asyncio.get_running_loop().create_future()
        # uvloop reads once after connection_made even though we paused there; such bytes, and any
        # read while we have no credit, are parked here and sent when the stream starts.
        self._park: bytearray | None = None
        self._park_len = 0
        self._parked = False

    # --- asyncio protocol --------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.pause_reading()
        transport.set_write_buffer_limits(high=0, low=0)  # resume_writing == "buffer drained"
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        if not self.client:
            peer = transport.get_extra_info("peername")
            self.client = f"{peer[0]}:{peer[1]}" if peer else "?"
        if not self.connected.done():
            self.connected.set_result(True)
        if self.on_accept is not None:
            self.on_accept(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        t = self.tunnel
        if self.reading and t is not None:
            mv = t.read_buffer(self.sid)
            if mv:
                self._parked = False
                return mv
        self._parked = True
        if self._park is None:
            self._park = bytearray(16384)
        elif self._park_len == len(self._park):
            self._park.extend(bytes(16384))
        return memoryview(self._park)[self._park_len:]

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_up += nbytes
        if self._parked:
            self._park_len += nbytes
            self.transport.pause_reading()
            return
        self.tunnel.send_data(self, nbytes)

    def eof_received(self) -> bool:
        self.local_eof = True
        if not self._park_len:
            self._send_fin()
        return True  # keep our write side open: TCP half-close (protocol §4.2 FIN)

    def _send_fin(self) -> None:
        t = self.tunnel
        if t is not None and self.sid and t.conn.state(self.sid) in (State.OPEN, State.HALF_CLOSED_REMOTE):
            t.send_frame(t.conn.fin(self.sid))
            if t.conn.state(self.sid) is State.CLOSED:
                self.finish("closed")

    def resume_writing(self) -> None:
        self._credit_undelivered()

    def pause_writing(self) -> None:
        pass  # credit is withheld instead (protocol §6.2)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        t = self.tunnel
        if t is not None and self.sid and t.conn.state(self.sid) is not State.CLOSED:
            why = f"local connection lost: {exc}" if exc else "local connection closed"
            frame = t.conn.reset(self.sid, Reason.ABORTED, why)
            if frame:
                t.send_frame(frame)
            self.finish("aborted by local peer" if exc else "local close")
        else:
            self.finish(None)
        if not self.connected.done():
            self.connected.set_result(False)

    # --- driven by the tunnel ----------------------------------------------------------
    def attach(self, tunnel: Tunnel, sid: int) -> None:
        self.tunnel = tunnel
        self.sid = sid

    def start(self) -> None:
        """OPEN succeeded: send what was parked, then read the local socket (credit permitting)."""
        self.credit_paused = False
        if self._park_len:
            self._flush_parked()
        elif self.local_eof:
            self._send_fin()
        self._update_reading()

    def _flush_parked(self) -> None:
        t = self.tunnel
        view = memoryview(self._park)
        sent = 0
        while sent < self._park_len:
            n = min(self._park_len - sent, t.conn.send_limit(self.sid))
            if n <= 0:
                break
            t.send_payload(self.sid, view[sent:sent + n])
            sent += n
        view.release()
        if sent:
            del self._park[:sent]
            self._park_len -= sent
        if self._park_len:
            self.credit_paused = True  # the rest goes out when credit returns (on_credit)
            return
        self._park = None
        if self.local_eof:
            self._send_fin()

    def _update_reading(self) -> None:
        tr = self.transport
        if tr is None or self.local_eof:
            return
        want = not self.credit_paused and not self.tunnel_paused
        if want != self.reading:
            self.reading = want
            if want:
                tr.resume_reading()
            else:
                tr.pause_reading()

    def credit_exhausted(self) -> None:
        self.credit_paused = True
        self._update_reading()

    def on_credit(self) -> None:
        if self.credit_paused and self.tunnel.conn.send_limit(self.sid) > 0:
            self.credit_paused = False
            if self._park_len:
                self._flush_parked()
            self._update_reading()

    def set_tunnel_paused(self, paused: bool) -> None:
        self.tunnel_paused = paused
        self._update_reading()

    def deliver(self, mv: memoryview) -> None:
        n = len(mv)
        self.bytes_down += n
        tr = self.transport
        if tr is None:
            return
        if self.undelivered == 0:
            try:
                written = os.write(self.fd, mv)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                self.abort(Reason.ABORTED, f"write to {self.peer_label} failed: {exc.strerror}")
                return
            if written:
                self._credit(written)
            if written == n:
                return
            mv = mv[written:]
        self.undelivered += len(mv)
        tr.write(bytes(mv))  # copy: picows reuses this memory after the callback returns
        if tr.get_write_buffer_size() == 0:
            self._credit_undelivered()

    def _credit(self, n: int) -> None:
        frame = self.tunnel.conn.delivered(self.sid, n)
        if frame is not None:
            self.tunnel.send_frame(frame)

    def _credit_undelivered(self) -> None:
        if self.undelivered and self.tunnel is not None:
            n, self.undelivered = self.undelivered, 0
            self._credit(n)

    def on_remote_fin(self, closed: bool) -> None:
        tr = self.transport
        if tr is not None and tr.can_write_eof():
            tr.write_eof()
        if closed:
            self.finish("closed")

    def abort(self, code: int, text: str, tell_peer: bool = True) -> None:
        """Reset the stream: RST to the peer, TCP reset to the local socket."""
        t = self.tunnel
        if tell_peer and t is not None and self.sid:
            frame = t.conn.reset(self.sid, code, text)
            if frame:
                t.send_frame(frame)
        tr = self.transport
        if tr is not None:
            reset(tr)
        self.finish(f"reset: {Reason.name_of(code)} {text}")

    @property
    def peer_label(self) -> str:
        return self.client if self.side == "accept" else self.target

    @property
    def buffered(self) -> int:
        """Bytes received from the tunnel that the local reader has not taken yet (status, tests)."""
        tr = self.transport
        return tr.get_write_buffer_size() if tr is not None else 0

    def finish(self, reason: str | None) -> None:
        """Log the stream once and let go of it. Closes the local socket gracefully."""
        if self.finished:
            return
        self.finished = True
        tr = self.transport
        if tr is not None:
            tr.close()  # flushes what is queued, then closes
        t = self.tunnel
        if t is not None:
            t.stream_finished(self, reason or "closed")
