"""A relayed stream: two tunnel streams spliced together on a cloud member (docs/ha.md §5).

Member Y gets an OPEN flagged RELAYED on a peer link from member X and opens the same service on one
of its own on-prem tunnels. Each side of the splice is a ``BridgeEnd``, which looks to its tunnel like
a local socket (the LocalStream interface the tunnel drives). Flow control stays end to end: bytes
from one tunnel are forwarded within the other tunnel's credit, and credit goes back to the sender
only for bytes forwarded, so a bridge holds at most one window per direction.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from ..protocol import State
from ..protocol.frames import Reason

if TYPE_CHECKING:
    from .owner import Tunnel


class BridgeEnd:
    def __init__(self, service: str, side: str, client: str, target: str, tenant: str = "default"):
        self.service = service
        self.tenant = tenant
        self.counted = False  # holds one of its tenant's stream slots (GatewayStats.hold_slot)
        self.gate = None  # its service's admission.ServiceGate while it holds a slot there
        self.in_service = False  # opened and logged: stream_closed frees the slot
        self.side = side
        self.client = client
        self.target = target
        self.tunnel: Tunnel | None = None
        self.sid = 0
        self.other: BridgeEnd | None = None
        self.pending: deque[bytes] = deque()  # from our tunnel, not yet forwarded
        self.pending_bytes = 0
        self.fin_pending = False  # our tunnel sent FIN; forward it after pending
        self.started = time.monotonic()
        self.bytes_up = 0  # forwarded from the other end into our tunnel
        self.bytes_down = 0  # received from our tunnel
        self.live = False  # both sides opened
        self.finished = False
        self.reading = True
        self.in_turns = False  # in our tunnel's fair ring: the other end's bytes go in our turns
        self.cycle = 0  # our tunnel's congestion cycle that ``sent_in_cycle`` counts in
        self.sent_in_cycle = 0  # bytes forwarded into our tunnel outside turns while it was congested
        self.transport = None
        self.keeping = False  # a relay keeps nothing for resume: the ends do (protocol §10.3)
        self.ok_payload = b""  # the far side's OPEN_OK payload, passed on to the near side unchanged

    @staticmethod
    def pair(service: str, client: str, target: str, tenant: str = "default") -> tuple[BridgeEnd, BridgeEnd]:
        a = BridgeEnd(service, "relay-in", client, target, tenant)
        b = BridgeEnd(service, "relay-out", client, target, tenant)
        a.other, b.other = b, a
        return a, b

    def attach(self, tunnel: Tunnel, sid: int) -> None:
        self.tunnel = tunnel
        self.sid = sid

    @property
    def buffered(self) -> int:
        return self.pending_bytes

    # --- the LocalStream interface, driven by our tunnel --------------------------------
    def start(self) -> None:
        self.live = True
        if self.other.live:
            self._flush()
            self.other._flush()

    def deliver(self, mv: memoryview) -> None:
        self.bytes_down += len(mv)
        self.pending.append(bytes(mv))
        self.pending_bytes += len(mv)
        self._flush()

    def on_credit(self) -> None:
        """Our tunnel granted credit: the other end's pending bytes may flow into it."""
        self.other._flush()

    def on_ack(self, held: int) -> None:
        """The end behind our tunnel ACKs: pass it to the end behind the other one (protocol §10.3)."""
        t = self.other.tunnel
        if t is not None and self.other.sid and t.resumable:
            frame = t.conn.ack(self.other.sid, held)
            if frame is not None:
                t.send_frame(frame)

    def path_lost(self, reason: str, silent: bool) -> None:
        """Our tunnel closed: the other side's end parks its stream on PATH_LOST (protocol §10.4); the
        text says whether our tunnel died of silence (the end then waits resume_timeout) or was closed."""
        self.abort(Reason.PATH_LOST, f"path {'silent' if silent else 'closed'} at relay: {reason}", tell_peer=False)

    def on_remote_fin(self, closed: bool) -> None:
        self.fin_pending = True
        self._flush()

    def take_turn(self, limit: int) -> bool:
        """Our tunnel gives us a turn (protocol §6.3): forward up to ``limit`` of the other end's bytes."""
        if self.finished or not self.in_turns:
            self.in_turns = False
            return False
        more = self.other._forward(limit)
        self.in_turns = more
        return more

    def end_turns(self) -> None:
        self.in_turns = False
        self.other._flush()

    def abort(self, code: int, text: str, tell_peer: bool = True) -> None:
        for end, tell in ((self, tell_peer), (self.other, True)):
            if end.finished:
                continue
            t = end.tunnel
            if tell and t is not None and end.sid:
                frame = t.conn.reset(end.sid, code, text)
                if frame:
                    t.send_frame(frame)
            end.finish(f"reset: {Reason.name_of(code)} {text}")

    def take_sent(self) -> None:
        """Nothing to take: a relay end has no socket of its own (StreamEnd)."""

    def begin_early(self) -> None:
        """No early data through a relay: peer links accept none (protocol §4.5)."""

    def finish(self, reason: str | None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.tunnel is not None:
            self.tunnel.stream_finished(self, reason or "closed")

    # --- forwarding ---------------------------------------------------------------------
    def _flush(self) -> None:
        """Forward our pending bytes into the other end's tunnel, within its credit. While that
        tunnel's queue is full, more than a turn's worth waits for the other end's turns there."""
        out = self.other
        if out.in_turns:
            return
        t_out = out.tunnel
        if t_out is not None and t_out.paused and self.live and out.live:
            if out.cycle != t_out.cycle:
                out.cycle, out.sent_in_cycle = t_out.cycle, 0
            if out.sent_in_cycle + self.pending_bytes > t_out.turn:  # as LocalStream.buffer_updated
                out.in_turns = True
                t_out.wait_turn(out)
                return
            out.sent_in_cycle += self.pending_bytes
        self._forward(None)

    def _forward(self, budget: int | None) -> bool:
        """Forward up to ``budget`` bytes (None: all) of our pending bytes; True while more wait and
        the other end's tunnel has credit for them."""
        out = self.other
        if not (self.live and out.live) or out.finished or self.finished:
            return False
        t_out, t_in = out.tunnel, self.tunnel
        while self.pending:
            limit = t_out.conn.send_limit(out.sid)
            if limit <= 0:
                return False
            if budget is not None:
                if budget <= 0:
                    return True
                limit = min(limit, budget)
            chunk = self.pending[0]
            n = min(limit, len(chunk))
            if budget is not None:
                budget -= n
            t_out.send_payload(out.sid, memoryview(chunk)[:n])
            out.bytes_up += n
            if n == len(chunk):
                self.pending.popleft()
            else:
                self.pending[0] = chunk[n:]
            self.pending_bytes -= n
            frame = t_in.conn.delivered(self.sid, n)
            if frame is not None:
                t_in.send_frame(frame)
        if self.fin_pending and t_out.conn.state(out.sid) in (State.OPEN, State.HALF_CLOSED_REMOTE):
            t_out.send_frame(t_out.conn.fin(out.sid))
        self._check_closed()
        return False

    def _check_closed(self) -> None:
        a, b = self, self.other
        if a.tunnel.conn.state(a.sid) is State.CLOSED and b.tunnel.conn.state(b.sid) is State.CLOSED:
            a.finish("closed")
            b.finish("closed")
