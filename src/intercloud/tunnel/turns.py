"""The fair ring of a congested tunnel (docs/protocol.md §6.3).

While a tunnel's outgoing queue is full, the streams that have more to send than one read wait here
and send in turns of at most ``quantum`` bytes, round robin: deficit round robin with equal quanta,
where an end never sends more than a quantum in one turn, so no deficit carries over. Pure logic:
the ends do the reading and sending, the tunnel says when its queue is full.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Protocol

# A turn smaller than a frame costs more per byte (a syscall, a frame header, a TLS record); a larger
# one lets another stream's frame wait longer: behind at most one turn per waiting stream.
TURN = 64 * 1024
# Queues sized by time (queue_limits): each of the two queues in front of the wire (the process's, the
# kernel's unsent bytes) holds about this much of the connection's sending time. The event loop must
# come back within it to keep the link busy; an interactive frame waits about twice it.
QUEUE_TIME = 0.010
MIN_QUEUE = 32 * 1024  # below this, per-frame costs grow and a loop hiccup idles the link
# Until a connection's rate is known the queues start at most this big (within the config): the
# configured maxima (1 MiB each by default) are for paths fast enough to drain them in QUEUE_TIME;
# on a 20 Mbit/s path 256 + 128 KiB already wait 150 ms. Sized by rate, a loopback or 1 Gbit/s tunnel
# reaches the maxima: 128 KiB there cost the sending gateway 13-16 % more CPU per GB than 1 MiB
# (docs/performance.md §8.4), at no gain in latency (10 ms of 1 Gbit/s is 1.25 MB).
START_BUFFER = 256 * 1024
START_LOWAT = 128 * 1024
MIN_TURN = 16 * 1024


def queue_limits(rate: int, max_buffer: int, max_lowat: int) -> tuple[int, int, int]:
    """(outgoing-buffer limit, TCP_NOTSENT_LOWAT, turn size) for a connection that sends ``rate`` bytes
    per second: QUEUE_TIME's worth each, at least MIN_QUEUE, at most what the config allows
    (``max_lowat`` 0: the kernel's setting is left alone and stays 0 here). A turn is at most half the
    buffer limit, so that one turn past the limit does not double the wait. ``rate`` 0 (unknown):
    start_limits."""
    if rate <= 0:
        return start_limits(max_buffer, max_lowat)
    target = max(MIN_QUEUE, int(rate * QUEUE_TIME))
    high = min(max_buffer, target)
    lowat = min(max_lowat, target) if max_lowat else 0
    return high, lowat, max(MIN_TURN, min(TURN, high // 2))


def start_limits(max_buffer: int, max_lowat: int) -> tuple[int, int, int]:
    """The limits of a connection whose rate is not known yet: START_BUFFER and START_LOWAT within
    the configured maxima (``max_lowat`` 0: the kernel's setting)."""
    return min(max_buffer, START_BUFFER), min(max_lowat, START_LOWAT) if max_lowat else 0, TURN


class TurnTaker(Protocol):
    def take_turn(self, limit: int) -> bool:
        """Send up to ``limit`` bytes now; False when the end has nothing more to send in turns."""

    def end_turns(self) -> None:
        """The tunnel has room again: send as data comes, no longer in turns."""


class TurnRing:
    def __init__(self, quantum: int = TURN) -> None:
        self.quantum = quantum
        self._ends: deque[TurnTaker] = deque()

    def __len__(self) -> int:
        return len(self._ends)

    def wait(self, end: TurnTaker) -> None:
        """``end`` sends only in its turns from now on (the caller made sure it is not here yet)."""
        self._ends.append(end)

    def clear(self) -> None:
        self._ends.clear()

    def round(self, full: Callable[[], bool]) -> None:
        """Give each waiting end one turn, in order, while ``full()`` is false. If a whole round left
        room, the tunnel is no longer the bottleneck: every end goes back to sending as it reads."""
        ends = self._ends
        for _ in range(len(ends)):
            if not ends or full():
                return
            end = ends.popleft()
            if end.take_turn(self.quantum):
                ends.append(end)
        while ends and not full():
            ends.popleft().end_turns()
