"""Streams that survive tunnel breaks (docs/protocol.md §10): the registry of resumable streams, the
ones parked now, their deadlines, and the resume of each parked stream on another path.

Who does what: a tunnel that closes (or a relay that resets with PATH_LOST) asks ``park`` for each of
its open streams; a parked stream's opening end (``side == "accept"``, it holds the client) gets a task
that sends RESUME on any usable path to the far end instance; its accepting end waits for that RESUME
(``resume_requested``). The tunnel attaches the stream and replays (``Tunnel._resumed``,
``Tunnel.accept_resume``) and tells us (``resumed``). A stream nobody resumes in time is reset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol

from .protocol.frames import Reason
from .router import _TIMED_OUT, answer
from .stats import GatewayStats
from .tunnel.stream import LocalStream

if TYPE_CHECKING:
    from .config import Config
    from .router import Router
    from .tunnel.tunnel import Tunnel

slog = logging.getLogger("intercloud.stream")
BUSY_RETRY = 0.5  # the far end still sees the stream on a live tunnel: ask again this much later
# What the sender of a RESUME learns when its token matches no stream it may resume: the same whether
# the token is unknown or belongs to another tenant, service or gateway, so that a RESUME is no oracle
# for other tenants' streams (the log line still says which; tests/security/test_resume_forged.py)
_NO_SUCH_STREAM = "no stream with that token here (ended, or never)"
_ANSWER_SLACK = 5.0


class ParkingHost(Protocol):
    """What the registry needs of its gateway."""
    config: Config
    node_id: str
    role: str
    incarnation: str
    router: Router
    tg: asyncio.TaskGroup
    tunnels: set

    def relay_link(self, route: str, exclude) -> Tunnel | None: ...

    def stream_closed(self, tunnel: Tunnel, stream, reason: str) -> None: ...


class _Parked:
    __slots__ = ("since", "reason", "timer", "task", "why_deadline")

    def __init__(self, since: float, reason: str, timer: asyncio.TimerHandle, why_deadline: str):
        self.since = since
        self.reason = reason
        self.timer = timer
        self.task: asyncio.Task | None = None
        self.why_deadline = why_deadline


class Parking:
    def __init__(self, gw: ParkingHost, stats: GatewayStats):
        self.gw = gw
        self.stats = stats
        self.live: dict[bytes, LocalStream] = {}  # every resumable stream of ours, by token
        self.parked: dict[LocalStream, _Parked] = {}
        for name in ("streams_parked", "streams_resumed", "resume_failures", "resume_refusals", "bytes_replayed"):
            stats.counters.setdefault(name, 0)

    # --- registry ----------------------------------------------------------------------
    def register(self, stream: LocalStream) -> None:
        """``stream`` opened with a resume identity (protocol §10.2)."""
        if stream.token is not None:
            self.live[stream.token] = stream

    def forget(self, stream) -> None:
        """``stream`` closed while attached to a tunnel."""
        token = getattr(stream, "token", None)  # a relay's BridgeEnd has none
        if token is not None and self.live.get(token) is stream:
            del self.live[token]

    # --- parking (protocol §10.4) ---------------------------------------------------------
    def park(self, stream, tunnel: Tunnel, reason: str, silent: bool) -> bool:
        cfg = self.gw.config.tunnel
        if (cfg.resume_timeout <= 0 or not isinstance(stream, LocalStream) or stream.token is None
                or stream.finished or not stream.in_service or stream.parked or tunnel.goaway_received):
            return False
        if stream.far is not None and self._restarted(stream.far):
            return False
        timeout = cfg.resume_timeout if silent else min(cfg.ping_timeout, cfg.resume_timeout)
        why = ("tunnel.resume_timeout" if silent or cfg.resume_timeout <= cfg.ping_timeout else
               "tunnel.ping_timeout: the connection was closed, not silent, and a live far gateway is back "
               "within its first redial")
        stream.park()
        stream.parking = self
        loop = asyncio.get_running_loop()
        p = self.parked[stream] = _Parked(time.monotonic(), reason,
                                          loop.call_later(timeout, self._expire, stream, timeout), why)
        self.stats.counters["streams_parked"] += 1
        self.stats.count("streams_parked", service=stream.service, tenant=stream.tenant)
        far = self._far_label(stream)
        slog.info("[%s] PARKED: stream %s %s -> %s, path via %s broke (%s); resuming within %gs",
                  stream.service, stream.client, stream.target or far, far, tunnel.peer_node, reason, timeout,
                  extra={"event": "stream.parked", "service": stream.service, "client": stream.client,
                         "target": stream.target, "peer_node": far, "tenant": stream.tenant,
                         "reason": reason, "timeout": timeout, "sent": stream.tx, "held": stream.bytes_down})
        self.stats.event("stream.parked", service=stream.service, client=stream.client, reason=reason)
        if stream.side == "accept":  # the opening end resumes; the accepting end waits for its RESUME
            p.task = self.gw.tg.create_task(self._resume(stream))
        return True

    def _far_label(self, stream: LocalStream) -> str:
        return stream.far[0] if stream.far else (stream.tunnel_was.peer_node if stream.tunnel_was else "?")

    def _restarted(self, far: tuple[str, str]) -> bool:
        """A tunnel from ``far``'s node id with another incarnation is up: ``far`` is gone for good."""
        return any(t.peer_node == far[0] and t.peer is not None and t.peer.incarnation != far[1]
                   for t in self.gw.tunnels)

    def peer_up(self, tunnel: Tunnel) -> None:
        """A tunnel was admitted: parked streams whose far end restarted (same node id, another
        incarnation) are reset at once instead of waiting for their deadline."""
        peer = tunnel.peer
        for stream in [s for s in self.parked if s.far is not None and s.far[0] == peer.node_id
                       and s.far[1] != peer.incarnation]:
            self.fail(stream, f"{peer.node_id} restarted (incarnation {stream.far[1]} is gone, "
                              f"{peer.incarnation} is up): the stream's far end died with it")

    def member_gone(self, node_id: str, incarnation: str) -> None:
        """The member table dropped a member: its streams cannot come back."""
        for stream in [s for s in self.parked if s.far == (node_id, incarnation)]:
            self.fail(stream, f"member {node_id} left the member table: the stream's far end is gone")

    def _expire(self, stream: LocalStream, timeout: float) -> None:
        p = self.parked.get(stream)
        if p is not None:
            self.fail(stream, f"no path to {self._far_label(stream)} within {timeout:g}s ({p.why_deadline})")

    def fail(self, stream: LocalStream, why: str) -> None:
        """Give up on a parked stream: reset its socket (it is logged and counted by ``gone``)."""
        if stream not in self.parked:
            return
        self.stats.counters["resume_failures"] += 1
        self.stats.count("resume_failures", service=stream.service, tenant=stream.tenant)
        slog.warning("[%s] RESUME FAILED: stream %s -> %s: %s", stream.service, stream.client,
                     stream.target or self._far_label(stream), why,
                     extra={"event": "stream.resume_failed", "service": stream.service, "client": stream.client,
                            "target": stream.target, "peer_node": self._far_label(stream),
                            "tenant": stream.tenant, "reason": why})
        self.stats.event("stream.resume_failed", service=stream.service, client=stream.client, reason=why)
        stream.abort(Reason.ABORTED, f"resume failed: {why}", tell_peer=False)

    def gone(self, stream: LocalStream, reason: str) -> None:
        """A parked stream finished (reset, or its local peer left): log and count it as closed."""
        p = self.parked.pop(stream, None)
        if p is not None:
            p.timer.cancel()
            if p.task is not None and p.task is not asyncio.current_task():
                p.task.cancel()
        self.forget(stream)
        stream.parking = None
        if stream.tunnel_was is not None:
            self.gw.stream_closed(stream.tunnel_was, stream, reason)

    def resumed(self, stream: LocalStream, tunnel: Tunnel, replayed: int) -> None:
        """The tunnel attached ``stream`` and replayed ``replayed`` bytes (either end)."""
        p = self.parked.pop(stream, None)
        if p is None:
            return
        p.timer.cancel()
        if p.task is not None and p.task is not asyncio.current_task():
            p.task.cancel()
        gap = time.monotonic() - p.since
        self.stats.counters["streams_resumed"] += 1
        self.stats.counters["bytes_replayed"] += replayed
        self.stats.count("streams_resumed", service=stream.service, tenant=stream.tenant)
        self.stats.count("bytes_replayed", replayed, service=stream.service, tenant=stream.tenant)
        via = tunnel.peer_node + (" (relay)" if tunnel.kind == "peer" else "")
        slog.info("[%s] RESUMED: stream %s -> %s via %s after %.3fs, %d bytes replayed", stream.service,
                  stream.client, stream.target or self._far_label(stream), via, gap, replayed,
                  extra={"event": "stream.resumed", "service": stream.service, "client": stream.client,
                         "target": stream.target, "peer_node": tunnel.peer_node, "tenant": stream.tenant,
                         "stream": stream.sid, "tunnel": tunnel.id, "relayed": tunnel.kind == "peer",
                         "gap": round(gap, 6), "bytes_replayed": replayed})
        self.stats.event("stream.resumed", service=stream.service, client=stream.client, gap=round(gap, 3))

    # --- the opening end: RESUME on any path to the far end (protocol §10.5) ---------------
    def _paths(self, stream: LocalStream, tried: set) -> Tunnel | None:
        """A tunnel to the far end instance itself (fewest streams first), else a relay link. ``tried``
        holds the tunnels (to the far end itself) and the relaying members (instances) that failed this
        round."""
        best = None
        for t in self.gw.tunnels:
            if (t.peer_key == stream.far and t.tenant == stream.tenant and t.resumable and t.usable
                    and not t.goaway_received and t not in tried):
                if best is None or t.stream_count < best.stream_count:
                    best = t
        if best is None:
            link = self.gw.relay_link(f"{stream.tenant}/{stream.service}", tried)
            if link is not None and link.resumable:
                best = link
        return best

    async def _resume(self, stream: LocalStream) -> None:
        cfg = self.gw.config.tunnel
        tried: set = set()
        while stream in self.parked and not stream.finished:
            tunnel = self._paths(stream, tried)
            if tunnel is None:
                tried.clear()  # a path that refused may be the only one once routes change
                await self.gw.router.wait_route_change(cfg.resume_timeout)
                continue
            fut = tunnel.resume(stream, stream.token, stream.far, stream.bytes_down, attach=False)
            result = await answer(fut, cfg.connect_timeout + _ANSWER_SLACK)
            if stream not in self.parked:
                return  # resumed (the tunnel attached it when OPEN_OK arrived), failed or gone
            if result is _TIMED_OUT:
                result = (Reason.TIMEOUT, f"no answer to RESUME from {tunnel.peer_node}")
                tunnel.cancel_resume(stream, "RESUME timed out")
            code, text = result
            if code == Reason.NOT_RESUMABLE:
                self.fail(stream, f"{tunnel.peer_node} refused the RESUME: {text}")
                return
            if code == Reason.BUSY:  # the far end has not noticed the break yet
                await asyncio.sleep(BUSY_RETRY)
                continue
            # Exclude the path that failed, not the far end: a tunnel to the far end itself failed (it
            # closed under the RESUME, timed out, was full), another tunnel to it may well work. Excluding
            # the instance skipped every such tunnel, including one that came up while this RESUME was
            # out, and the stream then waited for the next route change, up to resume_timeout, with a
            # working path up (tests/protocol/test_resume_properties.py: a new tunnel cut under its RESUME
            # while a third one comes up).
            tried.add(tunnel.peer_key if tunnel.kind == "peer" else tunnel)
            slog.info("[%s] RESUME of stream %s via %s refused: %s %s; trying another path", stream.service,
                      stream.client, tunnel.peer_node, Reason.name_of(code), text,
                      extra={"event": "stream.resume_retry", "service": stream.service,
                             "peer_node": tunnel.peer_node, "reason": Reason.name_of(code), "detail": text})

    # --- the accepting end: a RESUME arrived (protocol §10.5) ------------------------------
    def resume_requested(self, tunnel: Tunnel, sid: int, service: str, resume: dict) -> None:
        token, far, offset = resume["token"], resume["far"], resume["offset"]
        me = (self.gw.node_id, self.gw.incarnation)
        stream = self.live.get(token)
        if far != me:
            why = (f"RESUME names {far[0]} incarnation {far[1]}; this is {me[0]} incarnation {me[1]} "
                   "(the stream's end restarted)")
            self._refuse(tunnel, sid, service, Reason.NOT_RESUMABLE, why)
        elif stream is None or stream.finished:
            self._refuse(tunnel, sid, service, Reason.NOT_RESUMABLE, _NO_SUCH_STREAM)
        elif stream.side != "connect":  # only the accepting end is resumed; its opener resumes it
            self._refuse(tunnel, sid, service, Reason.NOT_RESUMABLE,
                         "the token is of a stream this gateway opened: only its far end may be resumed",
                         told=_NO_SUCH_STREAM)
        elif stream.service != service or stream.tenant != tunnel.tenant:
            self._refuse(tunnel, sid, service, Reason.NOT_RESUMABLE,
                         f"the token belongs to another service or tenant than {tunnel.tenant}/{service}",
                         told=_NO_SUCH_STREAM)
        elif stream.far is not None and tunnel.peer_key != stream.far:
            self._refuse(tunnel, sid, service, Reason.NOT_RESUMABLE,
                         f"the stream belongs to {stream.far[0]} incarnation {stream.far[1]}, the RESUME came "
                         f"from {tunnel.peer_key[0]} incarnation {tunnel.peer_key[1]}", told=_NO_SUCH_STREAM)
        elif not stream.parked:
            self._refuse(tunnel, sid, service, Reason.BUSY, "the stream is still attached to a live tunnel here")
        elif not stream.can_replay_from(offset):
            self._refuse(tunnel, sid, service, Reason.NOT_RESUMABLE,
                         f"offset {offset} is outside what was kept ({stream.kept_from}..{stream.tx})")
            self.fail(stream, f"{tunnel.peer_node} asked to resume from offset {offset}, outside what was kept")
        else:
            replayed = tunnel.accept_resume(sid, stream, offset)
            self.resumed(stream, tunnel, replayed)

    def _refuse(self, tunnel: Tunnel, sid: int, service: str, code: int, why: str, told: str | None = None) -> None:
        """Refuse a RESUME; the peer is ``told`` (default ``why``), the log says ``why``."""
        tunnel.refuse(sid, code, why if told is None else told)
        self.stats.counters["resume_refusals"] += 1
        self.stats.count("resume_refusals", reason=Reason.label(code))
        level = logging.INFO if code == Reason.BUSY else logging.WARNING
        slog.log(level, "RESUME of %s from %s (%s) refused: %s", service, tunnel.peer_node, tunnel.peer_addr, why,
                 extra={"event": "stream.resume_refused", "service": service, "peer_node": tunnel.peer_node,
                        "peer_addr": tunnel.peer_addr, "tenant": tunnel.tenant, "reason": Reason.name_of(code),
                        "detail": why})

    # --- status ------------------------------------------------------------------------
    def snapshot(self) -> dict:
        c = self.stats.counters
        return {"parked": len(self.parked), "resumable": len(self.live), "parked_total": c["streams_parked"],
                "resumed": c["streams_resumed"], "failed": c["resume_failures"], "refused": c["resume_refusals"],
                "bytes_replayed": c["bytes_replayed"]}
