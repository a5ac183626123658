"""Cloud gateway: accepts tunnels from on-prem gateways on a TLS WebSocket listener (DESIGN §2) and,
with ``[cluster]``, joins the other members over peer links (DESIGN §3)."""

from __future__ import annotations

import asyncio
import logging
import time

from picows import WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

from ..cluster.peers import Cluster
from ..gateway import Gateway
from ..protocol.frames import HEADER_SIZE
from ..transport import tls_server
from ..transport.tls import server_context
from ..tunnel.tunnel import Tunnel

log = logging.getLogger("intercloud.cloud")
SUBPROTOCOL = "intercloud.v1"


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

    def connect_service_names(self, tunnel: Tunnel) -> list[str]:
        if tunnel.kind == "peer":  # what we can carry for a relaying member: our on-prem routes
            return sorted({s for t in self.tunnels for s in t.conn.peer.services})
        return super().connect_service_names(tunnel)

    def hello_extra(self, tunnel: Tunnel) -> dict:
        advertise = str(self.config.cluster.advertise) if self.config.cluster.advertise else None
        if tunnel.kind == "peer":
            return {"link": "peer", "advertise": advertise,
                    "members": self.cluster.table.wire(time.monotonic())}
        members = (self.cluster.onprem_view() if self.cluster else
                   [{"node_id": self.node_id, "incarnation": self.incarnation, "url": advertise}])
        return {"members": members}

    def admit(self, tunnel: Tunnel) -> str | None:
        self._handshakes.discard(tunnel)
        if tunnel.kind == "peer":
            if self.cluster is None:
                return "this cloud gateway has no [cluster]"
            return self.cluster.admit_link(tunnel)
        return super().admit(tunnel)

    def tunnel_ready(self, tunnel: Tunnel) -> None:
        super().tunnel_ready(tunnel)
        if self.cluster and tunnel.kind != "peer" and tunnel in self.tunnels:
            self.cluster.local_routes_changed()

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        self._handshakes.discard(tunnel)
        if tunnel.kind == "peer":
            if self.cluster:
                self.cluster.link_closed(tunnel, reason)
            return
        super().tunnel_closed(tunnel, reason)
        if self.cluster:
            self.cluster.local_routes_changed()

    def members_received(self, tunnel: Tunnel, members: list) -> None:
        if tunnel.kind == "peer" and self.cluster:
            self.cluster.members_received(tunnel, members)

    def goaway_received(self, tunnel: Tunnel) -> None:
        if self.cluster:
            if tunnel.kind == "peer":
                self.cluster.goaway(tunnel)
            else:
                self.cluster.local_routes_changed()
        super().goaway_received(tunnel)

    def services_changed(self, tunnel: Tunnel) -> None:
        if self.cluster and tunnel.kind != "peer":
            self.cluster.local_routes_changed()
        super().services_changed(tunnel)

    def reload_tls(self) -> None:
        cfg = self.config
        if cfg.tls.insecure:
            return
        ctx = server_context(cfg.tls.cert, cfg.tls.key, cfg.tls.ca, cfg.tls.verify_client)
        if self._tunnel_server is not None and hasattr(self._tunnel_server, "set_ssl"):
            self._tunnel_server.set_ssl(ctx)
        if self.cluster is not None:
            self.cluster.reload_tls()

    def relay_link(self, service: str, exclude: set[str]) -> Tunnel | None:
        return self.cluster.pick_link(service, exclude) if self.cluster else None

    # --- the tunnel listener -----------------------------------------------------------
    async def run_role(self) -> None:
        cfg = self.config
        url = cfg.tunnel.listen
        ssl_ctx = None
        if not cfg.tls.insecure:
            ssl_ctx = server_context(cfg.tls.cert, cfg.tls.key, cfg.tls.ca, cfg.tls.verify_client)
        cap = cfg.cluster.max_handshakes

        def factory(request):
            path = request.path.decode("latin-1").split("?", 1)[0]
            if path != url.path:
                log.warning("upgrade for path %r refused: tunnels live at %r", path, url.path,
                            extra={"event": "tunnel.refused", "reason": "wrong path"})
                return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
                    404, f"no intercloud tunnel endpoint at {path}; it is at {url.path}\n".encode()), None)
            offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
            if SUBPROTOCOL not in offered:
                log.warning("upgrade without subprotocol %s refused", SUBPROTOCOL,
                            extra={"event": "tunnel.refused", "reason": "subprotocol"})
                return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
                    400, f"this is an intercloud tunnel endpoint; speak {SUBPROTOCOL}\n".encode()), None)
            if self.draining:
                return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
                    503, b"gateway is draining\n"), None)
            if len(self._handshaking()) >= cap:  # DESIGN §3.2: cap concurrent handshakes
                return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
                    503, b"too many tunnel handshakes in progress; retry\n"), None)
            tunnel = Tunnel(self, client=False)
            self._handshakes.add(tunnel)
            resp = WSUpgradeResponse.create_101_response(extra_headers={"Sec-WebSocket-Protocol": SUBPROTOCOL})
            return WSUpgradeResponseWithListener(resp, tunnel)

        try:
            if ssl_ctx is not None:  # logs every failed TLS handshake with the peer address
                server = await tls_server.create_server(
                    factory, url.host, url.port, ssl_ctx, handshake_timeout=cfg.tunnel.handshake_timeout,
                    max_frame_size=cfg.tunnel.max_frame + HEADER_SIZE + 64)
            else:
                server = await ws_create_server(
                    factory, url.host, url.port,
                    websocket_handshake_timeout=cfg.tunnel.handshake_timeout,
                    max_frame_size=cfg.tunnel.max_frame + HEADER_SIZE + 64,
                    reuse_address=True, backlog=1024, use_aiofastnet=False,
                )
        except OSError as exc:
            raise SystemExit(f"{cfg.source}: tunnel.listen {url}: cannot listen: {exc.strerror}; "
                             "free the port or change tunnel.listen") from None
        self.listeners.append(server)
        self._tunnel_server = server
        log.info("tunnel endpoint listening on %s (%s)", url,
                 "mutual TLS" if ssl_ctx and cfg.tls.verify_client else "TLS" if ssl_ctx else "INSECURE plain ws",
                 extra={"event": "tunnel.listening", "url": str(url)})
        self.serving.set()
        if self.cluster is not None:
            await self.cluster.run()
        await asyncio.Event().wait()  # until cancelled by the gateway's drain
