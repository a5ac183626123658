"""Cloud gateway: accepts tunnels from on-prem gateways on a TLS WebSocket listener (docs/architecture.md) and,
with ``[cluster]``, joins the other members over peer links (docs/ha.md)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging


from ..errors import StartupError
from ..cluster.peers import Cluster
from .tenants import match_tenant
from ..gateway import Gateway
from ..protocol.announce import ws_frame_limit
from ..protocol.frames import Reason
from ..revocation import load_revocations
from ..transport import tls_server, ws
from ..transport.tls import server_context
from ..tunnel.tunnel import Tunnel

log = logging.getLogger("intercloud.cloud")


class CloudGateway(Gateway):
    def __init__(self, config):
        super().__init__(config)
        self.cluster = Cluster(self) if config.cluster.enabled else None
        self._handshakes: set[Tunnel] = set()
        self._tunnel_server = None

    # --- hooks of the shared core --------------------------------------------------------
    def is_ready(self) -> bool:
        return super().is_ready() and (self.cluster is None or self.cluster.ready())

    def all_tunnels(self) -> list[Tunnel]:
        links = list(self.cluster.links) if self.cluster else []
        return super().all_tunnels() + links

    def _handshaking(self) -> list[Tunnel]:
        return [t for t in self._handshakes if not t.done.done()]

    def route_keys(self) -> set[str]:
        """"tenant/service" for every service some live on-prem tunnel of ours connects."""
        return {f"{t.tenant}/{s}" for t in self.tunnels if not t.goaway_received for s in t.peer.services}

    # --- ClusterHost (cluster/host.py) ---------------------------------------------------
    def members_changed(self, view: list[dict]) -> None:
        for t in self.tunnels:
            t.send_members(view)

    def watch_handshake(self, tunnel: Tunnel) -> None:
        self._handshakes.add(tunnel)

    def handshake_done(self, tunnel: Tunnel) -> None:
        self._handshakes.discard(tunnel)

    def add_listener(self, server) -> None:
        self.listeners.append(server)

    # --- tenants (issue 3) ---------------------------------------------------------------
    def classify(self, tunnel: Tunnel) -> None:
        if not self.config.tenants:
            return
        tunnel.tenant, tunnel.tenant_problem = match_tenant(self.config.tenants, tunnel.peer_der)

    def screen(self, tunnel: Tunnel) -> str | None:
        """tls.crl, on the certificate alone, before our HELLO (members, services) goes out."""
        return self.refuse_revoked(tunnel, self.revocations, "tunnel")

    def admit_tenant(self, tunnel: Tunnel, again: bool = False) -> str | None:
        """Why this on-prem tunnel is refused (tenant, services, limits), or None. ``again``: it is
        already admitted and announced new services (its own tunnel is not counted twice)."""
        subject = tunnel.peer_cert.get("subject", "?")
        if tunnel.tenant_problem:
            return f"certificate {subject!r} refused: {tunnel.tenant_problem}"
        tenant = tunnel.tenant
        peer = tunnel.peer
        allowed = {name for t, name in self.accept_services if t == tenant}
        foreign = [s for s in peer.services if s not in allowed]
        if foreign:
            return (f"on-prem gateway {peer.node_id} (tenant {tenant!r}, certificate {subject!r}) offers "
                    f"{', '.join(foreign[:5])}{f' and {len(foreign) - 5} more' if len(foreign) > 5 else ''}, which tenant {tenant!r} does not have here (its services: "
                    f"{', '.join(sorted(allowed)[:20]) or 'none'}); remove them from the on-prem config or add them "
                    "to the tenant's cloud services")
        spec = self._tenant(tenant)
        if spec is not None and spec.max_tunnels is not None:
            have = sum(1 for t in self.tunnels if t.tenant == tenant and t is not tunnel)
            if have >= spec.max_tunnels:
                return f"tenant {tenant!r} already holds {have} tunnels (its max_tunnels is {spec.max_tunnels})"
        return None

    def after_reload(self) -> None:
        """SIGHUP: the PROXY protocol settings go onto the tunnel listener; tunnels and peer links whose
        certificate a CRL now revokes close (tls.crl, cluster.crl), and so do tunnels whose certificate
        no longer maps to the same single tenant (issue 4)."""
        self._proxy_settings()
        super().after_reload()
        if self.cluster is not None:
            self.cluster.after_reload()
        if not self.config.tenants and all(t.tenant == "default" for t in self.tunnels):
            return
        for t in list(self.tunnels):
            before = t.tenant
            if self.config.tenants:
                tenant, problem = match_tenant(self.config.tenants, t.peer_der)
            else:
                tenant, problem = "default", None
            if t.close_reason:  # closed just now: revoked
                continue
            if problem or tenant != before:
                why = problem or f"it now maps to tenant {tenant!r}, not {before!r}"
                log.warning("tunnel %s from %s closed after reload: certificate %r: %s", t.id, t.peer_node,
                            t.peer_cert.get("subject"), why,
                            extra={"event": "tenant.revoked", "tunnel": t.id, "peer_node": t.peer_node,
                                   "subject": t.peer_cert.get("subject"), "reason": why})
                t.goaway(f"after a configuration reload: {why}", Reason.FORBIDDEN)
                t.fail(f"certificate no longer maps to tenant {before!r}: {why}", code=1008)

    def _proxy_settings(self) -> None:
        """tunnel.accept_proxy_protocol / trusted_proxies onto the tunnel listener (start and SIGHUP)."""
        server, t = self._tunnel_server, self.config.tunnel
        if server is None or not hasattr(server, "proxies"):
            return
        server.proxies = [ipaddress.ip_network(n) for n in t.trusted_proxies] if t.accept_proxy_protocol else None
        server.on_proxy_refused = lambda peer, why, rule: self.stats.refused(
            "proxy_protocol", why, client=peer, rule=f"tunnel.{rule}", log=False)

    def _tenant(self, name: str):
        return next((t for t in self.config.tenants if t.name == name), None)

    def stream_limit(self, tenant: str) -> str | None:
        spec = self._tenant(tenant)
        if spec is None or spec.max_streams is None:
            return None
        have = self.tenant_streams.get(tenant, 0)
        if have >= spec.max_streams:
            return f"tenant {tenant!r} has {have} streams open, its max_streams (tenant.max_streams); refused"
        return None

    def hello_extra(self, tunnel: Tunnel) -> dict:
        advertise = str(self.config.cluster.advertise) if self.config.cluster.advertise else None
        members = (self.cluster.onprem_view() if self.cluster else
                   [{"node_id": self.node_id, "incarnation": self.incarnation, "url": advertise}])
        return {"members": members}

    def admit(self, tunnel: Tunnel) -> str | None:
        self._handshakes.discard(tunnel)
        # tls.crl again: screen checked it at the handshake, but a SIGHUP may have loaded a new CRL since
        # (after_reload closes only admitted tunnels); refused and logged once, in refuse_revoked
        revoked = self.refuse_revoked(tunnel, self.revocations, "tunnel")
        if revoked is not None:
            return revoked
        # the role, then the node id against the certificate (protocol §5.4), then tenant and services
        refusal = super().admit(tunnel)
        tenant_refusal = None if refusal is not None else self.admit_tenant(tunnel)
        refusal = refusal or tenant_refusal
        if refusal is not None:
            tunnel.refusal_logged = True
            log.warning("tunnel from %s refused: %s", tunnel.peer_addr, refusal,
                        extra={"event": "tenant.refused", "peer_addr": tunnel.peer_addr, "reason": refusal,
                               "peer_node": tunnel.peer_node, "subject": tunnel.peer_cert.get("subject"),
                               "tenant": tunnel.tenant})
            if tenant_refusal is not None and self.stats.audit is not None:  # logged above: audit record only
                self.stats.audit.refused("tenant", refusal, client=tunnel.peer_addr, tenant=tunnel.tenant,
                                         peer=tunnel.peer_node)
            elif tenant_refusal is None:  # role or node id against the certificate: counted and audited too
                self.stats.refused("identity", refusal, client=tunnel.peer_addr, tenant=tunnel.tenant,
                                   peer=tunnel.peer_node, rule="node_id", log=False)
        return refusal

    def tunnel_ready(self, tunnel: Tunnel) -> None:
        super().tunnel_ready(tunnel)
        if self.cluster and tunnel in self.tunnels:
            self.cluster.local_routes_changed()
            tunnel.send_members(self.cluster.onprem_view())  # changed since our HELLO, or left out of it (§5.5)

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        self._handshakes.discard(tunnel)
        super().tunnel_closed(tunnel, reason)
        if self.cluster:
            self.cluster.local_routes_changed()

    def goaway_received(self, tunnel: Tunnel) -> None:
        if self.cluster:
            self.cluster.local_routes_changed()
        super().goaway_received(tunnel)

    def services_changed(self, tunnel: Tunnel) -> None:
        refusal = self.admit_tenant(tunnel, again=True)  # SERVICES passes the same admission as HELLO (issue 12)
        if refusal is not None:
            log.warning("tunnel %s from %s closed: its SERVICES %s", tunnel.id, tunnel.peer_addr, refusal,
                        extra={"event": "tenant.refused", "peer_addr": tunnel.peer_addr, "reason": refusal,
                               "tenant": tunnel.tenant})
            if self.stats.audit is not None:
                self.stats.audit.refused("tenant", f"SERVICES refused: {refusal}", client=tunnel.peer_addr,
                                         tenant=tunnel.tenant, peer=tunnel.peer_node)
            tunnel.goaway(refusal, Reason.FORBIDDEN)
            tunnel.fail(f"SERVICES refused: {refusal}", code=1008, quiet=True)
            return
        if self.cluster:
            self.cluster.local_routes_changed()
        super().services_changed(tunnel)

    def load_tls(self, config):
        """(tunnel.listen context, cluster contexts or None, tls.crl); in a worker thread on SIGHUP
        (Gateway.load_tls)."""
        if config.tls.insecure:
            return None
        ctx = server_context(config.tls.cert, config.tls.key, config.tls.ca, config.tls.verify_client)
        return (ctx, self.cluster.load_tls(config) if self.cluster is not None else None,
                load_revocations(config.tls.crl))

    def apply_tls(self, contexts) -> None:
        if contexts is None:
            return
        ctx, peer_contexts, self.revocations = contexts
        if self._tunnel_server is not None and hasattr(self._tunnel_server, "set_ssl"):
            self._tunnel_server.set_ssl(ctx)
        if self.cluster is not None and peer_contexts is not None:
            self.cluster.apply_tls(peer_contexts)

    def relay_link(self, route: str, exclude: set[tuple[str, str]]) -> Tunnel | None:
        return self.cluster.pick_link(route, exclude) if self.cluster else None

    # --- the tunnel listener -----------------------------------------------------------
    async def run_role(self) -> None:
        cfg = self.config
        url = cfg.tunnel.listen
        ssl_ctx = None
        if not cfg.tls.insecure:
            ssl_ctx = server_context(cfg.tls.cert, cfg.tls.key, cfg.tls.ca, cfg.tls.verify_client)
        cap = cfg.cluster.max_handshakes

        def refused(status: int, peer: str | None, source: str | None, why: str) -> None:
            # rate-limited: anyone can send upgrades (issue 12)
            tls_server.refuse_logged("tunnel.refused", source, "tunnel.listen: upgrade from %s refused (HTTP %d): %s",
                                     peer or "?", status, why, reason=why, peer_addr=peer, listener="tunnel.listen")

        def accept(peer: str | None, source: str | None):
            if self.draining:
                refused(503, peer, source, "this gateway is draining")
                return ws.Refusal(503, "gateway is draining")
            # The listener caps handshakes from accept on (tls_server.Slots); this count only matters
            # where it could not (tls_server fell back to picows' own server).
            if peer is None and len(self._handshaking()) >= cap:
                refused(503, peer, source, f"{cap} handshakes in progress (cluster.max_handshakes)")
                return ws.Refusal(503, "too many tunnel handshakes in progress; retry")
            tunnel = Tunnel(self, client=False)
            if peer is not None:  # the on-prem gateway's real address (after a PROXY header), not the balancer's
                tunnel.peer_addr = peer
            self._handshakes.add(tunnel)
            return tunnel

        factory = ws.upgrade_policy(url.path, accept, refused)
        try:  # the listener logs every failed TLS handshake with the peer address, and caps handshakes
            server = await tls_server.create_server(
                factory, url.host, url.port, ssl_ctx, handshake_timeout=cfg.tunnel.handshake_timeout,
                max_frame_size=ws_frame_limit(cfg.tunnel.max_frame), name="tunnel.listen",
                max_handshakes=cap, per_source=cfg.cluster.handshakes_per_source)
        except OSError as exc:
            raise StartupError(f"{cfg.source}: tunnel.listen {url}: cannot listen: {exc.strerror}; "
                             "free the port or change tunnel.listen") from None
        self.listeners.append(server)
        self._tunnel_server = server
        self._proxy_settings()
        log.info("tunnel endpoint listening on %s (%s)", url,
                 "mutual TLS" if ssl_ctx and cfg.tls.verify_client else "TLS" if ssl_ctx else "INSECURE plain ws",
                 extra={"event": "tunnel.listening", "url": str(url)})
        self.serving.set()
        if self.cluster is not None:
            await self.cluster.run()
        await asyncio.Event().wait()  # until cancelled by the gateway's drain
