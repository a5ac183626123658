"""Where a gateway dials a ``wss://`` URL whose host may be a name for several members (docs/ha.md §3,
§3.2): one dial target per member address the name resolves to.

A name with three A records is three members (DNS round robin in front of a cluster, a headless
service listing every member), so an on-prem gateway keeps ``per_member`` tunnels to each address and
a member keeps a peer link to each, not to whichever address the resolver happens to list first. A
dual-stack member has an IPv4 and an IPv6 address; it must count once, so the number of targets is
the larger of the two families' address counts, and each target tries "its" address of each family
first; with ``fallback`` (tunnels: any member will do) then every other answer, the same fallback the
OS gives a plain ``connect`` to a name. Not expanded: hosts the caller dials by name (through a
forward proxy, which resolves them; the on-prem network often cannot) and IP literals.

Names are resolved again every ``RESOLVE_EVERY`` seconds, and within ``RETRY_FAILED`` of a change of the member
set (``look_again_soon``: a replaced member comes back at a new address); a failed lookup keeps the last answer. A name
that never resolved is one target whose dial fails with the resolver's error. Addresses are sorted
within a family, so a resolver that rotates its answers keeps each member on the same target.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from typing import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from ..config.values import is_ip_literal

log = logging.getLogger("intercloud.targets")

RESOLVE_EVERY = 30.0  # seconds: how soon a member added to (or removed from) DNS is dialed (or not)
RETRY_FAILED = 1.0  # seconds: a name that never resolved is looked up again at most this often

Address = tuple[int, tuple]  # (family, sockaddr) as getaddrinfo returns them
Lookup = Callable[[str, int], Awaitable[list]]  # loop.getaddrinfo(host, port, type=SOCK_STREAM)


class DialTarget(str):
    """A URL to dial. As a ``str`` it is the URL (logs, metrics labels, the WebSocket request);
    ``host``, ``port``, ``path`` are parsed from it; ``addresses`` are the (family, sockaddr) pairs to
    connect to, in order; empty means by name (through a proxy, or the name did not resolve:
    ``error`` says why)."""

    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[Address, ...]
    error: str | None

    def __new__(cls, url: str, addresses: Sequence[Address] = (), error: str | None = None):
        self = super().__new__(cls, url)
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "wss" else 80)
        self.path = parts.path or "/"
        self.addresses = tuple(addresses)
        self.error = error
        return self

    @property
    def where(self) -> str:
        """host:port, and the address dialed first when the host is a name: for error messages."""
        return self.at(self.addresses[0][1][0] if self.addresses else None)

    def at(self, ip: str | None) -> str:
        """host:port, and ``ip`` when it is not the host itself."""
        return f"{_host(self.host)}:{self.port}" + (f" ({ip})" if ip and ip != self.host else "")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def member_orders(infos: Sequence[tuple], fallback: bool = True) -> list[tuple[Address, ...]]:
    """getaddrinfo answers -> one address order per member (see the module docstring): the member's
    own address of each family, then (``fallback``) the name's other answers.

    >>> v4 = lambda ip: (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 1))
    >>> [[a[1][0] for a in o] for o in member_orders([v4("10.0.0.1"), v4("10.0.0.2")])]
    [['10.0.0.1', '10.0.0.2'], ['10.0.0.2', '10.0.0.1']]
    """
    by_family: dict[int, list[Address]] = {}  # in the order the resolver prefers the families (RFC 6724)
    for family, _type, _proto, _canon, sockaddr in infos:
        addr = (int(family), tuple(sockaddr))
        if addr not in by_family.setdefault(addr[0], []):
            by_family[addr[0]].append(addr)
    # Sorted within a family: a resolver that rotates its answers (round robin) must not move the
    # members between targets at every lookup.
    for addrs in by_family.values():
        addrs.sort(key=lambda a: ipaddress.ip_address(a[1][0]))
    answers = [a for addrs in by_family.values() for a in addrs]
    count = max((len(v) for v in by_family.values()), default=0)
    orders = []
    for i in range(count):
        own = [addrs[i] for addrs in by_family.values() if i < len(addrs)]
        orders.append(tuple(own + [a for a in answers if a not in own] if fallback else own))
    return orders


async def getaddrinfo(host: str, port: int) -> list:
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


class DialTargets:
    """The configured URLs as dial targets, re-resolved every ``RESOLVE_EVERY`` seconds."""

    def __init__(self, urls: Sequence, *, by_name: Callable[[str], bool], lookup: Lookup | None = None,
                 fallback: bool = True, clock: Callable[[], float] = time.monotonic, every: float = RESOLVE_EVERY):
        self._urls = [str(u) for u in urls]
        self._fallback = fallback
        self._by_name = by_name  # host -> dial it by name (a forward proxy resolves it)
        self._lookup = lookup or getaddrinfo
        self._clock = clock
        self._every = every
        self._answers: dict[str, list[tuple[Address, ...]]] = {}  # url -> member orders (last good)
        self._errors: dict[str, str] = {}  # url -> why it never resolved
        self._resolved_at: float | None = None
        self._generation = 0  # bumped by use(): a lookup started before a SIGHUP does not count
        self._inflight: dict[str, asyncio.Future] = {}  # a lookup the resolver has not answered yet
        self._lock = asyncio.Lock()
        self.targets: list[DialTarget] = [DialTarget(u) for u in self._urls]

    def view(self) -> list[dict]:
        """For /api/status: each target's URL, the address it dials first (null: by name) and why a
        name never resolved."""
        return [{"url": str(t), "address": t.addresses[0][1][0] if t.addresses else None, "error": t.error}
                for t in self.targets]

    def use(self, urls: Sequence) -> None:
        """The configured URLs (again: SIGHUP may have changed them); a change starts over."""
        urls = [str(u) for u in urls]
        if urls != self._urls:
            self._urls = urls
            self._generation += 1
            self._answers = {u: a for u, a in self._answers.items() if u in urls}
            self._errors.clear()
            self._resolved_at = None
            self.targets = self._build()

    def wait_time(self) -> float:
        """Seconds until the names are due for another lookup."""
        if self._resolved_at is None:
            return 0.0
        left = (RETRY_FAILED if self._errors else self._every) - (self._clock() - self._resolved_at)
        return max(0.0, left)

    def look_again_soon(self) -> None:
        """The member set changed (a member joined, came back with a new incarnation, or left). A member
        that comes back is often a new instance at a new address under the same name (a StatefulSet pod
        replaced by Kubernetes; docs/ha.md §3.2.1): look the names up again ``RETRY_FAILED`` seconds
        after the change (time for DNS to publish it) instead of at the next ``RESOLVE_EVERY``; a burst
        of changes still means one lookup. The caller wakes whatever waits out ``wait_time()``."""
        if self._resolved_at is not None:
            self._resolved_at = min(self._resolved_at, self._clock() - self._every + RETRY_FAILED)

    def due(self) -> bool:
        if self._resolved_at is None:
            return True
        age = self._clock() - self._resolved_at
        return age >= self._every or (bool(self._errors) and age >= RETRY_FAILED)

    async def refresh(self, timeout: float) -> bool:
        """Resolve the names if due; True when the targets changed."""
        async with self._lock:  # many workers ask at once: one of them resolves
            if not self.due():
                return False
            generation = self._generation
            names = [u for u in self._urls if self._wants_lookup(DialTarget(u))]
            results = await asyncio.gather(*(self._resolve(u, timeout) for u in names))
            if generation == self._generation:  # else the URLs changed meanwhile: look up again soon
                self._resolved_at = self._clock()  # after the answer: until then, workers wait here
            for url, (orders, error) in zip(names, results):
                if url not in self._urls:
                    continue
                if orders:
                    if orders != self._answers.get(url):
                        self._log_answer(url, orders)
                    self._answers[url] = orders
                    self._errors.pop(url, None)
                elif url not in self._answers:  # never resolved: dial by name, fail with why
                    self._errors[url] = error
                else:  # keep the last answer through a resolver outage
                    log.warning("resolving %s failed (%s); dialing its last known addresses", url, error,
                                extra={"event": "dial.resolve_failed", "url": url, "reason": error})
            old, self.targets = self.targets, self._build()
            return [(t, t.addresses, t.error) for t in old] != [(t, t.addresses, t.error) for t in self.targets]

    def _wants_lookup(self, t: DialTarget) -> bool:
        return bool(t.host) and not is_ip_literal(t.host) and not self._by_name(t.host)

    async def _resolve(self, url: str, timeout: float) -> tuple[list[tuple[Address, ...]], str]:
        t = DialTarget(url)
        pending = self._inflight.get(url)
        if pending is None or pending.done():  # a hung resolver: never more than one lookup per name
            pending = self._inflight[url] = asyncio.ensure_future(self._lookup(t.host, t.port))
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even if late
        try:
            async with asyncio.timeout(timeout):
                infos = await asyncio.shield(pending)
        except TimeoutError:
            return [], f"cannot resolve {t.host}: no answer within {timeout:g}s; check DNS and tunnel.connect"
        except OSError as exc:
            return [], f"cannot resolve {t.host}: {exc.strerror or exc}; check DNS and tunnel.connect"
        return member_orders(infos, self._fallback), ""

    def _log_answer(self, url: str, orders: list[tuple[Address, ...]]) -> None:
        if len(orders) < 2 and url not in self._answers:
            return  # one member behind the name, as most configs have: nothing worth a line
        firsts = ", ".join(o[0][1][0] for o in orders)
        log.info("%s resolves to %d member address(es): %s; dialing each", url, len(orders), firsts,
                 extra={"event": "dial.resolved", "url": url, "addresses": [o[0][1][0] for o in orders]})

    def _build(self) -> list[DialTarget]:
        out = []
        for url in self._urls:
            orders = self._answers.get(url)
            if orders:
                out.extend(DialTarget(url, order) for order in orders)
            else:
                out.append(DialTarget(url, error=self._errors.get(url)))
        return out


async def connect_in_order(target: DialTarget, attempt_timeout: float,
                           skipped: list[str] | None = None) -> socket.socket:
    """A connected non-blocking socket to the first of ``target.addresses`` that answers. Each
    address gets ``attempt_timeout``; the error names every address tried. ``skipped`` receives
    "address: error" for the addresses that failed before one answered."""
    loop = asyncio.get_running_loop()
    errors = skipped if skipped is not None else []
    for family, sockaddr in target.addresses:
        sock = None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)  # fails for a family the host lacks
            sock.setblocking(False)
            async with asyncio.timeout(attempt_timeout):
                await loop.sock_connect(sock, sockaddr)
            return sock
        except TimeoutError:
            sock.close()
            errors.append(f"{sockaddr[0]}: no answer within {attempt_timeout:g}s")
        except OSError as exc:  # asyncio's strerror is "Connect call failed (...)": say the errno's
            if sock is not None:
                sock.close()
            errors.append(f"{sockaddr[0]}: {os.strerror(exc.errno) if exc.errno else exc}")
        except BaseException:
            if sock is not None:
                sock.close()
            raise
    raise ConnectError(f"cannot reach {_host(target.host)}:{target.port} at " + "; ".join(errors))


class ConnectError(OSError):
    """No address of a dial target answered; the message lists each address and its error."""
