"""What the Helm chart promises, in network namespaces: cloud members behave as a StatefulSet behind a
headless Service (issue 17, docs/ha.md §12).

Hosts (each its own namespace and address on one lab bridge; clients run in the test process, in the
root namespace):

* ``cloud1``..``cloud3``: cluster members, found through ONE name, ``members.test``, that every
  gateway's hosts file resolves to every member's current address (the headless Service):
  ``cluster.peers`` is that name, and so is the on-prem gateways' ``tunnel.connect``;
* ``onprem1``, ``onprem2``: on-prem gateways (service B's client port, never restarted);
* ``servera``/``serverb``: echo servers behind service A (on-prem side) and B (cloud side);
* ``lb``: nginx in front of the members' service-A ports (the client-facing LoadBalancer Service),
  rewritten as members come and go, as Kubernetes updates a Service's endpoints.

A **replacement** is what Kubernetes does to a StatefulSet pod: the member is taken out of the
client balancer, its address leaves the name and it gets SIGTERM (the preStop drain); once it has
exited, the same node_id starts in a NEW namespace at a NEW address, the name resolves to the new
address, and the member goes back into the balancer when /readyz says so. Nothing else restarts: the
other members and the on-prem gateways must converge by themselves (every on-prem holds per_member
tunnels to every member, every member links to every other, nobody dials the old address).

Throughout, a paced client load of more than 100 new connections/s (short echo exchanges, never
retried) enters through service B (on-prem client ports) and service A (nginx), and long transfers
(paced, both directions, SHA-256 checked) run without a break: every drain finds long streams on the
member it stops (one is started right at it), and they must complete byte-exact. A stream cannot
outlive its own end (protocol §10.7): a client's TCP connection that terminates in a member ends with
that member, so a long transfer here lasts a few seconds, less than drain_timeout, and the drain holds
it; a new one takes its slot, so long transfers run during the whole roll.

Each test ends with 0 failed new connections and 0 broken streams, and prints its timeline.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.gateway import Gateway
from tests.support.netns import Host, Lab, lab_fixture
from tests.support.nginx import NginxLB
from tests.support.servers import EchoServer
from tests.support.timeouts import scaled, wait_until

from .ha import HA, Addr, make_certs
from .netns_topology import Transfer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.netns,
    pytest.mark.needs_root,
    pytest.mark.needs_binary("ip", "nginx", "iptables"),
]

MEMBERS = ("cloud1", "cloud2", "cloud3")
ONPREMS = ("onprem1", "onprem2")
NAME = "members.test"  # the headless Service's name: every member's address
TUNNEL_PORT, PEER_PORT, CLIENT_A_PORT, CLIENT_B_PORT, ADMIN_PORT, LB_PORT = 8443, 8444, 5551, 6661, 9090, 5551
PER_MEMBER = 2
RATE = 120  # new client connections per second, all paths together (the issue asks for >= 100)
MIN_RATE = 100
LOADERS = 8  # client threads; each paces RATE / LOADERS connections per second
LONG_SIZE = 3 << 20  # bytes per long transfer, each way
LONG_CHUNK, LONG_PACE = 16 << 10, 0.02  # ~800 KB/s each way: ~4 s per transfer, below drain_timeout (10 s)


@pytest.fixture
def lab():
    yield from lab_fixture()


# --- the StatefulSet ---------------------------------------------------------------------------

@dataclass
class Member:
    node: str
    host: Host
    gw: Gateway
    generation: int = 0


@dataclass
class StatefulSet:
    lab: Lab
    tmp: Path
    gateways: object  # the conftest factory
    ha: HA
    members: dict[str, Member]
    onprems: dict[str, tuple[Host, Gateway]]
    lb: NginxLB
    echo_a: EchoServer
    echo_b: EchoServer
    in_name: set[str] = field(default_factory=set)  # members whose address the name lists now
    old_ips: set[str] = field(default_factory=set)  # addresses of members that were replaced

    # -- the headless Service and the client Service ---------------------------------------
    def publish(self) -> None:
        """Rewrite every gateway host's hosts file: NAME -> the listed members' current addresses
        (a name's lookup happens in the gateway's own namespace, ``ip netns exec`` mounts the file)."""
        ips = sorted(self.members[n].host.ip for n in self.in_name)
        for h in [*(m.host for m in self.members.values()), *(h for h, _ in self.onprems.values())]:
            h.set_hosts_file({NAME: ips})

    def balance(self) -> None:
        """nginx's upstreams = the service-A ports of the members in the client Service (graceful
        reload: connections already proxied stay on the old worker until they end)."""
        self.lb.reload(backends=[(self.members[n].host.ip, CLIENT_A_PORT) for n in sorted(self.in_name)])

    # -- observation (admin endpoints are on 127.0.0.1 inside each host) ---------------------
    def status(self, name: str) -> dict:
        host, gw = (self.members[name].host, self.members[name].gw) if name in self.members else self.onprems[name]
        with host.entered():
            return gw.status()

    def wait_ready(self, name: str, timeout: float = 20.0) -> None:
        m = self.members[name]
        with m.host.entered():
            m.gw.wait_ready(timeout=timeout)

    def convergence(self) -> list[str]:
        """What is still missing for 'converged' (empty: converged)."""
        missing: list[str] = []
        ips = {m.host.ip for m in self.members.values()}
        incarnations = {n: self.status(n)["incarnation"] for n in MEMBERS}
        for o in ONPREMS:
            st = self.status(o)
            cov: dict[str, int] = {}
            for t in st["tunnels"]:
                if not t.get("draining"):
                    cov[t["peer_node"]] = cov.get(t["peer_node"], 0) + 1
            if cov != {n: PER_MEMBER for n in MEMBERS}:
                missing.append(f"{o} tunnels {cov}")
            stale = [t["peer_addr"] for t in st["tunnels"] if t["peer_addr"].rsplit(":", 1)[0] in self.old_ips]
            if stale:
                missing.append(f"{o} still has tunnels to old addresses {stale}")
            dialed = {t["address"] for t in st["dial_targets"]}
            if dialed != ips:
                missing.append(f"{o} dials {sorted(dialed)}, members are at {sorted(ips)}")
        for n in MEMBERS:
            st = self.status(n)
            linked = {link["peer_node"] for link in st["peer_links"]}
            if linked != set(MEMBERS) - {n}:
                missing.append(f"{n} links to {sorted(linked)}")
            table = {m["node_id"]: m["incarnation"] for m in st["members"]}
            if table != incarnations:
                missing.append(f"{n} member table {table} != {incarnations}")
            dialed = {t["address"] for t in st["dial_targets"]}
            if dialed != ips:
                missing.append(f"{n} peer targets {sorted(dialed)}, members are at {sorted(ips)}")
        return missing

    def wait_converged(self, timeout: float = 20.0) -> None:
        last: list[list[str]] = [[]]

        def done() -> bool:
            last[0] = self.convergence()
            return not last[0]

        try:
            wait_until(done, timeout, interval=0.1, ignore=(OSError,), what="convergence")
        except AssertionError:
            raise AssertionError(f"not converged within {timeout}s: {last[0]}") from None

    # -- one StatefulSet pod replacement ---------------------------------------------------
    def replace(self, name: str, t0: float, long_at: tuple[str, int] | None = None) -> dict:
        """Take ``name`` out, drain it, start it again at a new address, wait until every gateway
        converged. Returns its timeline row (seconds since ``t0``)."""
        row: dict = {"member": name}
        old = self.members[name]
        self.in_name.discard(name)
        self.balance()  # endpoints first: no new client is sent to the member that will drain
        self.publish()  # and its address leaves the name
        held = Transfer((old.host.ip, CLIENT_A_PORT), LONG_SIZE, seed=900 + MEMBERS.index(name), chunk=LONG_CHUNK,
                        pace=LONG_PACE, label=f"held-by-{name}", via=name)
        held.start()  # a long stream that starts at the member itself: its drain must hold it
        assert held.connected.wait(scaled(10)) and held.local_port, held.describe()
        wait_until(lambda: held.received >= 64 << 10, 10, what=f"{held.label} to be flowing")
        mark = old.gw.log_mark()
        row["sigterm"] = time.monotonic() - t0
        old.gw.terminate()
        rc = old.gw.wait_exit(timeout=20)
        row["exited"] = time.monotonic() - t0
        assert rc == 0, f"{name} exited with {rc} after SIGTERM\n{old.gw.log_tail()}"
        drained = old.gw.wait_log(lambda r: r.get("event") == "gateway.draining", since=mark, timeout=1)
        stopped = old.gw.wait_log(lambda r: r.get("event") == "gateway.stopped", since=mark, timeout=1)
        row["streams at SIGTERM"] = drained["streams"]
        row["streams cut"] = stopped["streams_cut"]
        row["held"] = held
        self.old_ips.add(old.host.ip)

        gen = old.generation + 1
        host = self.lab.host(f"{name}-r{gen}")  # a new pod: a new namespace, a new address
        self.ha.clouds[name] = _cloud_addrs(host.ip)
        gw = self.gateways(f"{name}-r{gen}", self.ha.cloud_config(name), argv_prefix=host.argv_prefix, start=False)
        self.members[name] = Member(name, host, gw, gen)
        self.in_name.add(name)
        self.publish()  # before the process starts: `ip netns exec` mounts the hosts file only if it exists
        gw.start()
        row["started"] = time.monotonic() - t0
        row["address"] = f"{old.host.ip} -> {host.ip}"
        self.wait_ready(name)
        row["ready"] = time.monotonic() - t0
        self.balance()  # ready: back into the client Service
        self.wait_converged()
        row["converged"] = time.monotonic() - t0
        return row


def _cloud_addrs(ip: str) -> dict[str, Addr]:
    return {"tunnel": Addr(ip, TUNNEL_PORT), "peer": Addr(ip, PEER_PORT), "client": Addr(ip, CLIENT_A_PORT),
            "admin": Addr("127.0.0.1", ADMIN_PORT)}


@pytest.fixture
def statefulset(lab, gateways, tmp_path):
    with contextlib.ExitStack() as stack:
        hosts = {n: lab.host(n) for n in (*MEMBERS, *ONPREMS, "servera", "serverb", "lb")}
        with hosts["servera"].entered():
            echo_a = stack.enter_context(EchoServer(hosts["servera"].ip))
        with hosts["serverb"].entered():
            echo_b = stack.enter_context(EchoServer(hosts["serverb"].ip))
        # Tunnel certificates name the Service (on-prem gateways verify the name they dial); peer
        # links are checked by node id (cluster.peer_names), never by address: a new address needs
        # no new certificate, as with a StatefulSet.
        certs = make_certs(tmp_path / "certs", list(MEMBERS), list(ONPREMS), sans=[NAME])
        onprem_addrs = {o: {"client": Addr(hosts[o].ip, CLIENT_B_PORT), "admin": Addr("127.0.0.1", ADMIN_PORT)}
                        for o in ONPREMS}
        ha = HA(certs, {n: _cloud_addrs(hosts[n].ip) for n in MEMBERS}, onprem_addrs,
                Addr(hosts["servera"].ip, echo_a.port), Addr(hosts["serverb"].ip, echo_b.port),
                connect_urls=[f"wss://{NAME}:{TUNNEL_PORT}/intercloud"], per_member=PER_MEMBER, peers_name=NAME)
        lb = NginxLB(tmp_path, hosts["lb"], LB_PORT, [(hosts[n].ip, CLIENT_A_PORT) for n in MEMBERS],
                     method="round_robin", fail_timeout="1s", name="nginx-a", half_close=True)
        stack.enter_context(lb)
        sts = StatefulSet(lab, tmp_path, gateways, ha, {}, {}, lb, echo_a, echo_b, in_name=set(MEMBERS))
        for n in MEMBERS:
            sts.members[n] = Member(n, hosts[n], None)  # type: ignore[arg-type]
        for o in ONPREMS:
            sts.onprems[o] = (hosts[o], None)  # type: ignore[assignment]
        sts.publish()
        for n in MEMBERS:
            sts.members[n].gw = gateways(n, ha.cloud_config(n), argv_prefix=hosts[n].argv_prefix, ready=False)
        for n in MEMBERS:
            sts.wait_ready(n)
        for o in ONPREMS:
            sts.onprems[o] = (hosts[o], gateways(o, ha.onprem_config(o), argv_prefix=hosts[o].argv_prefix,
                                                 ready=False))
        for o in ONPREMS:
            with hosts[o].entered():
                sts.onprems[o][1].wait_ready(timeout=20)
        sts.wait_converged(timeout=30)
        yield sts


# --- client load -------------------------------------------------------------------------------

class Load:
    """Paced short echo clients (never retried) through service B at every on-prem gateway and
    service A through nginx, plus long transfers in ``long_slots`` that start again as they end."""

    def __init__(self, sts: StatefulSet) -> None:
        self.entries = [(f"B via {o}", (h.ip, CLIENT_B_PORT)) for o, (h, _) in sts.onprems.items()]
        self.entries += [("A via nginx", sts.lb.address)] * len(self.entries)
        self.long_entries = [(f"long B via {o}", (h.ip, CLIENT_B_PORT)) for o, (h, _) in sts.onprems.items()]
        self.long_entries += [("long A via nginx", sts.lb.address)] * 2
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.per_path: dict[str, int] = {}
        self.transfers: list[Transfer] = []
        self.t0 = time.monotonic()
        self.threads = [threading.Thread(target=self._clients, args=(i,), daemon=True, name=f"load-{i}")
                        for i in range(LOADERS)]
        self.threads += [threading.Thread(target=self._long, args=(i,), daemon=True, name=f"long-{i}")
                         for i in range(len(self.long_entries))]

    def start(self) -> "Load":
        self.t0 = time.monotonic()
        for th in self.threads:
            th.start()
        return self

    def _clients(self, i: int) -> None:
        interval = LOADERS / RATE
        due = time.monotonic() + random.random() * interval
        n = 0
        while not self.stop.is_set():
            label, addr = self.entries[(i + n) % len(self.entries)]
            n += 1
            msg = f"{label} {i}.{n} {random.random()}\n".encode()
            start = time.monotonic()
            try:
                with socket.create_connection(addr, timeout=scaled(10)) as s:
                    s.sendall(msg)
                    s.shutdown(socket.SHUT_WR)
                    got = bytearray()
                    while chunk := s.recv(65536):
                        got += chunk
                problem = None if got == msg else f"got {bytes(got)[:60]!r}"
            except OSError as exc:
                problem = repr(exc)
            with self.lock:
                if problem is None:
                    self.ok += 1
                    self.per_path[label] = self.per_path.get(label, 0) + 1
                else:
                    self.failures.append(f"{label} at {start - self.t0:.2f}s: {problem}")
            due += interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing only: nothing waits on this
            else:
                due = time.monotonic()  # behind (CPU): do not burst to catch up

    def _long(self, i: int) -> None:
        label, addr = self.long_entries[i]
        k = 0
        while not self.stop.is_set():
            k += 1
            tr = Transfer(addr, LONG_SIZE, seed=1000 * i + k, chunk=LONG_CHUNK, pace=LONG_PACE,
                          label=f"{label} #{k}", via=label)
            with self.lock:
                self.transfers.append(tr)
            tr.run()  # in this thread: the next one starts when it ends

    def finish(self) -> float:
        """Stop new clients, let running transfers end; returns the seconds the load ran."""
        self.stop.set()
        elapsed = time.monotonic() - self.t0
        for th in self.threads:
            th.join(scaled(30))
        return elapsed


# --- the tests -----------------------------------------------------------------------------------

def _roll(sts: StatefulSet, order: tuple[str, ...], title: str, capsys, record_property, tmp_path) -> None:
    others = {o: gw.pid for o, (_, gw) in sts.onprems.items()}
    others.update({n: sts.members[n].gw.pid for n in MEMBERS if n not in order})
    load = Load(sts).start()
    wait_until(lambda: load.ok >= RATE // 2, 10, what="the client load to run")
    rows: list[dict] = []
    elapsed = 0.0
    try:
        for name in order:
            rows.append(sts.replace(name, load.t0))
        # a last few seconds of load on the converged set, then drain the load
        end = time.monotonic() + 2
        wait_until(lambda: time.monotonic() >= end, 5, interval=0.1, what="the last load seconds")
    finally:
        elapsed = load.finish()
        table = _timeline(title, rows, load, elapsed)
        (tmp_path / "timeline.txt").write_text(table + "\n" + "\n".join(load.failures) + "\n")
        record_property("timeline", table)
        with capsys.disabled():
            print("\n" + table)
    assert sts.convergence() == [], "converged at the end"
    for n, pid in others.items():  # nothing else restarted
        gw = sts.onprems[n][1] if n in sts.onprems else sts.members[n].gw
        assert gw.running and gw.pid == pid, f"{n} was restarted or died"
    broken = [tr.describe() for tr in load.transfers if not tr.intact]
    broken += [r["held"].describe() for r in rows if not r["held"].intact]
    cut = {r["member"]: r["streams cut"] for r in rows if r["streams cut"]}
    assert not load.failures and not broken and not cut, (
        f"{len(load.failures)} failed new connections of {load.ok + len(load.failures)}, "
        f"{len(broken)} broken streams of {len(load.transfers) + len(rows)}, streams cut by drains {cut}:\n"
        + "\n".join(load.failures[:30] + broken) + "\n" + table)
    rate = load.ok / elapsed
    assert rate >= MIN_RATE, f"only {rate:.0f} new connections/s (wanted >= {MIN_RATE})\n{table}"
    held_at_sigterm = [r["member"] for r in rows if r["streams at SIGTERM"] < 1]
    assert not held_at_sigterm, f"drains with nothing to hold: {held_at_sigterm}"


def _timeline(title: str, rows: list[dict], load: Load, elapsed: float) -> str:
    cols = ("member", "address", "sigterm", "exited", "started", "ready", "converged", "streams at SIGTERM",
            "streams cut")
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [cols] + [tuple(fmt(r.get(c, "")) for c in cols) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [f"{title}: seconds since the load started. sigterm: preStop drain begins (after nginx and the "
             f"name dropped the member); exited: the process ended (status 0); started: the replacement "
             f"at its new address; ready: its /readyz 200; converged: every on-prem holds {PER_MEMBER} "
             f"tunnels to every member, every member links to every other, nobody dials an old address."]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    total = load.ok + len(load.failures)
    longs = load.transfers + [r["held"] for r in rows]
    moved = sum(tr.received for tr in longs)
    lines.append(f"new connections: {total} in {elapsed:.1f}s = {load.ok / max(elapsed, 1e-9):.0f}/s ok, "
                 f"{len(load.failures)} failed; per path {dict(sorted(load.per_path.items()))}")
    lines.append(f"long transfers: {len(longs)} ({sum(tr.intact for tr in longs)} byte-exact), "
                 f"{moved / 1e6:.1f} MB echoed; streams cut by drains: {sum(r.get('streams cut', 0) for r in rows)}")
    return "\n".join(lines)


def test_member_replaced_at_a_new_address_converges_under_load(statefulset, capsys, record_property, tmp_path):
    """One member is replaced by a pod at a new address under the same name and node_id; the old
    address leaves the name. Without restarting anything else, on-prem gateways and peers converge on
    the new address and stop dialing the old one; no client fails, no stream breaks."""
    _roll(statefulset, ("cloud2",), "Replacement of cloud2", capsys, record_property, tmp_path)


def test_rolling_restart_of_every_member_under_load(statefulset, capsys, record_property, tmp_path):
    """Every member in turn, one at a time (SIGTERM drain, exit, replacement at a new address, ready,
    converged), under >= 100 new connections/s and long transfers: 0 failed, 0 broken."""
    _roll(statefulset, MEMBERS, "Rolling restart", capsys, record_property, tmp_path)
