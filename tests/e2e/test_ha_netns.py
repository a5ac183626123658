"""HA end to end in network namespaces: the KWIC 4-ha tutorial picture with real hosts.

cloud1, cloud2 (cluster members with peer links), onprem1, onprem2, an echo server for service A
(on-prem side) and one for service B (cloud side), and an nginx load balancer host, each in its own
namespace (``tests/e2e/netns_topology.py``). Gateways are killed for real (SIGKILL: the kernel
closes their sockets; SIGTERM: graceful drain) or cut off silently (iptables DROP, no FIN).
Clients run in the test process, in the root namespace, which reaches every host over the lab
bridge.

What is shown (docs/ha.md):
* the tutorial walkthrough with direct member URLs, every step, with a recovery-time table;
* the 4-ha-lb variant (on-prem sites reach only nginx): a restarted member serves its first
  client at once and is covered again within nginx's fail_timeout + 5 s, with no client trick;
* a silent partition is detected by liveness, and healed;
* streams that do not pass through a failed instance lose no byte; the others end, never hang;
* no black holes: with no route anywhere a client is reset after route_wait, with a log line;
* advertised member URLs are dialed only if tunnel.allow_members allows them;
* one tunnel.connect name that resolves to both members (DNS round robin) covers each of them;
* cluster.peers as one name that resolves to every member links every member.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from tests.support.netns import lab_fixture
from tests.support.timeouts import scaled, wait_until

from .netns_topology import (CLOUDS, ONPREMS, PER_MEMBER, PING_INTERVAL, PING_TIMEOUT, ROUTE_WAIT, TUNNEL_PORT,
                             Topology, Transfer, build, count_syns, echo_exchange, syn_counts)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.netns,
    pytest.mark.needs_root,
    pytest.mark.needs_binary("ip", "nginx", "iptables"),
]

FAIL_TIMEOUT = 2.0  # nginx fail_timeout in the load-balancer tests


@pytest.fixture
def lab():
    yield from lab_fixture()


@pytest.fixture
def topology(lab, gateways, tmp_path):
    """``topology(**kw) -> Topology``: build the 4-ha picture once in this test's lab."""
    with contextlib.ExitStack() as stack:
        yield lambda **kw: build(stack, lab, tmp_path, gateways, **kw)


# --- helpers ---------------------------------------------------------------------------------

def _stop(topo: Topology, name: str, sig: str) -> None:
    gw = topo.gws[name]
    if sig == "SIGKILL":
        gw.kill()
    else:
        gw.terminate()
        assert gw.wait_exit(timeout=15) == 0, f"{name} did not exit cleanly on SIGTERM\n{gw.log_tail()}"
    assert not gw.running


def _assert_down(topo: Topology, name: str) -> None:
    """The stopped gateway's client port is really gone (refused by its host's kernel)."""
    with pytest.raises(ConnectionRefusedError):
        echo_exchange(topo.client_addr(name), b"x", timeout=2)


def _first_echo(topo: Topology, name: str, t0: float, out: dict) -> None:
    """From t0, connect to ``name``'s client port until a client gets its echo. Refused
    connects (listener not bound yet) are retried and not counted; ``attempts`` counts
    clients that got in, so 1 means the very first admitted client was served. Failures are
    recorded with start/end time (s after t0) and the client's local port (to find it in logs)."""
    addr = topo.client_addr(name)
    state = {"attempts": 0}

    def one_client() -> bool:
        msg = f"recovery {name} {state['attempts']}\n".encode()
        start = time.monotonic() - t0
        port = None
        try:
            with socket.create_connection(addr, timeout=scaled(ROUTE_WAIT + 5)) as s:
                port = s.getsockname()[1]
                s.sendall(msg)
                s.shutdown(socket.SHUT_WR)
                got = bytearray()
                while chunk := s.recv(65536):
                    got += chunk
        except ConnectionRefusedError:
            if port is None:  # the listener is not bound yet: not a client that got in
                return False
            got = "ConnectionRefusedError"
        except OSError as exc:
            got = repr(exc)
        state["attempts"] += 1
        if got == msg:
            out["echo"] = time.monotonic() - t0
            out["attempts"] = state["attempts"]
            return True
        out.setdefault("failures", []).append(
            f"client :{port} {start:.2f}s..{time.monotonic() - t0:.2f}s: {bytes(got) if isinstance(got, bytearray) else got!r}")
        return False

    with contextlib.suppress(AssertionError):  # no echo within the bound: the caller reports it
        wait_until(one_client, 30, interval=0.01, what=f"an echo through {name}")


