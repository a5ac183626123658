"""The stream state table (protocol §4.2), exhaustively, and the rules around it (§3.1, §4, §5, §9).

Every State x direction x stream FrameType is applied to a Connection whose stream was driven
into that state through legal frames exchanged with a real peer.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from intercloud.protocol import frames
from intercloud.protocol.connection import (
    _TRANSITIONS, PROTOCOL_VERSION, RECV, SEND, Connection, CreditAvailable, Data,
    LocalProtocolError, OpenAccepted, OpenRefused, ProtocolError, RemoteFin, RemoteReset, State,
    StreamOpened, transition,
)
from intercloud.protocol.frames import CONNECTION_TYPES, HEADER_SIZE, FrameType, Reason

from .sim import MISSING, connection_payload, header, hello_frame, make_pair

F = FrameType
S = State
DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
STREAM_TYPES = [F.OPEN, F.OPEN_OK, F.OPEN_FAIL, F.DATA, F.WINDOW, F.FIN, F.RST]
MIRROR = {
    S.IDLE: S.IDLE, S.OPENING_OUT: S.OPENING_IN, S.OPENING_IN: S.OPENING_OUT, S.OPEN: S.OPEN,
    S.HALF_CLOSED_LOCAL: S.HALF_CLOSED_REMOTE, S.HALF_CLOSED_REMOTE: S.HALF_CLOSED_LOCAL,
    S.CLOSED: S.CLOSED,
}
EVENT_OF = {
    F.OPEN: StreamOpened, F.OPEN_OK: OpenAccepted, F.OPEN_FAIL: OpenRefused, F.DATA: Data,
    F.WINDOW: CreditAvailable, F.FIN: RemoteFin, F.RST: RemoteReset,
}
WINDOW = 4096
SIDES = ("client", "server")


def first_id(client: bool) -> int:
    return 1 if client else 2


def stream_frame(ftype: FrameType, sid: int) -> bytes:
    """A well-formed frame of each stream type, as a peer would send it."""
    payload = {
        F.OPEN: frames.encode_open("svc", "192.0.2.1:1234"),
        F.OPEN_FAIL: frames.encode_reason(Reason.REFUSED, "connection refused"),
        F.DATA: b"abc",
        F.WINDOW: frames.encode_window(1000),
        F.RST: frames.encode_reason(Reason.ABORTED, "reset by client"),
    }.get(ftype, b"")
    return frames.encode(ftype, sid, payload)


class Setup:
    """``me`` (the side under test) and ``peer``, with stream ``sid`` in ``state`` on ``me``."""

    def __init__(self, side: str, state: State, origin: str | None, direction: str):
        c, s = make_pair(client_window=WINDOW, server_window=WINDOW)
        self.me, self.peer = (c, s) if side == "client" else (s, c)
        self.state = state
        if state is S.IDLE:
            # the id the next OPEN in this direction would use
            self.sid = first_id(self.me.client if direction == SEND else self.peer.client)
        else:
            opener = self.me if origin == "local" else self.peer
            self.sid, f = opener.open_stream("svc", "192.0.2.1:1234")
            self.carry(opener, f)
            if state not in (S.OPENING_OUT, S.OPENING_IN):
                acceptor = self.peer if opener is self.me else self.me
                self.carry(acceptor, acceptor.open_ok(self.sid))
            if state is S.HALF_CLOSED_LOCAL:
                self.carry(self.me, self.me.fin(self.sid))
            elif state is S.HALF_CLOSED_REMOTE:
                self.carry(self.peer, self.peer.fin(self.sid))
            elif state is S.CLOSED:
                self.carry(self.me, self.me.fin(self.sid))
                self.carry(self.peer, self.peer.fin(self.sid))
        assert self.me.state(self.sid) is state
        assert self.peer.state(self.sid) is MIRROR[state]

    def carry(self, sender: Connection, frame: bytes):
        receiver = self.peer if sender is self.me else self.me
        ev, reply = receiver.receive(frame)
        assert reply is None
        return ev


CONFIGS = [
    (S.IDLE, None), (S.OPENING_OUT, "local"), (S.OPENING_IN, "remote"),
    *((st, origin) for st in (S.OPEN, S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_REMOTE, S.CLOSED)
      for origin in ("local", "remote")),
]
assert {st for st, _ in CONFIGS} == set(State)


def _id(v):
    return v.name.lower() if isinstance(v, (State, FrameType)) else str(v)


@pytest.mark.parametrize("ftype", STREAM_TYPES, ids=_id)
@pytest.mark.parametrize(("state", "origin"), CONFIGS, ids=_id)
@pytest.mark.parametrize("side", SIDES)
def test_recv(side: str, state: State, origin: str | None, ftype: FrameType) -> None:
    t = Setup(side, state, origin, RECV)
    me, sid = t.me, t.sid
    frame = stream_frame(ftype, sid)
    if state is S.CLOSED:
        if ftype is F.OPEN:  # id reuse (peer's id) or wrong parity (ours): §4.1
            with pytest.raises(ProtocolError):
                me.receive(frame)
        else:  # forgotten stream: the two sides raced (protocol §4.3)
            assert me.receive(frame) == (None, None)
            assert me.state(sid) is S.CLOSED
        return
    nxt = transition(state, RECV, ftype)
    if nxt is None:
        with pytest.raises(ProtocolError) as exc:
            me.receive(frame)
        assert exc.value.stream_id in (0, sid)
        return
    ev, reply = me.receive(frame)
    assert reply is None
    assert type(ev) is EVENT_OF[ftype] and ev.stream_id == sid
    assert me.state(sid) is nxt
    if ftype is F.FIN:
        assert ev.closed == (nxt is S.CLOSED)
    if nxt is S.CLOSED:
        assert sid not in me._streams  # closed streams are forgotten
        assert me.receive(stream_frame(F.WINDOW, sid)) == (None, None)


def _send(me: Connection, ftype: FrameType, sid: int) -> bytes | None:
    if ftype is F.OPEN_OK:
        return me.open_ok(sid)
    if ftype is F.OPEN_FAIL:
        return me.open_fail(sid, Reason.UNKNOWN_SERVICE, "no such service")
    if ftype is F.DATA:
        return me.data(sid, b"abc")
    if ftype is F.FIN:
        return me.fin(sid)
    if ftype is F.RST:
        return me.reset(sid, Reason.ABORTED, "local socket reset")
    raise AssertionError(ftype)


@pytest.mark.parametrize("ftype", STREAM_TYPES, ids=_id)
@pytest.mark.parametrize(("state", "origin"), CONFIGS, ids=_id)
@pytest.mark.parametrize("side", SIDES)
def test_send(side: str, state: State, origin: str | None, ftype: FrameType) -> None:
    t = Setup(side, state, origin, SEND)
    me, peer, sid = t.me, t.peer, t.sid
    nxt = transition(state, SEND, ftype)
    if ftype is F.OPEN:
        new_sid, frame = me.open_stream("svc", "192.0.2.1:1234")
        if state is S.IDLE:
            assert nxt is S.OPENING_OUT and new_sid == sid
        else:  # the API cannot send OPEN on an existing stream: it allocates the next id
            assert nxt is None and new_sid != sid
        assert new_sid % 2 == first_id(me.client) % 2
        assert me.state(new_sid) is S.OPENING_OUT
        ev = t.carry(me, frame)
        assert isinstance(ev, StreamOpened) and peer.state(new_sid) is S.OPENING_IN
        return
    if ftype is F.WINDOW:
        # WINDOW is sent by delivered() (protocol §6.2), only where the table allows it
        frame = me.delivered(sid, WINDOW)
        if frame is not None:
            assert nxt is state and state in (S.OPEN, S.HALF_CLOSED_LOCAL)
            assert header(frame) == (F.WINDOW, sid)
            ev = t.carry(me, frame)
            assert isinstance(ev, CreditAvailable) and ev.credit == WINDOW + WINDOW
        else:  # no stream, nothing received yet, or the peer has finished sending
            assert nxt is None or state is S.HALF_CLOSED_REMOTE
        assert me.state(sid) is state
        # the one place all sends go through
        if nxt is None:
            with pytest.raises(LocalProtocolError):
                me._send(sid, F.WINDOW)
        else:
            me._send(sid, F.WINDOW)
        assert me.state(sid) is state
        return
    if ftype is F.RST and state in (S.IDLE, S.CLOSED):
        assert nxt is None
        assert me.reset(sid, Reason.ABORTED, "gone") is None  # nothing to reset: no frame
        assert me.state(sid) is state
        return
    if nxt is None:
        with pytest.raises(LocalProtocolError):
            _send(me, ftype, sid)
        assert me.state(sid) is state  # a refused send changes nothing
        return
    frame = _send(me, ftype, sid)
    assert header(frame) == (ftype, sid)
    assert me.state(sid) is nxt
    if nxt is S.CLOSED:
        assert sid not in me._streams
    # what one side may send, the other side (in the mirrored state) accepts
    ev = t.carry(me, frame)
    assert type(ev) is EVENT_OF[ftype] and ev.stream_id == sid
    assert peer.state(sid) is MIRROR[nxt]


# --- the table in the doc is the table in the code ---------------------------------------

def doc_section(number: str) -> list[str]:
    text = DOC.read_text()
    start = text.index(f"\n{number} ")
    end = text.find("\n\n", text.index("\n|", start))
    return text[start:end].splitlines()


def table_rows(lines: list[str]) -> list[list[str]]:
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines if ln.startswith("|")]
    assert rows and set("".join(rows[1])) <= set("-: "), "expected a markdown header separator"
    return rows[2:]


def doc_transitions() -> dict[tuple[State, str, FrameType], State]:
    table: dict[tuple[State, str, FrameType], State] = {}
    for state, event, nxt in table_rows(doc_section("4.2")):
        m = re.fullmatch(r"(send|recv|send/recv)\s+([A-Z_]+(?:\s*,\s*[A-Z_]+)*)(?:\s+\(.*\))?", event)
        assert m, f"cannot parse event {event!r}"
        for direction in m.group(1).split("/"):
            for name in m.group(2).split(","):
                key = (State[state.upper()], direction, FrameType[name.strip()])
                assert key not in table, f"{key} listed twice in protocol §4.2"
                table[key] = State[nxt.upper()]
    return table


def test_doc_state_table_matches_code() -> None:
    doc = doc_transitions()
    assert len(doc) == 40  # 32, plus RESUME from idle (2) and ACK in three states (6), protocol §10
    missing_in_code = {k: v for k, v in doc.items() if _TRANSITIONS.get(k) != v}
    missing_in_doc = {k: v for k, v in _TRANSITIONS.items() if doc.get(k) != v}
    assert not missing_in_code and not missing_in_doc
    assert doc == _TRANSITIONS


def test_table_is_about_stream_frames_and_closed_is_terminal() -> None:
    for (state, direction, ftype), nxt in _TRANSITIONS.items():
        assert ftype not in CONNECTION_TYPES and direction in (SEND, RECV)
        assert state is not S.CLOSED and nxt is not S.IDLE
    assert transition(S.CLOSED, RECV, F.RST) is None


# --- rules outside the table -------------------------------------------------------------

@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("ftype", [t for t in STREAM_TYPES if t is not F.OPEN], ids=_id)
def test_never_opened_id_is_a_protocol_error(side: str, ftype: FrameType) -> None:
    c, s = make_pair()
    me, peer = (c, s) if side == "client" else (s, c)
    # a stream each way, so "never opened" is above the ids in use, of both parities
    for opener, acceptor in ((me, peer), (peer, me)):
        sid, f = opener.open_stream("svc", "x")
        acceptor.receive(f)
    for sid in (3, 4, 5, 6, 1001, 1002, 2**32 - 1, 2**32 - 2):
        with pytest.raises(ProtocolError, match="never opened") as exc:
            me.receive(stream_frame(ftype, sid))
        assert exc.value.stream_id == sid
        assert me.state(sid) is S.IDLE


CLOSE_PATHS = ["rst_sent", "rst_received", "fin_both", "open_fail", "refused_limit",
               "refused_draining", "rst_while_opening"]


def close_stream(me: Connection, peer: Connection, how: str, mine: bool) -> int:
    """Open a stream (by ``me`` if ``mine``) and close it along path ``how``; return its id."""
    opener, acceptor = (me, peer) if mine else (peer, me)
    if how == "refused_limit":
        acceptor.max_streams = acceptor.stream_count
    if how == "refused_draining":
        acceptor.goaway(Reason.DRAINING, "bye")  # crosses the OPEN on the wire
    sid, f = opener.open_stream("svc", "x")
    ev, reply = acceptor.receive(f)
    if how in ("refused_limit", "refused_draining"):
        assert ev is None
        ev, _ = opener.receive(reply)
        assert isinstance(ev, OpenRefused)
    elif how == "rst_while_opening":
        acceptor.receive(opener.reset(sid, Reason.TIMEOUT, "open deadline"))
    elif how == "open_fail":
        opener.receive(acceptor.open_fail(sid, Reason.REFUSED, "refused"))
    else:
        opener.receive(acceptor.open_ok(sid))
        if how == "fin_both":
            peer.receive(me.fin(sid))
            me.receive(peer.fin(sid))
        elif how == "rst_sent":
            peer.receive(me.reset(sid, Reason.ABORTED, "x"))
        else:
            me.receive(peer.reset(sid, Reason.ABORTED, "x"))
    assert me.state(sid) is peer.state(sid) is S.CLOSED
    return sid


@pytest.mark.parametrize("how", CLOSE_PATHS)
@pytest.mark.parametrize("mine", [True, False], ids=["opened_by_me", "opened_by_peer"])
@pytest.mark.parametrize("side", SIDES)
def test_closed_stream_frames_are_ignored(side: str, mine: bool, how: str) -> None:
    c, s = make_pair()
    me, peer = (c, s) if side == "client" else (s, c)
    sid = close_stream(me, peer, how, mine)
    for ftype in (F.OPEN_OK, F.OPEN_FAIL, F.DATA, F.WINDOW, F.FIN, F.RST):
        assert me.receive(stream_frame(ftype, sid)) == (None, None)
        assert me.state(sid) is S.CLOSED and me.stream_count == 0
    # sending on it is a local bug, except RST which has nothing left to reset
    for send in (lambda: me.data(sid, b"x"), lambda: me.fin(sid), lambda: me.open_ok(sid)):
        with pytest.raises(LocalProtocolError):
            send()
    assert me.reset(sid, Reason.ABORTED, "x") is None
    assert me.delivered(sid, 10**6) is None
    # but OPEN on the id again is a reuse (or wrong parity)
    with pytest.raises(ProtocolError):
        me.receive(stream_frame(F.OPEN, sid))


@pytest.mark.parametrize("side", SIDES)
def test_open_id_rules(side: str) -> None:
    c, s = make_pair()
    me, peer = (c, s) if side == "client" else (s, c)
    theirs = first_id(peer.client)
    ours = first_id(me.client)
    with pytest.raises(ProtocolError, match="wrong parity"):
        me.receive(stream_frame(F.OPEN, ours))
    with pytest.raises(ProtocolError, match="wrong parity"):
        me.receive(stream_frame(F.OPEN, ours + 10))
    for sid in (theirs, theirs + 2):
        ev, _ = me.receive(stream_frame(F.OPEN, sid))
        assert isinstance(ev, StreamOpened) and ev.stream_id == sid
    for sid in (theirs + 2, theirs):
        with pytest.raises(ProtocolError, match="reuses stream id"):
            me.receive(stream_frame(F.OPEN, sid))
    ev, _ = me.receive(stream_frame(F.OPEN, theirs + 4))
    assert isinstance(ev, StreamOpened)
    with pytest.raises(ProtocolError, match="on stream 0"):
        me.receive(stream_frame(F.OPEN, 0))
    # ids allocated locally: own parity, from the lowest, strictly increasing
    assert [me.open_stream("svc", "x")[0] for _ in range(3)] == [ours, ours + 2, ours + 4]


@pytest.mark.parametrize("ftype", sorted(CONNECTION_TYPES), ids=_id)
def test_connection_frame_with_stream_id(ftype: FrameType) -> None:
    c, s = make_pair()
    payload = connection_payload(ftype)
    for sid in (1, 2, 2**32 - 1):
        with pytest.raises(ProtocolError, match="must use stream 0"):
            c.receive(frames.encode(ftype, sid, payload))
    if ftype is not F.HELLO:  # the same frame on stream 0 is fine
        c.receive(frames.encode(ftype, 0, payload))


@pytest.mark.parametrize("ftype", STREAM_TYPES, ids=_id)
def test_stream_frame_on_stream_zero(ftype: FrameType) -> None:
    c, s = make_pair()
    with pytest.raises(ProtocolError) as exc:
        s.receive(stream_frame(ftype, 0))
    assert exc.value.stream_id == 0


@pytest.mark.parametrize("client", [True, False], ids=["client", "server"])
@pytest.mark.parametrize("ftype", [t for t in FrameType if t is not F.HELLO], ids=_id)
def test_any_frame_before_hello_is_a_protocol_error(client: bool, ftype: FrameType) -> None:
    for sid in (0, 1, 2):
        conn = Connection(client=client, window=1024, max_frame=1024, max_streams=4)
        frame = (frames.encode(ftype, sid, connection_payload(ftype)) if ftype in CONNECTION_TYPES
                 else stream_frame(ftype, sid))
        with pytest.raises(ProtocolError):
            conn.receive(frame)
        assert conn.peer is None
    conn = Connection(client=client, window=1024, max_frame=1024, max_streams=4)
    with pytest.raises(LocalProtocolError):
        conn.open_stream("svc", "x")


def test_hello_exchange_and_second_hello() -> None:
    c, s = make_pair()
    assert c.peer.role == "cloud" and s.peer.role == "onprem" and c.peer.services == ["svc"]
    with pytest.raises(ProtocolError, match="second HELLO"):
        c.receive(hello_frame())
    with pytest.raises(LocalProtocolError):
        c.hello("n", "onprem", [], "i")


@pytest.mark.parametrize("version", [0, 2, PROTOCOL_VERSION + 1, "1", None, [1], MISSING])
def test_hello_with_wrong_version(version) -> None:
    conn = Connection(client=True, window=1024, max_frame=1024, max_streams=4)
    with pytest.raises(ProtocolError, match="version"):
        conn.receive(hello_frame(version=version))
    assert conn.peer is None


@pytest.mark.parametrize("side", SIDES)
def test_open_beyond_max_streams_is_refused_with_limit(side: str) -> None:
    c, s = make_pair(client_max_streams=2, server_max_streams=2)
    me, peer = (c, s) if side == "client" else (s, c)
    sids = []
    for _ in range(2):
        sid, f = peer.open_stream("svc", "x")
        ev, reply = me.receive(f)
        assert isinstance(ev, StreamOpened) and reply is None
        peer.receive(me.open_ok(sid))
        sids.append(sid)
    sid, f = peer.open_stream("svc", "x")
    ev, reply = me.receive(f)  # not an error: OPEN_FAIL LIMIT
    assert ev is None and me.stream_count == 2 and me.state(sid) is S.CLOSED
    assert header(reply) == (F.OPEN_FAIL, sid)
    assert frames.decode_reason(reply[HEADER_SIZE:])[0] == Reason.LIMIT
    ev, _ = peer.receive(reply)
    assert isinstance(ev, OpenRefused) and ev.code == Reason.LIMIT and peer.state(sid) is S.CLOSED
    # once a stream ends there is room again
    me.receive(peer.reset(sids[0], Reason.ABORTED, "x"))
    sid, f = peer.open_stream("svc", "x")
    ev, reply = me.receive(f)
    assert isinstance(ev, StreamOpened) and reply is None


@pytest.mark.parametrize("side", SIDES)
def test_open_after_goaway_is_refused_with_draining(side: str) -> None:
    c, s = make_pair()
    me, peer = (c, s) if side == "client" else (s, c)
    old, f = peer.open_stream("svc", "x")
    me.receive(f)
    peer.receive(me.open_ok(old))
    # the peer's OPEN crosses our GOAWAY on the wire
    sid, f = peer.open_stream("svc", "x")
    goaway = me.goaway(Reason.DRAINING, "shutting down")
    ev, reply = me.receive(f)
    assert ev is None and me.state(sid) is S.CLOSED
    assert header(reply) == (F.OPEN_FAIL, sid)
    assert frames.decode_reason(reply[HEADER_SIZE:])[0] == Reason.DRAINING
    ev, _ = peer.receive(reply)
    assert isinstance(ev, OpenRefused) and ev.code == Reason.DRAINING
    # streams already open continue (protocol §9.1)
    ev, _ = me.receive(peer.data(old, b"still here"))
    assert bytes(ev.data) == b"still here"
    # and the peer, once it has our GOAWAY, opens no more
    ev, _ = peer.receive(goaway)
    assert ev.code == Reason.DRAINING and ev.text == "shutting down"
    with pytest.raises(LocalProtocolError):
        peer.open_stream("svc", "x")
