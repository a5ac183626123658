"""Opening a stream somewhere: pick a tunnel, OPEN, await the answer, retry on another gateway
instance after a refusal, wait up to ``route_wait`` for a route to appear (docs/ha.md §6).

One loop serves a local client (``Gateway._route``: its tunnels, else a peer link for relay) and a
stream another member relayed to us (``Gateway._relay``: only our own tunnels of that tenant). The
caller says where to look (``pick``) and what to do with the result; the router owns the retry rules
and the waiters woken when routes change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NamedTuple

from .protocol.frames import Reason
from .tunnel.owner import StreamEnd
from .tunnel.tunnel import Tunnel

Instance = tuple[str, str]  # a gateway instance: node id and incarnation (protocol §5.4)


class OpenResult(NamedTuple):
    """How an OPEN with retries ended: ``tunnel`` carries the stream now (``ok``), or the last refusal
    (``code``, ``text`` from ``peer``), or no route at all (``peer`` None)."""
    tunnel: Tunnel | None
    code: int | None = None
    text: str = ""
    peer: str | None = None
    tried: int = 0  # gateway instances that refused

    @property
    def ok(self) -> bool:
        return self.tunnel is not None


_TIMED_OUT = object()
NOT_TRIED: frozenset = frozenset()


class Router:
    def __init__(self) -> None:
        self._waiters: set[asyncio.Future] = set()

    # --- route changes ---------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Opens waiting for a route to appear (tests wait on this instead of sleeping)."""
        return len(self._waiters)

    def routes_changed(self) -> None:
        """A tunnel or peer link came or went, sent GOAWAY or SERVICES, a member's routes changed."""
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def wait_route_change(self, timeout: float) -> None:
        if timeout <= 0:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(fut)

    # --- opening ---------------------------------------------------------------------------
    async def open_with_retry(self, end: StreamEnd, pick: Callable[[set[Instance] | frozenset], Tunnel | None], *,
                              answer_within: float, route_wait: float = 0.0, stop: Callable[[], bool] = lambda: False,
                              first: tuple[Tunnel, asyncio.Future] | None = None,
                              refused: Callable[[Tunnel, int, str], None] | None = None) -> OpenResult:
        """OPEN ``end`` on ``pick(tried)`` until one accepts. ``first``: an OPEN already sent (the
        client's first-byte path sends it from a callback, docs/performance.md P10). A refusal or an
        answer later than ``answer_within`` s excludes that gateway *instance* (a clone or an impostor
        with the same node id cannot hide a healthy one) and tries the next; ``refused`` hears of each.
        With no candidate and nothing tried yet it waits for a route change, up to ``route_wait`` s in
        all, unless ``stop()``. Ends at once when ``end`` finishes (the client left)."""
        deadline = time.monotonic() + route_wait
        tried: set[Instance] = set()
        last: tuple[str, int, str] | None = None
        while not end.finished:
            if first is not None:
                (tunnel, fut), first = first, None
            else:
                tunnel = pick(tried)
                if tunnel is None:
                    left = deadline - time.monotonic()
                    if tried or left <= 0 or stop():  # every candidate refused, or no route in time
                        break
                    await self.wait_route_change(left)
                    continue
                fut = tunnel.open(end)
            result = await answer(fut, answer_within)
            if result is _TIMED_OUT:
                result = (Reason.TIMEOUT, f"no answer to OPEN from {tunnel.peer_node}")
                tunnel.cancel_open(end, Reason.TIMEOUT, "OPEN timed out")
            if end.finished:
                break
            if result is None:
                return OpenResult(tunnel, tried=len(tried))
            tunnel.detach(end)
            tried.add(tunnel.peer_key)
            last = (tunnel.peer_node, *result)
            if refused is not None:
                refused(tunnel, *result)
        if last is None:
            return OpenResult(None, tried=len(tried))
        return OpenResult(None, last[1], last[2], last[0], len(tried))


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)


async def answer(fut: asyncio.Future, timeout: float):
    """The peer's answer to an OPEN (None or (code, text)), or _TIMED_OUT. A timer rather than
    wait_for(shield(...)): two futures and a task wake-up less per OPEN (docs/performance.md P3)."""
    timer = asyncio.get_running_loop().call_later(timeout, _expire, fut)
    try:
        return await fut
    finally:
        timer.cancel()
