"""The fair ring of a congested tunnel (intercloud.tunnel.turns, docs/protocol.md §6.3), as properties.

A model tunnel drains a random number of bytes per tick and is full above a random limit; bulk ends
always have more than a quantum to send, finite ends run dry, and ends join at random ticks. Whatever
the schedule:
- two ends that stayed backlogged through the same turns never differ by more than one quantum;
- an end that joins gets its first turn before any other end gets two;
- nothing is sent while the tunnel is full, and no end sends more than a quantum per turn;
- a round that leaves room releases every end (end_turns), and each end is in the ring once at most.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from intercloud.tunnel.turns import (MIN_QUEUE, MIN_TURN, QUEUE_TIME, START_BUFFER, START_LOWAT, TURN, TurnRing,
                                     queue_limits)

Q = 100  # quantum in the model: the property does not depend on its size


class Tunnel:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queued = 0
        self.log: list[tuple[str, int]] = []  # (end name, bytes) per turn, in order

    def full(self) -> bool:
        return self.queued >= self.limit


class End:
    def __init__(self, name: str, tunnel: Tunnel, backlog: int | None) -> None:
        self.name = name
        self.tunnel = tunnel
        self.backlog = backlog  # None: always more than a quantum (bulk)
        self.sent = 0
        self.waiting = False
        self.released = 0

    def take_turn(self, limit: int) -> bool:
        t = self.tunnel
        assert self.waiting, f"{self.name} got a turn while not in the ring"
        assert not t.full(), f"{self.name} got a turn while the tunnel was full"
        assert limit == Q
        n = limit if self.backlog is None else min(limit, self.backlog)
        if self.backlog is not None:
            self.backlog -= n
        self.sent += n
        t.queued += n
        t.log.append((self.name, n))
        more = self.backlog is None or self.backlog > 0
        self.waiting = more
        return more

    def end_turns(self) -> None:
        assert self.waiting
        self.waiting = False
        self.released += 1


schedule = st.lists(
    st.tuples(st.integers(0, 4 * Q),  # drained this tick
              st.lists(st.one_of(st.none(), st.integers(1, 5 * Q)), max_size=2)),  # ends joining
    min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(Q, 8 * Q), ticks=schedule)
def test_turns_are_fair_bounded_and_released(limit: int, ticks) -> None:
    tunnel = Tunnel(limit)
    tunnel.queued = limit  # congested from the start: that is when ends join the ring
    ring = TurnRing(Q)
    ends: list[End] = []
    for drained, joining in ticks:
        for backlog in joining:
            end = End(f"e{len(ends)}", tunnel, backlog)
            ends.append(end)
            if tunnel.full():  # an end joins the ring only while the tunnel is full (LocalStream)
                end.waiting = True
                ring.wait(end)
                _note_join(ring, end, tunnel)
        before = len(tunnel.log)
        tunnel.queued = max(0, tunnel.queued - drained)
        ring.round(tunnel.full)
        turns = tunnel.log[before:]
        # one round: every end at most one turn
        names = [n for n, _ in turns]
        assert len(names) == len(set(names)), f"an end got two turns in one round: {names}"
        assert len(ring) == sum(e.waiting for e in ends), "an end is in the ring twice, or a waiting end is missing"
        if not tunnel.full():
            assert len(ring) == 0 and not any(e.waiting for e in ends), "a round left room but ends still wait"
    _check_fair_shares(tunnel.log, ends)


def _note_join(ring: TurnRing, end: End, tunnel: Tunnel) -> None:
    """Where in the log ``end`` joined and how many ends were ahead of it (checked at the end)."""
    end.joined_at = len(tunnel.log)
    end.ahead = len(ring) - 1


def _check_fair_shares(log: list[tuple[str, int]], ends: list[End]) -> None:
    # an end that joined waits at most one turn per end ahead of it in the ring
    for end in ends:
        if not hasattr(end, "joined_at"):
            continue
        after = [n for n, _ in log[end.joined_at:]]
        if end.name in after:
            first = after.index(end.name)
            assert first <= end.ahead, f"{end.name} waited {first} turns behind {end.ahead} ends"
            # nobody got two turns before its first
            seen: dict[str, int] = {}
            for n in after[:first]:
                seen[n] = seen.get(n, 0) + 1
            assert max(seen.values(), default=0) <= 1, f"another end got two turns before {end.name}'s first"
    # bulk ends that joined at the same moment and never left: byte totals within one quantum
    bulk = [e for e in ends if e.backlog is None and hasattr(e, "joined_at") and e.released == 0]
    for a in bulk:
        for b in bulk:
            if a.joined_at == b.joined_at:
                assert abs(a.sent - b.sent) <= Q, f"{a.name} sent {a.sent}, {b.name} {b.sent}"


def test_a_bulk_end_and_a_small_one_share_by_turns() -> None:
    """A concrete case: two bulk ends and one with 30 bytes; the small one goes in the first round
    and leaves; the bulk ones alternate, a quantum each."""
    tunnel = Tunnel(limit=3 * Q)
    tunnel.queued = tunnel.limit
    ring = TurnRing(Q)
    a, b, small = End("a", tunnel, None), End("b", tunnel, None), End("small", tunnel, 30)
    for e in (a, b, small):
        e.waiting = True
        ring.wait(e)
    for _ in range(5):
        tunnel.queued -= 2 * Q  # room for two turns
        ring.round(tunnel.full)
    assert [n for n, _ in tunnel.log[:3]] == ["a", "b", "small"]
    assert not small.waiting and small.sent == 30
    assert abs(a.sent - b.sent) <= Q and a.sent + b.sent == sum(n for name, n in tunnel.log if name != "small")


KiB = 1024


def test_queues_are_sized_by_time_within_the_configured_limits() -> None:
    """queue_limits: QUEUE_TIME of sending per queue, at least MIN_QUEUE, at most the config; the turn
    at most half the buffer limit; unknown rate: the start limits within the config."""
    cfg = (256 * KiB, 128 * KiB)
    assert queue_limits(0, *cfg) == (256 * KiB, 128 * KiB, TURN)  # rate unknown
    assert queue_limits(125_000_000, *cfg) == (256 * KiB, 128 * KiB, TURN)  # 1 Gbit/s: 1.25 MB > both
    defaults = (1024 * KiB, 1024 * KiB)
    assert queue_limits(0, *defaults) == (START_BUFFER, START_LOWAT, TURN)  # small until the rate is known
    assert queue_limits(125_000_000, *defaults) == (1024 * KiB, 1024 * KiB, TURN)  # fast path: the maxima
    assert queue_limits(0, 64 * KiB, 0) == (64 * KiB, 0, TURN)  # never above the config, 0 stays 0
    mbit20 = 2_500_000  # bytes per second
    high, lowat, turn = queue_limits(mbit20, *cfg)
    assert high == lowat == MIN_QUEUE and turn == MIN_TURN  # 25 KB of 10 ms, raised to the floor
    mbit100 = 12_500_000
    high, lowat, turn = queue_limits(mbit100, *cfg)
    assert high == lowat == int(mbit100 * QUEUE_TIME) and turn == high // 2
    assert queue_limits(mbit100, 256 * KiB, 0)[1] == 0  # notsent_lowat 0: the kernel's setting stays
    assert queue_limits(mbit100, 64 * KiB, 128 * KiB)[0] == 64 * KiB  # never above the config


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(0, 10**10), buf=st.integers(64 * KiB, 1 << 30), lowat=st.one_of(st.just(0), st.integers(16 * KiB, 64 << 20)))
def test_queue_limits_stay_in_bounds(rate: int, buf: int, lowat: int) -> None:
    high, lw, turn = queue_limits(rate, buf, lowat)
    assert min(buf, MIN_QUEUE) <= high <= buf
    assert lw == 0 if lowat == 0 else min(lowat, MIN_QUEUE) <= lw <= lowat
    assert MIN_TURN <= turn <= TURN
