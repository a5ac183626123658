"""The cloud's WebSocket listeners (``tunnel.listen``, ``cluster.listen``): everything that happens to a
connection before its HELLO, which is what anyone on the internet can make this process do.

asyncio and uvloop run a server's TLS handshake inside their SSL protocol and, when it fails, drop
the error unless the loop is in debug mode. So this listener accepts TCP itself and hands each socket
to ``aiofastnet.connect_accepted_socket`` (the transport picows uses on the dialing side too,
docs/performance.md) and then to the same picows WebSocket protocol ``picows.ws_create_server`` would
have used. One task per connection owns its whole pre-HELLO life, and that is where the limits are:

- **Handshake slots.** At most ``cluster.max_handshakes`` connections per listener are between accept
  and HELLO, at most ``max(1, max_handshakes / 8)`` of them (``cluster.max_handshakes_per_source``)
  from one source address (IPv6: one /64) or, once TLS is done, with one client certificate. A
  connection over a limit is reset at accept, before any TLS work.
- **One deadline.** ``tunnel.handshake_timeout`` counts from accept and covers the first bytes, TLS,
  the WebSocket upgrade and the HELLO, whatever frames arrive meanwhile (a PONG before HELLO does not
  buy time, issue 12).
- **No TLS state before the client speaks.** The TLS engine allocates two static BIO buffers of 257 KiB
  (aiofastnet's default ``ssl_*_bio_size``) as soon as it is created. Created at accept, a flood of
  connections that never send a byte churned ~0.5 MiB of heap per connection; freed in the middle of
  the heap, that memory stayed resident (glibc only gives back the top), and 20 rounds of 2,000
  connections left the process at 1.09 GB RSS (docs/operations.md §8). So the socket is first only
  watched for readability; the engine is created when the ClientHello (or, on ``ws://``, the HTTP
  request) is there.
- **A descriptor reserve.** The kernel hands out the lowest free descriptor, so an accepted socket
  numbered ``limit - reserve`` or higher proves that fewer than ``reserve`` descriptors are free: it is
  reset at once, and the reserve stays for established tunnels, their streams and the admin endpoint.
  When ``accept()`` itself fails with EMFILE/ENFILE, a spare descriptor kept for that is closed, the
  pending connection accepted and reset, and the spare reopened (the libuv trick), so the listener
  neither spins nor leaves the connection in the backlog; if even that fails, accepting pauses 0.5 s.

Every refusal and failure is one log line through the rate limiter (logs.limited), never a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import logging
import os
import resource
import socket
import ssl
import struct
import traceback

import aiofastnet
from .. import logs, proxy_protocol
from ..admission import client_address, within
from . import ws

log = logging.getLogger("intercloud.cloud")

#: Connections taken per wake-up of a listening socket: other work gets its turn in between (64 per
#: wake-up let a raw flood's accept-and-reset bursts add ~20 ms to a service client's p99).
_ACCEPT_BATCH = 16
#: How long accepting pauses when even the spare descriptor cannot be had (ENFILE: the whole system).
_ACCEPT_PAUSE = 0.5
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST and leaves no TIME_WAIT here


def fd_reserve(limit: int) -> int:
    """Descriptors kept free for established tunnels, streams and admin: 1/8 of the limit, at least 32."""
    return max(32, limit // 8)


def source_of(addr) -> str:
    """What a per-source limit counts: the IP address, an IPv6 one by its /64 (one customer's network)."""
    host = addr[0]
    if ":" in host:
        try:
            net = ipaddress.IPv6Network(f"{host.split('%')[0]}/64", strict=False)
        except ValueError:
            return host
        mapped = ipaddress.IPv6Address(host.split('%')[0]).ipv4_mapped
        return str(mapped) if mapped else str(net)
    return host


def _peer_text(addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    except OSError:
        pass
    sock.close()


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """(log level, what went wrong and what to do) for a failed server-side TLS handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return logging.WARNING, (f"client certificate refused: {exc.verify_message}; an on-prem gateway must "
                                 "present a valid (unexpired) certificate signed by a CA in tls.ca")
    closed = ("the client closed the connection during the handshake; if it is an on-prem gateway, its log "
              "says why (often: it does not trust this gateway's certificate or expected another name)")
    if isinstance(exc, ssl.SSLEOFError):
        return logging.INFO, closed
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        up = reason.upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in up or "CERTIFICATE_REQUIRED" in up:
            hint = "an on-prem gateway must present one (tls.cert and tls.key)"
        elif "HTTP_REQUEST" in up or "HTTPS_PROXY_REQUEST" in up:
            hint = "the client sent plain HTTP; tunnels need wss:// (TLS)"
        elif "ALERT" in up:
            hint = ("the client aborted the handshake; it likely does not trust this gateway's certificate "
                    "(tls.cert) or expected another name")
        else:
            hint = "the client does not speak TLS 1.2+ as an intercloud on-prem gateway does"
        return logging.WARNING, f"{reason.lower().replace('_', ' ')}; {hint}"
    if isinstance(exc, ConnectionAbortedError) and "handshake" in str(exc):
        return logging.WARNING, f"{exc} (tunnel.handshake_timeout)"
    if isinstance(exc, (ConnectionError, EOFError)):
        return logging.INFO, closed
    return logging.WARNING, f"{type(exc).__name__}: {exc}"


def drop_frames(exc: BaseException | None) -> None:
    """Clear the locals of the finished frames that ``exc`` (and the exceptions it was raised from or
    during) passed through, so that what they held is freed now by reference counting.

    Why: when a server-side TLS handshake fails, aiofastnet's transport keeps its handshake waiter, a Future
    holding the SSLError, whose traceback holds the frame of ``_create_connection_transport``, whose locals
    hold the transport: a reference cycle around the TLS engine (two 257 KiB BIO buffers, OpenSSL's ~70 KiB
    of state, the picows protocol; ~45 GC-tracked objects). Only a full (generation 2) collection frees such
    a cycle, and CPython runs one only once the objects that survived younger collections since the last one
    exceed a quarter of the long-lived ones (~45,000 in an idle cloud gateway): up to ~250 dead handshakes,
    ~72 KiB resident each, waited for it, for good once the flood stopped, and more in a gateway with more
    objects. Measured: with the collector off, 1,751 failed handshakes left 1,751 SSLTransport_Socket and
    SSLEngineDirect alive (besides the tunnel's) and the RSS at 182 MB (57 MB with this); with it on,
    test_floods' 160,000 connections left 150 of them alive 25 s later, 49 MiB of the heap in use against 10
    MiB at the baseline, 17 MiB of it resident, which malloc_trim cannot give back (_HeapTrim), and the RSS
    11-21 MB above the baseline (~1 MB with this). A handshake cut short by ``tunnel.handshake_timeout``
    leaves no such cycle (with the collector off, 60 of them left no engine alive). The frame ``_serve`` is
    still running and is skipped (clear_frames ignores the RuntimeError); the exception itself is not kept
    by anyone."""
    for _ in range(8):  # the chain is short (an exception raised while handling another); bounded anyway
        if exc is None:
            return
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


class _Spare:
    """One descriptor held back so that accept() can still take (and reset) a connection at EMFILE."""

    fd = -1

    @classmethod
    def ensure(cls) -> None:
        if cls.fd < 0:
            try:
                cls.fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                cls.fd = -1

    @classmethod
    def release(cls) -> bool:
        if cls.fd < 0:
            return False
        os.close(cls.fd)
        cls.fd = -1
        return True


class _HeapTrim:
    """Give the heap pages that ended handshakes freed back to the kernel, at most every ``EVERY`` s.

    Why: a TLS handshake allocates ~0.6 MiB (two 257 KiB BIO buffers plus OpenSSL's and picows' state);
    when it ends, glibc keeps the freed chunks in the middle of the heap resident (only the top is ever
    trimmed, and cli.run._tune_malloc keeps 64 MiB of that on purpose). Within the handshake cap, 15,000
    failed handshakes from a flood grew a listener's RSS by ~50 MB while the bytes in use stayed at 5 MB
    (mallinfo2), and it kept growing; ``malloc_trim(0)`` took it back to the baseline in 4-7 ms on a
    170 MB heap. A lower M_MMAP_THRESHOLD (256 KiB) was measured too: the heap still grew (~10 MB per
    3,000 handshakes, the smaller OpenSSL buffers fragment it too) and bulk transfers paid 230 extra
    mmap/munmap pairs per 600 MB. So: once handshakes ended, trim when things are quiet for ``DELAY``
    s, or every ``EVERY`` s during a flood (~0.1 % of a core). Every ended handshake counts: a threshold
    (32 once) left the tail of a flood, up to 31 handshakes' worth of freed pages, resident for good,
    and the flood test's RSS bound failed in one of five fresh-clone runs. Closed tunnels count too
    (heap_churn): 1,000 silent tunnels that closed left the RSS 135 MB above its start value, with 8 MB
    in use; a trim took it back to within 15 MB."""

    DELAY = 1.0
    EVERY = 10.0
    ended = 0
    last = 0.0
    timer = None
    libc = None

    @classmethod
    def note(cls, loop: asyncio.AbstractEventLoop) -> None:
        cls.ended += 1
        if cls.timer is not None:
            if loop.time() - cls.last < cls.EVERY:  # a flood: push the quiet-time trim back
                cls.timer.cancel()
            else:
                return
        cls.timer = loop.call_at(max(loop.time() + cls.DELAY, cls.last + cls.EVERY), cls.trim)

    @classmethod
    def trim(cls) -> None:
        cls.timer = None
        cls.ended = 0
        cls.last = asyncio.get_running_loop().time()
        if cls.libc is None:
            try:
                import ctypes

                cls.libc = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc: nothing to do
                cls.libc = False
        if cls.libc:
            cls.libc(0)


def heap_churn(loop: asyncio.AbstractEventLoop) -> None:
    """A tunnel closed (its transport and TLS buffers are freed): count it toward the next heap trim,
    as an ended handshake counts, so tunnel churn does not leave the process large either."""
    _HeapTrim.note(loop)


class _Pace:
    """At most ``PER_TICK`` TLS handshakes start per event-loop iteration.

    Why: the server's expensive handshake step (ECDHE, signature, certificate) runs synchronously when
    the ClientHello is read. When a flood's ClientHellos arrive together, all 64 slots' first steps ran
    in one iteration and every established stream waited behind them: a service client's p99 went from
    3.5 ms to 44 ms during a TLS flood on this 2-core VM (tests/security/test_floods.py); 4 per iteration:
    26 ms, 1 per iteration: 13 ms, at the same handshake rate (~400/s: the flood, not the loop, limits it)."""

    PER_TICK = 1
    budget = PER_TICK
    armed = False

    @classmethod
    async def turn(cls, loop: asyncio.AbstractEventLoop) -> None:
        while cls.budget <= 0:
            await asyncio.sleep(0)
        cls.budget -= 1
        if not cls.armed:
            cls.armed = True
            loop.call_soon(cls._refill)

    @classmethod
    def _refill(cls) -> None:
        cls.budget = cls.PER_TICK
        cls.armed = False


class Slots:
    """Connections between accept and HELLO on one listener: in all, per source, per certificate."""

    def __init__(self, cap: int, per_source: int):
        self.cap = cap
        self.per_source = per_source
        self.total = 0
        self.sources: dict[str, int] = {}
        self.certs: dict[str, int] = {}

    def refusal(self, source: str) -> str | None:
        if self.total >= self.cap:
            return f"{self.total} handshakes in progress already (cluster.max_handshakes = {self.cap})"
        n = self.sources.get(source, 0)
        if n >= self.per_source:
            return (f"{n} handshakes from {source} in progress already (cluster.max_handshakes_per_source "
                    f"= {self.per_source})")
        return None

    def take(self, source: str) -> None:
        self.total += 1
        self.sources[source] = self.sources.get(source, 0) + 1

    def release(self, source: str) -> None:
        self.total -= 1
        n = self.sources.pop(source) - 1
        if n:
            self.sources[source] = n

    def take_cert(self, cert: str) -> str | None:
        n = self.certs.get(cert, 0)
        if n >= self.per_source:
            return (f"{n} handshakes with this client certificate in progress already "
                    f"(cluster.max_handshakes_per_source = {self.per_source})")
        self.certs[cert] = n + 1
        return None

    def release_cert(self, cert: str) -> None:
        n = self.certs.pop(cert) - 1
        if n:
            self.certs[cert] = n


class TlsWsServer:
    """Listening sockets plus their accept callbacks; ``close()`` stops accepting (like asyncio.Server).
    ``ssl_ctx`` None: plain ``ws://`` (tls.insecure), with the same limits."""

    def __init__(self, socks: list[socket.socket], protocol_factory, ssl_ctx: ssl.SSLContext | None,
                 handshake_timeout: float, *, name: str, max_handshakes: int, per_source: int):
        self._socks = socks
        self._factory = protocol_factory
        self._ssl = ssl_ctx
        self._timeout = handshake_timeout
        self.name = name  # the config key, for log lines: "tunnel.listen" or "cluster.listen"
        self.slots = Slots(max_handshakes, per_source)
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.get_running_loop()
        self._closed = False
        #: tunnel.accept_proxy_protocol: the trusted_proxies networks (None: no PROXY header expected)
        #: and what counts a refusal (peer, why, rule); set by the owner, reloads included
        self.proxies: list | None = None
        self.on_proxy_refused = None
        _Spare.ensure()
        for s in socks:
            self._loop.add_reader(s.fileno(), self._on_readable, s)

    def set_ssl(self, ssl_ctx: ssl.SSLContext) -> None:
        """New handshakes use ``ssl_ctx`` (certificate rotation on SIGHUP); live tunnels are untouched."""
        self._ssl = ssl_ctx

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._socks:
            self._loop.remove_reader(s.fileno())
            s.close()

    # --- accept ------------------------------------------------------------------------
    def _on_readable(self, lsock: socket.socket) -> None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        high = limit - fd_reserve(limit) if limit != resource.RLIM_INFINITY else 1 << 30
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._accept_failed(lsock, exc)
                return
            source = source_of(addr)
            if sock.fileno() >= high:
                why = (f"fewer than {fd_reserve(limit)} of {limit} open files left (descriptor {sock.fileno()}); "
                       "they are kept for established tunnels; raise LimitNOFILE / ulimit -n")
            else:
                why = self.slots.refusal(source)
            if why is not None:
                _reset(sock)
                logs.limited(log, logging.WARNING, "tunnel.shed", source,
                             "%s: connection from %s reset at accept: %s", self.name, _peer_text(addr), why,
                             extra={"peer_addr": _peer_text(addr), "listener": self.name, "reason": why})
                continue
            self.slots.take(source)
            task = self._loop.create_task(self._serve(sock, addr, source))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _accept_failed(self, lsock: socket.socket, exc: OSError) -> None:
        """EMFILE/ENFILE and friends: shed the pending connection with the spare descriptor, or pause."""
        shed = False
        if exc.errno in (errno.EMFILE, errno.ENFILE) and _Spare.release():
            try:
                sock, _addr = lsock.accept()
                _reset(sock)
                shed = True
            except OSError:
                pass
            _Spare.ensure()
        what = "one pending connection reset" if shed else f"not accepting for {_ACCEPT_PAUSE:g}s"
        logs.limited(log, logging.ERROR, "tunnel.accept_failed", self.name,
                     "%s cannot accept: %s; %s; raise the open-files limit (LimitNOFILE / ulimit -n) or find "
                     "what holds descriptors (ls /proc/PID/fd)", self.name, exc.strerror or exc, what,
                     extra={"listener": self.name, "reason": exc.strerror or str(exc)})
        if not shed and not self._closed:  # level-triggered: without a pause this would spin
            fd = lsock.fileno()
            self._loop.remove_reader(fd)
            self._loop.call_later(_ACCEPT_PAUSE, self._resume, lsock)

    def _resume(self, lsock: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(lsock.fileno(), self._on_readable, lsock)

    # --- one connection, accept to HELLO ------------------------------------------------
    async def _serve(self, sock: socket.socket, addr, source: str) -> None:
        peer = _peer_text(addr)
        loop = self._loop
        deadline = loop.time() + self._timeout
        stage = "first bytes"
        proto = None
        cert = None
        tls_state = False
        try:
            async with asyncio.timeout_at(deadline):
                await self._readable(sock)
                if self.proxies is not None:
                    stage = "PROXY header"
                    real = await self._proxy_header(sock, peer, source)
                    if real is None:
                        return
                    addr = client_address(real)
                    peer, real_source = real, source_of((str(addr),)) if addr is not None else source
                    if real_source != source:  # per-source limits count the real source, not the balancer
                        self.slots.release(source)
                        source = real_source
                        why = self.slots.refusal(source)
                        self.slots.take(source)  # released in finally, refused or not
                        if why is not None:
                            _reset(sock)
                            self._limited(logging.WARNING, "tunnel.shed", source, "%s: connection from %s reset "
                                          "after its PROXY header: %s", self.name, peer, why, peer=peer)
                            return
                    await self._readable(sock)  # the TLS bytes may follow the header later
                try:
                    first = sock.recv(1, socket.MSG_PEEK)
                except OSError as exc:
                    first, why = b"", exc.strerror or str(exc)
                else:
                    why = "the client closed the connection before sending anything"
                if not first:  # connect-and-close floods end here, without any TLS state
                    _reset(sock)
                    self._limited(logging.INFO, "tunnel.tls_failed", source, "TLS handshake from %s failed: %s",
                                  peer, why, peer=peer)
                    return
                stage = "TLS handshake" if self._ssl is not None else "WebSocket upgrade"
                await _Pace.turn(loop)
                tls_state = True
                try:
                    transport, proto = await aiofastnet.connect_accepted_socket(
                        loop, lambda: self._factory(peer), sock, ssl=self._ssl,
                        ssl_handshake_timeout=self._timeout + 1 if self._ssl is not None else None)
                except (OSError, EOFError, ssl.SSLError) as exc:
                    sock.close()  # no-op when the transport already closed it
                    drop_frames(exc)  # frees the failed TLS engine now, not at the next full gc
                    level, why = describe_failure(exc)
                    self._limited(level, "tunnel.tls_failed", source, "TLS handshake from %s failed: %s",
                                  peer, why, peer=peer)
                    return
                ssl_obj = transport.get_extra_info("ssl_object")
                der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
                if der:
                    fp = "sha256:" + hashlib.sha256(der).hexdigest()
                    why = self.slots.take_cert(fp)
                    if why is not None:
                        transport.abort()
                        self._limited(logging.WARNING, "tunnel.shed", fp, "%s: connection from %s closed after "
                                      "TLS: %s", self.name, peer, why, peer=peer)
                        return
                    cert = fp
                stage = "WebSocket upgrade"
                listener = await ws.upgraded(proto)
                if listener is None:
                    if ws.refused_by_picows(proto):  # before our listener factory saw it: say so here
                        self._limited(logging.WARNING, "tunnel.upgrade_failed", source,
                                      "%s: upgrade request from %s refused with HTTP 400 and closed: larger than "
                                      "16 KiB, not HTTP, or the connection closed before it was complete",
                                      self.name, peer, peer=peer)
                    return  # otherwise our listener factory refused it and said why
                ready = getattr(listener, "ready", None)
                if ready is not None:
                    stage = "HELLO"
                    try:
                        await asyncio.shield(ready)
                    except ConnectionError:
                        pass  # closed before HELLO: the tunnel said why
        except TimeoutError:
            why = f"no {stage} within {self._timeout:g}s of accept (tunnel.handshake_timeout)"
            event = {"first bytes": "tunnel.tls_failed", "TLS handshake": "tunnel.tls_failed",
                     "PROXY header": "tunnel.proxy_refused",
                     "WebSocket upgrade": "tunnel.upgrade_failed", "HELLO": "tunnel.hello_timeout"}[stage]
            self._limited(logging.WARNING, event, source, "%s: connection from %s closed: %s", self.name, peer, why,
                          peer=peer, code=ws.POLICY_VIOLATION if stage == "HELLO" else None)
            self._close(sock, proto, why)
        except asyncio.CancelledError:
            self._close(sock, proto, "listener closed")
            raise
        finally:
            self.slots.release(source)
            if tls_state:
                _HeapTrim.note(loop)
            if cert is not None:
                self.slots.release_cert(cert)

    async def _proxy_header(self, sock: socket.socket, peer: str, source: str) -> str | None:
        """tunnel.accept_proxy_protocol: take the PROXY header off the socket, leaving the TLS bytes
        behind it there for the TLS engine; the real peer ("ip:port"), or None when refused (reset,
        logged, counted). Only bytes of the header are consumed: while it is incomplete every byte
        there belongs to it (v1: no CRLF yet; v2: fewer than its stated length), once it is whole
        exactly its length."""
        if not within(client_address(peer), self.proxies):
            return self._proxy_refused(sock, peer, source, "trusted_proxies",
                                       f"{peer} is not in tunnel.trusted_proxies and tunnel.accept_proxy_protocol is "
                                       "on: only those load balancers may connect; add the balancer's address")
        got = bytearray()
        while True:
            try:
                data = sock.recv(proxy_protocol.MAX_V2, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as exc:
                data, eof = b"", exc.strerror or str(exc)
            else:
                eof = "the connection closed"
            if data == b"":
                return self._proxy_refused(sock, peer, source, "accept_proxy_protocol",
                                           f"{eof} after {len(got)} bytes, before a complete PROXY header")
            if data:
                try:
                    header = proxy_protocol.parse(bytes(got) + data)
                except proxy_protocol.ProxyHeaderError as exc:
                    return self._proxy_refused(sock, peer, source, "accept_proxy_protocol",
                                               f"bad PROXY header from trusted proxy {peer}: {exc}")
                take = len(data) if header is None else header.length - len(got)
                got += sock.recv(take)
                if header is not None:
                    return header.client or peer  # LOCAL/UNKNOWN: the balancer's own connection
            else:  # readable said so but nothing is there (or _readable could not wait): do not spin
                await asyncio.sleep(0.01)
            await self._readable(sock)

    def _proxy_refused(self, sock: socket.socket, peer: str, source: str, rule: str, why: str) -> None:
        _reset(sock)
        self._limited(logging.WARNING, "tunnel.proxy_refused", source, "%s: connection from %s refused (%s): %s",
                      self.name, peer, rule, why, peer=peer)
        if self.on_proxy_refused is not None:
            self.on_proxy_refused(peer, why, rule)
        return None

    async def _readable(self, sock: socket.socket) -> None:
        """Wait until the client has sent something (no TLS engine, no buffers until then)."""
        fut = self._loop.create_future()
        fd = sock.fileno()
        try:
            self._loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        except RuntimeError:  # uvloop: the number was an aborted transport's in this very iteration
            return  # rare: start TLS at once, as before
        try:
            await fut
        finally:
            self._loop.remove_reader(fd)

    def _close(self, sock: socket.socket, proto, why: str) -> None:
        if not ws.close_accepted(proto, why, self._loop):
            _reset(sock)  # no-op when a transport took it over already

    def _limited(self, level: int, event: str, source: str, msg: str, *args, peer: str, code=None) -> None:
        extra = {"peer_addr": peer, "listener": self.name}
        if code is not None:
            extra["code"] = code
        logs.limited(log, level, event, source, msg, *args, extra=extra)


def refuse_logged(event: str, source: str | None, msg: str, *args, **fields) -> None:
    """A listener factory's refusal of an upgrade: one rate-limited line per (event, source)."""
    logs.limited(log, logging.WARNING, event, source or "?", msg, *args, extra=fields)


async def create_server(listener_factory, host: str, port: int, ssl_ctx: ssl.SSLContext | None, *,
                        handshake_timeout: float, max_frame_size: int, name: str, max_handshakes: int,
                        per_source: int, backlog: int = 1024):
    """Listen on host:port for (TLS) WebSocket tunnels; ``listener_factory(request, peer)`` decides on each
    upgrade (``peer``: "ip:port", or None). Raises OSError when it cannot listen."""
    factory = ws.server_protocol(listener_factory, handshake_timeout, max_frame_size)
    if factory is None:  # another picows: keep working, only without the limits and log lines here
        log.warning("this picows version cannot hand over accepted sockets; %s runs without its handshake "
                    "limits and failed TLS handshakes will not be logged", name,
                    extra={"event": "tunnel.tls_logging_unavailable"})
        return await ws.fallback_server(listener_factory, host, port, ssl_ctx, handshake_timeout=handshake_timeout,
                                        max_frame_size=max_frame_size, backlog=backlog)
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _name, sockaddr in dict.fromkeys(infos):
            s = socket.socket(family, type_, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(sockaddr)
            s.listen(backlog)
            s.setblocking(False)
    except OSError:
        for s in socks:
            s.close()
        raise
    return TlsWsServer(socks, factory, ssl_ctx, handshake_timeout, name=name, max_handshakes=max_handshakes,
                       per_source=per_source)
