"""What happens to each new stream (docs/architecture.md §4): a local client connects to an accept
listener (route it: a tunnel, else a peer link for relay), the peer OPENs one of our connect services
(dial the target), a member relays a stream to us (carry it over one of our own tunnels).

Every such stream gets a task (route, dial, relay) under a guard: an unexpected exception resets that
one stream, counts and logs it, and leaves the gateway and every other stream running.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Protocol

from .protocol.frames import Reason
from .router import _TIMED_OUT, NOT_TRIED, Router, answer
from .stats import GatewayStats
from .tunnel.bridge import BridgeEnd
from .tunnel.stream import LocalStream, reset
from .tunnel.tunnel import Tunnel

if TYPE_CHECKING:
    from .config import Config
    from .resume import Parking

slog = logging.getLogger("intercloud.stream")
# OPEN is answered once the far side has dialed its target; allow its connect_timeout plus slack.
_OPEN_SLACK = 5.0
DEFAULT_TENANT = "default"


class DispatchHost(Protocol):
    """What stream dispatch needs of its gateway (gateway.Gateway, and the cloud's CloudGateway)."""
    config: Config
    node_id: str
    role: str
    draining: bool
    router: Router
    tg: asyncio.TaskGroup
    connect_services: dict

    def stream_limit(self, tenant: str) -> str | None: ...

    def pick_tunnel(self, service: str, exclude, tenant: str = DEFAULT_TENANT) -> Tunnel | None: ...

    def relay_link(self, route: str, exclude) -> Tunnel | None: ...

    def connect_service_names(self, tunnel: Tunnel) -> list[str]: ...

    tunnels: set
    parking: Parking
    gates: dict  # (tenant, service) -> admission.ServiceGate


class StreamDispatch:
    def __init__(self, gw: DispatchHost, stats: GatewayStats):
        self.gw = gw
        self.stats = stats
        # test hook only (tests/e2e/test_stream_faults.py): streams of this service raise inside their task
        self._fault_service = os.environ.get("INTERCLOUD_TEST_STREAM_FAULT")

    # --- accept side: a local client wants the peer's service ----------------------------
    def client_connected(self, stream: LocalStream) -> None:
        """A client connected to an accept listener (called from LocalStream.connection_made)."""
        if self.gw.draining:
            self._audit_refused("draining", f"{self.gw.node_id} is draining (shutting down); the client may retry "
                                "on another member", stream.client, stream.service, stream.tenant)
            reset(stream.transport)
            return
        limit = self.gw.stream_limit(stream.tenant)
        if limit is not None:
            self._refuse_client(stream, limit)
            self._audit_refused("tenant", limit, stream.client, stream.service, stream.tenant,
                                rule=self._tenant_rule(stream.tenant))
            return
        gate = self.gw.gates.get((stream.tenant, stream.service))
        if gate is not None:  # allow/deny, max_connections, max_rate (admission.py)
            refusal = gate.admit(stream.client)
            if refusal is not None:
                self.stats.refused(refusal.kind, refusal.why, client=stream.client, service=stream.service,
                                   tenant=stream.tenant, rule=refusal.rule)
                if stream.transport is not None:
                    reset(stream.transport)
                stream.finished = True
                return
        self.stats.hold_slot(stream, gate)
        # The first OPEN leaves from this callback when a tunnel is up, not one loop iteration later
        # from the task: it is on the client's first-byte path (docs/performance.md, P10).
        tunnel = self._pick_route(stream, NOT_TRIED)
        first = (tunnel, tunnel.open(stream)) if tunnel is not None else None
        self._stream_task(stream, self._route(stream, first))

    def _pick_route(self, stream: LocalStream, tried: set[tuple[str, str]] | frozenset) -> Tunnel | None:
        return (self.gw.pick_tunnel(stream.service, tried, stream.tenant)
                or self.gw.relay_link(f"{stream.tenant}/{stream.service}", tried))

    async def _route(self, stream: LocalStream, first: tuple[Tunnel, asyncio.Future] | None) -> None:
        """Await the answer to the first OPEN (``first``, sent by client_connected) or find a tunnel,
        OPEN, retry elsewhere on refusal; never leave the client hanging (docs/ha.md §6)."""
        svc = stream.service
        wait = self.gw.config.gateway.route_wait
        result = await self.gw.router.open_with_retry(
            stream, lambda tried: self._pick_route(stream, tried), first=first, route_wait=wait,
            answer_within=self.gw.config.tunnel.connect_timeout + _OPEN_SLACK, stop=lambda: self.gw.draining,
            refused=lambda tunnel, code, text: self._open_refused(stream, tunnel, code, text))
        if svc == self._fault_service:
            raise RuntimeError("fault injected by INTERCLOUD_TEST_STREAM_FAULT (a test hook; unset it)")
        if stream.finished:  # the client left while we opened
            if self.stats.audit is not None and not stream.in_service:
                self.stats.audit.stream_failed(stream, "client_left", "the client left before the stream opened",
                                               tunnel=stream.tunnel)
            return
        if result.ok:
            stream.identify()  # the far end's resume identity, if any (protocol §10.2)
            stream.start()  # parked bytes first: the OPENED line is not on the client's path
            self.stats.stream_opened(result.tunnel, stream)
            self.gw.parking.register(stream)
            return
        if result.peer is None:
            self.stats.counters["route_timeouts"] += 1
            self.stats.count("route_timeouts", service=svc, tenant=stream.tenant)
            why = (f"no route: no tunnel offers service {svc!r} (waited {wait:g}s, gateway.route_wait); "
                   "check that a gateway on the other side connects this service and its tunnels are up")
            self._audit_refused("no_route", why, stream.client, svc, stream.tenant, rule="route_wait")
        else:
            why = (f"every gateway offering {svc!r} refused; last {result.peer}: "
                   f"{Reason.name_of(result.code)} {result.text}")
            if self.stats.audit is not None:
                self.stats.audit.stream_failed(stream, "refused", why, peer_node=result.peer)
        self._refuse_client(stream, why)

    def _open_refused(self, stream: LocalStream, tunnel: Tunnel, code: int, text: str) -> None:
        svc = stream.service
        self.stats.counters["open_failures"] += 1
        self.stats.count("open_failures", service=svc, tenant=stream.tenant, reason=Reason.label(code))
        slog.info("OPEN %s via %s refused: %s %s; trying another gateway", svc, tunnel.peer_node,
                  Reason.name_of(code), text,
                  extra={"event": "stream.open_failed", "service": svc, "peer_node": tunnel.peer_node,
                         "reason": Reason.name_of(code), "detail": text})

    def _refuse_client(self, stream: LocalStream, why: str) -> None:
        svc = stream.service
        slog.warning("[%s] REFUSED client %s: %s", svc, stream.client, why,
                     extra={"event": "stream.refused", "service": svc, "client": stream.client, "reason": why,
                            "tenant": stream.tenant})
        self.stats.event("stream.refused", service=svc, client=stream.client, reason=why)
        tr = stream.transport
        if tr is not None:
            reset(tr)
        stream.finished = True

    # --- the audit log: refusals and failed streams that GatewayStats.refused and stream_closed do not see
    # (these have log lines of their own: stream.refused, stream.open_refused, stream.target_failed)
    def _audit_refused(self, kind: str, why: str, client: str, service: str, tenant: str, *,
                       peer: str | None = None, rule: str | None = None) -> None:
        if self.stats.audit is not None:
            self.stats.audit.refused(kind, why, client=client, service=service, tenant=tenant, peer=peer, rule=rule)

    def _tenant_rule(self, tenant: str) -> str | None:
        spec = next((t for t in self.gw.config.tenants if t.name == tenant), None)
        return f"max_streams {spec.max_streams}" if spec is not None and spec.max_streams is not None else None

    # --- connect side: the peer asks us to dial one of our services ---------------------
    def relay_requested(self, link: Tunnel, sid: int, tenant: str, service: str, client: str) -> None:
        """A member relays a stream of ``tenant`` to us (protocol §3.2): carry it over our own tunnels."""
        limit = self.gw.stream_limit(tenant)
        if limit is not None:
            link.refuse(sid, Reason.LIMIT, limit)
            self._audit_refused("tenant", limit, client, service, tenant, peer=link.peer_node,
                                rule=self._tenant_rule(tenant))
            return
        inner, outer = BridgeEnd.pair(service, client, target="", tenant=tenant)
        self.stats.hold_slot(inner)  # the inner end is the one counted and logged (stream_closed)
        link.track_open(sid, self._stream_task(inner, self._relay(link, sid, inner, outer), link, sid))

    def stream_requested(self, tunnel: Tunnel, sid: int, service: str, client: str) -> None:
        svc = self.gw.connect_services.get((tunnel.tenant, service))
        if svc is None:
            mine = self.gw.connect_service_names(tunnel)
            who = f" for tenant {tunnel.tenant!r}" if tunnel.tenant != DEFAULT_TENANT else ""
            text = (f"{self.gw.node_id} connects no service named {service!r}{who} "
                    f"(it connects: {', '.join(mine) or 'none'})")
            tunnel.refuse(sid, Reason.UNKNOWN_SERVICE, text)
            slog.warning("OPEN from %s refused: %s", tunnel.peer_node, text,
                         extra={"event": "stream.open_refused", "service": service, "peer_node": tunnel.peer_node,
                                "tenant": tunnel.tenant})
            self._audit_refused("no_route", text, client, service, tunnel.tenant, peer=tunnel.peer_node)
            return
        limit = self.gw.stream_limit(tunnel.tenant)
        if limit is not None:
            tunnel.refuse(sid, Reason.LIMIT, limit)
            slog.warning("OPEN %s from %s refused: %s", service, tunnel.peer_node, limit,
                         extra={"event": "stream.open_refused", "service": service, "peer_node": tunnel.peer_node,
                                "tenant": tunnel.tenant, "reason": limit})
            self._audit_refused("tenant", limit, client, service, tunnel.tenant, peer=tunnel.peer_node,
                                rule=self._tenant_rule(tunnel.tenant))
            return
        gate = self.gw.gates.get((tunnel.tenant, service))
        if gate is not None:  # the same rules on the side that dials, against the client the OPEN names
            refusal = gate.admit(client)
            if refusal is not None:
                code = Reason.FORBIDDEN if refusal.kind == "acl" else Reason.LIMIT
                tunnel.refuse(sid, code, f"{self.gw.node_id}: service {service} refused client {client} "
                                         f"({refusal.kind})")
                self.stats.refused(refusal.kind, refusal.why, client=client, service=service, tenant=tunnel.tenant,
                                   peer=tunnel.peer_node, rule=refusal.rule)
                return
        ep = svc.connect
        stream = LocalStream(svc.name, "connect", client=client, target=f"{ep.host}:{ep.port}", tenant=tunnel.tenant,
                             on_connected=lambda s: self._target_connected(tunnel, sid, s))
        stream.proxy_protocol = svc.proxy_protocol
        self.stats.hold_slot(stream, gate)
        tunnel.track_open(sid, self._stream_task(stream, self._dial_target(tunnel, sid, svc, stream), tunnel, sid))

    async def _dial_target(self, tunnel: Tunnel, sid: int, svc, stream: LocalStream) -> None:
        ep = svc.connect
        client = stream.client
        loop = asyncio.get_running_loop()
        code = None
        try:
            async with asyncio.timeout(self.gw.config.tunnel.connect_timeout):
                await loop.create_connection(lambda: stream, ep.host, ep.port)
        except ConnectionRefusedError:
            code, text = Reason.REFUSED, f"{ep.host}:{ep.port} refused the connection (service {svc.name} on {self.gw.node_id})"
        except TimeoutError:
            code, text = Reason.UNREACHABLE, (f"{ep.host}:{ep.port} did not answer within "
                                              f"{self.gw.config.tunnel.connect_timeout:g}s (tunnel.connect_timeout)")
        except OSError as exc:
            code, text = Reason.UNREACHABLE, f"{ep.host}:{ep.port} unreachable: {exc.strerror or exc}"
        if code is None or stream.sid:  # connected: _target_connected took it from there
            return  # (a timeout that fired after it did closes the socket; the stream reports that itself)
        tunnel.refuse(sid, code, text)
        if self.stats.audit is not None:
            self.stats.audit.stream_failed(stream, "refused", f"{Reason.name_of(code)} {text}", tunnel=tunnel)
        self.stats.counters["open_failures"] += 1
        self.stats.count("open_failures", service=svc.name, tenant=tunnel.tenant, reason=Reason.label(code))
        slog.warning("[%s] target failed for client %s via %s: %s", svc.name, client, tunnel.peer_node, text,
                     extra={"event": "stream.target_failed", "service": svc.name, "client": client,
                            "target": stream.target, "reason": Reason.name_of(code), "detail": text})

    def _target_connected(self, tunnel: Tunnel, sid: int, stream: LocalStream) -> None:
        """The target accepted: answer OPEN_OK and hand it the early bytes from connection_made,
        one loop iteration before the dial task would resume (docs/performance.md, P12)."""
        if not tunnel.accept(sid, stream):
            reset(stream.transport)  # the peer gave up (RST) or the tunnel is gone meanwhile
            return
        if stream.finished:  # the target could not take the early data
            return
        if stream.token is not None:  # resumable (protocol §10.2): a cloud binds it to the opening gateway
            stream.far = tunnel.peer_key if self.gw.role == "cloud" else None
            self.gw.parking.register(stream)
        stream.start()
        self.stats.stream_opened(tunnel, stream)

    async def _relay(self, link: Tunnel, sid: int, inner, outer) -> None:
        """Carry a stream another member relayed to us over one of our own tunnels (docs/ha.md §5).
        Never over another peer link (protocol §3.2), so a stream is relayed at most once."""
        service, tenant = inner.service, inner.tenant
        inner.attach(link, sid)  # so that a failure here can reset the relaying member's stream
        result = await self.gw.router.open_with_retry(
            outer, lambda tried: self.gw.pick_tunnel(service, tried, tenant),  # never another tenant's tunnel
            answer_within=self.gw.config.tunnel.connect_timeout + 2)  # before the relaying member gives up
        if result.ok:
            if not link.accept(sid, inner, identity=outer.ok_payload):  # the relaying member gave up meanwhile
                outer.abort(Reason.ABORTED, "relaying member reset the stream", tell_peer=True)
                return
            outer.target = inner.target = result.tunnel.peer_node
            self.stats.stream_opened(link, inner)
            inner.start()
            outer.start()
        elif result.peer is None:
            text = f"{self.gw.node_id} has no tunnel offering {service!r} any more"
            link.refuse(sid, Reason.UNKNOWN_SERVICE, text)
            self._audit_refused("no_route", text, inner.client, service, tenant, peer=link.peer_node)
        else:
            link.refuse(sid, result.code, f"via {self.gw.node_id}: {result.peer}: {result.text}")
            if self.stats.audit is not None:
                self.stats.audit.stream_failed(inner, "refused", f"{Reason.name_of(result.code)} {result.text}",
                                               peer_node=result.peer)

    def relay_resume_requested(self, link: Tunnel, sid: int, tenant: str, service: str, resume: dict) -> None:
        """A member relays a RESUME to us (protocol §10.5): carry it over our tunnel to the far end
        instance itself, never elsewhere; the far end's answer goes back unchanged."""
        far = resume["far"]
        tunnel = None
        for t in self.gw.tunnels:
            if t.peer_key == far and t.tenant == tenant and t.resumable and t.usable and not t.goaway_received:
                if tunnel is None or t.stream_count < tunnel.stream_count:
                    tunnel = t
        if tunnel is None:
            link.refuse(sid, Reason.UNKNOWN_SERVICE, f"{self.gw.node_id} has no tunnel to {far[0]} "
                                                     f"incarnation {far[1]}")
            return
        inner, outer = BridgeEnd.pair(service, "", target=far[0], tenant=tenant)
        self.stats.hold_slot(inner)
        link.track_open(sid, self._stream_task(inner, self._relay_resume(link, sid, inner, outer, tunnel, resume),
                                               link, sid))

    async def _relay_resume(self, link: Tunnel, sid: int, inner, outer, tunnel: Tunnel, resume: dict) -> None:
        inner.attach(link, sid)
        fut = tunnel.resume(outer, resume["token"], resume["far"], resume["offset"], attach=True)
        result = await answer(fut, self.gw.config.tunnel.connect_timeout + 2)
        if result is None:
            if not link.accept(sid, inner, identity=outer.ok_payload):
                outer.abort(Reason.ABORTED, "relaying member reset the stream", tell_peer=True)
                return
            self.stats.stream_opened(link, inner)
            inner.start()
            outer.start()
            return
        if result is _TIMED_OUT:
            tunnel.cancel_open(outer, Reason.TIMEOUT, "RESUME timed out")
            result = (Reason.TIMEOUT, f"no answer to RESUME from {tunnel.peer_node}")
        tunnel.detach(outer)
        link.refuse(sid, result[0], f"via {self.gw.node_id}: {result[1]}")

    # --- per-stream tasks -------------------------------------------------------------
    def _stream_task(self, stream, coro, tunnel: Tunnel | None = None, sid: int = 0) -> asyncio.Task:
        """Run a stream's open task (route, dial, relay) under a guard: an unexpected exception resets
        that one stream and is logged, instead of cancelling the gateway's TaskGroup and with it every
        tenant's streams. The stream's slot goes when the task ends unless the stream opened (a done
        callback, which runs even when the task is cancelled before its first step)."""
        task = self.gw.tg.create_task(self._guarded(stream, coro, tunnel, sid))

        def done(_t) -> None:
            coro.close()  # cancelled before its first step, the guard never awaited it: no "never awaited" warning
            if not stream.in_service:
                self.stats.free_slot(stream)
        task.add_done_callback(done)
        return task

    async def _guarded(self, stream, coro, tunnel: Tunnel | None, sid: int) -> None:
        try:
            await coro
        except Exception as exc:  # noqa: BLE001 - containment is the point; CancelledError passes
            self._internal_error(stream, exc, tunnel, sid)

    def _internal_error(self, stream, exc: BaseException, tunnel: Tunnel | None, sid: int) -> None:
        self.stats.counters["internal_errors"] += 1
        self.stats.count("internal_errors", service=stream.service, tenant=stream.tenant)
        what = f"{type(exc).__name__}: {exc}"
        slog.error("[%s] internal error on stream %s %s -> %s: %s; the stream was reset, the gateway goes on "
                   "(a bug: please report it with the debug-level traceback)", stream.service, stream.sid,
                   stream.client, stream.target or "?", what,
                   extra={"event": "internal.error", "service": stream.service, "stream": stream.sid,
                          "client": stream.client, "tenant": stream.tenant, "error": what})
        slog.debug("traceback of the internal error on stream %s", stream.sid, exc_info=exc,
                   extra={"event": "internal.traceback", "service": stream.service})
        text = "internal error in the gateway"
        if tunnel is not None and sid:
            tunnel.refuse(sid, Reason.INTERNAL, text)  # if still unanswered
        if not stream.finished:
            stream.abort(Reason.INTERNAL, text)
