"""Flow-control invariants (protocol §6) over random sequences of sends, deliveries and frames."""

from __future__ import annotations

import copy
import random
from collections import deque

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test,
)

from intercloud.protocol import frames
from intercloud.protocol.connection import (
    CreditAvailable, Data, LocalProtocolError, ProtocolError, RemoteFin, State,
)
from intercloud.protocol.frames import HEADER_SIZE, FrameType

from .sim import Sim, header, make_pair, threshold

F = FrameType
# Whole-tunnel simulations: no shrinking, which can take minutes on a failure here; the
# failing example is still printed and replayed from the hypothesis database.
SIM = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow],
               phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])

windows = st.one_of(st.integers(1, 40), st.integers(41, 5000), st.sampled_from([1, 3, 4, 7, 1024, 2**31]))
max_frames = st.one_of(st.just(1024), st.integers(1024, 3000))


def open_stream(c, s, opener_is_client: bool = True) -> int:
    """Open one stream between a connected pair; both sides end in OPEN."""
    opener, acceptor = (c, s) if opener_is_client else (s, c)
    sid, f = opener.open_stream("svc", "203.0.113.9:5000")
    acceptor.receive(f)
    opener.receive(acceptor.open_ok(sid))
    assert opener.state(sid) is acceptor.state(sid) is State.OPEN
    return sid


# --- model-based: one direction of one stream --------------------------------------------

class OneDirection(RuleBasedStateMachine):
    """A sender and a receiver on one stream, with the frames between them held on two wires
    so DATA and WINDOW can be in flight at the same time (protocol §6.1, §6.2)."""

    @initialize(window=windows, max_frame=max_frames, sender_is_client=st.booleans(),
                 opener_is_client=st.booleans())
    def setup(self, window, max_frame, sender_is_client, opener_is_client):
        c, s = make_pair(client_window=window, server_window=window,
                         client_max_frame=max_frame, server_max_frame=max_frame)
        self.sid = open_stream(c, s, opener_is_client)
        self.snd, self.rcv = (c, s) if sender_is_client else (s, c)
        self.window = window
        self.data_wire: deque[bytes] = deque()  # sender -> receiver
        self.window_wire: deque[bytes] = deque()  # receiver -> sender
        self.held = 0  # received, not delivered
        self.owed = 0  # delivered, credit not returned (model)
        self.granted = window  # total credit the receiver has granted: window + WINDOW increments
        self.sent = 0

    def in_flight(self) -> int:
        return sum(len(f) - HEADER_SIZE for f in self.data_wire)

    def window_in_flight(self) -> int:
        return sum(frames.decode_window(f[HEADER_SIZE:]) for f in self.window_wire)

    @rule(n=st.one_of(st.integers(1, 64), st.integers(1, 2**17)))
    def send(self, n):
        credit = self.snd.credit(self.sid)
        limit = self.snd.send_limit(self.sid)
        assert limit == min(credit, self.snd.peer.max_frame)
        if n > limit:
            with pytest.raises(LocalProtocolError):
                self.snd.data(self.sid, b"\x5a" * n)
            assert self.snd.credit(self.sid) == credit  # a refused send costs nothing
        else:
            self.data_wire.append(self.snd.data(self.sid, b"\x5a" * n))
            self.sent += n
            assert self.snd.credit(self.sid) == credit - n

    @rule()
    def send_all_it_may(self):
        limit = self.snd.send_limit(self.sid)
        if limit:
            self.data_wire.append(self.snd.data(self.sid, bytes(limit)))
            self.sent += limit
        with pytest.raises(LocalProtocolError):
            self.snd.send_data(self.sid, self.snd.send_limit(self.sid) + 1)

    @precondition(lambda self: self.data_wire)
    @rule()
    def carry_data(self):
        frame = self.data_wire.popleft()
        ev, reply = self.rcv.receive(frame)
        assert reply is None and isinstance(ev, Data) and len(ev.data) == len(frame) - HEADER_SIZE
        self.held += len(ev.data)

    @precondition(lambda self: self.window_wire)
    @rule()
    def carry_window(self):
        frame = self.window_wire.popleft()
        before = self.snd.credit(self.sid)
        ev, reply = self.snd.receive(frame)
        inc = frames.decode_window(frame[HEADER_SIZE:])
        assert reply is None and isinstance(ev, CreditAvailable)
        assert ev.credit == self.snd.credit(self.sid) == before + inc

    @precondition(lambda self: self.held > 0)
    @rule(n=st.integers(0, 2**17))
    def deliver(self, n):
        n = 1 + n % self.held
        frame = self.rcv.delivered(self.sid, n)
        self.held -= n
        self.owed += n
        if self.owed < threshold(self.window):
            assert frame is None, f"WINDOW before a quarter of window {self.window} was owed"
        else:
            assert frame is not None, f"{self.owed} bytes owed (window {self.window}) but no WINDOW"
            assert header(frame) == (F.WINDOW, self.sid)
            inc = frames.decode_window(frame[HEADER_SIZE:])
            assert inc == self.owed and inc * 4 >= self.window - 3  # a quarter, rounded down
            self.owed = 0
            self.granted += inc
            self.window_wire.append(frame)

    @rule(extra=st.integers(1, 1000))
    def rogue_sender(self, extra):
        """A peer that sends beyond the credit it was granted is a protocol error (§6.1)."""
        allowed = self.rcv._streams[self.sid].recv_allowed
        n = allowed + extra
        if n > self.rcv.max_frame:
            return  # max_frame is checked first; the credit boundary is unreachable by one frame
        with pytest.raises(ProtocolError, match="peer exceeded flow-control window") as exc:
            copy.deepcopy(self.rcv).receive(frames.encode(F.DATA, self.sid, bytes(n)))
        assert exc.value.stream_id == self.sid

    @invariant()
    def credit_is_conserved(self):
        s = self.snd.credit(self.sid)
        r = self.rcv._streams[self.sid].recv_allowed
        d, w = self.in_flight(), self.window_in_flight()
        assert s >= 0 and r >= 0
        assert s + d + w + self.held + self.owed == self.window
        assert r == s + d + w
        if not d and not w:
            assert r == s  # once every frame has arrived, both sides agree on the credit
        assert self.sent - self.in_flight() - self.held - self.owed == self.granted - self.window
        assert self.rcv._streams[self.sid].owed == self.owed

    @invariant()
    def receiver_holds_at_most_the_window(self):
        assert 0 <= self.held <= self.window
        assert self.held + self.in_flight() <= self.window


