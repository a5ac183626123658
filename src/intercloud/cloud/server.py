"""Cloud gateway: a TLS WebSocket listener that accepts tunnels (DESIGN §2)."""

from __future__ import annotations

import asyncio
import logging

from picows import WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

from ..gateway import Gateway
from ..protocol.frames import HEADER_SIZE
from ..transport.tls import server_context
from ..tunnel.tunnel import Tunnel

log = logging.getLogger("intercloud.cloud")
SUBPROTOCOL = "intercloud.v1"


class CloudGateway(Gateway):
    async def run_role(self) -> None:
        cfg = self.config
        url = cfg.tunnel.listen
        ssl_ctx = None
        if not cfg.tls.insecure:
            ssl_ctx = server_context(cfg.tls.cert, cfg.tls.key, cfg.tls.ca, cfg.tls.verify_client)

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
            resp = WSUpgradeResponse.create_101_response(extra_headers={"Sec-WebSocket-Protocol": SUBPROTOCOL})
            return WSUpgradeResponseWithListener(resp, Tunnel(self, client=False))

        try:
            server = await ws_create_server(
                factory, url.host, url.port, ssl=ssl_ctx,
                websocket_handshake_timeout=cfg.tunnel.handshake_timeout,
                max_frame_size=cfg.tunnel.max_frame + HEADER_SIZE + 64,
                reuse_address=True, backlog=1024, use_aiofastnet=False,
                **({"ssl_handshake_timeout": cfg.tunnel.handshake_timeout} if ssl_ctx else {}),
            )
        except OSError as exc:
            raise SystemExit(f"{cfg.source}: tunnel.listen {url}: cannot listen: {exc.strerror}; "
                             "free the port or change tunnel.listen") from None
        self.listeners.append(server)
        log.info("tunnel endpoint listening on %s (%s)", url,
                 "mutual TLS" if ssl_ctx and cfg.tls.verify_client else "TLS" if ssl_ctx else "INSECURE plain ws",
                 extra={"event": "tunnel.listening", "url": str(url)})
        self.serving.set()
        await asyncio.Event().wait()  # until cancelled by the gateway's drain