def _first_ready(topo: Topology, name: str, t0: float, out: dict) -> None:
    gw = topo.gws[name]
    with contextlib.suppress(AssertionError):  # never ready: the caller reports it
        wait_until(lambda: not gw.running or topo.readyz(name) == 200, 30, interval=0.01,
                   ignore=(OSError,), what=f"{name}'s /readyz")
        if gw.running:
            out["ready"] = time.monotonic() - t0


def _restart_and_measure(topo: Topology, names: tuple[str, ...]) -> dict[str, dict]:
    """Start the stopped gateways ``names`` together; measure for each the time to /readyz 200
    and to the first echo through its own client port, then the time until every on-prem
    gateway holds per_member tunnels to every member again."""
    results: dict[str, dict] = {n: {} for n in names}
    t0 = time.monotonic()
    for n in names:
        topo.gws[n].start()
    threads = []
    for n in names:
        for fn in (_first_echo, _first_ready):
            th = threading.Thread(target=fn, args=(topo, n, t0, results[n]), daemon=True)
            th.start()
            threads.append(th)
    for th in threads:
        th.join(scaled(40))
    topo.wait_full_coverage(timeout=30)
    covered = time.monotonic() - t0
    for n in names:
        results[n]["covered"] = covered
    return results


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


# --- 1. the tutorial walkthrough -------------------------------------------------------------

WALKTHROUGH = [
    (("cloud1",), "SIGKILL"), (("cloud1",), "SIGTERM"),
    (("cloud2",), "SIGKILL"), (("cloud2",), "SIGTERM"),
    (("onprem1",), "SIGKILL"), (("onprem1",), "SIGTERM"),
    (("onprem2",), "SIGKILL"), (("onprem2",), "SIGTERM"),
    (("cloud1", "onprem2"), "SIGKILL"), (("cloud2", "onprem1"), "SIGTERM"),
]


def test_tutorial_walkthrough_direct_urls(topology, tmp_path, capsys, record_property):
    """4-ha step by step: stop each instance in turn (SIGKILL and SIGTERM), every client path
    that should work does, restart it, its own path works again; one cloud and one on-prem
    instance down together too. Prints the recovery table (also tmp_path/recovery.txt)."""
    topo = topology()
    topo.wait_full_coverage()
    for n in (*CLOUDS, *ONPREMS):
        topo.check_path(n)
    rows: list[tuple] = []
    problems: list[str] = []
    try:
        for victims, sig in WALKTHROUGH:
            topo.wait_full_coverage()
            for v in victims:
                _stop(topo, v, sig)
            live = [n for n in (*CLOUDS, *ONPREMS) if n not in victims]
            for v in victims:
                _assert_down(topo, v)
            for n in live:  # client A via each live member, client B via each live on-prem
                topo.check_path(n)
            res = _restart_and_measure(topo, victims)
            for n in (*CLOUDS, *ONPREMS):  # everything works again, the restarted paths included
                topo.check_path(n)
            for v in victims:
                r = res[v]
                rows.append((" + ".join(victims), v, sig, ", ".join(live), r.get("ready"), r.get("echo"),
                             r.get("attempts"), r.get("covered")))
                if "echo" not in r:
                    problems.append(f"{sig} {v}: no echo through the restarted gateway: {r}")
                elif r["echo"] > scaled(10):
                    problems.append(f"{sig} {v}: first echo only after {r['echo']:.2f}s: {r}")
                if r.get("attempts", 1) != 1:
                    problems.append(f"{sig} {v}: {r['attempts'] - 1} admitted clients failed before one was "
                                    f"served: {r.get('failures')}")
                if r["covered"] > scaled(10):
                    problems.append(f"{sig} {v}: full coverage only after {r['covered']:.2f}s")
    finally:
        table = _recovery_table(rows)
        (tmp_path / "recovery.txt").write_text(table + "\n")
        record_property("recovery", table)
        with capsys.disabled():
            print("\n" + table)
    assert not problems, "\n".join(problems) + "\n" + table