def test_one_direction_model() -> None:
    run_state_machine_as_test(
        OneDirection,
        settings=settings(max_examples=120, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )


# --- whole tunnels: many streams, both directions ---------------------------------------

@SIM
@given(cw=windows, sw=windows, cf=max_frames, sf=max_frames,
       streams=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1200), st.integers(0, 1200)),
                        min_size=1, max_size=3),
       seed=st.integers(), w=st.fixed_dictionaries(
           {k: st.integers(1, 20) for k in ("pump", "send", "deliver", "fin", "probe_recv")}),
       schedule=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 2**16)), max_size=100))
def test_invariants_across_a_tunnel(cw, sw, cf, sf, streams, seed, w, schedule) -> None:
    """Sim checks after every step: credit conservation per stream and direction, held bytes
    within the window, WINDOW exactly when a quarter is owed; and probes that the sender refuses
    to exceed its credit and the receiver catches a peer that does, at the exact boundary."""
    rng = random.Random(seed)
    specs = [(o, rng.randbytes(a), rng.randbytes(b)) for o, a, b in streams]
    c, s = make_pair(client_window=cw, server_window=sw, client_max_frame=cf, server_max_frame=sf)
    sim = Sim((c, s), specs, probe=True)
    sim.run(schedule, rng, w)


# --- examples -------------------------------------------------------------------------------

@pytest.mark.parametrize(("window", "quarter"), [(1024, 256), (4, 1), (1, 1), (3, 1), (7, 1), (8, 2), (2**31, 2**29)])
def test_window_returned_at_a_quarter(window: int, quarter: int) -> None:
    c, s = make_pair(server_window=window)
    sid = open_stream(c, s)
    if quarter > 1:
        assert s.delivered(sid, quarter - 1) is None
        assert s.delivered(sid, 1) == frames.encode(F.WINDOW, sid, frames.encode_window(quarter))
    else:
        assert s.delivered(sid, 1) == frames.encode(F.WINDOW, sid, frames.encode_window(1))
    # batching starts over after each WINDOW
    assert (s.delivered(sid, quarter - 1) if quarter > 1 else None) is None


