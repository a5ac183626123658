"""The process-wide buffer budget, ``[gateway] max_buffered`` (docs/protocol.md §6.4).

Every stream starts with a small, unbudgeted grant (``INITIAL_WINDOW``, announced as the HELLO
``window``) and grows it, up to ``tunnel.stream_window``, with credit taken from this budget. What
the gateway holds in user space for received bytes never exceeds the sum of the grants, so a
gateway's memory is bounded by ``max_buffered`` + streams x ``INITIAL_WINDOW`` however many streams
peers open into readers that never read (issue 12: 300 such streams took 1.04 GB before).

The budget is pure accounting and is only touched off the per-write hot path: when a stream returns
a batch of credit (a quarter of its grant), when it closes, and when a local write is queued in user
space. Measured (2-core VM, noisy): ``Connection.delivered`` 600-670 ns/call with the budget against
600-660 ns before it (16 KiB writes, min of 7 x 1M calls); iperf CPU s/GB per gateway unchanged
within run-to-run spread (1.2-2.2 s/GB both). Which streams hold or want credit lives in the protocol ``Connection`` (its ``_Stream``s); the
budget keeps the totals, the FIFO queue of streams waiting for credit, and the log line.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

log = logging.getLogger("intercloud.budget")

#: The grant every stream starts with (HELLO ``window``), outside the budget. 64 KiB: 300 streams
#: into readers that never read hold at most 19 MiB this way; it is also the early data we accept
#: (protocol §4.5), so a client's first request still crosses with the OPEN.
INITIAL_WINDOW = 64 * 1024

#: At most one "budget exhausted" warning per this many seconds (the condition can persist for hours).
LOG_INTERVAL = 10.0


class Waiter(Protocol):
    def budget_grant(self, sid: int, free: int) -> bool:
        """Grow stream ``sid`` by its next step, at most ``free`` bytes, taking the credit with
        :meth:`BufferBudget.take`. True when it got less than its step (it queues again)."""


class BufferBudget:
    """Credit granted beyond the initial windows, process-wide, with a FIFO of streams that wait."""

    def __init__(self, limit: int, *, clock=time.monotonic):
        self.limit = limit
        self.committed = 0  # credit granted beyond the initial windows, all streams
        self.holders = 0  # streams holding some of it
        self.buffered = 0  # bytes queued in user space toward local sockets now (a gauge, not a limit)
        self.exhausted = 0  # times a stream wanted credit and had to wait
        # (waiter, sid) -> None: the FIFO of streams waiting to grow (dicts keep insertion order)
        self.waiting: dict[tuple[Waiter, int], None] = {}
        self._clock = clock
        self._logged_at: float | None = None
        self._serving = False

    @property
    def free(self) -> int:
        return max(0, self.limit - self.committed)

    def fair_share(self) -> int:
        """What one stream may keep while others wait (protocol §6.4)."""
        return self.limit // max(1, self.holders + len(self.waiting))

    def set_limit(self, limit: int) -> None:
        """SIGHUP: a new ``max_buffered``. Grants above a lower limit are not revoked (credit on the
        wire cannot be); streams shrink to fair shares as they return credit."""
        self.limit = limit
        self._serve()

    def take(self, want: int, held: int) -> int:
        """A stream that holds ``held`` wants ``want`` more: how much it gets now. Nothing while
        other streams wait (no stream passes the queue), nor when the budget is spent."""
        if self.waiting and not self._serving:
            return 0
        got = min(want, self.free)
        if got > 0:
            if held == 0:
                self.holders += 1
            self.committed += got
        return got

    def release(self, n: int, left: int) -> None:
        """A stream gives back ``n`` and keeps ``left``; waiting streams get what is free now."""
        if n <= 0:
            return
        self.committed -= n
        if left == 0:
            self.holders -= 1
        if self.waiting:
            self._serve()

    def wait(self, waiter: Waiter, sid: int) -> None:
        """Stream ``sid`` of ``waiter`` wants to grow but got nothing: queue it (once)."""
        key = (waiter, sid)
        if key in self.waiting:
            return
        self.waiting[key] = None
        self.exhausted += 1
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= LOG_INTERVAL:
            self._logged_at = now
            log.warning(
                "buffer budget exhausted: %d bytes of credit granted beyond the initial windows (limit "
                "[gateway] max_buffered = %d) to %d streams, %d streams wait for more; streams run with "
                "small windows (slower, memory stays bounded). If local readers are slow, find them in "
                "`intercloud status` (streams with large 'buffered'); otherwise raise max_buffered",
                self.committed, self.limit, self.holders, len(self.waiting),
                extra={"event": "budget.exhausted", "committed": self.committed, "limit": self.limit,
                       "holders": self.holders, "waiting": len(self.waiting)})

    def forget(self, waiter: Waiter, sid: int) -> None:
        """Stream ``sid`` is gone: it no longer waits."""
        self.waiting.pop((waiter, sid), None)

    def _serve(self) -> None:
        """Hand free credit to waiting streams in queue order, each its next step (a doubling of its
        grant). A stream served leaves the queue: it asks again when it has used the new credit, so
        credit keeps going to streams whose readers read. One cut short by the budget goes to the back
        (round robin: a stream that wants much cannot keep the head of the queue)."""
        if self._serving:
            return  # a grant released credit again: the loop already running serves it
        self._serving = True
        try:
            while self.waiting and self.free > 0:
                key = next(iter(self.waiting))
                del self.waiting[key]
                waiter, sid = key
                if waiter.budget_grant(sid, self.free):
                    self.waiting[key] = None
        finally:
            self._serving = False
