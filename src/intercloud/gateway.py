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
from collections import deque

from . import logs
from .config import Config
from .protocol import State
from .protocol.frames import Reason
from .tunnel.budget import BufferBudget
from .tunnel.stream import LocalStream, reset
from .tunnel.tunnel import Tunnel

log = logging.getLogger("intercloud.gateway")
slog = logging.getLogger("intercloud.stream")
tlog = logging.getLogger("intercloud.tunnel")

# OPEN is answered once the far side has dialed its target; allow its connect_timeout plus slack.
_OPEN_SLACK = 5.0
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
        self.tenant_streams: dict[str, int] = {}
        self.listeners: list[asyncio.AbstractServer] = []
        self.service_listeners: dict[str, asyncio.AbstractServer] = {}
        self.tg: asyncio.TaskGroup | None = None
        self.stopping = asyncio.Event()
        self.draining = False
        self.serving = asyncio.Event()  # listeners bound (readiness)
        self._route_waiters: set[asyncio.Future] = set()
        self.events: deque[dict] = deque(maxlen=200)
        self.counters = {"streams_opened": 0, "streams_closed": 0, "open_failures": 0, "route_timeouts": 0,
                         "bytes_up": 0, "bytes_down": 0, "tunnels_opened": 0, "tunnels_closed": 0,
                         "liveness_misses": 0, "protocol_errors": 0}
        self.started = time.time()
        # labelled counters for /metrics: (name, ((label, value), ...)) -> count
        self.labelled: dict[tuple[str, tuple], float] = {}
        # SIGHUP: the reload in progress, whether another SIGHUP came meanwhile, and the thread that
        # reads the files of the last one (it may outlive its reload, stuck on a hung file system)
        self._reload_task: asyncio.Task | None = None
        self._reload_again = False
        self._reload_thread: threading.Thread | None = None
        self._reload_thread_since = 0.0
        self._reload_state = ""  # for the failure message: how much of the reload was applied

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
        peer = tunnel.conn.peer
        if peer.role == self.role:
            return (f"peer {peer.node_id} is a {peer.role} gateway like this one; "
                    "a tunnel joins a cloud and an on-prem gateway")
        return None

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
        """Re-check live tunnels against the reloaded config (cloud: tenants)."""

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
        try:
            async with asyncio.TaskGroup() as tg:
                self.tg = tg
                if admin:
                    await admin.start()
                await self._start_listeners()
                tg.create_task(self._liveness())
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
        return 0

    async def _start_listeners(self) -> None:
        for svc in self.accept_services.values():
            try:
                await self._listen(svc)
            except OSError as exc:
                raise SystemExit(
                    f"{self.config.source}: service {svc.name!r}: cannot listen on {svc.accept}: {exc.strerror}; "
                    "free the port or change service.accept") from None

    async def _listen(self, svc) -> None:
        ep = svc.accept
        server = await asyncio.get_running_loop().create_server(
            lambda: LocalStream(svc.name, "accept", on_connected=self.client_connected, tenant=svc.tenant or DEFAULT_TENANT),
            ep.host, ep.port, reuse_address=True, backlog=1024)
        self.service_listeners[svc_key(svc)] = server
        log.info("service %s listening on %s", svc.name, ep,
                 extra={"event": "service.listening", "service": svc.name, "address": str(ep)})

    # --- reload (SIGHUP) -----------------------------------------------------------------
    def _sighup(self) -> None:
        """The SIGHUP handler: start a reload, or fold this signal into the one in progress (it runs
        once more when done, so the newest file wins and no change is lost). Nothing here raises: a
        reload task that raised would cancel the whole TaskGroup and drop every tunnel."""
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
                self._event("gateway.reload_failed", reason=f"{type(exc).__name__}: {exc}")
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
            ("cluster", old.cluster, new.cluster), ("tunnel.max_frame", old.tunnel.max_frame, new.tunnel.max_frame),
            ("tunnel.per_member", old.tunnel.per_member, new.tunnel.per_member)) if a != b]
        if fixed:
            new = new.model_copy(update={"gateway": new.gateway.model_copy(update={"role": old.gateway.role,
                                 "node_id": old.gateway.node_id, "admin": old.gateway.admin}),
                                 "tunnel": new.tunnel.model_copy(update={"listen": old.tunnel.listen,
                                           "max_frame": old.tunnel.max_frame, "per_member": old.tunnel.per_member}),
                                 "cluster": old.cluster})
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
            self._event("gateway.reload_failed", reason="invalid configuration")
            return
        except TimeoutError:
            log.error("SIGHUP: reading %s and its certificate files took longer than %gs (gateway.reload_timeout); "
                      "reload abandoned, the running configuration stays in force. Look for a hung network file "
                      "system or a FIFO at one of those paths", self.config.source, timeout,
                      extra={"event": "gateway.reload_failed", "reason": "timeout"})
            self._event("gateway.reload_failed", reason="timeout")
            return
        if os.environ.get("INTERCLOUD_TEST_RELOAD_FAULT"):  # test hook only (tests/security/test_reload.py)
            raise RuntimeError("fault injected by INTERCLOUD_TEST_RELOAD_FAULT (a test hook; unset it)")
        if fixed:
            log.warning("SIGHUP: %s changed; that takes a restart, the old values stay in force", ", ".join(fixed),
                        extra={"event": "gateway.reload_partial", "keys": fixed})
        self.config = new
        self.budget.set_limit(new.gateway.max_buffered)
        self._reload_state = "the configuration was applied only partly; send SIGHUP again or restart"
        if tls_error is not None:
            log.error("SIGHUP: certificates not reloaded: %s; the old ones stay in use", tls_error,
                      extra={"event": "gateway.reload_failed"})
        else:
            self.apply_tls(contexts)
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
                t.send_frame(t.conn.services(self.connect_service_names(t)))
        self.after_reload()
        log.info("SIGHUP: configuration reloaded (%d services)", len(new.services),
                 extra={"event": "gateway.reloaded"})
        self._event("gateway.reloaded")

    async def _drain(self) -> None:
        """DESIGN §3.7: stop listening, GOAWAY, let streams finish up to drain_timeout."""
        self.draining = True
        timeout = self.config.gateway.drain_timeout
        n = sum(len(t.streams) for t in self.all_tunnels())  # relayed streams ride peer links
        log.info("draining: %d tunnels, %d streams, up to %gs", len(self.tunnels), n, timeout,
                 extra={"event": "gateway.draining", "streams": n})
        for server in self.listeners + list(self.service_listeners.values()):
            server.close()
        for t in self.all_tunnels():
            if t.conn.peer is not None:
                t.goaway(f"{self.node_id} is shutting down")
        deadline = time.monotonic() + timeout
        while any(t.streams or t.open_tasks for t in self.all_tunnels()) and time.monotonic() < deadline:
            await self._wait_route_change(min(0.5, deadline - time.monotonic()))
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
                t.fail(f"no frame from {t.peer_node} for {now - t.last_rx:.1f}s "
                       f"(tunnel.ping_timeout = {t_cfg.ping_timeout:g}s); peer dead or path broken",
                       code=1011)
        if now >= next_ping:
            next_ping = now + t_cfg.ping_interval
            for t in live:
                if not t.close_reason and t.conn.peer is not None:
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
        peer = tunnel.conn.peer
        refusal = self.admit(tunnel)
        if refusal is not None:
            tunnel.refused = True
            if self.role == "cloud" and tunnel.conn.hello_sent:  # whole reason; a close reason holds 123 bytes
                tunnel.send_frame(tunnel.conn.goaway(Reason.FORBIDDEN, refusal))
            # landing on an already covered member is routine behind a load balancer: the dialer logs it
            tunnel.fail(refusal, code=1008, quiet=refusal.startswith(("landed on member", "peer link to this member itself")))
            return
        if tunnel.client:
            tunnel.send_hello()  # protocol §5.2: the dialer answers after admitting the peer
        if tunnel.kind == "peer":
            return
        self.tunnels.add(tunnel)
        self.counters["tunnels_opened"] += 1
        tlog.info("[%s] OPENED: %s %s %s <-> %s %s, %s %s, peer services %s", tunnel.label,
                  "wss" if tunnel.tls.get("tls") != "none" else "ws", self.role, self.node_id,
                  peer.role, peer.node_id, tunnel.tls.get("tls"), tunnel.tls.get("cipher", ""),
                  ",".join(peer.services) or "-",
                  extra={"event": "tunnel.opened", "tunnel": tunnel.id, "peer_addr": tunnel.peer_addr,
                         "peer_node": peer.node_id, "node": self.node_id, **tunnel.tls,
                         "peer_cert": tunnel.peer_cert.get("subject"), "services": peer.services})
        self._event("tunnel.opened", peer=peer.node_id, tunnel=tunnel.id)
        twins = [t for t in self.tunnels if t.peer_node == peer.node_id and t.conn.peer.incarnation != peer.incarnation]
        if twins:  # a cloned VM (same certificate and node id): both serve, neither hides the other
            tlog.warning("[%s] DUPLICATE IDENTITY: %s from %s (incarnation %s) while %s (incarnation %s) is live; "
                         "both are used, but give every gateway its own node_id and certificate",
                         tunnel.label, peer.node_id, tunnel.peer_addr, peer.incarnation,
                         ", ".join(sorted({t.peer_addr for t in twins})), twins[0].conn.peer.incarnation,
                         extra={"event": "tunnel.duplicate_identity", "peer_node": peer.node_id,
                                "peer_addr": tunnel.peer_addr, "incarnation": peer.incarnation})
            self._event("tunnel.duplicate_identity", peer=peer.node_id, tunnel=tunnel.id)
        self.routes_changed()

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        if tunnel in self.tunnels:
            self.tunnels.discard(tunnel)
            self.counters["tunnels_closed"] += 1
            tlog.info("[%s] CLOSED: %s %s <-> %s after %.1fs, %d streams: %s", tunnel.label, self.role,
                      self.node_id, tunnel.peer_node, time.time() - tunnel.opened_at, tunnel.streams_total,
                      reason, extra={"event": "tunnel.closed", "tunnel": tunnel.id, "peer_node": tunnel.peer_node,
                                     "peer_addr": tunnel.peer_addr, "reason": reason})
            self._event("tunnel.closed", peer=tunnel.peer_node, tunnel=tunnel.id, reason=reason)
            self.routes_changed()

    def duplicate_identities(self) -> dict[str, list[str]]:
        """Node ids held by more than one live gateway instance: node id -> their incarnations."""
        seen: dict[str, set[str]] = {}
        for t in self.tunnels:
            seen.setdefault(t.peer_node, set()).add(t.conn.peer.incarnation)
        return {n: sorted(incs) for n, incs in sorted(seen.items()) if len(incs) > 1}

    def routes_changed(self) -> None:
        for fut in self._route_waiters:
            if not fut.done():
                fut.set_result(None)
        self._route_waiters.clear()

    async def _wait_route_change(self, timeout: float) -> None:
        if timeout <= 0:
            return
        fut = asyncio.get_running_loop().create_future()
        self._route_waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            self._route_waiters.discard(fut)

    def pick_tunnel(self, service: str, exclude: set[tuple[str, str]], tenant: str = "default") -> Tunnel | None:
        """DESIGN §3.5: the least loaded live tunnel of ``tenant`` whose peer connects ``service``."""
        best, best_load = None, None
        for t in self.tunnels:
            peer = t.conn.peer
            if (t.tenant != tenant or t.conn.goaway_received or t.peer_key in exclude
                    or service not in peer.services):
                continue
            load = t.conn.stream_count
            if best is None or load < best_load:
                best, best_load = t, load
        return best

    # --- accept side: a local client wants the peer's service ----------------------------
    def client_connected(self, stream: LocalStream) -> None:
        """A client connected to an accept listener (called from LocalStream.connection_made)."""
        if self.draining:
            reset(stream.transport)
            return
        limit = self.stream_limit(stream.tenant)
        if limit is not None:
            self._refuse_client(stream, limit)
            return
        # The first OPEN leaves from this callback when a tunnel is up, not one loop iteration later
        # from the task: it is on the client's first-byte path (docs/performance.md, P10).
        tunnel = self._pick_route(stream, _NOT_TRIED)
        first = (tunnel, self._open(tunnel, stream)) if tunnel is not None else None
        self.tg.create_task(self._route(stream, first))

    def _pick_route(self, stream: LocalStream, tried: set[tuple[str, str]] | frozenset) -> Tunnel | None:
        return (self.pick_tunnel(stream.service, tried, stream.tenant)
                or self.relay_link(f"{stream.tenant}/{stream.service}", tried))

    @staticmethod
    def _open(tunnel: Tunnel, stream: LocalStream) -> asyncio.Future:
        stream.take_sent()  # what the client has sent already leaves in the OPEN's write (P13)
        if stream.finished:  # it reset the connection instead
            fut = asyncio.get_running_loop().create_future()
            fut.set_result((Reason.ABORTED, "client left before the stream opened"))
            return fut
        tunnel.hold()
        fut = tunnel.open(stream)
        stream.begin_early()  # the client's first bytes go right behind the OPEN (protocol §4.5)
        tunnel.flush()
        return fut

    async def _route(self, stream: LocalStream, first: tuple[Tunnel, asyncio.Future] | None) -> None:
        """Await the answer to the first OPEN (``first``, sent by client_connected) or find a tunnel,
        OPEN, retry elsewhere on refusal; never leave the client hanging (§3.4)."""
        svc = stream.service
        wait = self.config.gateway.route_wait
        deadline = time.monotonic() + wait
        tried: set[tuple[str, str]] = set()  # gateway instances (node id, incarnation) that refused
        last = None
        while not stream.finished:
            if first is not None:
                (tunnel, fut), first = first, None
            else:
                tunnel = self._pick_route(stream, tried)
                if tunnel is None:
                    if tried:  # every gateway offering the service refused: give up at once
                        break
                    left = deadline - time.monotonic()
                    if left <= 0 or self.draining:
                        break
                    await self._wait_route_change(left)
                    continue
                fut = self._open(tunnel, stream)
            result = await _answer(fut, self.config.tunnel.connect_timeout + _OPEN_SLACK)
            if result is _TIMED_OUT:
                result = (Reason.TIMEOUT, f"no answer to OPEN from {tunnel.peer_node}")
                frame = tunnel.conn.reset(stream.sid, Reason.TIMEOUT, "OPEN timed out")
                if frame:
                    tunnel.send_frame(frame)
                tunnel.pending_opens.pop(stream.sid, None)
            if stream.finished:  # the client left while we opened
                return
            if result is None:
                stream.start()  # parked bytes first: the OPENED line is not on the client's path
                self._stream_opened(tunnel, stream)
                return
            tunnel.streams.pop(stream.sid, None)
            last = (tunnel.peer_node, *result)
            # the instance, not the name: a clone with the same node id (and certificate) may still
            # serve the stream, and an impostor's refusals must not hide the real gateway (issue 12)
            tried.add(tunnel.peer_key)
            self.counters["open_failures"] += 1
            self.count("open_failures", service=svc, tenant=stream.tenant, reason=Reason.label(result[0]))
            slog.info("OPEN %s via %s refused: %s %s; trying another gateway", svc, tunnel.peer_node,
                      Reason.name_of(result[0]), result[1],
                      extra={"event": "stream.open_failed", "service": svc, "peer_node": tunnel.peer_node,
                             "reason": Reason.name_of(result[0]), "detail": result[1]})
            stream.tunnel, stream.sid = None, 0
        if stream.finished:
            return
        if last is None:
            self.counters["route_timeouts"] += 1
            self.count("route_timeouts", service=svc, tenant=stream.tenant)
            why = (f"no route: no tunnel offers service {svc!r} (waited {wait:g}s, gateway.route_wait); "
                   "check that a gateway on the other side connects this service and its tunnels are up")
        else:
            why = (f"every gateway offering {svc!r} refused; last {last[0]}: "
                   f"{Reason.name_of(last[1])} {last[2]}")
        self._refuse_client(stream, why)

    def _refuse_client(self, stream: LocalStream, why: str) -> None:
        svc = stream.service
        slog.warning("[%s] REFUSED client %s: %s", svc, stream.client, why,
                     extra={"event": "stream.refused", "service": svc, "client": stream.client, "reason": why,
                            "tenant": stream.tenant})
        self._event("stream.refused", service=svc, client=stream.client, reason=why)
        tr = stream.transport
        if tr is not None:
            reset(tr)
        stream.finished = True

    # --- connect side: the peer asks us to dial one of our services ---------------------
    def stream_requested(self, tunnel: Tunnel, sid: int, service: str, client: str) -> None:
        if tunnel.kind == "peer":  # a relayed OPEN names "tenant/service" (protocol §3.2)
            tenant, _, name = service.partition("/")
            limit = self.stream_limit(tenant)
            if limit is not None:
                tunnel.send_frame(tunnel.conn.open_fail(sid, Reason.LIMIT, limit))
                return
            task = self.tg.create_task(self._relay(tunnel, sid, name, client, tenant))
            tunnel.open_tasks[sid] = task
            task.add_done_callback(lambda _t: tunnel.open_tasks.pop(sid, None))
            return
        svc = self.connect_services.get((tunnel.tenant, service))
        if svc is None:
            mine = self.connect_service_names(tunnel)
            who = f" for tenant {tunnel.tenant!r}" if tunnel.tenant != DEFAULT_TENANT else ""
            text = (f"{self.node_id} connects no service named {service!r}{who} "
                    f"(it connects: {', '.join(mine) or 'none'})")
            tunnel.send_frame(tunnel.conn.open_fail(sid, Reason.UNKNOWN_SERVICE, text))
            slog.warning("OPEN from %s refused: %s", tunnel.peer_node, text,
                         extra={"event": "stream.open_refused", "service": service, "peer_node": tunnel.peer_node,
                                "tenant": tunnel.tenant})
            return
        limit = self.stream_limit(tunnel.tenant)
        if limit is not None:
            tunnel.send_frame(tunnel.conn.open_fail(sid, Reason.LIMIT, limit))
            slog.warning("OPEN %s from %s refused: %s", service, tunnel.peer_node, limit,
                         extra={"event": "stream.open_refused", "service": service, "peer_node": tunnel.peer_node,
                                "tenant": tunnel.tenant, "reason": limit})
            return
        task = self.tg.create_task(self._dial_target(tunnel, sid, svc, client))
        tunnel.open_tasks[sid] = task
        task.add_done_callback(lambda _t: (tunnel.open_tasks.pop(sid, None), tunnel.early.pop(sid, None)))

    async def _dial_target(self, tunnel: Tunnel, sid: int, svc, client: str) -> None:
        ep = svc.connect
        stream = LocalStream(svc.name, "connect", client=client, target=f"{ep.host}:{ep.port}", tenant=tunnel.tenant,
                             on_connected=lambda s: self._target_connected(tunnel, sid, s))
        loop = asyncio.get_running_loop()
        code = None
        try:
            async with asyncio.timeout(self.config.tunnel.connect_timeout):
                await loop.create_connection(lambda: stream, ep.host, ep.port)
        except ConnectionRefusedError:
            code, text = Reason.REFUSED, f"{ep.host}:{ep.port} refused the connection (service {svc.name} on {self.node_id})"
        except TimeoutError:
            code, text = Reason.UNREACHABLE, (f"{ep.host}:{ep.port} did not answer within "
                                              f"{self.config.tunnel.connect_timeout:g}s (tunnel.connect_timeout)")
        except OSError as exc:
            code, text = Reason.UNREACHABLE, f"{ep.host}:{ep.port} unreachable: {exc.strerror or exc}"
        if code is None or stream.sid:  # connected: _target_connected took it from there
            return  # (a timeout that fired after it did closes the socket; the stream reports that itself)
        if tunnel.conn.state(sid) is State.OPENING_IN:
            tunnel.send_frame(tunnel.conn.open_fail(sid, code, text))
        self.counters["open_failures"] += 1
        self.count("open_failures", service=svc.name, tenant=tunnel.tenant, reason=Reason.label(code))
        slog.warning("[%s] target failed for client %s via %s: %s", svc.name, client, tunnel.peer_node, text,
                     extra={"event": "stream.target_failed", "service": svc.name, "client": client,
                            "target": stream.target, "reason": Reason.name_of(code), "detail": text})

    def _target_connected(self, tunnel: Tunnel, sid: int, stream: LocalStream) -> None:
        """The target accepted: answer OPEN_OK and hand it the early bytes from connection_made,
        one loop iteration before the dial task would resume (docs/performance.md, P12)."""
        if tunnel.conn.state(sid) is not State.OPENING_IN or tunnel.ws is None or tunnel.ws.is_disconnected:
            reset(stream.transport)  # the peer gave up (RST) or the tunnel is gone meanwhile
            return
        stream.attach(tunnel, sid)
        tunnel.streams[sid] = stream
        early = tunnel.early.pop(sid, None)
        if early:  # the early bytes are on the client's path, OPEN_OK is not: write them first (P11)
            tunnel.hold()
        tunnel.send_frame(tunnel.conn.open_ok(sid))  # the stream is OPEN from here: early bytes earn credit
        if early:
            for chunk in early:  # early data first (protocol §4.5)
                stream.deliver(memoryview(chunk))
            tunnel.flush()  # OPEN_OK, then any WINDOW or RST the delivery produced, in that order
        if stream.finished:  # the target could not take it
            return
        stream.start()
        self._stream_opened(tunnel, stream)

    async def _relay(self, link: Tunnel, sid: int, service: str, client: str, tenant: str) -> None:
        """DESIGN §3.3: carry a stream another member relayed to us over one of our own tunnels.
        Never over another peer link (protocol §3.2), so a stream is relayed at most once."""
        from .tunnel.bridge import BridgeEnd

        inner, outer = BridgeEnd.pair(service, client, target="", tenant=tenant)
        inner.attach(link, sid)
        tried: set[tuple[str, str]] = set()
        last = None
        while True:
            tunnel = self.pick_tunnel(service, tried, tenant)  # never another tenant's tunnel
            if tunnel is None:
                break
            fut = tunnel.open(outer)
            result = await _answer(fut, self.config.tunnel.connect_timeout + 2)  # before the relaying member gives up
            if result is _TIMED_OUT:
                result = (Reason.TIMEOUT, f"no answer to OPEN from {tunnel.peer_node}")
                frame = tunnel.conn.reset(outer.sid, Reason.TIMEOUT, "OPEN timed out")
                if frame:
                    tunnel.send_frame(frame)
            if result is None:
                if link.conn.state(sid) is not State.OPENING_IN:  # the relaying member gave up meanwhile
                    outer.abort(Reason.ABORTED, "relaying member reset the stream", tell_peer=True)
                    return
                outer.target = tunnel.peer_node
                inner.target = tunnel.peer_node
                link.streams[sid] = inner
                link.send_frame(link.conn.open_ok(sid))
                self._stream_opened(link, inner)
                inner.start()
                outer.start()
                return
            tunnel.streams.pop(outer.sid, None)
            tried.add(tunnel.peer_key)
            last = (tunnel.peer_node, *result)
        if link.conn.state(sid) is State.OPENING_IN:
            if last is None:
                code, text = Reason.UNKNOWN_SERVICE, f"{self.node_id} has no tunnel offering {service!r} any more"
            else:
                code, text = last[1], f"via {self.node_id}: {last[0]}: {last[2]}"
            link.send_frame(link.conn.open_fail(sid, code, text))

    # --- accounting and logs -----------------------------------------------------------
    def _stream_opened(self, tunnel: Tunnel, stream: LocalStream) -> None:
        self.counters["streams_opened"] += 1
        self.count("streams_opened", service=stream.service, tenant=stream.tenant)
        if tunnel.kind == "peer" or stream.side.startswith("relay"):
            self.count("relays", service=stream.service, tenant=stream.tenant,
                       direction="out" if tunnel.kind == "peer" and stream.side == "accept" else "in")
        stream.counted = True
        self.tenant_streams[stream.tenant] = self.tenant_streams.get(stream.tenant, 0) + 1
        relayed = tunnel.kind == "peer"
        peer = tunnel.peer_node
        logs.emit(slog, logging.INFO,
                  f"[{stream.service}] OPENED: stream {stream.sid} {stream.client} -> {stream.target or peer} "
                  f"via {peer}{' (relay)' if relayed else ''} ({stream.side})",
                  {"event": "stream.opened", "service": stream.service, "stream": stream.sid,
                   "tunnel": tunnel.id, "client": stream.client, "target": stream.target,
                   "peer_node": peer, "side": stream.side, "relayed": relayed})

    def stream_closed(self, tunnel: Tunnel, stream: LocalStream, reason: str) -> None:
        if stream.side == "relay-out":  # a relayed stream is logged and counted once, by its inner end
            return
        self.counters["streams_closed"] += 1
        if getattr(stream, "counted", False):
            stream.counted = False
            self.tenant_streams[stream.tenant] -= 1
        self.counters["bytes_up"] += stream.bytes_up
        self.counters["bytes_down"] += stream.bytes_down
        self.count("bytes_out", stream.bytes_up, service=stream.service, tenant=stream.tenant)
        self.count("bytes_in", stream.bytes_down, service=stream.service, tenant=stream.tenant)
        dur = time.monotonic() - stream.started
        peer = tunnel.peer_node
        logs.emit(slog, logging.INFO,
                  f"[{stream.service}] CLOSED: stream {stream.sid} {stream.client} -> {stream.target or peer} "
                  f"via {peer}, {stream.bytes_up} bytes out, {stream.bytes_down} bytes in, {dur:.3f}s: {reason}",
                  {"event": "stream.closed", "service": stream.service, "stream": stream.sid,
                   "tunnel": tunnel.id, "client": stream.client, "target": stream.target,
                   "peer_node": peer, "bytes_out": stream.bytes_up,
                   "bytes_in": stream.bytes_down, "duration": round(dur, 6), "reason": reason})
        if self.draining:
            self.routes_changed()  # wakes the drain loop

    def count(self, name: str, n: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.labelled[key] = self.labelled.get(key, 0) + n

    def _event(self, kind: str, **fields) -> None:
        self.events.append({"ts": time.time(), "event": kind, **fields})


DEFAULT_TENANT = "default"


def svc_key(svc) -> tuple[str, str]:
    return (svc.tenant or DEFAULT_TENANT, svc.name)


_TIMED_OUT = object()
_NOT_TRIED: frozenset = frozenset()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)


async def _answer(fut: asyncio.Future, timeout: float):
    """The peer's answer to an OPEN (None or (code, text)), or _TIMED_OUT. A timer rather than
    wait_for(shield(...)): two futures and a task wake-up less per OPEN (docs/performance.md P3)."""
    timer = asyncio.get_running_loop().call_later(timeout, _expire, fut)
    try:
        return await fut
    finally:
        timer.cancel()


class _Stop(Exception):
    pass
