"""Peer links between the members of a cloud cluster (docs/ha.md §4).

Every member dials every URL in ``cluster.peers`` (a host name that resolves to several addresses, e.g. a
headless service listing every member, is dialed at each) and accepts peer links on ``cluster.listen``.
A peer link is an ordinary tunnel (same protocol) whose both ends are cloud members; it is mutual TLS
with the cluster's own CA, and the peer's certificate must carry a name in ``cluster.peer_names``, so a
tenant certificate can never pose as a member. Over peer links members exchange MEMBERS (who is in the
cluster, which services each can route to its own on-prem gateways) and relay streams (§3.3).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING

from ..errors import StartupError
from ..backoff import backoff
from ..protocol.announce import ws_frame_limit
from ..transport import tls_server, ws
from ..transport.targets import DialTarget, DialTargets, connect_in_order
from ..protocol.frames import Reason
from ..revocation import Revocations, load_revocations
from ..transport.tls import cert_names, client_context, server_context
from ..tunnel.tunnel import Tunnel
from .members import MemberTable

if TYPE_CHECKING:
    from .host import ClusterHost

log = logging.getLogger("intercloud.cluster")


class Cluster:
    """The member table and the peer links of a cloud member. It owns its peer links (the
    TunnelOwner of each, tunnel/owner.py) and talks to its gateway only through ClusterHost."""

    def __init__(self, gw: ClusterHost):
        self.gw = gw
        self.cfg = gw.config.cluster
        self.table = MemberTable(gw.node_id, self.cfg.member_ttl)
        self.links: set[Tunnel] = set()
        self.peer_targets = DialTargets(self.cfg.peers, by_name=lambda _host: False, fallback=False)
        self._wanted = {_key(t) for t in self.peer_targets.targets}  # the current dial targets
        self._tried: set[tuple] = set()  # dial targets whose first dial attempt finished (readiness)
        self._loops: dict[tuple, asyncio.Task] = {}  # the dial loop of each target (_dial_peers)
        self._pushed: tuple = ()
        self._resolve_soon = asyncio.Event()  # members_changed: look the peers names up again (_dial_peers)
        self._self_url = str(self.cfg.advertise) if self.cfg.advertise else None
        self.table.set_self(gw.incarnation, self._self_url, frozenset(), time.monotonic())
        self.server_ssl = self.client_ssl = None
        self.revocations = Revocations()  # cluster.crl: checked on peer-link handshakes both ways
        self._server = None
        self.apply_tls(self.load_tls(gw.config))
        gw.warn_stale_crls("cluster.crl", self.revocations)

    def load_tls(self, config) -> tuple | None:
        """(server, client) contexts for peer links. Reads files: on SIGHUP this runs in a worker
        thread (Gateway.load_tls), so it must not touch the event loop or this object's state."""
        tls = config.tls
        if tls.insecure:
            return None
        cert, key = self.cfg.cert or tls.cert, self.cfg.key or tls.key
        server_ssl = server_context(cert, key, self.cfg.ca, verify_client=True)
        client_ssl = client_context(cert, key, self.cfg.ca)
        # Peer URLs are often bare addresses; identity is the CA plus the peer_names allow-list.
        client_ssl.check_hostname = False
        return server_ssl, client_ssl, load_revocations(config.cluster.crl)

    def apply_tls(self, contexts: tuple | None) -> None:
        """On the loop: new peer-link handshakes (both directions) use ``contexts`` from load_tls."""
        if contexts is None:
            return
        self.server_ssl, self.client_ssl, self.revocations = contexts
        if self._server is not None and hasattr(self._server, "set_ssl"):
            self._server.set_ssl(self.server_ssl)

    # --- readiness ---------------------------------------------------------------------
    def ready(self) -> bool:
        """Relay is possible, or every peer was tried once (a lone survivor must still serve)."""
        return bool(self.links) or self._wanted <= self._tried

    # --- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            if self.cfg.listen is not None:
                await self._serve()
            if self.cfg.peers:
                tg.create_task(self._dial_peers(tg))
            tg.create_task(self._housekeeping())

    async def _dial_peers(self, tg: asyncio.TaskGroup) -> None:
        """One dial loop per peers entry, or per member address when an entry's host name resolves to
        several (transport/targets.py; no fallback to another member's address: that member has a loop
        of its own). Names are looked up again every RESOLVE_EVERY seconds, and 1 s after the member set
        changes (members_changed, look_again_soon); the loop of an address that left the name retires
        before its next dial (never cancelled: a live link to it stays until it ends, and ends like any
        link)."""
        targets = self.peer_targets
        loops = self._loops
        while not self.gw.draining:
            self._resolve_soon.clear()
            await targets.refresh(self.gw.config.tunnel.handshake_timeout)
            wanted = {_key(t): t for t in targets.targets}
            self._wanted = set(wanted)
            for key, target in wanted.items():
                if key not in loops:
                    loops[key] = tg.create_task(self._keep_dialing(target, key))
                    loops[key].add_done_callback(lambda _t, k=key: loops.pop(k, None))
            try:  # asyncio.timeout: wait_for can lose a cancellation that coincides with the event (3.11)
                async with asyncio.timeout(targets.wait_time()):
                    await self._resolve_soon.wait()
            except TimeoutError:
                pass

    async def _serve(self) -> None:
        url = self.cfg.listen

        def refused(status: int, peer: str | None, source: str | None, why: str) -> None:
            tls_server.refuse_logged("tunnel.refused", source, "cluster.listen: upgrade from %s refused (HTTP %d): %s",
                                     peer or "?", status, why, reason=why, peer_addr=peer, listener="cluster.listen")

        def accept(peer: str | None, source: str | None):
            tunnel = Tunnel(self, client=False, kind="peer")
            self.gw.watch_handshake(tunnel)  # watched for liveness like any tunnel
            return tunnel

        factory = ws.upgrade_policy(url.path, accept, refused)

        t = self.gw.config.tunnel
        try:  # caps handshakes (cluster.max_handshakes) and logs failed TLS handshakes, like tunnel.listen
            server = await tls_server.create_server(
                factory, url.host, url.port, self.server_ssl, handshake_timeout=t.handshake_timeout,
                max_frame_size=ws_frame_limit(t.max_frame), name="cluster.listen",
                max_handshakes=self.cfg.max_handshakes, per_source=self.cfg.handshakes_per_source)
        except OSError as exc:
            raise StartupError(f"{self.gw.config.source}: cluster.listen {url}: cannot listen: {exc.strerror}; "
                             "free the port or change cluster.listen") from None
        self.gw.add_listener(server)
        self._server = server
        log.info("peer-link endpoint listening on %s", url, extra={"event": "cluster.listening", "url": str(url)})

    async def _keep_dialing(self, url: DialTarget, key: tuple) -> None:
        t = self.gw.config.tunnel
        last_error = [None]
        first = [True]
        label = f"{url} at {url.addresses[0][1][0]}" if url.addresses else str(url)

        def tried() -> None:  # readiness: every peer was tried once
            if first[0]:
                first[0] = False
                self._tried.add(key)
                self.gw.routes_changed()

        async def dial() -> Tunnel:
            try:
                return await self._dial(url)
            except _Self:
                log.info("cluster.peers entry %s is this member itself; not dialing it", label,
                         extra={"event": "cluster.self_peer", "url": str(url)})
                self._tried.add(key)
                raise ws.StopDialing() from None

        async def on_up(tunnel: Tunnel) -> None:
            last_error[0] = None
            tried()
            await tunnel.done

        def on_error(exc: BaseException) -> None:
            msg = str(url.error) if url.error else f"{type(exc).__name__}: {exc}"
            if msg != last_error[0]:
                log.warning("peer link to %s failed: %s", label, msg,
                            extra={"event": "cluster.dial_failed", "url": str(url), "reason": msg})
            last_error[0] = msg
            tried()

        await ws.keep_dialing(
            dial, on_up, on_error, delays=lambda: backoff(t.reconnect_min, min(t.reconnect_max, 5.0)),
            keep_going=lambda: not self.gw.draining and key in self._wanted, stable_after=10.0,
            errors=(OSError, ws.WebSocketError, ssl.SSLError, TimeoutError, ConnectionError))

    async def _dial(self, url: DialTarget) -> Tunnel:
        cfg = self.gw.config.tunnel
        if url.error:  # its name never resolved
            raise ConnectionError(url.error)

        async def to_address(_parsed):  # a dual-stack member: leave time for its second family
            return await connect_in_order(url, max(1.0, cfg.handshake_timeout / len(url.addresses)))

        async with asyncio.timeout(cfg.handshake_timeout * 2):
            tunnel = await ws.dial_ws(
                lambda: Tunnel(self, client=True, url=str(url), kind="peer"), str(url), self.client_ssl,
                handshake_timeout=cfg.handshake_timeout, max_frame_size=ws_frame_limit(cfg.max_frame),
                socket_factory=to_address if url.addresses else None)
            if tunnel is None:  # closed before the upgrade answer: TLS 1.3 refusal of our certificate
                raise ConnectionError(f"{url} closed the connection during the handshake; it most likely "
                                      "refused this member's peer-link certificate (check cluster.cert is "
                                      "signed by cluster.ca and named in the peers' cluster.peer_names)")
            try:
                await asyncio.shield(tunnel.ready)
            except ConnectionError:
                if tunnel.self_link:
                    raise _Self() from None
                raise
        return tunnel

    async def _housekeeping(self) -> None:
        """Refresh member ages on every link, expire silent members, push changes."""
        interval = self.gw.config.tunnel.ping_interval
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for link in self.links:
                self.table.refresh(link.peer_node, link.last_rx)
            gone = self.table.expire(now)
            for node in gone:
                log.info("member %s forgotten: not heard of for %gs (cluster.member_ttl)", node, self.cfg.member_ttl,
                         extra={"event": "cluster.member_expired", "member": node})
            self._push_links()
            if gone:
                self.members_changed()

    # --- TunnelOwner of the peer links (tunnel/owner.py) ----------------------------------------
    @property
    def config(self):
        return self.gw.config

    @property
    def node_id(self) -> str:
        return self.gw.node_id

    @property
    def role(self) -> str:
        return self.gw.role

    @property
    def incarnation(self) -> str:
        return self.gw.incarnation

    @property
    def budget(self):
        return self.gw.budget

    @property
    def counters(self) -> dict[str, int]:
        return self.gw.counters

    def classify(self, tunnel: Tunnel) -> None:
        """A peer link has no tenant: its certificate is a member's (screen)."""

    def screen(self, tunnel: Tunnel) -> str | None:
        return self.screen_link(tunnel)

    def connect_service_names(self, tunnel: Tunnel) -> list[str]:
        return sorted(self.gw.route_keys())  # what we can carry for a relaying member: our on-prem routes

    def hello_extra(self, tunnel: Tunnel) -> dict:
        return {"link": "peer", "advertise": self._self_url, "members": self.table.wire(time.monotonic())}

    def tunnel_ready(self, tunnel: Tunnel) -> None:
        self.gw.handshake_done(tunnel)
        refusal = self.admit_link(tunnel)
        if refusal is not None:
            tunnel.refused = True
            if tunnel.hello_sent:  # the whole reason; a close reason holds 123 bytes
                tunnel.goaway(refusal, Reason.FORBIDDEN)
            tunnel.fail(refusal, code=1008, quiet=tunnel.refusal_logged
                        or refusal.startswith("peer link to this member itself"))
            return
        if tunnel.client:
            tunnel.send_hello()  # protocol §5.2: the dialer answers after admitting the peer

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        self.gw.handshake_done(tunnel)
        self.link_closed(tunnel, reason)

    def stream_requested(self, tunnel: Tunnel, sid: int, service: str, client: str) -> None:
        tenant, _, name = service.partition("/")  # a relayed OPEN names "tenant/service" (protocol §3.2)
        self.gw.relay_requested(tunnel, sid, tenant, name, client)

    def resume_requested(self, tunnel: Tunnel, sid: int, service: str, resume: dict) -> None:
        tenant, _, name = service.partition("/")  # relayed, like OPEN (protocol §10.5)
        self.gw.relay_resume_requested(tunnel, sid, tenant, name, resume)

    def park(self, end, tunnel: Tunnel, reason: str, silent: bool) -> bool:
        return self.gw.park(end, tunnel, reason, silent)

    def stream_closed(self, tunnel: Tunnel, end, reason: str) -> None:
        self.gw.stream_closed(tunnel, end, reason)

    def goaway_received(self, tunnel: Tunnel) -> None:
        self.goaway(tunnel)
        self.gw.routes_changed()

    def services_changed(self, tunnel: Tunnel) -> None:
        """Members announce their routes in MEMBERS; SERVICES on a peer link only wakes the router."""
        self.gw.routes_changed()

    # --- links -------------------------------------------------------------------------
    def admit_link(self, tunnel: Tunnel) -> str | None:
        peer = tunnel.peer
        if peer.node_id == self.gw.node_id:
            if peer.incarnation == self.gw.incarnation:
                tunnel.self_link = True
                return "peer link to this member itself"
            return (f"duplicate node id {peer.node_id!r}: another process (incarnation {peer.incarnation}) claims "
                    "this member's gateway.node_id; give every member its own node_id")
        if peer.role != "cloud" or peer.extra.get("link") != "peer":
            return f"peer-link endpoint reached by a {peer.role} gateway {peer.node_id!r}; on-prem gateways dial tunnel.listen"
        if self.server_ssl is not None:
            refusal = self.screen_link(tunnel)
            if refusal is not None:
                return refusal
            names = cert_names(tunnel.peer_der)
            if peer.node_id not in names:  # a member's certificate is its identity (protocol §5.4)
                return (f"member at {tunnel.peer_addr} claims node id {peer.node_id!r}, which is not a name in its "
                        f"peer-link certificate ({', '.join(sorted(names)[:8])}); give it a certificate for its "
                        "node id (intercloud certs init DIR --cloud NODE_ID) or set gateway.node_id to a name in it")
        for other in self.links:
            if other.peer_node == peer.node_id and other.peer.incarnation != peer.incarnation:
                m = self.table.members.get(peer.node_id)
                if m is not None and m.incarnation == other.peer.incarnation and not other.done.done():
                    return (f"duplicate node id {peer.node_id!r}: a live member already uses it "
                            f"(incarnation {other.peer.incarnation}); give every member its own node_id")
        self.links.add(tunnel)
        tunnel.routes = frozenset(peer.services)
        now = time.monotonic()
        self.table.heard(self._entry_of(tunnel), now, direct=True)
        for entry in peer.extra.get("members", []):
            if isinstance(entry, dict) and entry.get("node_id") != peer.node_id:
                self.table.heard(entry, now, direct=False)
        log.info("peer link %s with member %s (%s) up", tunnel.label, peer.node_id, tunnel.peer_addr,
                 extra={"event": "cluster.link_up", "member": peer.node_id, "peer_addr": tunnel.peer_addr})
        self.gw.event("cluster.link_up", member=peer.node_id)
        self.gw.stats.tunnel_up(tunnel)  # the audit log's link record
        # after the caller has sent our HELLO (a dialer sends it only once admitted, protocol §5.2)
        loop = asyncio.get_running_loop()
        loop.call_soon(self._push_link, tunnel)  # the whole table now: a big HELLO left it out (protocol §5.5)
        loop.call_soon(self.members_changed)
        loop.call_soon(self.gw.routes_changed)
        return None

    def after_reload(self) -> None:
        """SIGHUP: close the peer links whose member certificate cluster.crl now revokes."""
        self.gw.warn_stale_crls("cluster.crl", self.revocations)
        self.gw.close_revoked(self.links, self.revocations, "peer link")

    def screen_link(self, tunnel: Tunnel) -> str | None:
        """peer_names, checked on the certificate alone: on cluster.listen before our HELLO (with the
        member table and every route) goes out, so a refused peer learns nothing."""
        if self.server_ssl is None:
            return None
        revoked = self.gw.refuse_revoked(tunnel, self.revocations, "peer link")  # cluster.crl
        if revoked is not None:
            return revoked
        names = cert_names(tunnel.peer_der)
        if not names & set(self.cfg.peer_names):
            return (f"peer-link certificate names {sorted(names)[:8]} are not in cluster.peer_names "
                    f"{sorted(self.cfg.peer_names)[:8]}; refused (a tenant certificate cannot join the cluster)")
        return None

    def _entry_of(self, tunnel: Tunnel) -> dict:
        peer = tunnel.peer
        return {"node_id": peer.node_id, "incarnation": peer.incarnation, "url": peer.extra.get("advertise"),
                "services": peer.services}

    def link_closed(self, tunnel: Tunnel, reason: str) -> None:
        if tunnel in self.links:
            self.links.discard(tunnel)
            log.info("peer link with member %s down: %s", tunnel.peer_node, reason,
                     extra={"event": "cluster.link_down", "member": tunnel.peer_node, "reason": reason})
            self.gw.event("cluster.link_down", member=tunnel.peer_node, reason=reason)
            self.gw.stats.tunnel_down(tunnel, reason)
            self.gw.routes_changed()

    def members_received(self, tunnel: Tunnel, members: list) -> None:
        now = time.monotonic()
        changed = False
        for entry in members:
            if isinstance(entry, dict):
                direct = entry.get("node_id") == tunnel.peer_node
                changed |= self.table.heard(entry, now, direct=direct)
                if direct:  # the peer's own route set: what it can carry for us
                    tunnel.routes = frozenset(str(s) for s in entry.get("services", ()))
        if changed:
            self.members_changed()
            self.gw.routes_changed()

    def goaway(self, tunnel: Tunnel) -> None:
        if tunnel.refused_by_peer is not None:  # a refusal, not the member leaving (protocol §9.1)
            return
        if self.table.forget(tunnel.peer_node, tunnel.peer.incarnation):
            log.info("member %s left the cluster (GOAWAY)", tunnel.peer_node,
                     extra={"event": "cluster.member_left", "member": tunnel.peer_node})
            self.members_changed()

    # --- routes ------------------------------------------------------------------------
    def local_routes_changed(self) -> None:
        services = frozenset(self.gw.route_keys())
        if self.table.set_self(self.gw.incarnation, self._self_url, services, time.monotonic()):
            self._push_links()

    def pick_link(self, route: str, exclude: set[tuple[str, str]]) -> Tunnel | None:
        """A peer link whose member routes ``route`` ("tenant/service") to its own on-prem tunnels."""
        best = None
        for link in self.links:
            if link.peer_key in exclude or link.goaway_received or route not in link.routes:
                continue
            if best is None or link.stream_count < best.stream_count:
                best = link
        return best

    # --- MEMBERS pushes ----------------------------------------------------------------
    def _push_links(self) -> None:
        frame_body = self.table.wire(time.monotonic())
        for link in self.links:
            self._push_link(link, frame_body)

    def _push_link(self, link: Tunnel, frame_body: list | None = None) -> None:
        if link not in self.links or link.ws is None:
            return
        link.send_members(frame_body if frame_body is not None else self.table.wire(time.monotonic()))

    def onprem_view(self) -> list[dict]:
        """What on-prem gateways learn: who the members are and where to dial them."""
        return [{"node_id": m.node_id, "incarnation": m.incarnation, "url": m.url}
                for m in sorted(self.table.members.values(), key=lambda m: m.node_id)]

    def members_changed(self) -> None:
        """Tell every on-prem gateway when a member joins, returns (new incarnation) or leaves."""
        view = self.onprem_view()
        key = tuple((m["node_id"], m["incarnation"], m["url"]) for m in view)
        if key == self._pushed:
            return
        self._pushed = key
        # A member that joined or came back may be a new instance at a new address under a peers name
        # (a replaced StatefulSet pod), one that left may have taken its address with it: look the names
        # up again soon rather than at the next RESOLVE_EVERY (docs/ha.md §4.1).
        self.peer_targets.look_again_soon()
        self._resolve_soon.set()
        log.info("members now: %s", ", ".join(m["node_id"] for m in view),
                 extra={"event": "cluster.members", "members": [m["node_id"] for m in view]})
        self.gw.members_changed(view)
        self._push_links()


def _key(target: DialTarget) -> tuple:
    """One dial loop per (URL, member address); the same URL listed twice is dialed once."""
    return (str(target), target.addresses)


class _Self(Exception):
    """A cluster.peers URL leads back to this member."""
