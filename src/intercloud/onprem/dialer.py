"""On-prem gateway: dials ``per_member`` tunnels to each configured cloud URL, redials with
jittered exponential backoff (DESIGN §3.6), through a forward proxy when configured."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from picows import WSError, ws_connect

from ..backoff import backoff
from ..gateway import Gateway
from ..protocol.frames import HEADER_SIZE
from ..transport import proxy as proxymod
from ..transport.tls import client_context, describe_peer_cert
from ..tunnel.tunnel import Tunnel

log = logging.getLogger("intercloud.onprem")
SUBPROTOCOL = "intercloud.v1"
# A tunnel that stayed up this long resets the backoff (DESIGN §3.6).
STABLE_AFTER = 10.0


class DialError(Exception):
    """A dial failed; the message says why and what to do, and is safe to log."""


class OnpremGateway(Gateway):
    def __init__(self, config):
        super().__init__(config)
        self._ssl = None
        if not config.tls.insecure:
            self._ssl = client_context(config.tls.cert, config.tls.key, config.tls.ca)
        self._dialing: set[Tunnel] = set()

    def is_ready(self) -> bool:
        return bool(self.tunnels) and not self.draining

    def _handshaking(self):
        return list(self._dialing)

    async def run_role(self) -> None:
        self.serving.set()
        async with asyncio.TaskGroup() as tg:
            for url in self.config.tunnel.connect:
                for slot in range(self.config.tunnel.per_member):
                    tg.create_task(self._keep_dialing(url, slot))

    def _proxy_for(self, url):
        # tunnel.proxy, else HTTPS_PROXY unless proxy = "none" or NO_PROXY covers the host. A malformed
        # HTTPS_PROXY is a dial failure (logged, password redacted), not a crash of the gateway.
        try:
            p = self.config.tunnel.effective_proxy(url.host)
        except ValueError as exc:
            raise DialError(str(exc)) from None
        return None if p is None else proxymod.Proxy(p.host, p.port, p.username, p.password)

    async def _keep_dialing(self, url, slot: int) -> None:
        cfg = self.config.tunnel
        delays = backoff(cfg.reconnect_min, cfg.reconnect_max)
        last_error = None
        while not self.draining:
            started = time.monotonic()
            try:
                tunnel = await self._dial(url)
            except DialError as exc:
                msg = str(exc)
                if msg != last_error:  # one line per distinct failure, not one per retry
                    log.warning("dial %s failed: %s", url, msg,
                                extra={"event": "tunnel.dial_failed", "url": str(url), "reason": msg})
                    self._event("tunnel.dial_failed", url=str(url), reason=msg)
                last_error = msg
            else:
                last_error = None
                await tunnel.done
                if time.monotonic() - started > STABLE_AFTER:
                    delays = backoff(cfg.reconnect_min, cfg.reconnect_max)
            if self.draining:
                return
            await asyncio.sleep(next(delays))

    async def _dial(self, url) -> Tunnel:
        cfg = self.config
        proxy = self._proxy_for(url)
        server_name = cfg.tls.server_name or url.host
        factory = None
        if proxy is not None:
            async def factory(_parsed):
                try:
                    return await proxymod.open_tunnel(proxy, url.host, url.port, cfg.tunnel.handshake_timeout)
                except proxymod.ProxyError as exc:
                    raise DialError(str(exc)) from None

        def make_tunnel():
            t = Tunnel(self, client=True, url=str(url))
            self._dialing.add(t)
            return t

        kwargs = {}
        if self._ssl is not None:
            kwargs["server_hostname"] = server_name
            kwargs["ssl_handshake_timeout"] = cfg.tunnel.handshake_timeout
        try:
            async with asyncio.timeout(cfg.tunnel.handshake_timeout * 2):
                _transport, tunnel = await ws_connect(
                    make_tunnel, str(url), ssl_context=self._ssl,
                    websocket_handshake_timeout=cfg.tunnel.handshake_timeout,
                    max_frame_size=cfg.tunnel.max_frame + HEADER_SIZE + 64,
                    extra_headers={"Sec-WebSocket-Protocol": SUBPROTOCOL},
                    socket_factory=factory, use_aiofastnet=False, **kwargs)
        except DialError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise DialError(await self._explain_verify_failure(url, proxy, server_name, exc)) from None
        except ssl.SSLError as exc:
            raise DialError(f"TLS handshake with {url.host}:{url.port} failed: {exc.reason or exc}; "
                            "the cloud may have refused this gateway's client certificate "
                            "(check tls.cert is signed by the CA the cloud trusts)") from None
        except TimeoutError:
            raise DialError(f"no WebSocket handshake with {url} within "
                            f"{cfg.tunnel.handshake_timeout * 2:g}s (tunnel.handshake_timeout)") from None
        except WSError as exc:
            raise DialError(f"WebSocket upgrade at {url} refused: {exc}; check the URL path and that "
                            "it is an intercloud cloud gateway") from None
        except ConnectionRefusedError:
            raise DialError(f"{url.host}:{url.port} refused the connection; is the cloud gateway running "
                            "and tunnel.connect right?") from None
        except OSError as exc:
            raise DialError(f"cannot reach {url.host}:{url.port}: {exc.strerror or exc}") from None
        finally:
            self._dialing = {t for t in self._dialing if t.ws is None or not t.ws.is_disconnected}
        try:
            async with asyncio.timeout(cfg.tunnel.handshake_timeout):
                await asyncio.shield(tunnel.ready)
        except (TimeoutError, ConnectionError) as exc:
            tunnel.fail(f"no HELLO from the cloud within {cfg.tunnel.handshake_timeout:g}s", code=1002)
            raise DialError(f"{url}: the cloud did not complete the intercloud handshake: {exc or 'timeout'}") from None
        finally:
            self._dialing.discard(tunnel)
        return tunnel

    async def _explain_verify_failure(self, url, proxy, server_name, exc) -> str:
        """Say why the cloud certificate did not verify; name an intercepting proxy when that is why."""
        base = (f"certificate of {url.host}:{url.port} failed verification: {exc.verify_message}")
        if proxy is None:
            return (f"{base}; check that tls.ca holds the CA that signed the cloud certificate and that "
                    f"{server_name!r} is among its names (tls.server_name overrides)")
        seen = {}
        try:
            sock = await proxymod.open_tunnel(proxy, url.host, url.port, self.config.tunnel.handshake_timeout)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=server_name)
            seen = describe_peer_cert(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
            writer.close()
        except Exception:  # noqa: BLE001 - diagnosis only; the original error stands
            pass
        issuer = seen.get("issuer", "an unknown issuer")
        return (f"{base}. Through forward proxy {proxy}, the certificate presented for {url.host} is issued by "
                f"{issuer!r}, not by the cloud's CA (tls.ca): the proxy intercepts TLS (e.g. squid ssl-bump). "
                f"Mutual TLS cannot pass an intercepting proxy. Fix: make the proxy splice, not bump, "
                f"connections to {url.host}:{url.port} (squid: acl intercloud ssl::server_name {url.host}; "
                f"ssl_bump splice intercloud)")