def _recovery_table(rows: list[tuple]) -> str:
    header = ("step", "restarted", "signal", "paths checked while down", "ready s", "first echo s",
              "clients", "all covered s")
    widths = [max(len(_fmt(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["Recovery after restart, seconds from process start. ready: GET /readyz == 200; first echo: "
             "first new client served through the restarted gateway's own client port; clients: admitted "
             "clients until then (1 = the first was served); all covered: every on-prem gateway holds "
             f"{PER_MEMBER} tunnels to every member again."]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines += ["  ".join(_fmt(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# --- 2. the 4-ha-lb variant ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["least_conn", "round_robin"])
def test_lb_restarted_member_serves_first_client_and_is_covered(topology, method, capsys):
    """On-prem sites reach only nginx and name only its URL. After cloud1 is SIGKILLed (and
    nginx has marked it failed) and restarted: the first client on cloud1's own port after
    /readyz is served without retry, and both on-prem gateways hold per_member tunnels to it
    within fail_timeout + 5 s, with no client traffic in between (the KWIC bug)."""
    topo = topology(lb_method=method, fail_timeout=f"{FAIL_TIMEOUT:g}s", onprems_reach_only_lb=True)
    lb_ip = topo.hosts["lb"].ip
    for o in ONPREMS:  # the sites really cannot reach the members directly
        for c in CLOUDS:
            with pytest.raises(OSError):
                topo.hosts[o].create_connection((topo.hosts[c].ip, TUNNEL_PORT), timeout=0.3).close()
    topo.wait_full_coverage()
    for o in ONPREMS:
        urls = {t["url"] for t in topo.status(o)["tunnels"]}
        assert urls == {topo.lb_url}, f"{o} tunnels dialed {urls}, not only the load balancer"
    for c in CLOUDS:
        addrs = {t["peer_addr"].rsplit(":", 1)[0] for t in topo.status(c)["tunnels"]}
        assert addrs == {lb_ip}, f"{c} sees tunnels from {addrs}, expected only the load balancer"
    for n in (*CLOUDS, *ONPREMS):
        topo.check_path(n)

    err_mark = topo.lb.error_log_path.stat().st_size
    topo.gws["cloud1"].kill()
    for n in ("cloud2", *ONPREMS):
        topo.check_path(n)
    wait_until(lambda: all("cloud1" not in topo.coverage(o) for o in ONPREMS), 5,
               what="on-prem gateways to drop their tunnels to the killed cloud1")
    # the hard case: nginx has seen cloud1 fail (redials through it) and marked it down
    c1 = f"{topo.hosts['cloud1'].ip}:{TUNNEL_PORT}"
    wait_until(lambda: c1 in topo.lb.error_log_text(since=err_mark), 10,
               what=f"nginx to record a failed connect to {c1}")
    for o in ONPREMS:
        assert topo.coverage(o) == {"cloud2": PER_MEMBER}, f"{o} does not hold its tunnels to cloud2"

    mark = topo.gws["cloud1"].log_mark()
    t0 = time.monotonic()
    topo.gws["cloud1"].start()
    topo.wait_ready("cloud1")
    t_ready = time.monotonic() - t0
    msg = b"first client after readyz\n"
    got = echo_exchange(topo.client_addr("cloud1"), msg, timeout=ROUTE_WAIT + 5)
    t_echo = time.monotonic() - t0
    assert got == msg, f"first client on the restarted cloud1 got {got!r}"
    opened = [r for r in topo.gws["cloud1"].log_lines(since=mark)
              if r.get("event") == "stream.opened" and r.get("service") == "serviceA"]
    assert opened, "cloud1 logged no stream.opened for the first client"
    how = "relay via " + opened[0]["peer_node"] if opened[0].get("relayed") else "own tunnel to " + opened[0]["peer_node"]

    # no client traffic from here on: only status reads
    deadline = t0 + FAIL_TIMEOUT + scaled(5)
    covered_at: dict[str, float] = {}

    def covered() -> bool:
        for o in ONPREMS:
            if o not in covered_at and topo.coverage(o).get("cloud1", 0) >= PER_MEMBER:
                covered_at[o] = time.monotonic() - t0
        return len(covered_at) == len(ONPREMS)

    wait_until(covered, max(0.1, deadline - time.monotonic()),
               what=f"every on-prem gateway to hold {PER_MEMBER} tunnels to the restarted cloud1 within "
                    f"fail_timeout {FAIL_TIMEOUT:g}s + 5s of its restart ({method}); coverage "
                    f"{topo.coverage_table()}")
    for o in ONPREMS:
        assert topo.coverage(o) == {"cloud1": PER_MEMBER, "cloud2": PER_MEMBER}
        assert {t["url"] for t in topo.status(o)["tunnels"]} == {topo.lb_url}
    with capsys.disabled():
        print(f"\n[lb {method}] cloud1 restarted: ready {t_ready:.2f}s, first client served at {t_echo:.2f}s "
              f"({how}), covered by " + ", ".join(f"{o} at {t:.2f}s" for o, t in sorted(covered_at.items())))


# --- 3. silent partition ---------------------------------------------------------------------

def test_partition_detected_by_liveness_and_healed(topology, capsys):
    """cloud1's namespace is cut off silently (DROP, no FIN): each on-prem notices within
    ping_timeout + ping_interval + slack, its tunnels to cloud1 leave the status, client A via
    cloud2 keeps working throughout; after healing cloud1 is covered again and serves."""
    topo = topology()
    topo.wait_full_coverage()
    marks = {o: topo.gws[o].log_mark() for o in ONPREMS}
    t0 = time.monotonic()
    topo.hosts["cloud1"].partition()
    topo.check_path("cloud2")  # at once, before anybody noticed
    with pytest.raises(TimeoutError):  # silent: no RST, no ICMP, just nothing
        socket.create_connection(topo.client_addr("cloud1"), timeout=0.5).close()
    gone_at: dict[str, float] = {}

    def detected() -> bool:
        for o in ONPREMS:
            if o not in gone_at and "cloud1" not in topo.coverage(o):
                gone_at[o] = time.monotonic() - t0
        return len(gone_at) == len(ONPREMS)

    bound = PING_TIMEOUT + PING_INTERVAL + scaled(1.0)
    wait_until(detected, bound + 5, interval=0.05, what="on-prem gateways to drop cloud1's tunnels")
    for o in ONPREMS:
        assert gone_at[o] <= bound, f"{o} noticed the partition only after {gone_at[o]:.2f}s (bound {bound:.2f}s)"
        closed = [r for r in topo.gws[o].log_lines(since=marks[o])
                  if r.get("event") == "tunnel.closed" and r.get("peer_node") == "cloud1"]
        assert len(closed) >= PER_MEMBER, f"{o} logged {len(closed)} closed tunnels to cloud1"
        assert all("ping_timeout" in r["reason"] for r in closed), \
            f"{o}: tunnels to cloud1 were not closed by liveness: {[r['reason'] for r in closed]}"
        assert topo.coverage(o) == {"cloud2": PER_MEMBER}
    topo.check_path("cloud2")
    for o in ONPREMS:
        topo.check_path(o)  # service B now only through cloud2
    # the cut-off member dropped its tunnels too (its admin, on its loopback, stays readable)
    wait_until(lambda: not topo.status("cloud1")["tunnels"], bound + 2,
               what="cloud1 to drop the tunnels of the on-prem gateways it cannot hear")

    t_heal = time.monotonic()
    topo.hosts["cloud1"].heal()
    topo.wait_full_coverage(timeout=30)
    healed = time.monotonic() - t_heal
    topo.check_path("cloud1")
    with capsys.disabled():
        print(f"\n[partition] cloud1 dropped by " + ", ".join(f"{o} after {t:.2f}s" for o, t in sorted(gone_at.items()))
              + f" (bound {bound:.2f}s); covered again {healed:.2f}s after heal")


# --- 4. streams not through the failed instance ----------------------------------------------

SIZE = 6 << 20  # per transfer; its second half waits until the failure is injected


@pytest.mark.parametrize("victim", ["cloud1", "onprem1"])
def test_sigkill_breaks_only_streams_through_the_victim(topology, victim, capsys):
    """Paced long transfers (SHA-256 both ends) through every client port; SIGKILL one instance
    mid-transfer. Transfers whose path avoids it complete byte-exact; the others end promptly
    (error or EOF) and never hang."""
    topo = topology()
    topo.wait_full_coverage()
    transfers: list[Transfer] = []
    gate = threading.Event()
    for via in (*CLOUDS, *ONPREMS):
        for i in range(2):
            tr = Transfer(topo.client_addr(via), SIZE, seed=len(transfers), label=f"{via}#{i}", via=via,
                          gate=gate)
            transfers.append(tr)
            tr.start()
    for tr in transfers:
        assert tr.connected.wait(scaled(10)) and tr.local_port, tr.describe()
    wait_until(lambda: all(tr.received >= 256 * 1024 for tr in transfers), 20,
               what="every transfer to be flowing end to end")
    # which instances each stream passes: the client-side gateway and the far end of its tunnel
    for tr in transfers:
        far = wait_until(lambda: topo.stream_peer(tr.via, tr.local_port), 5,
                         what=f"{tr.label}'s stream in {tr.via}'s status")
        tr.path = {tr.via, far}
    assert not [tr for tr in transfers if tr.ended_at], \
        "a transfer ended before the failure: " + "; ".join(tr.describe() for tr in transfers if tr.ended_at)
    affected = [tr for tr in transfers if victim in tr.path]
    spared = [tr for tr in transfers if victim not in tr.path]
    assert affected and spared, [(tr.label, sorted(tr.path)) for tr in transfers]

    t_kill = time.monotonic()
    topo.gws[victim].kill()
    gate.set()
    for tr in affected:
        tr.join(max(0.0, t_kill + scaled(5) - time.monotonic()))
    hung = [tr.describe() for tr in affected if tr.is_alive()]
    assert not hung, f"streams through the killed {victim} still hang 5 s later: {hung}"
    for tr in affected:
        assert not tr.intact, f"{tr.label} through {victim} claims to be complete: {tr.describe()}"
    for tr in spared:
        tr.join(scaled(60))
    broken = [f"{tr.describe()} path {sorted(tr.path)}" for tr in spared if tr.is_alive() or not tr.intact]
    assert not broken, f"streams that avoid {victim} were damaged: {broken}"
    assert all(tr.ended_at > t_kill for tr in spared), "spared transfers did not span the failure"
    with capsys.disabled():
        print(f"\n[sigkill {victim}] " + "; ".join(
            f"{tr.label} via {'/'.join(sorted(tr.path))}: "
            + (f"ended {tr.ended_at - t_kill:.2f}s after kill (read: {tr.recv_end}, {tr.received} bytes)"
               if tr in affected else f"intact, done {tr.ended_at - t_kill:.2f}s after kill")
            for tr in transfers))


# --- 5. no black holes -----------------------------------------------------------------------

def test_no_route_anywhere_resets_client_after_route_wait(topology, capsys):
    """Every on-prem gateway down: a new client on each member's port is reset within
    route_wait (+ slack), and the member logs stream.refused saying there is no route."""
    topo = topology()
    topo.wait_full_coverage()
    for o in ONPREMS:
        topo.gws[o].kill()
    for c in CLOUDS:
        wait_until(lambda: not topo.status(c)["tunnels"], 5, what=f"{c} to lose every tunnel")
    marks = {c: topo.gws[c].log_mark() for c in CLOUDS}
    out: dict[str, tuple] = {}

    def client(c: str) -> None:
        t = time.monotonic()
        try:
            got = echo_exchange(topo.client_addr(c), b"anyone there?\n", timeout=ROUTE_WAIT + 10)
            out[c] = (time.monotonic() - t, f"EOF after {got!r}")
        except OSError as exc:
            out[c] = (time.monotonic() - t, repr(exc))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in CLOUDS]
    for th in threads:
        th.start()
    for th in threads:
        th.join(scaled(ROUTE_WAIT + 15))
    for c in CLOUDS:
        elapsed, how = out[c]
        assert elapsed <= ROUTE_WAIT + scaled(1.5), f"client on {c} held {elapsed:.2f}s (route_wait {ROUTE_WAIT}s)"
        assert "ConnectionResetError" in how or how == "EOF after b''", f"client on {c}: {how}"
        rec = topo.gws[c].wait_log(lambda r: r.get("event") == "stream.refused", since=marks[c], timeout=2)
        assert rec["service"] == "serviceA" and "no route" in rec["reason"], rec
    with capsys.disabled():
        print("\n[no route] " + "; ".join(f"client on {c}: {how} after {t:.2f}s" for c, (t, how) in sorted(out.items())))


# --- 6. allow_members ------------------------------------------------------------------------

@pytest.mark.parametrize("allowed", [False, True], ids=["default-allow", "members-allowed"])
def test_advertised_member_urls_dialed_only_if_allowed(topology, allowed):
    """Members advertise their direct URLs (in HELLO and MEMBERS); on-prem gateways name only the
    LB. With the default allow_members (the LB's host) the advertised URLs are never dialed:
    tunnel.member_not_allowed is logged and the on-prem hosts send no SYN to a member. With
    allow_members naming the members' IPs they are dialed directly."""

    def allow(cloud_ips: list[str]) -> str:
        return ("allow_members = [" + ", ".join(f'"{ip}"' for ip in cloud_ips) + "]") if allowed else ""

    def counters(hosts) -> None:
        for o in ONPREMS:
            count_syns(hosts[o], [hosts[c].ip for c in CLOUDS], TUNNEL_PORT)

    topo = topology(lb_method="least_conn", fail_timeout=f"{FAIL_TIMEOUT:g}s", advertise=True,
                    extra_onprem_tunnel=allow, before_start=counters)
    lb_ip = topo.hosts["lb"].ip
    topo.wait_full_coverage()
    # cloud1 dies and returns: the survivors' MEMBERS and the new HELLOs name its advertised URL
    # while it lacks tunnels, so every on-prem gateway must decide whether it may dial that URL.
    c1_mark = topo.gws["cloud1"].log_mark()
    topo.gws["cloud1"].kill()
    wait_until(lambda: all("cloud1" not in topo.coverage(o) for o in ONPREMS), 5,
               what="on-prem gateways to drop cloud1's tunnels")
    topo.gws["cloud1"].start()
    topo.wait_ready("cloud1")
    topo.wait_full_coverage(timeout=20)
    for n in (*CLOUDS, *ONPREMS):
        topo.check_path(n)

    opened_c1 = [r for r in topo.gws["cloud1"].log_lines(since=c1_mark) if r.get("event") == "tunnel.opened"]
    sources = {r["peer_addr"].rsplit(":", 1)[0] for r in opened_c1}
    onprem_ips = {topo.hosts[o].ip for o in ONPREMS}
    for o in ONPREMS:
        syns = syn_counts(topo.hosts[o])
        assert set(syns) == set(topo.cloud_ips), syns
        refusals = [r for r in topo.gws[o].log_lines() if r.get("event") == "tunnel.member_not_allowed"]
        to_c1 = [t for t in topo.status(o)["tunnels"] if t["peer_node"] == "cloud1"]
        if not allowed:
            assert any(r.get("member") == "cloud1" and r.get("url") == topo.member_url("cloud1") for r in refusals), \
                f"{o} did not log tunnel.member_not_allowed for cloud1's URL: {refusals}"
            assert sum(syns.values()) == 0, f"{o} sent SYNs to members directly: {syns}"
            assert {t["url"] for t in topo.status(o)["tunnels"]} == {topo.lb_url}
        else:
            assert not refusals, f"{o} refused an allowed member URL: {refusals}"
            assert syns[topo.hosts["cloud1"].ip] > 0, f"{o} never dialed cloud1 directly: {syns}"
            direct = [t for t in to_c1 if t["url"] == topo.member_url("cloud1")]
            assert direct, f"{o} holds no direct tunnel to cloud1: {to_c1}"
    if not allowed:
        assert sources == {lb_ip}, f"cloud1 saw tunnels from {sources}; only the LB ({lb_ip}) expected"
    else:
        assert sources & onprem_ips, f"cloud1 saw tunnels only from {sources}, none straight from an on-prem host"


# --- 7. everything starts at once ------------------------------------------------------------

@pytest.mark.parametrize("run", range(4))
def test_simultaneous_start_covers_every_member(topology, run):
    """Members and sites power up together behind the LB: whatever the order in which the
    cluster forms and tunnels arrive, every on-prem gateway ends up with per_member tunnels to
    every member (a member-list change must reach tunnels that were still handshaking)."""
    topo = topology(lb_method="least_conn", fail_timeout=f"{FAIL_TIMEOUT:g}s", onprems_reach_only_lb=True,
                    stagger=False, advertise=bool(run % 2))
    topo.wait_full_coverage(timeout=15)


# --- 8. one name, several members --------------------------------------------------------------

def test_a_name_with_several_addresses_counts_as_several_members(topology):
    """docs/ha.md §3: the on-prem gateways dial one host name, which their resolver answers with both
    members' addresses (DNS round robin; no load balancer, members advertise no URL of their own).
    Dialing the name as the OS would reaches only the address listed first; the gateways must keep
    per_member tunnels to each address, and cover a member again when it dies and comes back."""
    name = "cloud.test"
    topo = topology(connect_name=name)
    topo.wait_full_coverage(timeout=20)
    url = f"wss://{name}:{TUNNEL_PORT}/intercloud"
    for o in ONPREMS:
        assert {t["url"] for t in topo.status(o)["tunnels"]} == {url}
        resolved = [r for r in topo.gws[o].log_lines() if r.get("event") == "dial.resolved"]
        assert resolved and sorted(resolved[0]["addresses"]) == sorted(topo.cloud_ips), resolved
        targets = topo.status(o)["dial_targets"]
        assert sorted((t["url"], t["address"], t["error"]) for t in targets) == sorted(
            (url, ip, None) for ip in topo.cloud_ips)
    victim = "cloud1"  # listed first for the name: where the OS alone would send every dial
    topo.gws[victim].kill()
    wait_until(lambda: all(victim not in topo.coverage(o) for o in ONPREMS), 5,
               what=f"on-prem gateways to drop {victim}'s tunnels")
    for n in (*CLOUDS, *ONPREMS):
        if n != victim:
            topo.check_path(n)
    # the victim's targets fall back to the other address, land on a covered member, and say why
    dead = f"after {topo.hosts[victim].ip}: Connection refused"
    wait_until(lambda: all(any(dead in r.get("reason", "") for r in topo.gws[o].log_lines()
                               if r.get("event") == "tunnel.dial_failed") for o in ONPREMS), 10,
               what=f"a tunnel.dial_failed line naming {victim}'s refused address")
    topo.gws[victim].start()
    topo.wait_ready(victim)
    topo.wait_full_coverage(timeout=20)
    for n in (*CLOUDS, *ONPREMS):
        topo.check_path(n)


def test_cluster_peers_by_one_name_link_every_member(topology):
    """docs/ha.md §4: cluster.peers is one host name that resolves to every member (as a headless
    service would), and each member's resolver lists its own address first. Dialing the name as the
    OS would, each member reaches only itself and the cluster never forms; dialing each address, each
    member recognises its own and links with the other. build() waits for both members to list both."""
    topo = topology(peers_name="cluster.test")
    for c in CLOUDS:
        recs = topo.gws[c].log_lines()
        own = [r for r in recs if r.get("event") == "cluster.self_peer"]
        assert own and topo.hosts[c].ip in own[0]["msg"], f"{c} did not recognise its own address: {own}"
        links = {r["member"] for r in recs if r.get("event") == "cluster.link_up"}
        assert links == set(CLOUDS) - {c}, f"{c} linked with {links}"
        assert sorted(t["address"] for t in topo.status(c)["dial_targets"]) == sorted(topo.cloud_ips)
    topo.wait_full_coverage()
    for n in (*CLOUDS, *ONPREMS):
        topo.check_path(n)
