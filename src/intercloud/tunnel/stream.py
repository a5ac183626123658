"""One proxied TCP connection bound to one stream of one tunnel (docs/protocol.md §4, §6).

Before OPEN_OK the stream reads into its park buffer and, where the peer accepts early data
(protocol §4.5), sends those bytes right after OPEN, keeping them until OPEN_OK in case the gateway
has to open the stream elsewhere. Hot path, both directions, per read (after OPEN_OK):
- local socket -> tunnel: asyncio's BufferedProtocol reads straight into the tunnel's send buffer
  behind room for the WebSocket and intercloud headers, capped by the stream's credit, so the
  payload is copied once by the kernel and once more by TLS (``Tunnel.send_data``).
- tunnel -> local socket: the payload memoryview picows hands us is written with ``os.write`` when
  nothing is queued (no copy); only what the kernel does not take is copied into the transport's
  buffer, and its credit is returned once that buffer drains (protocol §6.2). Such queued bytes are
  counted in the process-wide budget's ``buffered`` gauge (protocol §6.4); the budget itself bounds
  them through the credit the Connection grants, so the os.write path does no budget work.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
import socket
import struct
import time
from typing import TYPE_CHECKING

from .. import proxy_protocol
from ..protocol import State
from ..protocol.frames import FrameError, Reason, decode_identity
from ..transport.tls_server import heap_churn

if TYPE_CHECKING:
    from .owner import Tunnel

log = logging.getLogger("intercloud.stream")
_LINGER_RESET = struct.pack("ii", 1, 0)
# An end ACKs what it holds at least every this many bytes received (protocol §10.3), and with every
# WINDOW it sends (LocalStream._credit): often enough that the sender's kept bytes stay near our grant,
# rarely enough to cost nothing measurable (one 14-byte frame per 512 KiB: ~2,000 a second at 1 GB/s;
# WINDOW goes out per quarter grant, every 1 MiB at a 4 MiB grant).
ACK_EVERY = 512 * 1024
_SCRATCH = bytearray(16384)  # LocalStream.take_sent reads here first (single-threaded event loop)


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

    def __init__(self, service: str, side: str, client: str = "", target: str = "", on_connected=None,
                 tenant: str = "default"):
        self.service = service
        self.tenant = tenant
        self.counted = False  # holds one of its tenant's stream slots (GatewayStats.hold_slot)
        self.gate = None  # its service's admission.ServiceGate while it holds a slot there
        self.in_service = False  # opened and logged: stream_closed frees the slot
        self.on_connected = on_connected  # called from connection_made (both sides)
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
        self.opened = False  # start() ran: OPEN_OK seen by the opener, or the target connected
        self.in_turns = False  # in the tunnel's fair ring: read only in our turns (protocol §6.3)
        self._cycle = 0  # the tunnel's congestion cycle that ``_sent_in_cycle`` counts in
        self._sent_in_cycle = 0  # bytes sent outside turns while the tunnel was congested
        self.reading = False
        self.local_eof = False
        self.finished = False
        # uvloop reads once after connection_made even though we paused there; such bytes, any read
        # while we have no credit, and everything read before OPEN_OK are parked here. The first
        # ``_early_sent`` of them already went out as early data (§4.5) on the current OPEN.
        self._park: bytearray | None = None
        self._park_len = 0
        self._parked = False
        self._early = False  # OPEN sent, peer accepts early data, no answer yet
        self._early_sent = 0
        self._early_reading = False  # transport resumed for early data
        # Resume (protocol §10). ``tx``: stream offset of the next byte we send; ``kept`` holds what we
        # sent from ``kept_from`` on that the far end has not ACKed (None while nothing is: idle streams
        # keep nothing); past ``keep_max`` unacknowledged bytes we stop reading, as without credit.
        self.keeping = False  # our tunnel's peer announced resume: keep and count what we send
        self.acking = False  # ... and wants our ACKs of what we hold (bytes_down)
        self.tx = 0
        self.kept: deque[bytes] | None = None  # one bytes per DATA frame sent
        self.kept_from = 0  # stream offset of kept[0][_kept_head]
        self.kept_len = 0
        self._kept_head = 0  # bytes of kept[0] the far end has ACKed already
        self.keep_max = 0
        self._acked = 0  # the bytes_down we last ACKed
        self.token: bytes | None = None  # resume identity (protocol §10.2), once the stream is open
        self.far: tuple[str, str] | None = None  # the far end's instance, where we must resume to
        self.ok_payload = b""  # the OPEN_OK payload (our opener's resume identity)
        self.fin_sent = False
        self.parked = False  # our path broke: sockets open, reading paused, waiting to resume
        self.parking = None  # the registry that holds us while parked (resume.Parking)
        self.tunnel_was = None  # the tunnel we were on when we parked (logs)
        self._replay_at = -1  # resuming: the next kept offset to send again (-1: not replaying)
        # park() found bytes queued in the transport (received on the stream's old id): until they have
        # drained, deliver() must queue behind them, not os.write ahead of them (see deliver)
        self._stale_queued = False
        self._queued = False  # bytes for the local socket were queued in user space (see finish)
        self.proxy_protocol: str | None = None  # connect side: "v1"/"v2", a header to the target first

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
        if self.proxy_protocol is not None:
            # the client's address, and the target's as we reach it for the address it "connected to"
            # (the accepting gateway's listener means nothing to the target); first on the wire:
            # deliver() queues behind it if it did not all go out at once
            peer = transport.get_extra_info("peername")
            dest = proxy_protocol.address(f"{peer[0]}:{peer[1]}") if peer else None
            transport.write(proxy_protocol.build(self.proxy_protocol, proxy_protocol.address(self.client), dest))
            self._stale_queued = transport.get_write_buffer_size() > 0
        if self.on_connected is not None:
            self.on_connected(self)

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
            if self._early and self.tunnel is not None:  # detached after a refusal: park until the next OPEN
                self._send_early()
                if self.tunnel.conn.send_limit(self.sid) > 0:
                    return  # keep reading: the peer still accepts early data
            self._early_reading = False
            self.reading = False  # so that _update_reading resumes it
            if self.opened:  # parked for want of credit: on_credit sends it and resumes reading
                self.credit_paused = True
            self.transport.pause_reading()
            return
        t = self.tunnel
        t.send_data(self, nbytes)
        if t.paused and not self.credit_paused:
            # The tunnel's queue is full. Outside turns a stream sends up to a turn per congestion
            # cycle (an interactive message leaves at once); past that it sends only in its turns
            # (protocol §6.3).
            if self._cycle != t.cycle:
                self._cycle, self._sent_in_cycle = t.cycle, 0
            self._sent_in_cycle += nbytes
            if self._sent_in_cycle >= t.turn:
                self.in_turns = True
                self._update_reading()
                t.wait_turn(self)

    def eof_received(self) -> bool:
        self.local_eof = True
        if not self._park_len:
            self._send_fin()
        return True  # keep our write side open: TCP half-close (protocol §4.2 FIN)

    def _send_fin(self) -> None:
        t = self.tunnel
        if t is not None and self.sid and t.conn.state(self.sid) in (State.OPEN, State.HALF_CLOSED_REMOTE):
            self.fin_sent = True
            t.send_frame(t.conn.fin(self.sid))
            if t.conn.state(self.sid) is State.CLOSED:
                self.finish("closed")

    def resume_writing(self) -> None:
        self._credit_undelivered()

    def pause_writing(self) -> None:
        pass  # credit is withheld instead (protocol §6.2)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._drop_undelivered()
        if self.parked:
            self.finish(f"local connection {'lost: ' + str(exc) if exc else 'closed'} while parked")
            return
        t = self.tunnel
        if t is not None and self.sid and t.conn.state(self.sid) is not State.CLOSED:
            why = f"local connection lost: {exc}" if exc else "local connection closed"
            frame = t.conn.reset(self.sid, Reason.ABORTED, why)
            if frame:
                t.send_frame(frame)
            self.finish("aborted by local peer" if exc else "local close")
        else:
            self.finish(None)

    # --- driven by the tunnel ----------------------------------------------------------
    def attach(self, tunnel: Tunnel, sid: int) -> None:
        self.tunnel = tunnel
        self.sid = sid
        self._early = False
        self._early_sent = 0  # a new OPEN (maybe on another tunnel): everything parked goes again
        self.keeping = self.acking = tunnel.resumable  # counted from the stream's first byte (§10.3)
        self.tx, self.kept, self.kept_from, self.kept_len, self.keep_max = 0, None, 0, 0, tunnel.keep_max

    # --- resume (protocol §10) ---------------------------------------------------------
    def keep(self, mv) -> None:
        """``mv`` is about to go out as DATA: keep a copy until the far end ACKs it. A chunk per frame,
        not one growing bytearray: with ACKs cutting its front, the bytearray was reallocated and its
        whole content moved every ~0.5 MiB appended (0.7 s of CPU per GiB sent, measured); a chunk
        each is one copy of the payload (0.13 s/GiB here, about a memcpy)."""
        k = self.kept
        b = bytes(mv)
        if k is None:
            self.kept = k = deque((b,))
            self.kept_from, self._kept_head, self.kept_len = self.tx, 0, 0
        else:
            k.append(b)
        n = len(b)
        self.tx += n
        self.kept_len += n
        if self.kept_len >= self.keep_max:  # a peer granting credit beyond our window does not grow this
            self.credit_exhausted()

    def on_ack(self, held: int) -> None:
        """The far end holds ``held`` bytes of what we sent: let go of them."""
        if held > self.tx:
            self.abort(Reason.PROTOCOL_ERROR, f"far end ACKed {held} bytes of the {self.tx} sent")
            return
        k = self.kept
        drop = held - self.kept_from
        if k is None or drop <= 0:
            return
        self.kept_from = held
        self.kept_len -= drop
        while drop:
            left = len(k[0]) - self._kept_head
            if left > drop:
                self._kept_head += drop
                break
            k.popleft()
            self._kept_head = 0
            drop -= left
        if not k:
            self.kept = None
        if self.credit_paused:
            self.on_credit()

    def _kept_bytes(self, offset: int, n: int) -> bytes:
        """Up to ``n`` kept bytes from stream offset ``offset`` (replay only: not a hot path)."""
        out = []
        pos = offset - self.kept_from + self._kept_head  # into the chunks as if kept[0] were whole
        for chunk in self.kept:
            if pos >= len(chunk):
                pos -= len(chunk)
                continue
            piece = chunk[pos:pos + n]
            out.append(piece)
            n -= len(piece)
            pos = 0
            if not n:
                break
        return b"".join(out)

    def _ack(self) -> None:
        t = self.tunnel
        frame = t.conn.ack(self.sid, self.bytes_down)
        if frame is not None:
            self._acked = self.bytes_down
            t.send_frame(frame)

    def identify(self) -> None:
        """OPEN_OK arrived: its payload is the far end's resume identity, or empty (not resumable)."""
        ident = None
        if self.keeping:
            try:
                ident = decode_identity(self.ok_payload)
            except FrameError:
                ident = None
        self.ok_payload = b""
        if ident is None:
            self.keeping = self.acking = False
            self.kept, self.kept_len = None, 0
            return
        self.token, node, inc = ident
        self.far = (node, inc)

    def can_replay_from(self, offset: int) -> bool:
        if self.kept is None:
            return offset == self.tx
        return self.kept_from <= offset <= self.tx

    def park(self) -> None:
        """Our path broke (protocol §10.4): keep both sockets, stop reading, wait to resume."""
        self._drop_undelivered()  # still queued toward the socket; their credit belonged to the old id
        tr = self.transport
        self._stale_queued = tr is not None and tr.get_write_buffer_size() > 0  # ... and they go first
        self.tunnel_was, self.tunnel, self.sid = self.tunnel, None, 0
        self.parked = True
        self.in_turns = False
        self.credit_paused = True
        self._replay_at = -1
        self._update_reading()

    def resume_on(self, tunnel: Tunnel, sid: int, offset: int) -> int:
        """Continue on ``tunnel`` as stream ``sid``: send again what the far end lacks (from its
        ``offset``), then what is parked, FIN if we had sent it, and read on. Returns the bytes replayed."""
        self.tunnel, self.sid = tunnel, sid
        self.parked = False
        self.parking = None
        self.acking = True
        self.keep_max = tunnel.keep_max
        self._acked = self.bytes_down
        self._replay_at = offset
        replayed = self.tx - offset
        self._replay()
        return replayed

    def _replay(self) -> None:
        t = self.tunnel
        while self._replay_at < self.tx:
            n = min(self.tx - self._replay_at, t.conn.send_limit(self.sid))
            if n <= 0:
                return  # on_credit goes on
            t.send_payload(self.sid, memoryview(self._kept_bytes(self._replay_at, n)))
            self._replay_at += n
        self._replay_at = -1
        self.credit_paused = False
        if self._park_len:
            self._flush_parked()
        elif self.fin_sent or self.local_eof:
            self._send_fin()
        if not self.finished:
            self._update_reading()

    def preload(self, data: bytes) -> None:
        """Bytes the client sent that were read before this stream took over its socket (what came
        after a PROXY header): they go first, as if read here."""
        if data:
            self._park = bytearray(data)
            self._park.extend(bytes(max(0, 16384 - len(data))))
            self._park_len = len(data)
            self.bytes_up += len(data)

    def take_sent(self) -> None:
        """Read, once and without waiting, what the client sent before we accepted it (an HTTP request,
        a TLS ClientHello), so that it leaves in the same write as the OPEN instead of one loop
        iteration and one TLS record later (docs/performance.md, P13). Nothing there yet (the usual
        case when the server speaks first) or EOF: leave it to the transport, which sees the same
        socket state when it reads. A reset: the stream ends here, as the transport would end it."""
        if self.fd < 0 or self.transport is None or self._park_len or self.local_eof or self.finished:
            return
        try:
            n = os.readv(self.fd, [_SCRATCH])  # no park buffer for a client that has sent nothing
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. ECONNRESET, reported once: the transport would then see EOF
            self.abort(Reason.ABORTED, f"read from {self.peer_label} failed: {exc.strerror or exc}")
            return
        if n:
            self._park = bytearray(max(n, 16384))
            self._park[:n] = _SCRATCH[:n]
            self._park_len = n
            self.bytes_up += n

    def begin_early(self) -> None:
        """OPEN is sent: if the peer accepts early data (protocol §4.5), send what is parked now
        and keep reading into the park buffer while the early-data allowance lasts."""
        t = self.tunnel
        if t is None or t.conn.send_limit(self.sid) <= 0:
            return
        self._early = True
        if self._park_len:
            self._send_early()
        tr = self.transport
        if tr is not None and not self.local_eof and t.conn.send_limit(self.sid) > 0 and not self._early_reading:
            self._early_reading = True
            tr.resume_reading()

    def _send_early(self) -> None:
        t = self.tunnel
        view = memoryview(self._park)
        while self._early_sent < self._park_len:
            n = min(self._park_len - self._early_sent, t.conn.send_limit(self.sid))
            if n <= 0:
                break
            if self.keeping:
                self.keep(view[self._early_sent:self._early_sent + n])
            t.send_payload(self.sid, view[self._early_sent:self._early_sent + n])
            self._early_sent += n
        view.release()

    def start(self) -> None:
        """OPEN succeeded: send what was parked (less what went early), then read the local socket
        (credit permitting)."""
        self.opened = True
        self.credit_paused = False
        self._early = False
        if self._early_reading:  # the transport is reading: let _update_reading decide from here
            self._early_reading = False
            self.reading = True
        if self._early_sent:
            del self._park[:self._early_sent]
            self._park_len -= self._early_sent
            self._early_sent = 0
        if self._park_len:
            self._flush_parked()
        else:
            self._park = None
            if self.local_eof:
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
            if self.keeping:
                self.keep(view[sent:sent + n])
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
        if t.conn.send_limit(self.sid) <= 0:
            # No read before credit returns: it would only park. Routine since early data can use a
            # whole 64 KiB initial window (protocol §4.5, §6.4).
            self.credit_paused = True
        if self.local_eof:
            self._send_fin()

    def _update_reading(self) -> None:
        tr = self.transport
        if tr is None or self.local_eof:
            return
        want = not self.credit_paused and not self.in_turns
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
        # WINDOW can arrive in the same read as OPEN_OK, before the opening task ran start(): the
        # parked bytes (some already sent early) are start()'s to send, with the credit it then sees.
        # Since streams start at a 64 KiB window (protocol §6.4), early data alone triggers such a WINDOW.
        if not self.opened or self.parked:
            return
        if self._replay_at >= 0:
            self._replay()
            return
        if (self.credit_paused and self.tunnel.conn.send_limit(self.sid) > 0
                and self.kept_len < self.keep_max):
            self.credit_paused = False
            if self._park_len:
                self._flush_parked()
            self._update_reading()

    def take_turn(self, limit: int) -> bool:
        """Read up to ``limit`` bytes straight from the socket (reading is paused in the event loop
        while we are in turns) and send them. EOF, an error, no data or no credit end the turns: the
        event loop's reading then sees what is there (EOF and errors included) and reports it."""
        t = self.tunnel
        if self.finished or t is None or self.transport is None or not self.in_turns:
            self.in_turns = False
            return False
        mv = t.read_buffer(self.sid)[:limit]
        n = 0
        if mv:
            try:
                n = os.readv(self.fd, [mv])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                pass  # the event loop's read reports it
        if n <= 0:
            self.end_turns()
            return False
        self.bytes_up += n
        t.send_data(self, n)
        if self.credit_paused or self.finished:  # send_data ran out of credit (or the stream ended)
            self.in_turns = False
            return False
        return True

    def end_turns(self) -> None:
        self.in_turns = False
        self._update_reading()

    def deliver(self, mv: memoryview) -> None:
        n = len(mv)
        self.bytes_down += n
        tr = self.transport
        if tr is None:
            return
        if self.acking and self.bytes_down - self._acked >= ACK_EVERY:
            self._ack()  # before the write: held counts bytes queued here too (protocol §10.3)
        if self.undelivered == 0 and self._stale_queued:
            # ``undelivered`` counts this stream id's queued bytes only; park() dropped the old id's
            # from it, but they may still wait in the transport. Writing to the socket ahead of them
            # reordered the stream after a resume (tests/security/test_resume_memory.py: 466 of 1,000
            # streams corrupted at the point where the target's kernel buffer had filled).
            self._stale_queued = tr.get_write_buffer_size() > 0
        if self.undelivered == 0 and not self._stale_queued:
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
        self._queued = True
        b = self.tunnel.conn.budget
        if b is not None:
            b.buffered += len(mv)
        tr.write(bytes(mv))  # copy: picows reuses this memory after the callback returns
        if tr.get_write_buffer_size() == 0:
            self._credit_undelivered()

    def _credit(self, n: int) -> None:
        frame = self.tunnel.conn.delivered(self.sid, n)
        if frame is not None:
            self.tunnel.send_frame(frame)
            if self.acking and self.bytes_down != self._acked:
                # Credit goes back once a quarter of our grant is delivered: ACK what we hold with it,
                # so that the sender keeps for resume no more than our grant (protocol §10.3). With
                # ACKs only every 512 KiB, a sender kept every byte of each stream shorter than that
                # until its FIN, beyond any window or budget: 1,000 streams into a target that had
                # taken 250 KB each kept 380 MB on the cloud (tests/security/test_resume_memory.py).
                self._ack()

    def _credit_undelivered(self) -> None:
        if self.undelivered and self.tunnel is not None:
            n = self.undelivered
            self._drop_undelivered()
            self._credit(n)

    def _drop_undelivered(self) -> None:
        """The queued bytes left user space (drained, or dropped with the socket): off the gauge."""
        n, self.undelivered = self.undelivered, 0
        if n and self.tunnel is not None:
            b = self.tunnel.conn.budget
            if b is not None:
                b.buffered -= n

    def on_remote_fin(self, closed: bool) -> None:
        if self.acking and not closed and self.bytes_down != self._acked:
            self._ack()  # the sender may let go of everything now
        tr = self.transport
        if tr is not None and tr.can_write_eof():
            try:
                tr.write_eof()
            except OSError as exc:
                # The local peer reset its connection while we were not reading it (no credit, parked
                # for resume), so the transport had not noticed; asyncio's (not uvloop's) write_eof then
                # raises ENOTCONN. Uncaught, it escaped the tunnel's frame handler (picows closes the whole
                # tunnel for that) and this stream never finished: reset it, as a failed write does.
                self.abort(Reason.ABORTED, f"half-close toward {self.peer_label} failed: {exc.strerror or exc}")
                return
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
            self._drop_undelivered()  # abort() dropped the transport's buffer
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
        self.kept, self.kept_len = None, 0
        tr = self.transport
        if tr is not None:
            tr.close()  # flushes what is queued, then closes
        if self._queued:
            # What a slow reader's stream queued (up to its grant) was freed into the heap, where glibc
            # keeps it resident: count the stream toward the next heap trim, as a closed tunnel counts.
            # 1,000 streams that had filled their windows (parked, resumed, finished) left the on-prem
            # gateway 100 MB above its baseline with 11 MB in use (tests/security/test_resume_memory.py).
            heap_churn(asyncio.get_running_loop())
        t = self.tunnel
        if t is not None:
            t.stream_finished(self, reason or "closed")
        elif self.parking is not None:  # parked: the registry logs and counts it
            self.parking.gone(self, reason or "closed")

    def path_lost(self, reason: str, silent: bool) -> None:
        """Our tunnel closed and we could not park: reset the local socket."""
        self.abort(Reason.ABORTED, f"tunnel closed: {reason}", tell_peer=False)
