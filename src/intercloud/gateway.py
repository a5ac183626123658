"""The gateway core shared by both roles: services, routing of streams onto tunnels, liveness,
drain. The roles add how tunnels come to exist: ``cloud.server`` accepts them, ``onprem.dialer``
dials them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import os
import signal
import threading
import time

from cryptography import x509

from .admission import gates_for
from .errors import StartupError
from .resume import Parking
from .revocation import Revocations, describe, load_revocations, warn_stale
from .router import Router
from .stats import GatewayStats
from .streams import DEFAULT_TENANT, StreamDispatch
from .config import Config
from .protocol import peer_input
from .protocol.frames import Reason
from .transport.tls import certificate_names
from .tunnel.budget import BufferBudget
from .tunnel.owner import StreamEnd
from .transport.proxy_header import ProxyHeaderReader
from .tunnel.stream import LocalStream
from .tunnel.tunnel import Tunnel

log = logging.getLogger("intercloud.gateway")
#: How often the gateway looks for CRLs that have gone past their nextUpdate while it runs.
CRL_WATCH_EVERY = 60.0
tlog = logging.getLogger("intercloud.tunnel")

# On shutdown, how long closing tunnels may take to flush their queued frames.
_FLUSH_GRACE = 5.0


class Gateway:
    def __init__(self, config: Config):
        self.config = config
        self.role = config.gateway.role
        self.node_id = config.gateway.node_id
        self.incarnation = secrets.token_hex(8)
        self.tunnels: set[Tunnel] = set()  # HELLO exchanged, not closed
        self.budget = BufferBudget(config.gateway.max_buffered)  # protocol §6.4, shared by all tunnels
        # services are keyed by (tenant, name): two tenants may both have a "serviceA" (issue 3)
        self.accept_services = {svc_key(s): s for s in config.services if s.accept}
        self.connect_services = {svc_key(s): s for s in config.services if s.connect}
        self.gates = gates_for(config.services)  # allow/deny, max_connections, max_rate per service
        self.listeners: list[asyncio.AbstractServer] = []
        self.service_listeners: dict[str, asyncio.AbstractServer] = {}
        self.tg: asyncio.TaskGroup | None = None
        self.stopping = asyncio.Event()
        self.draining = False
        self.serving = asyncio.Event()  # listeners bound (readiness)
        self.router = Router()
        self.stats = GatewayStats()
        self.dispatch = StreamDispatch(self, self.stats)  # what happens to each new stream
        self.parking = Parking(self, self.stats)  # resumable and parked streams (protocol §10)
        self.started = time.time()
        # SIGHUP: the reload in progress, whether another SIGHUP came meanwhile, and the thread that
        # reads the files of the last one (it may outlive its reload, stuck on a hung file system)
        self._reload_task: asyncio.Task | None = None
        self._reload_again = False
        self._reload_thread: threading.Thread | None = None
        self._reload_thread_since = 0.0
        self._reload_state = ""  # for the failure message: how much of the reload was applied
        # [tls] crl: checked on every tunnel handshake (cloud: on-prem certificates; on-prem: the cloud's)
        self.revocations = Revocations() if config.tls.insecure else load_revocations(config.tls.crl)
        self._crl_warned: set = set()  # stale CRLs already said so (revocation.warn_stale)
        self.warn_stale_crls("tls.crl", self.revocations)

    # --- overridable per role ----------------------------------------------------------
    def connect_service_names(self, tunnel: Tunnel) -> list[str]:
        return sorted(name for tenant, name in self.connect_services if tenant == tunnel.tenant)

    def stream_limit(self, tenant: str) -> str | None:
        """Why a new stream of ``tenant`` must be refused now, or None (cloud: per-tenant limits)."""
        return None

    def hello_extra(self, tunnel: Tunnel) -> dict:
        return {}

    def members_received(self, tunnel: Tunnel, members: list) -> None:
        pass

    def classify(self, tunnel: Tunnel) -> None:
        """Decide what a new tunnel is (cloud: its tenant, from the certificate) before HELLO goes out."""

    def screen(self, tunnel: Tunnel) -> str | None:
        """A reason to refuse an accepted tunnel before our HELLO goes out (its certificate only)."""
        return None

    def admit(self, tunnel: Tunnel) -> str | None:
        """A reason to refuse a tunnel whose HELLO just arrived, or None to admit it."""
        peer = tunnel.peer
        if peer.role == self.role:
            return (f"peer {peer.node_id} is a {peer.role} gateway like this one; "
                    "a tunnel joins a cloud and an on-prem gateway")
        return identity_refusal(tunnel)

    def route_keys(self) -> set[str]:
        return set()

    def relay_link(self, route: str, exclude: set[tuple[str, str]]) -> Tunnel | None:
        """A peer link to a member that can carry ``service`` (cloud members only)."""
        return None

    def goaway_received(self, tunnel: Tunnel) -> None:
        self.routes_changed()

    def services_changed(self, tunnel: Tunnel) -> None:
        self.routes_changed()

    def load_tls(self, config: Config) -> object:
        """Build the TLS contexts that ``config`` names and return them for apply_tls. On SIGHUP this
        runs in a worker thread, because it reads files and a read may block (a hung network file
        system): it must not touch the event loop or the gateway's state."""
        return None

    def apply_tls(self, contexts: object) -> None:
        """On the loop: swap in the contexts from load_tls; new handshakes use them."""

    def reload_tls(self) -> None:
        """Rebuild TLS contexts from the current config, on the loop (tools and tests; SIGHUP splits it)."""
        self.apply_tls(self.load_tls(self.config))

    def after_reload(self) -> None:
        """Re-check live tunnels against the reloaded config (cloud: tenants; both: tls.crl)."""
        self.warn_stale_crls("tls.crl", self.revocations)
        self.close_revoked(self.tunnels, self.revocations, "tunnel")

    # --- certificate revocation ([tls] crl, [cluster] crl; revocation.py) -----------------
    def crl_sets(self) -> list[tuple[str, Revocations]]:
        """(config key, its CRLs) for every CRL set in force: tls.crl, and cluster.crl on a cluster member."""
        sets = [("tls.crl", self.revocations)]
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            sets.append(("cluster.crl", cluster.revocations))
        return sets

    def warn_stale_crls(self, key: str, revocations: Revocations) -> None:
        """At start-up and on reload: one WARNING per stale CRL of ``key``, said again each time; the
        watch (_crl_watch) then says only the ones that go stale later."""
        self._crl_warned = {w for w in self._crl_warned if w[0] != key}
        warn_stale(revocations, key, warned=self._crl_warned)

    def crl_view(self) -> list[dict]:
        """/api/status ``crl``: every loaded CRL, its dates and whether it is stale."""
        return [entry for key, revs in self.crl_sets() for entry in describe(revs, key)]

    async def _crl_watch(self, every: float = CRL_WATCH_EVERY) -> None:
        """A CRL that passes its nextUpdate while the gateway runs is said once, when it happens, not
        only at the next reload (the renewal job that should have replaced it has failed)."""
        while True:
            await asyncio.sleep(every)
            for key, revs in self.crl_sets():
                warn_stale(revs, key, warned=self._crl_warned)

    def refuse_revoked(self, tunnel: Tunnel, revocations: Revocations, what: str) -> str | None:
        """Why ``tunnel``'s peer certificate is refused as revoked, or None. Logged and counted here, once
        (GatewayStats.refused, kind "revoked"): the caller closes the tunnel quietly."""
        hit = revocations.check(tunnel.peer_der)
        if hit is None:
            return None
        why = f"{what} {'dialed at' if tunnel.client else 'from'} {tunnel.peer_addr}: {hit.why()}"
        tunnel.refusal_logged = True
        peer = tunnel.peer_node if tunnel.peer is not None else tunnel.peer_addr
        self.stats.refused("revoked", why, peer=peer, tenant=tunnel.tenant if self.role == "cloud" else None)
        return why

    def close_revoked(self, tunnels, revocations: Revocations, what: str) -> None:
        """After a reload: close every live tunnel (or peer link) whose peer certificate a CRL now revokes,
        as tenant revocation does (GOAWAY FORBIDDEN, then close 1008); one WARNING each."""
        if not revocations:
            return
        for t in list(tunnels):
            hit = revocations.check(t.peer_der)
            if hit is None or t.close_reason:
                continue
            why = hit.why()
            log.warning("%s %s with %s (%s) closed after reload: %s", what, t.id, t.peer_node, t.peer_addr, why,
                        extra={"event": "cert.revoked", "tunnel": t.id, "peer_node": t.peer_node,
                               "peer_addr": t.peer_addr, "subject": hit.subject, "serial": f"{hit.serial:#x}",
                               "crl": str(hit.path), "kind": t.kind})
            self.event("cert.revoked", peer=t.peer_node, tunnel=t.id, reason=why)
            t.goaway(f"after a configuration reload: {why}", Reason.FORBIDDEN)
            t.fail(f"peer certificate revoked: {why}", code=1008, quiet=True)

    def is_ready(self) -> bool:
        return self.serving.is_set() and not self.draining

    async def run_role(self) -> None:
        raise NotImplementedError

    # --- lifecycle ---------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        from .admin.server import AdminServer

        admin = AdminServer(self) if self.config.gateway.admin else None
        self._open_audit()
        try:
            async with asyncio.TaskGroup() as tg:
                self.tg = tg
                if admin:
                    await admin.start()
                await self._start_listeners()
                tg.create_task(self._liveness())
                tg.create_task(self._crl_watch())
                role_task = tg.create_task(self.run_role())
                await self.stopping.wait()
                await self._drain()
                role_task.cancel()
                raise _Stop
        except* _Stop:
            pass
        finally:
            if admin:
                await admin.stop()
            if self.stats.audit is not None:  # what the drain logged (tunnels down) goes out too
                await asyncio.to_thread(self.stats.audit.close)
        return 0

    def _open_audit(self) -> None:
        """[gateway] audit_log (docs/operations.md §10.3): open it before anything can happen to audit."""
        path = self.config.gateway.audit_log
        if path is None:
            return
        from .audit import AuditLog

        audit = AuditLog(path, self.node_id)
        try:
            audit.open()
        except OSError as exc:
            raise StartupError(f"{self.config.source}: gateway.audit_log {path}: cannot open it for writing: "
                               f"{exc.strerror or exc}; create its directory, make it writable by this user, or "
                               "change gateway.audit_log") from None
        audit.start()
        self.stats.audit = audit

    async def _start_listeners(self) -> None:
        for svc in self.accept_services.values():
            try:
                await self._listen(svc)
            except OSError as exc:
                raise StartupError(
                    f"{self.config.source}: service {svc.name!r}: cannot listen on {svc.accept}: {exc.strerror}; "
                    "free the port or change service.accept") from None

    async def _listen(self, svc) -> None:
        ep = svc.accept
        server = await asyncio.get_running_loop().create_server(
            lambda: self._accepted(svc.name, svc.tenant or DEFAULT_TENANT), ep.host, ep.port,
            reuse_address=True, backlog=1024)
        self.service_listeners[svc_key(svc)] = server
        log.info("service %s listening on %s", svc.name, ep,
                 extra={"event": "service.listening", "service": svc.name, "address": str(ep)})

    def _accepted(self, name: str, tenant: str):
        """The protocol of a new connection to service ``name``'s listener: its LocalStream, or with
        accept_proxy_protocol (as configured now, reloads included) a reader of the PROXY header first."""
        gate = self.gates.get((tenant, name))
        if gate is None or gate.proxies is None:
            return LocalStream(name, "accept", on_connected=self.dispatch.client_connected, tenant=tenant)

        def refused(peer: str, why: str, rule: str) -> None:
            self.stats.refused("proxy_protocol", why, client=peer, service=name, tenant=tenant, rule=rule)
        return ProxyHeaderReader(
            lambda client: LocalStream(name, "accept", client=client, on_connected=self.dispatch.client_connected,
                                       tenant=tenant),
            gate.proxy_refusal, refused)

    # --- reload (SIGHUP) -----------------------------------------------------------------
    def _sighup(self) -> None:
        """The SIGHUP handler: start a reload, or fold this signal into the one in progress (it runs
        once more when done, so the newest file wins and no change is lost). Nothing here raises: a
        reload task that raised would cancel the whole TaskGroup and drop every tunnel."""
        if self.stats.audit is not None:  # logrotate moved the file: reopen it whatever the reload does
            self.stats.audit.reopen(self.config.gateway.audit_log)
        if self.tg is None or self.stopping.is_set():
            log.warning("SIGHUP ignored: the gateway is %s; send it again once it runs",
                        "stopping" if self.stopping.is_set() else "still starting",
                        extra={"event": "gateway.reload_refused"})
            return
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            log.info("SIGHUP during a reload: the file is read once more when this reload ends",
                     extra={"event": "gateway.reload_queued"})
            return
        self._reload_task = self.tg.create_task(self._reload_guarded())

    async def _reload_guarded(self) -> None:
        while True:
            self._reload_again = False
            try:
                await self.reload()
            except Exception as exc:  # noqa: BLE001 - a reload must never take the gateway down
                log.error("SIGHUP: reload of %s failed (%s: %s); %s", self.config.source, type(exc).__name__,
                          exc, self._reload_state, extra={"event": "gateway.reload_failed",
                                                          "error": type(exc).__name__})
                self.event("gateway.reload_failed", reason=f"{type(exc).__name__}: {exc}")
            if not self._reload_again or self.stopping.is_set():
                return

    def _load_for_reload(self, old: Config) -> tuple:
        """In the reload thread: read and validate the file, keep the keys that need a restart, and
        build the TLS contexts. Returns (config, restart-only keys that changed, contexts, TLS error)."""
        from .config import load_config

        new = load_config(old.source)
        fixed = [k for k, a, b in (
            ("gateway.role", old.gateway.role, new.gateway.role), ("gateway.node_id", old.gateway.node_id, new.gateway.node_id),
            ("gateway.admin", old.gateway.admin, new.gateway.admin), ("tunnel.listen", old.tunnel.listen, new.tunnel.listen),
            # cluster.crl is re-read like the certificates; the rest of [cluster] takes a restart
            ("cluster", old.cluster, new.cluster.model_copy(update={"crl": old.cluster.crl})), ("tunnel.max_frame", old.tunnel.max_frame, new.tunnel.max_frame),
            ("tunnel.per_member", old.tunnel.per_member, new.tunnel.per_member),
            # a new path applies (reload below); turning the audit log on or off takes a restart
            ("gateway.audit_log", old.gateway.audit_log is None, new.gateway.audit_log is None)) if a != b]
        if fixed:
            on_off = "gateway.audit_log" in fixed
            new = new.model_copy(update={"gateway": new.gateway.model_copy(update={"role": old.gateway.role,
                                 "node_id": old.gateway.node_id, "admin": old.gateway.admin,
                                 "audit_log": old.gateway.audit_log if on_off else new.gateway.audit_log}),
                                 "tunnel": new.tunnel.model_copy(update={"listen": old.tunnel.listen,
                                           "max_frame": old.tunnel.max_frame, "per_member": old.tunnel.per_member}),
                                 "cluster": old.cluster.model_copy(update={"crl": new.cluster.crl})})
        contexts = tls_error = None
        try:
            contexts = self.load_tls(new)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            tls_error = exc
        return new, fixed, contexts, tls_error

    async def _in_thread(self, fn, *args, timeout: float):
        """``fn(*args)`` in a daemon thread, awaited for at most ``timeout`` seconds.

        Not asyncio.to_thread: a thread blocked in open() on a FIFO or a hung NFS mount cannot be
        killed. In the default executor it would hold a worker that getaddrinfo needs, and interpreter
        exit joins those workers, so a stuck one would also hang the exit after SIGTERM. A daemon
        thread is simply abandoned; reload() refuses to start another while it lives."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(result, exc) -> None:
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(result)

        def work() -> None:
            try:
                result, exc = fn(*args), None
            except Exception as e:  # noqa: BLE001 - delivered to the awaiting reload
                result, exc = None, e
            try:
                loop.call_soon_threadsafe(settle, result, exc)
            except RuntimeError:
                pass  # the loop is closed: the gateway stopped meanwhile

        thread = threading.Thread(target=work, name="intercloud-reload", daemon=True)
        self._reload_thread, self._reload_thread_since = thread, time.monotonic()
        thread.start()
        async with asyncio.timeout(timeout):
            return await fut

    async def reload(self) -> None:
        """SIGHUP: re-read the config; apply certificates and services without dropping streams.

        Files are read and validated, and TLS contexts built, in a worker thread with a timeout
        (gateway.reload_timeout): a blocking read must not freeze the event loop, whose tunnels would
        then miss their pings. The result is applied on the loop."""
        from .config import ConfigError

        self._reload_state = "nothing was applied, the running configuration stays in force"
        stuck = self._reload_thread
        if stuck is not None and stuck.is_alive():
            log.error("SIGHUP refused: the reload of %.0fs ago is still blocked reading %s or its certificate "
                      "files; the running configuration stays in force. Fix the file system or the paths "
                      "(a FIFO, a hung network mount), then restart the gateway or send SIGHUP once that read "
                      "returns", time.monotonic() - self._reload_thread_since, self.config.source,
                      extra={"event": "gateway.reload_failed", "reason": "previous reload stuck"})
            return
        timeout = self.config.gateway.reload_timeout
        try:
            new, fixed, contexts, tls_error = await self._in_thread(self._load_for_reload, self.config,
                                                                   timeout=timeout)
        except ConfigError as exc:
            log.error("SIGHUP: configuration NOT reloaded, the running one stays in force:\n%s", exc,
                      extra={"event": "gateway.reload_failed"})
            self.event("gateway.reload_failed", reason="invalid configuration")
            return
        except TimeoutError:
            log.error("SIGHUP: reading %s and its certificate files took longer than %gs (gateway.reload_timeout); "
                      "reload abandoned, the running configuration stays in force. Look for a hung network file "
                      "system or a FIFO at one of those paths", self.config.source, timeout,
                      extra={"event": "gateway.reload_failed", "reason": "timeout"})
            self.event("gateway.reload_failed", reason="timeout")
            return
        if os.environ.get("INTERCLOUD_TEST_RELOAD_FAULT"):  # test hook only (tests/security/test_reload.py)
            raise RuntimeError("fault injected by INTERCLOUD_TEST_RELOAD_FAULT (a test hook; unset it)")
        if fixed:
            log.warning("SIGHUP: %s changed; that takes a restart, the old values stay in force", ", ".join(fixed),
                        extra={"event": "gateway.reload_partial", "keys": fixed})
        audit, path = self.stats.audit, new.gateway.audit_log
        if audit is not None and path is not None and path != self.config.gateway.audit_log:
            audit.reopen(path)  # the writer moves to the new path before its next batch
        self.config = new
        self.budget.set_limit(new.gateway.max_buffered)
        self._reload_state = "the configuration was applied only partly; send SIGHUP again or restart"
        if tls_error is not None:
            log.error("SIGHUP: certificates not reloaded: %s; the old ones stay in use", tls_error,
                      extra={"event": "gateway.reload_failed"})
        else:
            self.apply_tls(contexts)
        # the admission rules first: a listener opened below takes connections under them at once
        self.gates = gates_for(new.services, self.gates)
        # accept services: close removed or moved listeners, open new ones
        new_accept = {svc_key(s): s for s in new.services if s.accept}
        for name, svc in list(self.accept_services.items()):
            if name not in new_accept or new_accept[name].accept != svc.accept:
                server = self.service_listeners.pop(name, None)
                if server is not None:
                    server.close()
                log.info("service %s: listener on %s closed (reload)", svc.name, svc.accept,
                         extra={"event": "service.closed", "service": svc.name, "tenant": svc.tenant})
        for name, svc in new_accept.items():
            if name not in self.service_listeners:
                try:
                    await self._listen(svc)
                except OSError as exc:
                    log.error("SIGHUP: service %s: cannot listen on %s: %s", svc.name, svc.accept, exc.strerror,
                              extra={"event": "gateway.reload_failed", "service": svc.name})
        self.accept_services = new_accept
        new_connect = {svc_key(s): s for s in new.services if s.connect}
        names_changed = set(new_connect) != set(self.connect_services)
        self.connect_services = new_connect
        if names_changed:
            for t in list(self.tunnels):
                t.send_services(self.connect_service_names(t))
        self.after_reload()
        log.info("SIGHUP: configuration reloaded (%d services)", len(new.services),
                 extra={"event": "gateway.reloaded"})
        self.event("gateway.reloaded")

    async def _drain(self) -> None:
        """Drain (docs/ha.md §8): stop listening, GOAWAY, let streams finish up to drain_timeout."""
        self.draining = True
        timeout = self.config.gateway.drain_timeout
        n = sum(len(t.streams) for t in self.all_tunnels())  # relayed streams ride peer links
        log.info("draining: %d tunnels, %d streams, up to %gs", len(self.tunnels), n, timeout,
                 extra={"event": "gateway.draining", "streams": n})
        for server in self.listeners + list(self.service_listeners.values()):
            server.close()
        for t in self.all_tunnels():
            if t.peer is not None:
                t.goaway(f"{self.node_id} is shutting down")
        deadline = time.monotonic() + timeout
        while any(t.streams or t.open_tasks for t in self.all_tunnels()) and time.monotonic() < deadline:
            await self.router.wait_route_change(min(0.5, deadline - time.monotonic()))
        left = sum(len(t.streams) for t in self.all_tunnels())
        closing = self.all_tunnels()
        for t in closing:
            t.close(f"{self.node_id} shut down")
        # Let every tunnel flush what it still has queued (the last DATA and FIN frames of streams that
        # just finished here) before the process exits; bounded, a dead peer must not hold us.
        pending = [t.done for t in closing if not t.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=_FLUSH_GRACE)
        log.info("stopped (%d streams cut at drain timeout)", left,
                 extra={"event": "gateway.stopped", "streams_cut": left})

    async def _liveness(self) -> None:
        """protocol §8: PING every ping_interval; close a tunnel once it has been silent for ping_timeout.

        The loop wakes at the next PING or at the earliest silence deadline of any tunnel, whichever
        comes first, so a dead peer is detected at ping_timeout (plus a few ms), not up to one more
        ping_interval later as when deadlines were checked only with the PINGs (docs/ha.md §7). A tunnel
        born during a sleep cannot be missed: its deadline is ping_timeout away, later than the next
        PING (ping_timeout > ping_interval is enforced)."""
        next_ping = time.monotonic() + self.config.tunnel.ping_interval
        while True:
            next_ping, wake = self._liveness_round(next_ping)
            await asyncio.sleep(wake)

    def _liveness_round(self, next_ping: float) -> tuple[float, float]:
        """One round of _liveness: (the next PING time, seconds to sleep). A method of its own so that
        the list of tunnels dies with the round: held across the sleep, it kept every tunnel that closed
        meanwhile, with its TLS transport, alive for up to ping_interval (test_metric_series.py)."""
        t_cfg = self.config.tunnel  # re-read: SIGHUP may change the timings
        now = time.monotonic()
        live = [t for t in self.all_tunnels() if not t.close_reason]  # a failed one is on its way out
        for t in live:
            if now - t.last_rx >= t_cfg.ping_timeout:
                self.counters["liveness_misses"] += 1
                # no peer_node label: a series per peer-chosen name would outlive the tunnel
                self.count("liveness_misses", kind=t.kind)
                t.silent = True  # a path that may come back: parked streams wait resume_timeout (protocol §10.4)
                t.fail(f"no frame from {t.peer_node} for {now - t.last_rx:.1f}s "
                       f"(tunnel.ping_timeout = {t_cfg.ping_timeout:g}s); peer dead or path broken",
                       code=1011)
        if now >= next_ping:
            next_ping = now + t_cfg.ping_interval
            for t in live:
                if not t.close_reason and t.peer is not None:
                    t.ping()
        deadline = min((t.last_rx + t_cfg.ping_timeout for t in live if not t.close_reason), default=next_ping)
        # at least 20 ms: a timer that fires a hair early must not spin, and tunnels whose deadlines
        # are close together (a burst of handshakes) are checked in one wake-up, not one each
        return next_ping, max(min(next_ping, deadline) - now, 0.02)

    def _handshaking(self) -> list[Tunnel]:
        return []

    def all_tunnels(self) -> list[Tunnel]:
        """Every tunnel to watch for liveness, including ones still handshaking."""
        return list(self.tunnels) + list(self._handshaking())

    # --- tunnels -----------------------------------------------------------------------
    def tunnel_ready(self, tunnel: Tunnel) -> None:
        peer = tunnel.peer
        refusal = self.admit(tunnel)
        if refusal is not None:
            tunnel.refused = True
            if self.role == "cloud" and tunnel.hello_sent:  # whole reason; a close reason holds 123 bytes
                tunnel.goaway(refusal, Reason.FORBIDDEN)
            # one line per refusal: the cloud's admit logged it (tenant.refused), a dialer logs it as its
            # dial failure (landing on an already covered member, routine behind a load balancer, at INFO)
            tunnel.fail(refusal, code=1008, quiet=tunnel.refusal_logged or tunnel.client
                        or refusal.startswith("peer link to this member itself"))
            return
        if tunnel.client:
            tunnel.send_hello()  # protocol §5.2: the dialer answers after admitting the peer
        self.tunnels.add(tunnel)
        self.counters["tunnels_opened"] += 1
        tlog.info("[%s] OPENED: %s %s %s <-> %s %s, %s %s, peer services %s", tunnel.label,
                  "wss" if tunnel.tls.get("tls") != "none" else "ws", self.role, self.node_id,
                  peer.role, peer.node_id, tunnel.tls.get("tls"), tunnel.tls.get("cipher", ""),
                  ",".join(peer.services) or "-",
                  extra={"event": "tunnel.opened", "tunnel": tunnel.id, "peer_addr": tunnel.peer_addr,
                         "peer_node": peer.node_id, "node": self.node_id, **tunnel.tls,
                         "peer_cert": tunnel.peer_cert.get("subject"), "services": peer.services})
        self.event("tunnel.opened", peer=peer.node_id, tunnel=tunnel.id)
        self.stats.tunnel_up(tunnel)
        self.parking.peer_up(tunnel)
        twins = [t for t in self.tunnels if t.peer_node == peer.node_id and t.peer.incarnation != peer.incarnation]
        if twins:  # a cloned VM (same certificate and node id): both serve, neither hides the other
            tlog.warning("[%s] DUPLICATE IDENTITY: %s from %s (incarnation %s) while %s (incarnation %s) is live; "
                         "both are used, but give every gateway its own node_id and certificate",
                         tunnel.label, peer.node_id, tunnel.peer_addr, peer.incarnation,
                         ", ".join(sorted({t.peer_addr for t in twins})), twins[0].peer.incarnation,
                         extra={"event": "tunnel.duplicate_identity", "peer_node": peer.node_id,
                                "peer_addr": tunnel.peer_addr, "incarnation": peer.incarnation})
            self.event("tunnel.duplicate_identity", peer=peer.node_id, tunnel=tunnel.id)
        self.routes_changed()

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        if tunnel in self.tunnels:
            self.tunnels.discard(tunnel)
            self.counters["tunnels_closed"] += 1
            tlog.info("[%s] CLOSED: %s %s <-> %s after %.1fs, %d streams: %s", tunnel.label, self.role,
                      self.node_id, tunnel.peer_node, time.time() - tunnel.opened_at, tunnel.streams_total,
                      reason, extra={"event": "tunnel.closed", "tunnel": tunnel.id, "peer_node": tunnel.peer_node,
                                     "peer_addr": tunnel.peer_addr, "reason": reason})
            self.event("tunnel.closed", peer=tunnel.peer_node, tunnel=tunnel.id, reason=reason)
            self.stats.tunnel_down(tunnel, reason)
            self.routes_changed()

    def duplicate_identities(self) -> dict[str, list[str]]:
        """Node ids held by more than one live gateway instance: node id -> their incarnations."""
        seen: dict[str, set[str]] = {}
        for t in self.tunnels:
            seen.setdefault(t.peer_node, set()).add(t.peer.incarnation)
        return {n: sorted(incs) for n, incs in sorted(seen.items()) if len(incs) > 1}

    def routes_changed(self) -> None:
        self.router.routes_changed()

    def pick_tunnel(self, service: str, exclude: set[tuple[str, str]], tenant: str = "default") -> Tunnel | None:
        """The least loaded live tunnel of ``tenant`` whose peer connects ``service``: one that is not
        congested (protocol §6.3) before one that is, then the fewest open streams. A new stream so
        gets a TCP connection of its own beside a bulk transfer where there is one (per_member >= 2),
        out of reach of the bulk stream's queue and of its losses' head-of-line delay."""
        best, best_load = None, None
        for t in self.tunnels:
            peer = t.peer
            if (t.tenant != tenant or t.goaway_received or t.peer_key in exclude
                    or service not in peer.services):
                continue
            load = (t.paused or t.turns_waiting > 0, t.stream_count)
            if best is None or load < best_load:
                best, best_load = t, load
        return best


    # --- streams (TunnelOwner) and accounting: StreamDispatch and GatewayStats do the work ----
    def stream_requested(self, tunnel: Tunnel, sid: int, service: str, client: str) -> None:
        self.dispatch.stream_requested(tunnel, sid, service, client)

    def relay_requested(self, link: Tunnel, sid: int, tenant: str, service: str, client: str) -> None:
        self.dispatch.relay_requested(link, sid, tenant, service, client)

    def relay_resume_requested(self, link: Tunnel, sid: int, tenant: str, service: str, resume: dict) -> None:
        self.dispatch.relay_resume_requested(link, sid, tenant, service, resume)

    def resume_requested(self, tunnel: Tunnel, sid: int, service: str, resume: dict) -> None:
        self.parking.resume_requested(tunnel, sid, service, resume)

    def park(self, stream: StreamEnd, tunnel: Tunnel, reason: str, silent: bool) -> bool:
        return not self.draining and self.parking.park(stream, tunnel, reason, silent)

    def stream_closed(self, tunnel: Tunnel, stream: StreamEnd, reason: str) -> None:
        self.parking.forget(stream)
        if self.stats.stream_closed(tunnel, stream, reason) and self.draining:
            self.routes_changed()  # wakes the drain loop

    @property
    def counters(self) -> dict[str, int]:
        return self.stats.counters

    @property
    def tenant_streams(self) -> dict[str, int]:
        return self.stats.tenant_streams

    def count(self, name: str, n: float = 1, **labels) -> None:
        self.stats.count(name, n, **labels)

    def event(self, kind: str, **fields) -> None:
        self.stats.event(kind, **fields)


def identity_refusal(tunnel: Tunnel) -> str | None:
    """Why the peer's HELLO node id does not match its certificate, or None (protocol §5.4).

    A gateway is who its verified certificate says: its node id must be one of the certificate's names
    (CN or DNS SAN, exact match), so a gateway holding a certificate of its own cannot pose as another
    one in logs, routes, coverage and member lists. Where no certificate was verified (tls.insecure,
    or a cloud with tls.verify_client = false) there is nothing to check against: the node id is
    taken on trust there."""
    if not tunnel.peer_der:
        return None
    node = tunnel.peer.node_id
    names = certificate_names(x509.load_der_x509_certificate(tunnel.peer_der))
    if node in names:
        return None
    peer_role, which, flag = (("on-prem", "client", "--onprem") if tunnel.gateway.role == "cloud"
                              else ("cloud", "server", "--cloud"))
    listed = ", ".join(peer_input.shown(n) for n in names[:8]) or "none (the certificate has no CN or DNS name)"
    if len(names) > 8:
        listed += f" and {len(names) - 8} more"
    # no address in the text: it is the same on every redial, so the dialer logs it once (the refusing
    # side's log line has the address)
    return (f"{peer_role} gateway {peer_input.shown(node)}: that node id is not a name of its {which} certificate "
            f"(subject {peer_input.shown(tunnel.peer_cert.get('subject', '?'))}); "
            f"set gateway.node_id of that gateway to one of: {listed}, "
            f"or issue it a certificate for {peer_input.shown(node)} (intercloud certs init DIR {flag} {node})")


def svc_key(svc) -> tuple[str, str]:
    return (svc.tenant or DEFAULT_TENANT, svc.name)


class _Stop(Exception):
    pass
