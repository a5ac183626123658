"""On-prem gateway: dials ``per_member`` tunnels to each configured cloud URL, redials with
jittered exponential backoff (docs/ha.md §3), through a forward proxy when configured."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl


from ..backoff import backoff
from ..gateway import Gateway
from ..protocol.announce import ws_frame_limit
from ..revocation import load_revocations
from ..transport import proxy as proxymod
from ..transport import ws
from ..transport.targets import ConnectError, DialTarget, DialTargets, connect_in_order
from ..transport.tls import client_context, describe_peer_cert
from ..tunnel.tunnel import Tunnel

log = logging.getLogger("intercloud.onprem")
# A tunnel that stayed up this long resets the backoff (docs/ha.md §3).
STABLE_AFTER = 10.0
# Waiting workers wake within this many seconds of hearing that a member joined or came back.
WAKE_JITTER = 0.5


class DialError(Exception):
    """A dial failed; the message says why and what to do, and is safe to log."""


class OnpremGateway(Gateway):
    def __init__(self, config):
        super().__init__(config)
        self._ssl = None
        if not config.tls.insecure:
            self._ssl = client_context(config.tls.cert, config.tls.key, config.tls.ca)
        self._dialing: set[Tunnel] = set()
        self._workers: dict[int, asyncio.Task] = {}
        self._targets: dict[int, str | None] = {}  # worker -> member it is dialing or holding
        self._wake = asyncio.Event()
        self._member_key: frozenset = frozenset()
        self._warned_urls: set[str] = set()
        self._dial_targets = DialTargets(config.tunnel.connect, by_name=self._dial_by_name)
        self._reloaded = asyncio.Event()

    def is_ready(self) -> bool:
        return bool(self.tunnels) and not self.draining

    def load_tls(self, config):
        """(the dialers' context, tls.crl); in a worker thread on SIGHUP (Gateway.load_tls)."""
        tls = config.tls
        return None if tls.insecure else (client_context(tls.cert, tls.key, tls.ca), load_revocations(tls.crl))

    def apply_tls(self, contexts) -> None:
        if contexts is not None:
            # the next dial uses them; live tunnels keep their sessions unless a CRL now revokes the
            # cloud's certificate (after_reload)
            self._ssl, self.revocations = contexts

    def _handshaking(self):
        return list(self._dialing)

    # --- members and coverage (docs/ha.md §3) ---------------------------------------
    def known_members(self) -> dict[str, dict]:
        """Members vouched for by a live member (their lists) plus the members we are connected to."""
        known: dict[str, dict] = {}
        for t in self.tunnels:
            for m in t.members:
                if isinstance(m, dict) and isinstance(m.get("node_id"), str):
                    known.setdefault(m["node_id"], m)
            known.setdefault(t.peer_node, {"node_id": t.peer_node, "incarnation": t.peer.incarnation})
        return known

    def coverage(self, exclude: Tunnel | None = None) -> dict[str, int]:
        cov: dict[str, int] = {}
        for t in self.tunnels:
            if t is not exclude and not t.goaway_received:
                cov[t.peer_node] = cov.get(t.peer_node, 0) + 1
        return cov

    def _wanted_workers(self) -> int:
        per = self.config.tunnel.per_member
        return per * max(len(self.known_members()), len(self._dial_targets.targets))

    def dial_targets_view(self) -> list[dict]:
        return self._dial_targets.view()

    def _dial_by_name(self, host: str) -> bool:
        """Through a forward proxy the proxy resolves the name (the on-prem network often cannot)."""
        try:
            return self.config.tunnel.effective_proxy(host) is not None
        except ValueError:  # a malformed HTTPS_PROXY: the dial reports it
            return True

    def _allowed(self, url: str | None) -> bool:
        if not url:
            return False
        from urllib.parse import urlsplit

        host = (urlsplit(url).hostname or "").lower()
        allow = self.config.tunnel.allow_members or [u.host for u in self.config.tunnel.connect]
        return host in {a.lower() for a in allow}

    def _choose_target(self, worker: int):
        """Where this worker dials next: an under-covered member's own URL when it advertises one we
        may dial, else the configured URLs in turn (a load balancer lands wherever it likes)."""
        per = self.config.tunnel.per_member
        cov = self.coverage()
        for node, m in sorted(self.known_members().items()):
            need = per - cov.get(node, 0) - sum(1 for w in self._targets.values() if w == node)
            if need > 0 and self._allowed(m.get("url")):
                return DialTarget(m["url"]), node
            if need > 0 and m.get("url") and node not in self._warned_urls:
                self._warned_urls.add(node)
                log.warning("member %s advertises %s, whose host is not in tunnel.allow_members; not dialing it "
                            "directly", node, m["url"], extra={"event": "tunnel.member_not_allowed",
                                                               "member": node, "url": m["url"]})
        targets = self._dial_targets.targets  # a name with several addresses is several (transport/targets.py)
        # Worker i dials target i mod count. When the addresses behind a name change (a member replaced
        # at a new address), that pairing shifts: the workers that lost their member can all map to
        # targets whose members are covered already, be refused there for ever, while nobody dials the
        # new address. So start at the worker's own target but pass over those whose own address is
        # that of a live tunnel to a member that has all its tunnels (docs/ha.md §3.3).
        full = {t.peer_addr.rsplit(":", 1)[0].strip("[]") for t in self.tunnels
                if not t.goaway_received and cov.get(t.peer_node, 0) >= per}
        for k in range(len(targets)):
            target = targets[(worker + k) % len(targets)]
            if (target.addresses[0][1][0] if target.addresses else target.host) not in full:
                return target, None
        return targets[worker % len(targets)], None

    def admit(self, tunnel: Tunnel) -> str | None:
        # tls.crl first: before our HELLO (the services we connect) goes out to a revoked cloud
        refusal = self.refuse_revoked(tunnel, self.revocations, "cloud gateway") or super().admit(tunnel)
        if refusal:
            return refusal
        peer = tunnel.peer
        tunnel.members = [m for m in peer.extra.get("members", []) if isinstance(m, dict)]
        if tunnel.expected_node and peer.node_id != tunnel.expected_node:
            return (f"dialed member {tunnel.expected_node} at {tunnel.url} but reached {peer.node_id}; "
                    "check the member's cluster.advertise")
        if self.coverage().get(peer.node_id, 0) >= self.config.tunnel.per_member:
            return f"landed on member {peer.node_id}, which already has its {self.config.tunnel.per_member} tunnels"
        return None

    def tunnel_ready(self, tunnel: Tunnel) -> None:
        super().tunnel_ready(tunnel)
        self._members_maybe_changed()

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        super().tunnel_closed(tunnel, reason)
        self._members_maybe_changed()

    def members_received(self, tunnel: Tunnel, members: list) -> None:
        tunnel.members = [m for m in members if isinstance(m, dict)]
        self._members_maybe_changed()

    def _members_maybe_changed(self) -> None:
        key = frozenset((n, m.get("incarnation")) for n, m in self.known_members().items())
        if key == self._member_key:
            return
        new = {n for n, _ in key} - {n for n, _ in self._member_key}
        returned = {n for n, inc in key} & {n for n, _ in self._member_key} and key - self._member_key
        dropped = (self._member_key - key) if key else frozenset()
        self._member_key = key
        # A member that joined or came back may sit at a new address under the tunnel.connect name, one
        # that left may have taken its address with it: look the names up again soon (docs/ha.md §3.2.1).
        if not self.draining:
            self._dial_targets.look_again_soon()
            self._reloaded.set()
        # The cloud's member table dropped an instance (GOAWAY, member_ttl): streams parked toward it
        # cannot come back (protocol §10.4).
        for node, inc in dropped & {s.far for s in self.parking.parked if s.far is not None}:
            self.parking.member_gone(node, inc)
        if new or returned:
            # A member joined or came back: wake every waiting worker (after a short jitter, so a
            # fleet of on-prem gateways does not arrive as one handshake storm).
            self._wake.set()
            self._wake = asyncio.Event()
        self._spawn_workers()

    def _spawn_workers(self) -> None:
        if self.tg is None or self.draining:
            return
        while len(self._workers) < self._wanted_workers():
            i = 0
            while i in self._workers:
                i += 1
            self._workers[i] = self.tg.create_task(self._worker(i))

    async def run_role(self) -> None:
        self.serving.set()
        self._spawn_workers()
        await self._keep_resolving()

    async def _keep_resolving(self) -> None:
        """Look the tunnel.connect names up again when due, even while every tunnel is up, so that a
        member added to a name gets its tunnels (transport/targets.py); at once after a SIGHUP."""
        while True:
            await self._refresh_targets()
            self._reloaded.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that arrives
            # just as the event is set, and the drain both closes tunnels (a member change sets it) and
            # cancels this task in the same turn of the loop: the process would never exit.
            try:
                async with asyncio.timeout(max(0.1, self._dial_targets.wait_time())):
                    await self._reloaded.wait()
            except TimeoutError:
                pass

    async def _refresh_targets(self) -> None:
        """Apply a changed tunnel.connect (SIGHUP) and look its names up again when due."""
        self._dial_targets.use(self.config.tunnel.connect)
        if self._dial_targets.due() and await self._dial_targets.refresh(self.config.tunnel.handshake_timeout):
            self._spawn_workers()  # the names now resolve to more (or fewer) members

    async def reload(self) -> None:
        await super().reload()
        self._reloaded.set()  # tunnel.connect may have changed

    def _proxy_for(self, url):
        # tunnel.proxy, else HTTPS_PROXY unless proxy = "none" or NO_PROXY covers the host. A malformed
        # HTTPS_PROXY is a dial failure (logged, password redacted), not a crash of the gateway.
        try:
            p = self.config.tunnel.effective_proxy(url.host)
        except ValueError as exc:
            raise DialError(str(exc)) from None
        return None if p is None else proxymod.Proxy(p.host, p.port, p.username, p.password)

    async def _worker(self, index: int) -> None:
        """Keep one tunnel up; retire when there are more workers than tunnels wanted."""
        cfg = self.config.tunnel
        last_error = [None]

        async def dial() -> tuple[DialTarget, Tunnel]:
            await self._refresh_targets()  # the first dial waits for the first lookup
            url, node = self._choose_target(index)
            self._targets[index] = node
            try:
                return url, await self._dial(url, node)
            except DialError as exc:
                exc.url = url
                raise
            finally:
                self._targets.pop(index, None)  # a live tunnel counts in coverage() by itself

        def on_error(exc: BaseException) -> None:
            msg, url = str(exc), exc.url
            self.count("dial_failures", url=str(url))
            if msg != last_error[0]:  # one line per distinct failure, not one per retry
                level = logging.INFO if "already has its" in msg else logging.WARNING
                log.log(level, "dial %s failed: %s", url, msg,
                        extra={"event": "tunnel.dial_failed", "url": str(url), "reason": msg})
                self.event("tunnel.dial_failed", url=str(url), reason=msg)
            last_error[0] = msg

        async def on_up(up: tuple[DialTarget, Tunnel]) -> bool:
            url, tunnel = up
            self.count("reconnects" if self.counters["tunnels_opened"] > 1 else "connects", url=str(url))
            await tunnel.done
            if not tunnel.refused_by_peer:
                last_error[0] = None
                return True
            msg = f"{tunnel.peer_node} refused this gateway: {tunnel.refused_by_peer}"  # the cloud says why
            if msg != last_error[0]:
                log.error("dial %s failed: %s", url, msg,
                          extra={"event": "tunnel.dial_failed", "url": str(url), "reason": msg})
                self.event("tunnel.dial_failed", url=str(url), reason=msg)
            last_error[0] = msg
            return False

        async def wait(delay: float) -> bool:
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                return False
            # woken: a member joined or returned; dial it soon, with jitter, from a fresh backoff
            await asyncio.sleep(random.uniform(0, WAKE_JITTER))
            return True

        try:
            await ws.keep_dialing(
                dial, on_up, on_error, delays=lambda: backoff(cfg.reconnect_min, cfg.reconnect_max),
                keep_going=lambda: not self.draining and index < self._wanted_workers(),
                stable_after=STABLE_AFTER, wait=wait, errors=(DialError,))
        finally:
            self._workers.pop(index, None)

    async def _dial(self, url: DialTarget, expected_node: str | None = None) -> Tunnel:
        cfg = self.config
        if url.error:
            raise DialError(url.error)  # its name never resolved
        proxy = self._proxy_for(url)
        server_name = cfg.tls.server_name or url.host
        async def through_proxy(_parsed):
            try:
                return await proxymod.open_tunnel(proxy, url.host, url.port, cfg.tunnel.handshake_timeout)
            except proxymod.ProxyError as exc:
                raise DialError(str(exc)) from None

        where = url.where  # host:port, and the address when the host is a name (error messages)
        skipped: list[str] = []  # this member's own address failed and another one answered

        async def to_addresses(_parsed):  # this member's address first, then the name's other answers
            nonlocal where
            attempt = max(1.0, cfg.tunnel.handshake_timeout / len(url.addresses))
            sock = await connect_in_order(url, attempt, skipped)
            where = url.at(sock.getpeername()[0])
            return sock

        factory = through_proxy if proxy is not None else to_addresses if url.addresses else None

        def make_tunnel():
            t = Tunnel(self, client=True, url=str(url), expected_node=expected_node)
            self._dialing.add(t)
            return t

        kwargs = {}
        if self._ssl is not None:
            kwargs["server_hostname"] = server_name
            kwargs["ssl_handshake_timeout"] = cfg.tunnel.handshake_timeout
        try:
            async with asyncio.timeout(cfg.tunnel.handshake_timeout * 2):
                tunnel = await ws.dial_ws(
                    make_tunnel, str(url), self._ssl, handshake_timeout=cfg.tunnel.handshake_timeout,
                    max_frame_size=ws_frame_limit(cfg.tunnel.max_frame), socket_factory=factory, **kwargs)
        except DialError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise DialError(await self._explain_verify_failure(url, proxy, server_name, exc)) from None
        except ssl.SSLError as exc:
            raise DialError(f"TLS handshake with {where} failed: {exc.reason or exc}; "
                            "the cloud may have refused this gateway's client certificate "
                            "(check tls.cert is signed by the CA the cloud trusts)") from None
        except TimeoutError:
            raise DialError(f"no WebSocket handshake with {url} within "
                            f"{cfg.tunnel.handshake_timeout * 2:g}s (tunnel.handshake_timeout)") from None
        except ws.WebSocketError as exc:
            raise DialError(f"WebSocket upgrade at {url} refused: {exc}; check the URL path and that "
                            "it is an intercloud cloud gateway") from None
        except ConnectError as exc:  # every address of the name failed; the message names each
            raise DialError(f"{exc}; is the cloud gateway running and tunnel.connect right?") from None
        except ConnectionRefusedError:
            raise DialError(f"{where} refused the connection; is the cloud gateway running "
                            "and tunnel.connect right?") from None
        except OSError as exc:
            raise DialError(f"cannot reach {where}: {exc.strerror or exc}") from None
        finally:
            self._dialing = {t for t in self._dialing if t.ws is None or not t.ws.is_disconnected}
        if tunnel is None:
            # picows returns no listener when the connection closes before the upgrade answer. With
            # TLS 1.3 that is how the cloud refuses a client certificate: its alert comes after our
            # side of the handshake has completed, and picows drops the error.
            raise DialError(f"TLS handshake with {where} failed: the cloud closed the connection "
                            "before answering the WebSocket upgrade; it most likely refused this gateway's "
                            "client certificate (check tls.cert is signed by the CA the cloud trusts, "
                            "has not expired and allows clientAuth)")
        try:
            async with asyncio.timeout(cfg.tunnel.handshake_timeout):
                await asyncio.shield(tunnel.ready)
        except (TimeoutError, ConnectionError) as exc:
            if tunnel.refused:
                why = f" (after {'; '.join(skipped)}, the name's next address answered)" if skipped else ""
                raise DialError(tunnel.close_reason + why) from None
            tunnel.fail(f"no HELLO from the cloud within {cfg.tunnel.handshake_timeout:g}s", code=1002)
            raise DialError(f"{url}: the cloud did not complete the intercloud handshake: {exc or 'timeout'}") from None
        finally:
            self._dialing.discard(tunnel)
        return tunnel

    async def _explain_verify_failure(self, url, proxy, server_name, exc) -> str:
        """Say why the cloud certificate did not verify; name an intercepting proxy when that is why."""
        base = f"certificate of {url.host}:{url.port} failed verification: {(exc.verify_message or '').rstrip('.')}"
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
