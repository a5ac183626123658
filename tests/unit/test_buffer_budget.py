"""The process-wide buffer budget (docs/protocol.md §6.4): accounting, growth, fairness, the bound.

A budgeted receiving Connection against a plain sending one, frames passed by hand: no sockets, no
clock (the log interval uses a fake one)."""

from __future__ import annotations

import logging

import pytest

from intercloud.protocol import Connection, Data, Hello, StreamOpened
from intercloud.protocol.frames import HEADER_SIZE, FrameType, decode_window
from intercloud.tunnel.budget import LOG_INTERVAL, BufferBudget

KiB = 1024
I = 64 * KiB  # initial window
W = 1024 * KiB  # largest window
FRAME = 16 * KiB


class Pair:
    """``s`` sends on streams it opens; ``r`` receives with budget ``b``; WINDOW frames that the
    budget sends on its own (serving the queue) land in ``sunk`` and are passed on by ``pump``."""

    def __init__(self, limit: int, *, budget: BufferBudget | None = None):
        self.b = budget or BufferBudget(limit)
        self.sunk: list[bytes] = []
        self.r = Connection(client=True, window=W, max_frame=FRAME, max_streams=1000, initial_window=I,
                            budget=self.b, sink=self.sunk.append)
        self.s = Connection(client=False, window=W, max_frame=FRAME, max_streams=1000)
        hr = self.r.hello("r", "onprem", ["svc"], "boot-r")
        ev, _ = self.s.receive(hr)
        assert isinstance(ev, Hello) and ev.window == I  # §6.4: only the initial window is announced
        ev, _ = self.r.receive(self.s.hello("s", "cloud", [], "boot-s"))
        assert isinstance(ev, Hello)
        self.received: dict[int, int] = {}  # bytes received per stream
        self.delivered: dict[int, int] = {}

    def open(self) -> int:
        sid, frame = self.s.open_stream("svc", "1.2.3.4:5")
        ev, _ = self.r.receive(frame)
        assert isinstance(ev, StreamOpened)
        self.s.receive(self.r.open_ok(sid))
        self.received[sid] = self.delivered[sid] = 0
        return sid

    def grant(self, sid: int) -> int:
        return self.r._streams[sid].grant

    def flush_sunk(self) -> None:
        while self.sunk:
            self.s.receive(self.sunk.pop(0))

    def send_all(self, sid: int) -> int:
        """The sender sends everything its credit allows."""
        sent = 0
        while (n := self.s.send_limit(sid)) > 0:
            ev, _ = self.r.receive(self.s.data(sid, bytes(n)))  # ProtocolError if beyond the grant
            assert isinstance(ev, Data)
            self.received[sid] += n
            sent += n
        return sent

    def deliver(self, sid: int, n: int | None = None) -> list[int]:
        """The local reader takes ``n`` (default: all) of what arrived; WINDOWs go back. Returns them."""
        n = self.received[sid] - self.delivered[sid] if n is None else n
        self.delivered[sid] += n
        incs = []
        frame = self.r.delivered(sid, n)
        if frame is not None:
            incs.append(decode_window(frame[HEADER_SIZE:]))
            self.s.receive(frame)
        self.flush_sunk()
        return incs

    def held(self) -> int:
        """Bytes received and not yet delivered: what sits in user space, all streams."""
        return sum(self.received[s] - self.delivered[s] for s in self.received)


def test_no_budget_announces_and_grants_the_full_window():
    r = Connection(client=True, window=W, max_frame=FRAME, max_streams=10, initial_window=I)
    s = Connection(client=False, window=W, max_frame=FRAME, max_streams=10)
    ev, _ = s.receive(r.hello("r", "onprem", ["svc"], "b"))
    assert ev.window == W


def test_a_stream_starts_small_and_doubles_while_its_reader_reads():
    p = Pair(limit=64 * 1024 * KiB)
    sid = p.open()
    assert p.s.credit(sid) == I and p.grant(sid) == I
    grants = [p.grant(sid)]
    for _ in range(40):
        p.send_all(sid)
        p.deliver(sid)
        if p.grant(sid) != grants[-1]:
            grants.append(p.grant(sid))
    assert grants == [I, 2 * I, 4 * I, 8 * I, W], grants  # doubling, capped at the window
    assert p.b.committed == W - I and p.b.holders == 1
    # in steady state the whole grant circulates: credit at the sender + owed == grant
    assert p.s.credit(sid) + (p.received[sid] - p.delivered[sid]) + p.r._streams[sid].owed == W


def test_stalled_readers_hold_at_most_the_budget_plus_initial_windows():
    limit = 512 * KiB
    p = Pair(limit=limit)
    sids = [p.open() for _ in range(20)]
    # every reader reads a while (its kernel buffer takes bytes), then stops for good
    for rounds, sid in enumerate(sids):
        for _ in range(rounds % 5 + 1):
            p.send_all(sid)
            p.deliver(sid)
    for _ in range(3):
        for sid in sids:
            p.send_all(sid)
    assert all(p.s.credit(sid) == 0 for sid in sids)  # the senders are stuck, not the receiver
    assert p.b.committed <= limit
    assert p.held() <= limit + len(sids) * I
    assert sum(p.grant(s) - I for s in sids) == p.b.committed  # accounting matches the streams


