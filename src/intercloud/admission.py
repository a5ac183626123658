"""Who may open a stream of one service, and how many (docs/operations.md §10.4): the service's
``allow``/``deny`` source networks, ``max_connections`` and ``max_rate``. Pure logic, no sockets:
``StreamDispatch`` asks the service's ``ServiceGate`` at accept (``client_connected``) and when the
peer OPENs a connect service (``stream_requested``), and refuses what it answers.

A gate lives as long as its service's key (tenant, name) is configured: a SIGHUP reload reconfigures
it in place, so the connections it counts and its bucket's tokens carry over.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: str  # a stats.REFUSAL_KINDS value: acl, max_connections, max_rate
    rule: str  # the config rule that matched, as the operator wrote it: "deny 10.0.0.0/8"
    why: str  # what happened and what to do, for the log line


def client_address(client: str) -> Address | None:
    """The address of a stream's ``client`` text ("ip:port", as LocalStream and OPEN carry it; IPv6
    without brackets, or with them). IPv4-mapped IPv6 (a dual-stack listener) is the IPv4 address.
    None when it is no address (an old peer's text, "?")."""
    host = client.rpartition(":")[0] if ":" in client else client
    host = host.strip("[]")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def within(addr: Address | None, networks: list[Network]) -> bool:
    """Whether ``addr`` is in one of ``networks`` (None, no address: in none)."""
    return addr is not None and any(addr.version == net.version and addr in net for net in networks)


class TokenBucket:
    """``rate`` tokens a second, holding at most one second's worth (at least one token)."""

    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def configure(self, rate: float) -> None:
        self.take(0)  # settle what the old rate earned
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = min(self.tokens, self.capacity)

    def take(self, n: float = 1.0, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class ServiceGate:
    """The admission rules of one service and the connections it holds on this gateway."""

    def __init__(self, svc) -> None:
        self.active = 0  # streams admitted and not yet ended (GatewayStats.hold_slot / free_slot)
        self.bucket: TokenBucket | None = None
        self.configure(svc)

    def configure(self, svc) -> None:
        self.name = svc.name
        self.allow: list[Network] = [ipaddress.ip_network(n) for n in svc.allow]
        self.deny: list[Network] = [ipaddress.ip_network(n) for n in svc.deny]
        self.max_connections: int | None = svc.max_connections
        # accept_proxy_protocol: the networks a PROXY header is taken from (None: no header expected)
        self.proxies: list[Network] | None = ([ipaddress.ip_network(n) for n in svc.trusted_proxies]
                                              if getattr(svc, "accept_proxy_protocol", False) else None)
        if svc.max_rate is None:
            self.bucket = None
        elif self.bucket is None:
            self.bucket = TokenBucket(svc.max_rate)
        else:
            self.bucket.configure(svc.max_rate)

    def proxy_refusal(self, peer: str) -> Refusal | None:
        """accept_proxy_protocol: a connection that is not from one of trusted_proxies is refused
        before a byte of it is read (its header would be a lie we cannot tell from the truth)."""
        if self.proxies is None or within(client_address(peer), self.proxies):
            return None
        return Refusal("proxy_protocol", "trusted_proxies",
                       f"{peer} is not in service {self.name}'s trusted_proxies "
                       f"({', '.join(map(str, self.proxies[:4]))}{', ...' if len(self.proxies) > 4 else ''}) and "
                       "accept_proxy_protocol is on: only those load balancers may connect; add the balancer's "
                       "address to trusted_proxies")

    def screen(self, client: str) -> Refusal | None:
        """The source rules: deny wins, then a non-empty allow list must match."""
        if not (self.allow or self.deny):
            return None
        addr = client_address(client)
        if addr is not None:
            for net in self.deny:
                if addr.version == net.version and addr in net:
                    return Refusal("acl", f"deny {net}",
                                   f"source {addr} matches service {self.name}'s deny {net}")
        if not self.allow:
            return None
        if addr is not None:
            for net in self.allow:
                if addr.version == net.version and addr in net:
                    return None
        what = f"source {addr}" if addr is not None else f"client {client!r} (no address to check)"
        return Refusal("acl", "allow", f"{what} is in none of service {self.name}'s allow networks "
                                       f"({', '.join(map(str, self.allow[:4]))}{', ...' if len(self.allow) > 4 else ''}); "
                                       "add its network to allow if it should get through")

    def admit(self, client: str) -> Refusal | None:
        """Source rules, then the concurrent limit, then the rate (a refused connection spends no token)."""
        refusal = self.screen(client)
        if refusal is not None:
            return refusal
        if self.max_connections is not None and self.active >= self.max_connections:
            return Refusal("max_connections", f"max_connections {self.max_connections}",
                           f"service {self.name} already has {self.active} connections on this gateway "
                           f"(max_connections = {self.max_connections}); raise it or add gateways")
        if self.bucket is not None and not self.bucket.take():
            return Refusal("max_rate", f"max_rate {self.bucket.rate:g}",
                           f"service {self.name} takes at most {self.bucket.rate:g} new connections a second "
                           "(max_rate); the client may retry, or raise max_rate")
        return None


def gates_for(services, old: dict | None = None) -> dict[tuple[str, str], ServiceGate]:
    """A gate per configured service key (tenant or "default", name); gates of ``old``
    are reconfigured in place (their counts carry over), gates of removed services are dropped (their
    streams keep a reference and release it when they end)."""
    old = old or {}
    gates: dict[tuple[str, str], ServiceGate] = {}
    for svc in services:
        key = (svc.tenant or "default", svc.name)
        gate = old.get(key)
        if gate is None:
            gate = ServiceGate(svc)
        else:
            gate.configure(svc)
        gates[key] = gate  # counted even without rules: a limit added by a reload sees today's streams
    return gates