def test_exhausted_credit_blocks_sender_until_window() -> None:
    c, s = make_pair(server_window=2000, server_max_frame=1024)
    sid = open_stream(c, s)
    assert c.send_limit(sid) == 1024  # capped by the receiver's max_frame
    for n in (1024, 976):
        ev, _ = s.receive(c.data(sid, bytes(n)))
        assert isinstance(ev, Data)
    assert c.credit(sid) == c.send_limit(sid) == 0
    with pytest.raises(LocalProtocolError, match="exceeds credit 0"):
        c.data(sid, b"x")
    with pytest.raises(ProtocolError, match="peer exceeded flow-control window") as exc:
        copy.deepcopy(s).receive(frames.encode(F.DATA, sid, b"x"))
    assert exc.value.stream_id == sid
    w = s.delivered(sid, 500)
    ev, _ = c.receive(w)
    assert ev == CreditAvailable(sid, 500) and c.credit(sid) == 500
    ev, _ = s.receive(c.data(sid, bytes(500)))
    assert isinstance(ev, Data)
    with pytest.raises(ProtocolError, match="flow-control window"):
        s.receive(frames.encode(F.DATA, sid, b"x"))


def test_credit_is_per_stream_and_per_direction() -> None:
    c, s = make_pair(client_window=100, server_window=50)
    a, b = open_stream(c, s), open_stream(c, s, opener_is_client=False)
    assert (c.credit(a), s.credit(a), c.credit(b), s.credit(b)) == (50, 100, 50, 100)
    s.receive(c.data(a, bytes(50)))
    assert (c.credit(a), s.credit(a), c.credit(b), s.credit(b)) == (0, 100, 50, 100)
    c.receive(s.data(a, bytes(100)))
    assert (c.credit(a), s.credit(a), c.credit(b), s.credit(b)) == (0, 0, 50, 100)
    s.receive(c.data(b, bytes(50)))
    c.receive(s.data(b, bytes(1)))
    assert (c.credit(a), s.credit(a), c.credit(b), s.credit(b)) == (0, 0, 0, 99)


def test_no_window_after_the_sender_finished() -> None:
    c, s = make_pair(server_window=8)
    sid = open_stream(c, s)
    s.receive(c.data(sid, bytes(8)))
    ev, _ = s.receive(c.fin(sid))
    assert ev == RemoteFin(sid, closed=False) and s.state(sid) is State.HALF_CLOSED_REMOTE
    assert s.delivered(sid, 8) is None  # the client will send no more: it needs no credit


def test_window_keeps_flowing_after_own_fin() -> None:
    c, s = make_pair(server_window=8)
    sid = open_stream(c, s)
    c.receive(s.fin(sid))  # server half-closes; client may still send to it
    s.receive(c.data(sid, bytes(8)))
    w = s.delivered(sid, 8)
    assert w is not None
    ev, _ = c.receive(w)
    assert ev == CreditAvailable(sid, 8)


def test_window_beyond_two_to_the_31_is_a_protocol_error() -> None:
    c, s = make_pair(server_window=2**31)
    sid = open_stream(c, s)
    with pytest.raises(ProtocolError, match="beyond 2\\^31"):
        c.receive(frames.encode(F.WINDOW, sid, frames.encode_window(1)))


def test_data_bounds() -> None:
    c, s = make_pair(server_window=10_000, server_max_frame=1024)
    sid = open_stream(c, s)
    with pytest.raises(LocalProtocolError):
        c.data(sid, bytes(1025))  # within credit, beyond the peer's max_frame
    with pytest.raises(LocalProtocolError):
        c.data(sid, b"")
    with pytest.raises(ProtocolError, match="exceeds max_frame"):
        copy.deepcopy(s).receive(frames.encode(F.DATA, sid, bytes(1025)))
    with pytest.raises(ProtocolError, match="empty DATA"):
        copy.deepcopy(s).receive(frames.encode(F.DATA, sid))
    ev, _ = s.receive(frames.encode(F.DATA, sid, bytes(1024)))
    assert isinstance(ev, Data) and len(ev.data) == 1024
