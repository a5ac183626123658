"""Drives one protocol Connection over one picows WebSocket (docs/protocol.md).

The Tunnel is the picows listener: every received message goes through the sans-I/O
``Connection``; events are dispatched to the local streams and to the gateway (routing, opens).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import struct
import time
from typing import TYPE_CHECKING

from ..protocol import (
    Acked, Connection, CreditAvailable, State, Data, GoAway, Hello, Members, OpenAccepted, OpenRefused, Ping, Pong,
    ProtocolError, RemoteFin, RemoteReset, ServicesChanged, StreamOpened,
)
from .. import logs
from ..protocol import peer_input
from ..protocol.frames import HEADER, FrameType, Reason, encode_identity
from ..transport import sockopts
from ..transport.tls import describe_peer_cert, session_info
from ..transport.tls_server import heap_churn
from ..transport.ws import CloseCode, Listener, MsgType
from .budget import INITIAL_WINDOW
from .stream import ACK_EVERY, LocalStream
from .resuming import ResumeOps
from .turns import TURN, TurnRing, queue_limits, start_limits

if TYPE_CHECKING:
    from .owner import StreamEnd, TunnelOwner

log = logging.getLogger("intercloud.tunnel")
_ids = itertools.count(1)
_PING = struct.Struct(">d")
# Room in front of the payload for the largest WebSocket header (14 bytes with a client mask)
# and our 6-byte frame header, so picows can frame in place (see Tunnel.send_data).
_WS_ROOM = 14
_PAYLOAD_AT = _WS_ROOM + HEADER.size
_BINARY = MsgType.BINARY
_MAX_SEND_FRAME = 1 << 20  # we never send DATA larger than this, whatever the peer allows
# Early data we accept per stream before answering OPEN (protocol §4.5): enough for a client's first
# request or TLS ClientHello; held in memory while the target is dialed, so kept small.
EARLY_DATA = 64 * 1024
# Control frames (OPEN, OPEN_OK, WINDOW, FIN, RST, small early DATA, PING) sent during one event-loop
# iteration leave as one write: one TLS record and one TCP segment instead of one each, and one wake-up
# of the peer instead of several (docs/performance.md, P6). Larger frames go through picows directly.
_CORK_MAX = 4096
_WS_LEN16 = struct.Struct("!BBH")
_SIZE_EVERY = 0.2  # seconds between two sizings of a congested tunnel's queues (size_queues)


def ws_frames(frames: list[bytes], client: bool) -> bytes:
    """RFC 6455 binary frames (FIN set) for ``frames``, masked with a fresh random key each when
    ``client`` (§5.3). For small frames only: the mask is applied in Python."""
    out: list[bytes] = []
    keys = os.urandom(4 * len(frames)) if client else b""
    bit = 0x80 if client else 0
    for i, f in enumerate(frames):
        n = len(f)
        if n < 126:
            out.append(bytes((0x82, bit | n)))
        elif n < 65536:
            out.append(_WS_LEN16.pack(0x82, bit | 126, n))
        else:
            raise ValueError(f"frame of {n} bytes is too large to cork")
        if client:
            key = keys[4 * i:4 * i + 4]
            stream = (key * (n // 4 + 1))[:n]
            out.append(key)
            out.append((int.from_bytes(f, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little"))
        else:
            out.append(f)
    return b"".join(out)


class Tunnel(ResumeOps, Listener):
    def __init__(self, gateway: TunnelOwner, *, client: bool, url: str = "", kind: str = "tunnel",
                 expected_node: str | None = None):
        t = gateway.config.tunnel
        self.gateway = gateway
        self.kind = kind  # "tunnel" (cloud <-> on-prem) or "peer" (a peer link between cloud members)
        self.expected_node = expected_node  # dialed a member's own URL: its HELLO must name it
        self.members: list[dict] = []  # the member list the cloud side sent (on-prem view)
        self.refused = False
        self.refusal_logged = False  # the gateway logged why it refused this tunnel (one line per refusal)
        self.tenant = "default"  # cloud: from the client certificate (issue 3); on-prem: always default
        self.tenant_problem: str | None = None
        self.refused_by_peer: str | None = None  # the peer's GOAWAY FORBIDDEN text  # why the certificate maps to no single tenant
        self.self_link = False  # a peer link that reached this very process
        self.routes: frozenset[str] = frozenset()  # peer link: services the member can carry for us
        self.peer_der: bytes | None = None
        self.id = next(_ids)
        self.url = url
        self.client = client
        # protocol §6.4: streams start at INITIAL_WINDOW and grow to stream_window from the process budget
        self.conn = Connection(client=client, window=t.stream_window, max_frame=t.max_frame,
                               max_streams=t.max_streams, early_data=EARLY_DATA if kind == "tunnel" else 0,
                               initial_window=INITIAL_WINDOW, budget=gateway.budget,
                               sink=self.send_frame)
        self.ws = None
        self.sock = None  # the TCP socket (asyncio's TransportSocket): options and TCP_INFO, transport/sockopts.py
        self.streams: dict[int, LocalStream] = {}
        self.pending_opens: dict[int, asyncio.Future] = {}
        self.resuming: dict[int, LocalStream] = {}  # our RESUMEs awaiting an answer (protocol §10.5)
        self.silent = False  # closed by liveness (nothing heard for ping_timeout), not by the network
        # Bytes a stream keeps for resume at most (protocol §10.3): two windows (a relay holds one more)
        # and the ACK interval of each end.
        self.keep_max = 2 * (t.stream_window + ACK_EVERY)
        self.open_tasks: dict[int, asyncio.Task] = {}
        self.early: dict[int, list[bytes]] = {}  # early data for streams whose target is being dialed
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future = loop.create_future()  # peer HELLO received
        self.done: asyncio.Future = loop.create_future()  # WebSocket gone
        self.last_rx = time.monotonic()
        self.opened_at = time.time()
        self.rtt: float | None = None
        self.paused = False  # the outgoing queue is above max_tunnel_buffer: full reads wait for turns
        self._turns = TurnRing()  # streams with more to send while paused (protocol §6.3)
        self.cycle = 0  # congestion cycles so far: each pause_writing starts one
        self.turn = TURN  # bytes a stream sends per turn, and per cycle outside turns (size_queues)
        self._queue_limits = (0, 0, TURN)  # (outgoing buffer limit, notsent_lowat, turn) in force
        self._sized_at = 0.0
        self.close_reason = ""
        self.peer_addr = "?"
        self.tls: dict = {}
        self.peer_cert: dict = {}
        self.streams_total = 0
        self._buf = bytearray()
        self._buf_mv = memoryview(self._buf)
        self._loop = loop
        self._corked: list[bytes] | None = None  # small frames waiting for the end of this iteration

    # --- identity for logs -------------------------------------------------------------
    @property
    def peer_node(self) -> str:
        return self.conn.peer.node_id if self.conn.peer else "?"

    @property
    def peer_key(self) -> tuple[str, str]:
        """The peer gateway instance: node id and incarnation (a restart or a clone is another)."""
        p = self.conn.peer
        return (p.node_id, p.incarnation) if p else ("?", "")

    @property
    def label(self) -> str:
        return f"tunnel#{self.id} {self.peer_addr}"

    # --- what the rest of the gateway may read (the Connection is this tunnel's own) -----
    @property
    def peer(self) -> Hello | None:
        """The peer's HELLO, once received (validated, protocol §5.3)."""
        return self.conn.peer

    @property
    def stream_count(self) -> int:
        return self.conn.stream_count

    @property
    def goaway_received(self) -> bool:
        return self.conn.goaway_received

    @property
    def goaway_sent(self) -> bool:
        return self.conn.goaway_sent

    @property
    def hello_sent(self) -> bool:
        return self.conn.hello_sent

    def send_credit(self, sid: int) -> int:
        return self.conn.credit(sid)

    def opening(self, sid: int) -> bool:
        """The peer's OPEN ``sid`` is still unanswered (neither OPEN_OK nor OPEN_FAIL nor RST yet)."""
        return self.conn.state(sid) is State.OPENING_IN

    @property
    def resumable(self) -> bool:
        """Both sides announced resume (protocol §10.1)."""
        p = self.conn.peer
        return self.conn.resume and p is not None and p.extra.get("resume") is True

    @property
    def usable(self) -> bool:
        return self.ws is not None and not self.ws.is_disconnected

    # --- picows callbacks --------------------------------------------------------------
    def on_ws_connected(self, transport) -> None:
        self.ws = transport
        under = transport.underlying_transport
        if self.peer_addr == "?":  # an accepted tunnel knows it from its listener (PROXY protocol included)
            peer = under.get_extra_info("peername")
            self.peer_addr = f"{peer[0]}:{peer[1]}" if peer else "?"
        ssl_obj = under.get_extra_info("ssl_object")
        self.tls = session_info(ssl_obj)
        if ssl_obj is not None:
            self.peer_der = ssl_obj.getpeercert(binary_form=True)
            self.peer_cert = describe_peer_cert(self.peer_der)
        self.gateway.classify(self)
        t = self.gateway.config.tunnel
        self._queue_limits = start_limits(t.max_tunnel_buffer, t.notsent_lowat)  # sized by rate later
        high, lowat, _turn = self._queue_limits
        under.set_write_buffer_limits(high=high, low=high // 2)  # protocol §6.3
        self.sock = under.get_extra_info("socket")
        sockopts.apply(self.sock, t.congestion, lowat, source=self.gateway.config.source)
        if not self.client:
            refusal = self.gateway.screen(self)
            if refusal is not None:  # e.g. a peer link whose certificate is not a member's: it learns nothing
                self.refused = True
                self.fail(refusal, code=1008, quiet=self.refusal_logged)  # logged once, where refused
                return
            self.send_hello()
        # The dialing side answers only once it has admitted the peer's HELLO (protocol §5.2): a tunnel
        # it refuses (e.g. it landed on an already covered member) never looks live to the peer.

    def send_hello(self) -> None:
        g = self.gateway
        extra = g.hello_extra(self)
        if g.config.tunnel.resume_timeout > 0:  # protocol §10.1
            self.conn.resume = extra["resume"] = True
        self.ws.send(_BINARY, self.conn.hello(g.node_id, g.role, g.connect_service_names(self), g.incarnation,
                                              **extra))

    def on_ws_frame(self, transport, frame) -> None:
        self.last_rx = time.monotonic()
        closing = transport.close_handshake
        if closing is not None and closing.sent is not None:
            # A close frame is out (ours, or picows's for a WebSocket violation): nothing more is acted on.
            # picows goes on parsing after it refused a frame over max_frame_size with 1009 and still
            # delivers it when the rest arrives within its 10 ms disconnect delay: a 1 MiB SERVICES was
            # decoded here although the limit is 256 KiB (protocol §5.5).
            return
        mt = frame.msg_type
        if mt is _BINARY and frame.fin and not frame.rsv1:  # RSV1: no extension was negotiated
            try:
                event, reply = self.conn.receive(frame.get_payload_as_memoryview())
            except ProtocolError as exc:
                self.gateway.counters["protocol_errors"] += 1
                self.fail(f"protocol error by peer {self.peer_node} ({self.peer_addr}): {exc}")
                return
            if reply is not None:
                self.send_frame(reply)
            if event is not None:
                self._dispatch(event)
        elif mt is MsgType.CLOSE:
            self.close_reason = self.close_reason or (
                f"peer closed the WebSocket ({frame.get_close_code()}: {frame.get_close_reason() or 'no reason'})")
            self.flush()
            transport.send_close(CloseCode.OK)
            transport.disconnect()
        elif mt is MsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif mt is MsgType.PONG:
            pass
        else:
            self.fail(f"protocol error by peer {self.peer_node} ({self.peer_addr}): WebSocket {mt.name} frame "
                      f"(fin={frame.fin}, rsv1={frame.rsv1}); intercloud sends only whole, uncompressed binary "
                      "messages")

    def on_ws_disconnected(self, transport) -> None:
        if not self.close_reason:
            sent = transport.close_handshake.sent if transport.close_handshake is not None else None
            if sent is not None and sent.code not in (CloseCode.OK, CloseCode.GOING_AWAY):
                # picows closed it for a WebSocket protocol violation (bad opcode, unmasked frame,
                # oversized frame...): say so once, before HELLO too, with the code the peer was told
                self.close_reason = (f"WebSocket protocol violation by peer {self.peer_node} ({self.peer_addr}): "
                                     f"closed with {int(sent.code)} {peer_input.shown(sent.reason, 200)}")
                logs.limited(log, logging.WARNING, "tunnel.ws_violation", self.peer_addr.rsplit(":", 1)[0],
                             "%s: %s", self.label, self.close_reason,
                             extra={"tunnel": self.id, "peer_node": self.peer_node, "code": int(sent.code)})
        self._teardown(self.close_reason or "connection lost")
        # The WebSocket is gone for good: break the one reference cycle (Tunnel -> Connection -> its
        # sink, our bound send_frame -> Tunnel), so that reference counting frees the tunnel and its
        # transport (TLS engine and buffers, ~130 KiB) now. Left to the cyclic GC, whose full
        # collections are rare, 1,000 closed tunnels held ~120 MB (tests/security/test_metric_series.py).
        self.conn.sink = None
        heap_churn(self._loop)  # and give the freed pages back to the kernel soon

    def _teardown(self, reason: str) -> None:
        """Reset every stream and tell the gateway; runs once, whoever notices first."""
        if self.done.done():
            return
        for fut in self.pending_opens.values():
            if not fut.done():
                fut.set_result((Reason.ABORTED, f"tunnel to {self.peer_node} closed: {reason}"))
        self.pending_opens.clear()
        self.resuming.clear()
        for task in self.open_tasks.values():
            task.cancel()
        self.open_tasks.clear()
        self.early.clear()
        self._turns.clear()
        self.conn.abort_all()
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:  # park what can resume on another path (protocol §10.4), reset the rest
            if stream.finished or stream.tunnel is not self:
                continue
            if not self.gateway.park(stream, self, reason, self.silent):
                stream.path_lost(reason, self.silent)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
            self.ready.exception()  # mark retrieved
        if not self.done.done():
            self.done.set_result(reason)
        self.gateway.tunnel_closed(self, reason)

    def pause_writing(self) -> None:
        self.paused = True
        self.cycle += 1

    def resume_writing(self) -> None:
        self.paused = False
        now = time.monotonic()
        if now - self._sized_at >= _SIZE_EVERY:
            self._sized_at = now
            self.size_queues()
        self.run_turns()

    @property
    def queued(self) -> int:
        """Bytes queued toward the tunnel in the process (TLS and socket transports; status)."""
        ws = self.ws
        return ws.underlying_transport.get_write_buffer_size() if ws is not None and not ws.is_disconnected else 0

    @property
    def queue_limit(self) -> int:
        """The outgoing-buffer limit in force (max_tunnel_buffer, or less once sized; status)."""
        return self._queue_limits[0]

    def size_queues(self) -> None:
        """Size the queues in front of the wire to the connection's rate (turns.queue_limits): about
        QUEUE_TIME of sending each, within the configured max_tunnel_buffer and notsent_lowat. On a
        20 Mbit/s path the starting 256 + 128 KiB would be 150 ms in front of every interactive
        frame; sized, about 25 ms. On loopback they grow to the configured maxima. Runs at the end
        of a congestion cycle, at most every _SIZE_EVERY:
        an uncongested tunnel has empty queues, whatever their limits."""
        t = self.gateway.config.tunnel
        limits = queue_limits(sockopts.pacing_rate(self.sock), t.max_tunnel_buffer, t.notsent_lowat)
        if limits == self._queue_limits or self.ws is None:
            return
        high, lowat, turn = limits
        if high != self._queue_limits[0]:
            self.ws.underlying_transport.set_write_buffer_limits(high=high, low=high // 2)
        if lowat != self._queue_limits[1]:
            sockopts.set_notsent_lowat(self.sock, lowat)
        self._queue_limits = limits
        self.turn = self._turns.quantum = turn

    # --- fair sending (protocol §6.3) ----------------------------------------------------
    def wait_turn(self, end: StreamEnd) -> None:
        """``end`` sent a turn's worth in this congestion cycle and has more: it sends only in its
        turns from here, at most a turn (``self.turn``) each, round robin with the other waiting streams. A
        stream that sends less (an interactive one) never waits here: its frame leaves at once,
        behind at most max_tunnel_buffer and one turn per waiting stream."""
        self._turns.wait(end)

    @property
    def turns_waiting(self) -> int:
        """Streams waiting for a turn now (status)."""
        return len(self._turns)

    def run_turns(self) -> None:
        self._turns.round(lambda: self.paused)

    # --- events ------------------------------------------------------------------------
    def _dispatch(self, ev) -> None:
        if type(ev) is Data:
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.deliver(ev.data)
            elif ev.stream_id in self.open_tasks:  # early data (§4.5): bounded by the Connection
                self.early.setdefault(ev.stream_id, []).append(bytes(ev.data))
            return
        if type(ev) is CreditAvailable:
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_credit()
        elif type(ev) is Acked:
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_ack(ev.held)
        elif type(ev) is RemoteFin:
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_remote_fin(ev.closed)
        elif type(ev) is RemoteReset:
            sid = ev.stream_id
            fut = self.pending_opens.pop(sid, None)
            if fut is not None and not fut.done():
                fut.set_result((ev.code, ev.text))
            task = self.open_tasks.pop(sid, None)
            if task is not None:
                task.cancel()
            self.resuming.pop(sid, None)
            s = self.streams.get(sid)
            if s is not None:
                if ev.code == Reason.PATH_LOST and s.in_service:  # a relay lost the other side (§10.4)
                    del self.streams[sid]
                    silent = ev.text.startswith("path silent")  # as its tunnel died: the wait follows it
                    if self.gateway.park(s, self, f"{self.peer_node} lost the path: {ev.text}", silent):
                        return
                s.abort(ev.code, f"peer reset: {ev.text}", tell_peer=False)
        elif type(ev) is OpenAccepted:
            sid = ev.stream_id
            s = self.streams.get(sid)
            if s is not None:
                s.ok_payload = ev.payload  # the far end's resume identity, or a relay's answer to pass on
            else:
                s = self.resuming.pop(sid, None)
                if s is not None and (s.finished or not s.parked):
                    # The stream ended while its RESUME was out (its client left while parked: Parking.gone
                    # cancelled the resuming task, not the RESUME). The far end has attached its end to
                    # this id: reset it. Resumed instead, a finished stream was attached here and the far
                    # end's socket waited forever (tests/protocol/test_resume_properties.py).
                    frame = self.conn.reset(sid, Reason.ABORTED, "the stream ended while its RESUME was out")
                    if frame:
                        self.send_frame(frame)
                elif s is not None:  # now, not in the resuming task: the far end's replay may be in this read
                    self._resumed(sid, s, ev.payload)
            fut = self.pending_opens.pop(sid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif type(ev) is OpenRefused:
            # A refused RESUME (BUSY, NOT_RESUMABLE, UNKNOWN_SERVICE): the stream stays parked, not ours.
            # Left here, each refusal (a BUSY retry every 0.5 s) kept the stream until the tunnel closed.
            self.resuming.pop(ev.stream_id, None)
            fut = self.pending_opens.pop(ev.stream_id, None)
            if fut is not None and not fut.done():
                fut.set_result((ev.code, ev.text))
        elif type(ev) is StreamOpened:
            if ev.relayed and self.kind != "peer":
                self.send_frame(self.conn.open_fail(ev.stream_id, Reason.FORBIDDEN,
                                                    "RELAYED OPEN outside a peer link"))
                return
            if ev.resume is not None:
                self.gateway.resume_requested(self, ev.stream_id, ev.service, ev.resume)
            else:
                self.gateway.stream_requested(self, ev.stream_id, ev.service, ev.client)
        elif type(ev) is Ping:
            pass  # PONG already sent by the caller
        elif type(ev) is Pong:
            if len(ev.payload) == 8:
                self.rtt = time.monotonic() - _PING.unpack(ev.payload)[0]
        elif type(ev) is Hello:
            self._buf = bytearray(_PAYLOAD_AT + min(ev.max_frame, _MAX_SEND_FRAME))
            self._buf_mv = memoryview(self._buf)
            self.gateway.tunnel_ready(self)
            if not self.ready.done():
                self.ready.set_result(ev)
        elif type(ev) is GoAway:
            if ev.code == Reason.FORBIDDEN:
                self.refused_by_peer = ev.text
                self.close_reason = f"refused by {self.peer_node}: {ev.text}"
            log.info("GOAWAY from %s: %s %s", self.peer_node, Reason.name_of(ev.code), ev.text,
                     extra={"event": "tunnel.goaway", "tunnel": self.id, "peer_node": self.peer_node})
            self.gateway.goaway_received(self)
        elif type(ev) is ServicesChanged:
            log.info("%s: %s now connects %s", self.label, self.peer_node, ", ".join(ev.services) or "nothing",
                     extra={"event": "tunnel.services", "tunnel": self.id, "peer_node": self.peer_node,
                            "services": ev.services})
            self.gateway.services_changed(self)
        elif type(ev) is Members:
            self.gateway.members_received(self, ev.members)

    # --- sending -----------------------------------------------------------------------
    def send_frame(self, frame: bytes) -> None:
        """Send one protocol frame. The first in a loop iteration leaves at once (it may be on a
        client's critical path: an OPEN, an OPEN_OK); small ones after it are held until the end of
        the iteration and leave together, in order (P6)."""
        ws = self.ws
        if ws is None or ws.is_disconnected:
            return
        q = self._corked
        if q is None:
            ws.send(_BINARY, frame)
            self.hold()  # what follows in this iteration waits for its end
        elif len(frame) > _CORK_MAX:
            self.flush()
            ws.send(_BINARY, frame)
        else:
            q.append(frame)

    def hold(self) -> None:
        """Hold every frame sent from now on until flush() or the end of this loop iteration (the
        caller has something more urgent to do first)."""
        if self._corked is None:
            self._corked = []
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the held frames now (before any frame that bypasses send_frame, and at the end of
        the loop iteration)."""
        q = self._corked
        self._corked = None
        if not q:
            return
        ws = self.ws
        if ws is None or ws.is_disconnected:
            return
        if len(q) == 1:
            ws.send(_BINARY, q[0])
        else:
            ws.underlying_transport.write(ws_frames(q, self.client))

    def read_buffer(self, sid: int) -> memoryview:
        """Where the next local read for stream ``sid`` lands: behind room for both headers,
        no longer than the stream may send (credit, peer max_frame)."""
        limit = self.conn.send_limit(sid)
        if self.paused:  # congested: at most a turn outside the ring (protocol §6.3)
            limit = min(limit, self.turn)
        return self._buf_mv[_PAYLOAD_AT:_PAYLOAD_AT + limit]

    def send_data(self, stream: LocalStream, n: int) -> None:
        sid = stream.sid
        self.conn.send_data(sid, n)
        if stream.keeping:  # before the send: a dialer's WebSocket mask is applied in place
            stream.keep(self._buf_mv[_PAYLOAD_AT:_PAYLOAD_AT + n])
        if self._corked:
            self.flush()  # frames sent before this DATA go before it
        HEADER.pack_into(self._buf, _WS_ROOM, FrameType.DATA, 0, sid)
        ws = self.ws
        if _PAYLOAD_AT + n == len(self._buf):
            # Full frame: picows writes its header into our buffer's front room; no copy.
            ws.send_reuse_external_bytearray(_BINARY, self._buf, _WS_ROOM)
        else:
            ws.send(_BINARY, self._buf_mv[_WS_ROOM:_PAYLOAD_AT + n])
        if self.conn.send_limit(sid) <= 0:
            stream.credit_exhausted()

    def send_payload(self, sid: int, payload: memoryview) -> None:
        """DATA from a buffer of the caller's (off the hot path: parked bytes)."""
        self.conn.send_data(sid, len(payload))
        self.send_frame(HEADER.pack(FrameType.DATA, 0, sid) + payload)

    # --- streams -----------------------------------------------------------------------
    def open(self, end: StreamEnd) -> asyncio.Future:
        """Send OPEN for ``end``; the future resolves to None (OPEN_OK) or (code, text). What a client
        has sent already leaves in the same write as the OPEN, and its next bytes right behind it as
        early data (protocol §4.5, docs/performance.md P13). On a peer link the OPEN is flagged
        RELAYED (protocol §3.2)."""
        end.take_sent()
        if end.finished:  # it reset the connection instead
            fut = self._loop.create_future()
            fut.set_result((Reason.ABORTED, "client left before the stream opened"))
            return fut
        self.hold()
        relayed = self.kind == "peer"
        name = f"{end.tenant}/{end.service}" if relayed else end.service
        sid, frame = self.conn.open_stream(name, end.client, relayed=relayed)
        end.attach(self, sid)
        self.streams[sid] = end
        fut = self._loop.create_future()
        self.pending_opens[sid] = fut
        self.send_frame(frame)
        end.begin_early()
        self.flush()
        return fut

    def cancel_open(self, end: StreamEnd, code: int, text: str) -> None:
        """Our OPEN for ``end`` got no answer in time: RST it (the peer may still answer; that answer
        is then ignored) and stop waiting."""
        frame = self.conn.reset(end.sid, code, text)
        if frame:
            self.send_frame(frame)
        self.pending_opens.pop(end.sid, None)

    def detach(self, end: StreamEnd) -> None:
        """``end``'s OPEN was refused: it is no stream of this tunnel any more (it may retry elsewhere)."""
        if self.streams.get(end.sid) is end:
            del self.streams[end.sid]
        end.tunnel, end.sid = None, 0

    def track_open(self, sid: int, task: asyncio.Task) -> None:
        """The task that answers the peer's OPEN ``sid`` (dial the target, relay): early DATA for ``sid``
        is kept for it, an RST or the tunnel's end cancels it."""
        self.open_tasks[sid] = task
        task.add_done_callback(lambda _t: (self.open_tasks.pop(sid, None), self.early.pop(sid, None)))

    def refuse(self, sid: int, code: int, text: str) -> None:
        """Answer the peer's OPEN ``sid`` with OPEN_FAIL, unless it is answered or reset already."""
        if self.opening(sid):
            self.send_frame(self.conn.open_fail(sid, code, text))

    def accept(self, sid: int, end: StreamEnd, identity: bytes | None = None) -> bool:
        """Answer the peer's OPEN ``sid`` with OPEN_OK and make ``end`` its stream; the early data that
        came with the OPEN goes to ``end`` right behind it (protocol §4.5). False when the OPEN is no
        longer waiting (the peer reset it) or the tunnel is gone: ``end`` is not attached.

        OPEN_OK carries the stream's resume identity (protocol §10.2): a new token for a local end, or
        ``identity`` as the far side of a relay sent it (passed on unchanged)."""
        if not self.opening(sid) or not self.usable:
            return False
        end.attach(self, sid)
        self.streams[sid] = end
        payload = b""
        if self.resumable:
            if identity is not None:
                payload = identity
            elif end.keeping:
                end.token = os.urandom(16)
                g = self.gateway
                payload = encode_identity(end.token, g.node_id, g.incarnation)
        early = self.early.pop(sid, None)
        if early:  # the early bytes are on the client's path, OPEN_OK is not: write them first (P11)
            self.hold()
        self.send_frame(self.conn.open_ok(sid, payload))  # the stream is OPEN from here: early bytes earn credit
        if early:
            for chunk in early:
                end.deliver(memoryview(chunk))
            self.flush()  # OPEN_OK, then any WINDOW or RST the delivery produced, in that order
        return True

    def send_services(self, names: list[str]) -> None:
        self.send_frame(self.conn.services(names))

    def send_members(self, entries: list[dict]) -> None:
        """MEMBERS, in as many frames as the peer's max_frame needs (protocol §5.5)."""
        for frame in self.conn.members(entries):
            self.send_frame(frame)

    def stream_finished(self, stream: LocalStream, reason: str) -> None:
        fut = self.pending_opens.pop(stream.sid, None)
        if fut is not None and not fut.done():
            fut.set_result((Reason.ABORTED, "client left before the stream opened"))
        if self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]
            self.streams_total += 1
        self.gateway.stream_closed(self, stream, reason)

    # --- lifecycle ---------------------------------------------------------------------
    def ping(self) -> None:
        self.send_frame(self.conn.ping(_PING.pack(time.monotonic())))

    def goaway(self, text: str, code: int = Reason.DRAINING) -> None:
        """GOAWAY (once): DRAINING when this side shuts down, FORBIDDEN when it refuses the peer."""
        if not self.conn.goaway_sent:
            self.send_frame(self.conn.goaway(code, text))

    def fail(self, reason: str, code: CloseCode = CloseCode.PROTOCOL_ERROR, quiet: bool = False) -> None:
        """Close the tunnel at once (protocol §9.2): its streams are reset now, not when the
        peer (maybe dead) acknowledges; the close frame is sent and the socket aborted soon after."""
        if not self.close_reason:
            self.close_reason = reason
            log.log(logging.DEBUG if quiet else logging.WARNING, "%s: closing: %s", self.label, reason,
                        extra={"event": "tunnel.error", "tunnel": self.id, "peer_node": self.peer_node,
                               "reason": reason})
        ws = self.ws
        if ws is not None and not ws.is_disconnected:
            self.flush()
            ws.send_close(code, reason.encode()[:120])
            ws.disconnect(graceful=True)
            asyncio.get_running_loop().call_later(1.0, ws.disconnect, False)
        self._teardown(reason)

    def close(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason
        ws = self.ws
        if ws is not None and not ws.is_disconnected:
            self.flush()
            ws.send_close(CloseCode.GOING_AWAY, reason.encode()[:120])
            ws.disconnect()