def test_the_budget_frees_when_streams_close_and_goes_to_waiters_in_fifo_order():
    p = Pair(limit=3 * I)
    hogs = [p.open() for _ in range(3)]
    for sid in hogs:  # each doubles once: 3 x I taken, the budget is spent
        p.send_all(sid)
        p.deliver(sid)
    assert p.b.committed == 3 * I and p.b.free == 0
    waiters = [p.open() for _ in range(3)]
    for sid in waiters:
        p.send_all(sid)
        assert p.deliver(sid) == [I]  # credit returned, no growth
        assert p.grant(sid) == I
    assert list(p.b.waiting) == [(p.r, s) for s in waiters]
    # a newcomer does not pass the queue even after budget frees for one step at a time
    p.s.receive(p.r.reset(hogs[0], 6, "gone"))  # frees I: the first waiter gets it
    assert p.grant(waiters[0]) == 2 * I and p.grant(waiters[1]) == I
    assert [decode_window(f[HEADER_SIZE:]) for f in p.sunk] == [I]
    p.flush_sunk()
    assert p.s.credit(waiters[0]) == 2 * I  # the sender sees the larger window
    p.r.reset(hogs[1], 6, "gone")
    p.flush_sunk()
    assert p.grant(waiters[1]) == 2 * I and p.grant(waiters[2]) == I
    assert list(p.b.waiting) == [(p.r, waiters[2])]
    p.r.abort_all()
    assert p.b.committed == 0 and p.b.holders == 0 and not p.b.waiting


def test_while_streams_wait_a_big_stream_shrinks_to_a_fair_share_but_never_below_the_initial_window():
    p = Pair(limit=8 * I)
    big = p.open()
    for _ in range(20):
        p.send_all(big)
        p.deliver(big)
    assert p.grant(big) == 9 * I and p.b.free == 0  # it took all of the budget, and waits for more
    assert list(p.b.waiting) == [(p.r, big)]
    small = [p.open() for _ in range(3)]
    for sid in small:
        p.send_all(sid)
        p.deliver(sid)
    assert list(p.b.waiting) == [(p.r, s) for s in [big, *small]]
    for _ in range(40):  # the big stream keeps moving; the small ones are served as it shrinks
        p.send_all(big)
        p.deliver(big)
        for sid in small:
            p.send_all(sid)
            p.deliver(sid)
        assert p.grant(big) >= I and p.b.committed <= p.b.limit
    fair = p.b.fair_share()
    assert p.grant(big) - I <= max(fair, 2 * I), (p.grant(big), fair)
    assert all(p.grant(sid) > I for sid in small)
    assert sum(p.grant(s) - I for s in [big, *small]) == p.b.committed


def test_take_refuses_while_others_wait_and_counts_holders():
    class Greedy:  # takes one byte per serving and always wants more
        def __init__(self, b):
            self.b, self.served = b, 0

        def budget_grant(self, sid, free):
            self.served += self.b.take(1, 1)
            return True

    b = BufferBudget(100)
    assert b.take(60, 0) == 60 and b.holders == 1
    assert b.take(60, 60) == 40 and b.holders == 1 and b.free == 0
    g = Greedy(b)
    b.wait(g, 1)
    b.release(3, 97)  # served round robin until the budget is spent again
    assert g.served == 3 and b.free == 0 and list(b.waiting) == [(g, 1)]
    b.release(10, 0)
    assert b.holders == 0
    assert g.served == 13
    b.limit += 5  # without set_limit nobody is served: free, but someone waits
    assert b.take(5, 0) == 0  # no passing the queue


def test_exhausted_is_logged_at_most_once_per_interval(caplog):
    now = [1000.0]
    b = BufferBudget(I, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="intercloud.budget")
    waiter = object()
    for sid in range(1, 50):
        b.wait(waiter, sid)
    lines = [r for r in caplog.records if getattr(r, "event", "") == "budget.exhausted"]
    assert len(lines) == 1 and "max_buffered" in lines[0].getMessage()
    now[0] += LOG_INTERVAL
    b.wait(waiter, 99)
    assert len([r for r in caplog.records if getattr(r, "event", "") == "budget.exhausted"]) == 2
    assert b.exhausted == 50


@pytest.mark.parametrize("limit", [I, 10 * I])
def test_set_limit_serves_waiters(limit):
    p = Pair(limit=limit)
    a = p.open()
    for _ in range(10):
        p.send_all(a)
        p.deliver(a)
    w = p.open()
    p.send_all(w)
    p.deliver(w)
    assert list(p.b.waiting) == [(p.r, a), (p.r, w)]
    p.b.set_limit(limit + 2 * I)  # a queued first: it gets the new credit (and, wanting more, queues behind w)
    p.flush_sunk()
    assert p.grant(w) == I and p.grant(a) == I + limit + 2 * I
    assert next(iter(p.b.waiting)) == (p.r, w)
    p.b.set_limit(limit + 3 * I)
    p.flush_sunk()
    assert p.grant(w) == 2 * I and p.s.credit(w) == 2 * I
