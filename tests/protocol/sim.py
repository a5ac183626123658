"""Helpers for the sans-I/O protocol tests: HELLO handshakes and a two-peer wire simulator.

The simulator joins two :class:`Connection` objects (client and server) by two FIFO "wires" and
moves bytes through streams in both directions. Which side acts next, how big each DATA chunk is
and how much the receiver reports as delivered come from a *schedule* (drawn by hypothesis); when
the schedule runs out a deterministic policy finishes the transfer, so every run terminates and a
run that cannot finish is a deadlock, reported as a failure.
"""

from __future__ import annotations

import copy
import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from intercloud.protocol import frames
from intercloud.protocol.connection import (
    Connection, CreditAvailable, Data, Hello, LocalProtocolError, OpenAccepted, ProtocolError,
    RemoteFin, State, StreamOpened,
)
from intercloud.protocol.frames import HEADER, HEADER_SIZE, FrameType

F = FrameType
# States in which a side still receives DATA and returns credit for it (protocol §4.2, §6.2).
RECEIVING = (State.OPEN, State.HALF_CLOSED_LOCAL)
# States in which a side may still send DATA.
SENDING = (State.OPEN, State.HALF_CLOSED_REMOTE)
MISSING = object()


def threshold(window: int) -> int:
    """When the receiver returns credit (protocol §6.2: owed credit reaches a quarter of the
    window). The code rounds the quarter down and never batches below 1 byte."""
    return max(1, window // 4)


def hello_body(**over) -> dict:
    body = {
        "version": 1, "node_id": "peer-1", "role": "cloud", "services": ["svc"],
        "window": 65536, "max_frame": 16384, "max_streams": 100, "incarnation": "boot-1",
    }
    body.update(over)
    return {k: v for k, v in body.items() if v is not MISSING}


def hello_frame(**over) -> bytes:
    return frames.encode(F.HELLO, 0, frames.encode_json(hello_body(**over)))


def make_pair(
    *, client_window: int = 65536, server_window: int = 65536,
    client_max_frame: int = 16384, server_max_frame: int = 16384,
    client_max_streams: int = 100, server_max_streams: int = 100,
    client_early: int = 1024, server_early: int = 1024,
) -> tuple[Connection, Connection]:
    """A client and a server Connection that have exchanged HELLOs (each accepting ``*_early``
    bytes of early data per stream, protocol §4.5)."""
    c = Connection(client=True, window=client_window, max_frame=client_max_frame,
                   max_streams=client_max_streams, early_data=client_early)
    s = Connection(client=False, window=server_window, max_frame=server_max_frame,
                   max_streams=server_max_streams, early_data=server_early)
    hc = c.hello("onprem-1", "onprem", [], "boot-c")
    hs = s.hello("cloud-1", "cloud", ["svc"], "boot-s", members=[])
    ev, reply = s.receive(hc)
    assert isinstance(ev, Hello) and reply is None
    assert (ev.window, ev.max_frame, ev.max_streams) == (client_window, client_max_frame, client_max_streams)
    ev, reply = c.receive(hs)
    assert isinstance(ev, Hello) and reply is None
    assert (ev.window, ev.max_frame, ev.max_streams) == (server_window, server_max_frame, server_max_streams)
    assert ev.extra == {"members": []}
    return c, s


def connection_payload(ftype: FrameType) -> bytes:
    """A well-formed payload for a connection-level frame type (protocol §3)."""
    return {
        F.HELLO: frames.encode_json(hello_body()), F.PING: bytes(8), F.PONG: bytes(8),
        F.GOAWAY: frames.encode_reason(5, "draining"),
        F.MEMBERS: frames.encode_json([{"node_id": "cloud1", "incarnation": "ab12", "url": None}]),
    }.get(ftype, b'["svc"]')  # SERVICES: a JSON array of names


def header(frame: bytes) -> tuple[FrameType, int]:
    ftype, flags, sid = HEADER.unpack_from(frame, 0)
    assert flags == 0
    return FrameType(ftype), sid


@dataclass
class Flow:
    """One direction of one stream: the bytes side ``src`` sends to side ``1 - src``."""

    sid: int
    src: int
    payload: bytes
    sent: int = 0  # bytes the sender has put on the wire
    received: bytearray = field(default_factory=bytearray)
    delivered: int = 0  # bytes the receiver has reported delivered
    owed: int = 0  # model: delivered bytes whose credit the receiver has not returned yet
    data_in_flight: int = 0  # DATA payload bytes on the wire, sender -> receiver
    window_in_flight: int = 0  # WINDOW increments on the wire, receiver -> sender
    fin_sent: bool = False
    fin_received: bool = False
    window_frames: int = 0

    @property
    def held(self) -> int:
        """Received by the receiving Connection, not yet delivered to its local socket."""
        return len(self.received) - self.delivered

    @property
    def done(self) -> bool:
        return self.fin_received and self.delivered == len(self.received) == len(self.payload)


class Sim:
    """Two connected peers; side 0 is the client, side 1 the server."""

    def __init__(self, conns: tuple[Connection, Connection],
                 streams: list[tuple[int, bytes, bytes]], *, probe: bool = False):
        self.conns = conns
        self.wires: tuple[deque, deque] = (deque(), deque())  # wires[i]: frames side i sent
        self.flows: dict[tuple[int, int], Flow] = {}
        self.probe = probe
        self.steps = 0
        self.races_ignored = 0  # frames for already-forgotten streams (protocol §4.3)
        for opener, from_client, from_server in streams:
            sid, frame = conns[opener].open_stream("svc", "198.51.100.7:4242")
            assert conns[opener].state(sid) is State.OPENING_OUT
            assert (sid % 2 == 1) == (opener == 0)
            self.wires[opener].append(frame)
            self.flows[sid, 0] = Flow(sid, 0, from_client)
            self.flows[sid, 1] = Flow(sid, 1, from_server)

    # --- actions ------------------------------------------------------------------------
    def actions(self, *, probes: bool) -> list[tuple]:
        acts: list[tuple] = [("pump", side) for side in (0, 1) if self.wires[side]]
        for key, fl in self.flows.items():
            snd, rcv = self.conns[fl.src], self.conns[1 - fl.src]
            state = snd.state(fl.sid)
            if not fl.fin_sent:
                if fl.sent < len(fl.payload):
                    # before OPEN_OK only as much early data as the peer announced (protocol §4.5)
                    if (state in SENDING or state is State.OPENING_OUT) and snd.send_limit(fl.sid) > 0:
                        acts.append(("send", key))
                elif state in SENDING:
                    acts.append(("fin", key))
            if fl.held > 0 and rcv.state(fl.sid) is not State.OPENING_IN:  # early bytes wait for OPEN_OK
                acts.append(("deliver", key))
            if rcv.state(fl.sid) is State.OPENING_IN:  # the receiver's target is up: OPEN_OK
                acts.append(("accept", 1 - fl.src, fl.sid))
            if probes and fl.sid in self.conns[1 - fl.src]._streams:
                acts.append(("probe_recv", key))
        return acts

    def run(self, schedule: list[tuple[int, int]], rng: random.Random | None = None,
            weights: dict[str, int] | None = None) -> None:
        """Play ``schedule`` (hypothesis-shrinkable choices), then random choices from ``rng``
        (weighted per action kind, so one side can be slow to read or to deliver), then a
        deterministic policy until everything has arrived."""
        for act_sel, size_sel in schedule:
            acts = self.actions(probes=self.probe)
            if not acts:
                break
            self.step(acts[act_sel % len(acts)], size_sel)
        if rng is not None:
            weights = weights or {}
            while acts := self.actions(probes=self.probe and rng.random() < 0.1):
                w = [weights.get(a[0], 1) for a in acts]
                act = rng.choices(acts, weights=w)[0]
                size = rng.choice((0, None, rng.randrange(2**16)))  # smallest, largest, any
                self.step(act, size)
                assert self.steps < 1_000_000, "simulation does not terminate"
        # Deterministic completion: every action makes progress on a finite amount of work,
        # so this ends; if no action is enabled before everything arrived, that is a deadlock.
        i = 0
        while acts := self.actions(probes=False):
            self.step(acts[i % len(acts)], None)
            i += 1
            assert i < 1_000_000, "simulation does not terminate"
        self.assert_finished()

    def step(self, act: tuple, size_sel: int | None) -> None:
        self.steps += 1
        kind = act[0]
        if kind == "pump":
            side = act[1]
            self._pump(side, self.wires[side].popleft())
        elif kind == "accept":
            self._accept(act[1], act[2])
        else:
            fl = self.flows[act[1]]
            getattr(self, "_" + kind)(fl, size_sel)
        self.check_invariants()

    def _send(self, fl: Flow, size_sel: int | None) -> None:
        conn = self.conns[fl.src]
        limit = min(conn.send_limit(fl.sid), len(fl.payload) - fl.sent)
        assert limit > 0
        n = limit if size_sel is None else 1 + size_sel % limit
        credit = conn.credit(fl.sid)
        if conn.state(fl.sid) is State.OPENING_OUT:
            early_left = conn.peer.early_data - fl.sent
            assert conn.send_limit(fl.sid) == min(credit, conn.peer.max_frame, early_left)
        else:
            assert conn.send_limit(fl.sid) == min(credit, conn.peer.max_frame)
        if self.probe:
            self._probe_send(conn, fl.sid)
        chunk = fl.payload[fl.sent : fl.sent + n]
        frame = conn.data(fl.sid, chunk)
        assert conn.credit(fl.sid) == credit - n
        assert header(frame) == (F.DATA, fl.sid) and frame[HEADER_SIZE:] == chunk
        fl.sent += n
        fl.data_in_flight += n
        self.wires[fl.src].append(frame)

    def _fin(self, fl: Flow, size_sel: int | None) -> None:
        conn = self.conns[fl.src]
        before = conn.state(fl.sid)
        frame = conn.fin(fl.sid)
        assert header(frame) == (F.FIN, fl.sid) and len(frame) == HEADER_SIZE
        expected = State.HALF_CLOSED_LOCAL if before is State.OPEN else State.CLOSED
        assert conn.state(fl.sid) is expected
        fl.fin_sent = True
        self.wires[fl.src].append(frame)

    def _deliver(self, fl: Flow, size_sel: int | None) -> None:
        rcv = self.conns[1 - fl.src]
        n = fl.held if size_sel is None else 1 + size_sel % fl.held
        state = rcv.state(fl.sid)
        frame = rcv.delivered(fl.sid, n)
        fl.delivered += n
        if state not in RECEIVING:
            # The sender has finished (FIN): it needs no more credit.
            assert frame is None
            return
        fl.owed += n
        if fl.owed < threshold(rcv.window):
            assert frame is None, f"WINDOW sent with only {fl.owed} bytes owed (window {rcv.window})"
            return
        assert frame is not None, f"no WINDOW although {fl.owed} bytes are owed (window {rcv.window})"
        assert header(frame) == (F.WINDOW, fl.sid)
        inc = frames.decode_window(frame[HEADER_SIZE:])
        assert inc == fl.owed
        fl.owed = 0
        fl.window_in_flight += inc
        fl.window_frames += 1
        self.wires[1 - fl.src].append(frame)

    def _accept(self, side: int, sid: int) -> None:
        """Side ``side`` answers the OPEN it received (its target is up): OPEN_OK."""
        conn = self.conns[side]
        ok = conn.open_ok(sid)
        assert header(ok) == (F.OPEN_OK, sid) and conn.state(sid) is State.OPEN
        self.wires[side].append(ok)

    def _probe_recv(self, fl: Flow, size_sel: int | None) -> None:
        """A peer that ignores the credit it was granted is caught, exactly at the boundary."""
        rcv = self.conns[1 - fl.src]
        st = rcv._streams[fl.sid]
        if st.state not in RECEIVING:
            return
        allowed = st.recv_allowed
        if allowed + 1 <= rcv.max_frame:
            rogue = copy.deepcopy(rcv)
            with pytest.raises(ProtocolError, match="flow-control window") as exc:
                rogue.receive(frames.encode(F.DATA, fl.sid, b"\0" * (allowed + 1)))
            assert exc.value.stream_id == fl.sid
        if 1 <= allowed <= rcv.max_frame:
            honest = copy.deepcopy(rcv)
            ev, reply = honest.receive(frames.encode(F.DATA, fl.sid, b"\0" * allowed))
            assert isinstance(ev, Data) and len(ev.data) == allowed and reply is None
            assert honest._streams[fl.sid].recv_allowed == 0

    @staticmethod
    def _probe_send(conn: Connection, sid: int) -> None:
        """The sender refuses to overrun its credit or the peer's max_frame (protocol §6.1)."""
        credit = conn.credit(sid)
        too_much = credit + 1 if credit + 1 <= conn.peer.max_frame else conn.peer.max_frame + 1
        for n in (too_much, 0):
            with pytest.raises(LocalProtocolError):
                conn.send_data(sid, n)
            assert conn.credit(sid) == credit
        with pytest.raises(LocalProtocolError):
            conn.data(sid, b"\0" * too_much)
        assert conn.credit(sid) == credit

    def _pump(self, side: int, frame: bytes) -> None:
        """Carry one frame from side ``side`` to the other side."""
        rcv = self.conns[1 - side]
        ftype, sid = header(frame)
        known = sid in rcv._streams
        ev, reply = rcv.receive(frame)
        assert reply is None
        if ftype is F.OPEN:
            assert isinstance(ev, StreamOpened) and ev.stream_id == sid
            assert (ev.service, ev.client) == ("svc", "198.51.100.7:4242")
            assert rcv.state(sid) is State.OPENING_IN  # answered by an "accept" action
        elif ftype is F.OPEN_OK:
            assert isinstance(ev, OpenAccepted) and ev.stream_id == sid
            assert rcv.state(sid) is State.OPEN
        elif ftype is F.DATA:
            fl = self.flows[sid, side]
            assert isinstance(ev, Data) and ev.stream_id == sid
            chunk = bytes(ev.data)
            n = len(chunk)
            assert n == len(frame) - HEADER_SIZE
            start = len(fl.received)
            assert chunk == fl.payload[start : start + n], "DATA arrived corrupted or out of order"
            if rcv.state(sid) is State.OPENING_IN:  # early data (protocol §4.5)
                assert len(fl.received) + n <= rcv.early_data
            fl.received += chunk
            fl.data_in_flight -= n
            assert fl.held <= rcv.window, "receiver holds more than the window it granted"
        elif ftype is F.WINDOW:
            fl = self.flows[sid, 1 - side]  # the flow whose sender gets the credit back
            inc = frames.decode_window(frame[HEADER_SIZE:])
            fl.window_in_flight -= inc
            if known:
                assert isinstance(ev, CreditAvailable) and ev.stream_id == sid
                assert ev.credit == rcv.credit(sid)
            else:  # the sender finished and forgot the stream meanwhile (protocol §4.3)
                assert ev is None and rcv.state(sid) is State.CLOSED
                self.races_ignored += 1
        elif ftype is F.FIN:
            fl = self.flows[sid, side]
            assert isinstance(ev, RemoteFin) and ev.stream_id == sid
            assert fl.data_in_flight == 0 and len(fl.received) == len(fl.payload)
            fl.fin_received = True
            assert ev.closed == self.flows[sid, 1 - side].fin_sent
            assert rcv.state(sid) is (State.CLOSED if ev.closed else State.HALF_CLOSED_REMOTE)
        else:
            raise AssertionError(f"unexpected {ftype.name} on the wire")

    # --- checks -------------------------------------------------------------------------
    def check_invariants(self) -> None:
        for fl in self.flows.values():
            snd, rcv = self.conns[fl.src], self.conns[1 - fl.src]
            assert 0 <= fl.held <= rcv.window
            assert fl.data_in_flight >= 0 and fl.window_in_flight >= 0
            if fl.sid not in snd._streams or fl.sid not in rcv._streams:
                continue
            if rcv.state(fl.sid) is State.HALF_CLOSED_REMOTE:
                continue  # sender finished; receiver stops accounting credit (§6.2)
            s = snd.credit(fl.sid)
            r = rcv._streams[fl.sid].recv_allowed
            # Credit is conserved (protocol §6): every byte of the window is either sender's
            # credit, DATA on the wire, held by the receiver, owed by it, or a WINDOW on the wire.
            total = s + fl.data_in_flight + fl.held + fl.owed + fl.window_in_flight
            assert total == rcv.window, (
                f"stream {fl.sid} from side {fl.src}: credit {s} + in flight {fl.data_in_flight} "
                f"+ held {fl.held} + owed {fl.owed} + WINDOW in flight {fl.window_in_flight} "
                f"!= window {rcv.window}")
            assert r == s + fl.data_in_flight + fl.window_in_flight
            if fl.data_in_flight == 0 and fl.window_in_flight == 0:
                assert r == s
            assert rcv._streams[fl.sid].owed == fl.owed
            if rcv.state(fl.sid) in RECEIVING:
                assert fl.owed < threshold(rcv.window)

    def assert_finished(self) -> None:
        assert not self.wires[0] and not self.wires[1]
        for fl in self.flows.values():
            assert fl.done, f"deadlock: stream {fl.sid} from side {fl.src} stuck: {fl}"
            assert bytes(fl.received) == fl.payload
            for conn in self.conns:
                assert conn.state(fl.sid) is State.CLOSED
        assert self.conns[0].stream_count == 0 and self.conns[1].stream_count == 0
