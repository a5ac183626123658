"""The 4-ha picture in network namespaces: one host per box, real processes, real nginx.

Hosts (each its own namespace and IP on one lab bridge; the test process sits at ``lab.root_ip``
and reaches every host directly, so clients run from the root namespace):

* ``cloud1``, ``cloud2``: cluster members (tunnel listener, peer-link listener, client port of
  service A, admin);
* ``onprem1``, ``onprem2``: on-prem gateways (client port of service B, admin);
* ``servera``: echo server behind service A (on-prem side); ``serverb``: echo server behind
  service B (cloud side);
* ``lb``: nginx stream load balancer in front of the members' tunnel ports (only when asked for).

Admin endpoints bind on 127.0.0.1 *inside* each host (the product refuses a network-reachable
admin endpoint without ``gateway.admin_token``, and the test harness sends no token); the test
reads them from a thread switched into that host (:meth:`Topology.status`, ``host.entered()``),
which also keeps them readable while the host is partitioned.

Every host has its own address, so ports are fixed numbers (the same on every host), as in the
tutorial. Configs come from ``tests/e2e/ha.py`` (``HA``); this module only places them on hosts.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.support.gateway import Gateway
from tests.support.netns import IPTABLES, Host, Lab
from tests.support.nginx import NginxLB
from tests.support.servers import EchoServer
from tests.support.timeouts import scaled, wait_until

from .ha import HA, Addr, make_certs

CLOUDS = ("cloud1", "cloud2")
ONPREMS = ("onprem1", "onprem2")
TUNNEL_PORT = 8443
PEER_PORT = 8444
CLIENT_A_PORT = 5551  # service A on every cloud member (as in the tutorial)
CLIENT_B_PORT = 6661  # service B on every on-prem gateway
ADMIN_PORT = 9090
LB_PORT = 8443
PER_MEMBER = 2
# What ha.py configures (kept here so assertions can name them).
PING_INTERVAL = 0.5
PING_TIMEOUT = 2.0
ROUTE_WAIT = 3.0


@dataclass
class Topology:
    lab: Lab
    ha: HA
    hosts: dict[str, Host]
    gws: dict[str, Gateway]
    echo_a: EchoServer
    echo_b: EchoServer
    lb: NginxLB | None = None
    lb_url: str | None = None
    cloud_ips: list[str] = field(default_factory=list)

    # --- addresses ---------------------------------------------------------------------
    def client_addr(self, name: str) -> tuple[str, int]:
        """Where a client reaches the service that ``name`` accepts (A on members, B on-prem)."""
        return (self.hosts[name].ip, CLIENT_A_PORT if name in CLOUDS else CLIENT_B_PORT)

    def member_url(self, name: str) -> str:
        return f"wss://{self.hosts[name].ip}:{TUNNEL_PORT}/intercloud"

    # --- admin (loopback inside each host) ---------------------------------------------
    def status(self, name: str) -> dict:
        with self.hosts[name].entered():
            return self.gws[name].status()

    def readyz(self, name: str) -> int:
        with self.hosts[name].entered():
            return self.gws[name].http_get("/readyz", timeout=0.5)[0]

    def wait_ready(self, name: str, timeout: float = 20.0) -> None:
        with self.hosts[name].entered():
            self.gws[name].wait_ready(timeout=timeout)

    # --- observations ------------------------------------------------------------------
    def coverage(self, onprem: str) -> dict[str, int]:
        """Live (not draining) tunnels per member, from the on-prem's /api/status."""
        cov: dict[str, int] = {}
        for t in self.status(onprem)["tunnels"]:
            if not t.get("draining"):
                cov[t["peer_node"]] = cov.get(t["peer_node"], 0) + 1
        return cov

    def fully_covered(self, onprems=ONPREMS, clouds=CLOUDS) -> bool:
        want = {c: PER_MEMBER for c in clouds}
        try:
            return all(self.coverage(o) == want for o in onprems)
        except OSError:
            return False

    def wait_full_coverage(self, timeout: float = 20.0, onprems=ONPREMS, clouds=CLOUDS) -> None:
        wait_until(lambda: self.fully_covered(onprems, clouds), timeout,
                   what=f"{'/'.join(onprems)} to hold {PER_MEMBER} tunnels to each of {'/'.join(clouds)}",
                   ignore=(OSError,))

    def coverage_table(self) -> dict[str, dict[str, int] | str]:
        out: dict[str, dict[str, int] | str] = {}
        for o in ONPREMS:
            try:
                out[o] = self.coverage(o)
            except (OSError, AssertionError) as exc:
                out[o] = f"unavailable: {exc}"
        return out

    def echo(self, name: str, data: bytes | None = None, timeout: float = 5.0) -> bytes:
        """One client through ``name``'s client port (from the root namespace): send, half-close,
        read to EOF. Returns what came back; raises OSError on refusal/reset/timeout."""
        data = data if data is not None else f"hello via {name} {random.random()}\n".encode()
        return echo_exchange(self.client_addr(name), data, timeout)

    def check_path(self, name: str) -> None:
        msg = f"path via {name} {random.random()}\n".encode()
        try:
            got = self.echo(name, msg)
        except OSError as exc:
            raise AssertionError(f"client via {name} {self.client_addr(name)} failed: {exc!r}; "
                                 f"coverage {self.coverage_table()}") from None
        assert got == msg, f"client via {name}: sent {msg!r}, got {got!r}"

    def stream_peer(self, via: str, client_port: int) -> str | None:
        """For a client of ``via`` (root namespace, local port ``client_port``): the node at the
        other end of the tunnel that carries its stream, from ``via``'s /api/status."""
        st = self.status(via)
        me = f"{self.lab.root_ip}:{client_port}"
        tunnels = {t["id"]: t["peer_node"] for t in st["tunnels"]}
        for s in st["streams"]:
            if s.get("client") == me and s.get("side") == "accept":
                return tunnels.get(s["tunnel"])
        return None


def echo_exchange(addr: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(addr, timeout=scaled(timeout)) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = bytearray()
        while chunk := s.recv(65536):
            buf += chunk
    return bytes(buf)


def build(stack: contextlib.ExitStack, lab: Lab, tmp_path: Path, gateways: Callable[..., Gateway], *,
          lb_method: str | None = None, fail_timeout: str = "2s", onprems_reach_only_lb: bool = False,
          advertise: bool = False, extra_onprem_tunnel: str | Callable[[list[str]], str] = "",
          before_start: Callable[[dict[str, Host]], None] | None = None, stagger: bool = True,
          connect_name: str | None = None, peers_name: str | None = None,
          ping: tuple[str, str] | None = None) -> Topology:
    """Create the hosts, certificates, echo servers, (nginx,) and start and ready all four
    gateways. Everything started is torn down by ``stack`` (servers, nginx) or the ``gateways``
    fixture (gateways) or the lab (namespaces).

    ``extra_onprem_tunnel`` may be a function of the members' IPs (known only once the hosts
    exist); ``before_start(hosts)`` runs before any gateway starts (packet counters, ...).
    With ``connect_name`` the on-prem gateways dial that one host name, which their hosts' resolver
    answers with both members' addresses (DNS round robin, no load balancer). With ``peers_name``
    the members' cluster.peers is that one name, which each member's resolver answers with its own
    address first, then the other's. ``ping`` is (tunnel.ping_interval, tunnel.ping_timeout) for
    every gateway (default: HA's, i.e. PING_INTERVAL and PING_TIMEOUT above).
    With ``stagger`` the on-prem gateways start once both members have formed the cluster;
    without it all four start at once."""
    hosts = {n: lab.host(n) for n in (*CLOUDS, *ONPREMS, "servera", "serverb", "lb")}
    with hosts["servera"].entered():
        echo_a = stack.enter_context(EchoServer(hosts["servera"].ip))
    with hosts["serverb"].entered():
        echo_b = stack.enter_context(EchoServer(hosts["serverb"].ip))
    cloud_ips = [hosts[c].ip for c in CLOUDS]
    lb_ip = hosts["lb"].ip
    certs = make_certs(tmp_path / "certs", list(CLOUDS), list(ONPREMS),
                       sans=[*cloud_ips, lb_ip, *([connect_name] if connect_name else [])])
    clouds = {c: {"tunnel": Addr(hosts[c].ip, TUNNEL_PORT), "peer": Addr(hosts[c].ip, PEER_PORT),
                  "client": Addr(hosts[c].ip, CLIENT_A_PORT), "admin": Addr("127.0.0.1", ADMIN_PORT)}
              for c in CLOUDS}
    onprems = {o: {"client": Addr(hosts[o].ip, CLIENT_B_PORT), "admin": Addr("127.0.0.1", ADMIN_PORT)}
               for o in ONPREMS}
    lb = lb_url = None
    if lb_method:
        lb_url = f"wss://{lb_ip}:{LB_PORT}/intercloud"
        connect_urls = [lb_url]
        lb = NginxLB(tmp_path, hosts["lb"], LB_PORT, [(ip, TUNNEL_PORT) for ip in cloud_ips],
                     method=lb_method, fail_timeout=fail_timeout)
        stack.enter_context(lb)
    elif connect_name:
        connect_urls = [f"wss://{connect_name}:{TUNNEL_PORT}/intercloud"]
        for o in ONPREMS:
            hosts[o].set_hosts_file({connect_name: cloud_ips})
    else:
        connect_urls = [f"wss://{ip}:{TUNNEL_PORT}/intercloud" for ip in cloud_ips]
    if peers_name:
        for c in CLOUDS:
            own = hosts[c].ip
            hosts[c].set_hosts_file({peers_name: [own, *(ip for ip in cloud_ips if ip != own)]})
    if onprems_reach_only_lb:
        for o in ONPREMS:
            for ip in cloud_ips:
                hosts[o].block(ip)
    if callable(extra_onprem_tunnel):
        extra_onprem_tunnel = extra_onprem_tunnel(cloud_ips)
    if before_start is not None:
        before_start(hosts)
    ha = HA(certs, clouds, onprems, Addr(hosts["servera"].ip, echo_a.port), Addr(hosts["serverb"].ip, echo_b.port),
            connect_urls=connect_urls, advertise=advertise, per_member=PER_MEMBER,
            extra_onprem_tunnel=extra_onprem_tunnel, peers_name=peers_name,
            **({"ping": ping} if ping is not None else {}))
    gws: dict[str, Gateway] = {}
    topo = Topology(lab, ha, hosts, gws, echo_a, echo_b, lb, lb_url, cloud_ips)
    for c in CLOUDS:
        gws[c] = gateways(c, ha.cloud_config(c), argv_prefix=hosts[c].argv_prefix, ready=False)
    if stagger:
        # The cluster first, then the sites: a member-list change while an on-prem tunnel is
        # still handshaking can be lost (see test_simultaneous_start_covers_every_member).
        for c in CLOUDS:
            topo.wait_ready(c)
            gws[c].wait_log(lambda r: r.get("event") == "cluster.members" and set(r["members"]) == set(CLOUDS),
                            timeout=10)
    for o in ONPREMS:
        gws[o] = gateways(o, ha.onprem_config(o), argv_prefix=hosts[o].argv_prefix, ready=False)
    for name in gws:
        topo.wait_ready(name)
    return topo


# --- long paced transfers -------------------------------------------------------------------

class Transfer(threading.Thread):
    """One long echo transfer from the root namespace at a bounded rate; SHA-256 of what was
    sent and of what came back. ``local_port`` identifies the stream in the gateways' status.
    The first ``gate_at`` of the payload goes at once (or ``chunk`` every ``pace`` s), the rest
    (in chunks, paced too) once ``gate`` is set: the test sets it after injecting its failure."""

    def __init__(self, addr: tuple[str, int], size: int, seed: int, *, chunk: int = 32 * 1024,
                 gate: threading.Event | None = None, label: str = "", via: str = "",
                 pace: float = 0.0, gate_at: float = 0.5):
        super().__init__(daemon=True, name=f"transfer-{label or seed}")
        self.addr = addr
        self.label = label
        self.via = via  # the gateway whose client port it uses
        self.path: set[str] = set()  # every gateway its stream passes (filled in by the test)
        self.payload = random.Random(seed).randbytes(size)
        self.sent_digest = hashlib.sha256(self.payload).hexdigest()
        self.chunk = chunk
        self.gate = gate  # the second half waits for it: the test sets it once the failure is injected
        self.gate_at = gate_at  # fraction of the payload sent before waiting for ``gate``
        self.pace = pace  # seconds between two chunks (0: as fast as the stream takes them)
        self.sent = 0  # bytes handed to the socket so far
        self.received = 0
        self.local_port: int | None = None
        self.error: str | None = None
        self.recv_end: str | None = None  # how reading ended: "EOF" or the exception
        self.recv_digest: str | None = None
        self.ended_at: float | None = None
        self.connected = threading.Event()
        self._sock: socket.socket | None = None

    def run(self) -> None:
        got = hashlib.sha256()
        try:
            # Bound before the connect: the port is then unique on this host, not only per
            # destination, so that "root_ip:port" (the stream's ``client`` in every gateway's
            # logs and status) names one transfer even among transfers to different ports.
            s = socket.create_connection(self.addr, timeout=scaled(30), source_address=("", 0))
            self._sock = s
            self.local_port = s.getsockname()[1]
            self.connected.set()
            sender = threading.Thread(target=self._send, args=(s,), daemon=True)
            sender.start()
            try:
                while chunk := s.recv(1 << 16):
                    got.update(chunk)
                    self.received += len(chunk)
                self.recv_end = "EOF"
            except OSError as exc:
                self.recv_end = repr(exc)
                raise
            sender.join(scaled(30))
        except OSError as exc:
            self.error = self.error or repr(exc)
        finally:
            self.recv_digest = got.hexdigest()
            self.ended_at = time.monotonic()
            self.connected.set()
            if self._sock is not None:
                self._sock.close()

    def _send(self, s: socket.socket) -> None:
        try:
            split = int(len(self.payload) * self.gate_at)
            if self.pace:
                self._send_chunks(s, 0, split)
            else:
                s.sendall(self.payload[:split])
                self.sent = split
            if self.gate is not None:
                self.gate.wait(scaled(60))  # the transfer must span the failure
            self._send_chunks(s, split, len(self.payload))
            s.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = self.error or f"send: {exc!r}"

    def _send_chunks(self, s: socket.socket, start: int, end: int) -> None:
        """``payload[start:end]`` in ``chunk``-sized writes, ``pace`` seconds apart (a paced
        transfer keeps bytes in flight for as long as it runs, whatever happens meanwhile)."""
        for off in range(start, end, self.chunk):
            if self.pace and off > start:
                time.sleep(self.pace)
            s.sendall(self.payload[off:min(off + self.chunk, end)])
            self.sent = min(off + self.chunk, end)

    @property
    def intact(self) -> bool:
        return self.error is None and self.recv_digest == self.sent_digest and self.received == len(self.payload)

    def describe(self) -> str:
        return (f"{self.label}: port {self.local_port} received {self.received}/{len(self.payload)} "
                f"read ended by {self.recv_end} error={self.error} intact={self.intact}")


# --- packet counters ------------------------------------------------------------------------

def count_syns(host: Host, ips: list[str], port: int) -> None:
    """Count TCP SYNs ``host`` sends to ``ips``:``port`` (mangle table: the lab owns filter)."""
    for ip in ips:
        host.run([IPTABLES, "-w", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--syn", "-d", f"{ip}/32",
                  "--dport", str(port), "-m", "comment", "--comment", "ic-syn-count"])


def syn_counts(host: Host) -> dict[str, int]:
    out = host.run([IPTABLES, "-w", "-t", "mangle", "-nvxL", "OUTPUT"]).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        if "ic-syn-count" not in line:
            continue
        fields = line.split()
        dst = [f for f in fields if re.fullmatch(r"\d+\.\d+\.\d+\.\d+(/32)?", f)]
        counts[dst[-1].split("/")[0]] = int(fields[0])
    return counts
