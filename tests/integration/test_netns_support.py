"""Proves tests/support/netns.py and tests/support/nginx.py do what the HA tests rely on.

The HA end-to-end tests reason about *which* host can reach *which*, about failures being
silent (no RST, no FIN: a member that vanished), and about how nginx spreads on-prem tunnels
over cloud members. If the harness were wrong those tests would prove nothing, so each promise
is checked here against the kernel and the real nginx.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.support import pki, procs
from tests.support.netcat import NC, nc_exchange
from tests.support.netns import STATE_DIR, Host, Lab, cleanup_stale_labs, lab_fixture
from tests.support.nginx import NginxConfigError, NginxLB
from tests.support.ports import free_port
from tests.support.servers import EchoServer
from tests.support.timeouts import scaled, wait_until

pytestmark = [
    pytest.mark.netns,
    pytest.mark.needs_root,
    pytest.mark.needs_binary("ip", "iptables", "iptables-restore", "nginx", "socat", "nc", "ss"),
]

# A connect to a silently partitioned peer must still be pending after this long (a refusal
# or unreachable error arrives in well under a millisecond on one machine).
SILENT = 1.0


@pytest.fixture
def lab():
    yield from lab_fixture()


# --- helpers ---------------------------------------------------------------------------------

def socat_echo(host: Host, port: int) -> procs.Tracked:
    """A forking ``socat`` echo server on host.ip:port, started inside ``host``."""
    tracked = host.spawn(["socat", f"TCP-LISTEN:{port},bind={host.ip},fork,reuseaddr", "EXEC:cat"],
                         title=f"socat echo {host.name}:{port}",
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: listening(host, port), 5.0, what=f"socat on {host.name}:{port}")
    return tracked


def listening(host: Host, port: int) -> bool:
    return bool(host.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.strip())


def established(host: Host, port: int) -> int:
    """Established TCP connections to local ``port`` in ``host`` (server side)."""
    out = host.run(["ss", "-Htn", "state", "established", f"sport = :{port}"]).stdout
    return len(out.splitlines())


def nc_from(host: Host, ip: str, port: int, data: bytes) -> bytes:
    """Run the real ``nc`` inside ``host``: send ``data``, half-close, return the reply."""
    return host.run([NC, "-n", "-N", "-w", "3", ip, str(port)], input=data, timeout=10).stdout


def echo_roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.settimeout(scaled(5))
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def connect_outcome(connect) -> str:
    """'ok', 'refused' or 'timeout' for a connect attempt with a SILENT-second timeout."""
    try:
        connect(SILENT).close()
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, socket.timeout):
        return "timeout"
    return "ok"


def from_root(ip: str, port: int):
    return lambda t: socket.create_connection((ip, port), timeout=scaled(t))


def from_host(host: Host, ip: str, port: int):
    return lambda t: host.create_connection((ip, port), timeout=t)


def in_host(host: Host, server_cls=EchoServer, **kw):
    with host.entered():
        return server_cls(host.ip, **kw)


# --- the network -----------------------------------------------------------------------------

def test_hosts_reach_each_other_and_the_test_process(lab):
    a, b = lab.host("a"), lab.host("b")
    assert a.ip != b.ip and a.ip in {str(h) for h in lab.subnet.hosts()}
    assert lab.root_ip == str(lab.subnet.network_address + 1)
    assert a.argv_prefix[-1] == a.ns and len(lab.bridge) <= 15 and len(a.veth) <= 15

    socat_echo(a, 7000)
    assert nc_exchange(a.ip, 7000, b"from root\n") == b"from root\n"
    assert nc_from(b, a.ip, 7000, b"from b\n") == b"from b\n"

    # in-process server inside a host (thread in the namespace), reached by the real nc
    with in_host(b) as srv:
        assert nc_from(a, b.ip, srv.port, b"to b\n") == b"to b\n"
        assert srv.connections == 1
    # hosts reach the root namespace at .1 (e.g. a server run by the test process)
    with EchoServer(lab.root_ip) as root_srv:
        assert nc_from(a, lab.root_ip, root_srv.port, b"to root\n") == b"to root\n"
    # host-to-host frames cross the root namespace's FORWARD chain when br_netfilter is on:
    # the lab's accept rule must be what lets them through
    rule = lab._state["forward_rule"]
    if rule:
        out = subprocess.run(["iptables", "-w", "-L", "FORWARD", "-v", "-x", "-n"],
                             capture_output=True, text=True).stdout
        line = next(l for l in out.splitlines() if f"intercloud-lab-{lab.id}" in l)
        assert int(line.split()[0]) > 0, out


def test_partition_is_silent_and_heal_restores(lab):
    a, b = lab.host("a"), lab.host("b")
    with in_host(a) as srv_a, in_host(b) as srv_b:
        held = socket.create_connection((a.ip, srv_a.port), timeout=scaled(5))
        assert echo_roundtrip(held, b"before") == b"before"

        a.partition()
        assert a.partitioned
        assert connect_outcome(from_root(a.ip, srv_a.port)) == "timeout"
        assert connect_outcome(from_root(a.ip, 1)) == "timeout"  # closed port: no RST either
        assert connect_outcome(from_host(b, a.ip, srv_a.port)) == "timeout"
        assert connect_outcome(from_host(a, b.ip, srv_b.port)) == "timeout"
        assert connect_outcome(from_host(a, "127.0.0.1", 1)) == "refused"  # loopback untouched
        # an established connection stalls: no data, no EOF, no reset
        held.sendall(b"during")
        held.settimeout(scaled(0.3))
        with pytest.raises((TimeoutError, socket.timeout)):
            held.recv(100)

        a.heal()
        assert not a.partitioned
        # the stalled bytes arrive on TCP's next retransmission
        held.settimeout(scaled(10))
        assert held.recv(100) == b"during"
        held.close()
        assert connect_outcome(from_host(b, a.ip, srv_a.port)) == "ok"

        # partition that still lets the test process in (admin endpoints)
        a.partition(allow=[lab.root_ip])
        assert connect_outcome(from_root(a.ip, srv_a.port)) == "ok"
        assert connect_outcome(from_host(b, a.ip, srv_a.port)) == "timeout"
        a.heal()
        assert connect_outcome(from_host(b, a.ip, srv_a.port)) == "ok"


def test_block_isolates_one_peer_only(lab):
    a, b, c = lab.host("a"), lab.host("b"), lab.host("c")
    with in_host(a) as sa, in_host(b) as sb, in_host(c) as sc:
        c.block(a.ip)
        assert c.blocked == {a.ip}
        assert connect_outcome(from_host(c, a.ip, sa.port)) == "timeout"
        assert connect_outcome(from_host(a, c.ip, sc.port)) == "timeout"
        assert connect_outcome(from_host(c, b.ip, sb.port)) == "ok"
        assert connect_outcome(from_host(a, b.ip, sb.port)) == "ok"
        assert connect_outcome(from_root(c.ip, sc.port)) == "ok"

        c.block(a.ip, reject=True)  # fail fast instead
        assert connect_outcome(from_host(c, a.ip, sa.port)) == "refused"

        c.unblock(a.ip)
        assert not c.blocked
        assert connect_outcome(from_host(c, a.ip, sa.port)) == "ok"
        assert connect_outcome(from_host(a, c.ip, sc.port)) == "ok"


# --- nginx -----------------------------------------------------------------------------------

PORT = 7000  # every backend host is its own namespace: the same port everywhere is fine


def lb_session(client: Host, lb: NginxLB, data: bytes = b"ping\n") -> socket.socket:
    """A connection from ``client`` through the LB, proven proxied by one echo round trip."""
    s = client.create_connection(lb.address)
    assert echo_roundtrip(s, data) == data
    lb.sessions_opened = getattr(lb, "sessions_opened", 0) + 1
    return s


def finished(lb: NginxLB, still_open: int = 0) -> list[dict]:
    """The access log once every session opened so far (but ``still_open``) is logged."""
    n = getattr(lb, "sessions_opened", 0) - still_open
    return wait_until(lambda: len(lb.access_log()) >= n and lb.access_log(), 5.0,
                      what=f"{n} sessions in the nginx access log")


def upstreams(entries: list[dict]) -> list[str]:
    """The final upstream ("ip:port") of each session."""
    return [e["upstream"].split(", ")[-1] for e in entries]


@pytest.mark.parametrize("method", ["least_conn", "round_robin"])
def test_nginx_balances_and_fails_over(lab, tmp_path, method):
    lbh, b1, b2, client = (lab.host(n) for n in ("lb", "b1", "b2", "client"))
    e1, e2 = f"{b1.ip}:{PORT}", f"{b2.ip}:{PORT}"
    # the on-prem situation: members reachable only through the LB
    client.block(b1.ip)
    client.block(b2.ip)
    assert connect_outcome(from_host(client, b1.ip, PORT)) == "timeout"
    echo1 = socat_echo(b1, PORT)
    socat_echo(b2, PORT)

    with NginxLB(tmp_path, lbh, 443, [(b1.ip, PORT), (b2.ip, PORT)], method=method,
                 fail_timeout="1s") as lb:
        assert lb.access_log() == []  # readiness did not open a session through the LB
        # both backends take sessions in turn
        for _ in range(4):
            lb_session(client, lb).close()
        assert sorted(upstreams(finished(lb))) == sorted([e1, e1, e2, e2])

        # a long-lived session on one backend: least_conn sends the next ones elsewhere
        first = lb_session(client, lb)
        busy = b1 if established(b1, PORT) else b2
        other = b2 if busy is b1 else b1
        more = [lb_session(client, lb) for _ in range(2)]
        if method == "least_conn":
            assert (established(busy, PORT), established(other, PORT)) == (1, 2)
        else:
            assert (established(busy, PORT), established(other, PORT)) == (2, 1)
        for s in [first, *more]:
            s.close()
        wait_until(lambda: established(b1, PORT) + established(b2, PORT) == 0, 5.0,
                   what="backend sessions to end")

        # b1 dies (refuses): every new session still works, served by b2
        procs.kill(echo1)
        done = len(finished(lb))
        for _ in range(4):
            lb_session(client, lb).close()
        assert upstreams(finished(lb)[done:]) == [e2] * 4

        # b1 comes back; once fail_timeout has passed it gets sessions again, and least_conn
        # sends it everything new while b2 holds more (the 4-ha-lb "restarted member" story)
        held = [lb_session(client, lb) for _ in range(3)]
        socat_echo(b1, PORT)

        def reaches_b1() -> bool:
            held.append(lb_session(client, lb))
            return established(b1, PORT) > 0

        wait_until(reaches_b1, 5.0, interval=0.2, what="a session through the LB to land on b1")
        if method == "least_conn":
            held.append(lb_session(client, lb))
            assert established(b1, PORT) == 2
        for s in held:
            s.close()

        # a member vanishes silently: the LB's connect times out (1s) and it moves on.
        # An anchor session makes least_conn deterministic: the member without it is picked
        # next (nginx's tie-break after failures is weighted, so ties would not be).
        anchor = lb_session(client, lb)
        victim, survivor = (b1, b2) if established(b2, PORT) else (b2, b1)
        victim.partition()
        tried = []
        for _ in range(3):
            done = len(finished(lb, still_open=1))
            lb_session(client, lb).close()
            tried.append(finished(lb, still_open=1)[done]["upstream"])
            if "," in tried[-1]:
                break
        assert tried[-1] == f"{victim.ip}:{PORT}, {survivor.ip}:{PORT}", tried
        if method == "least_conn":
            assert len(tried) == 1, tried
        assert "upstream timed out" in lb.error_log_text()
        anchor.close()


def cert_cn(tls: ssl.SSLSocket) -> str:
    cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_nginx_ssl_preread_routes_by_sni(lab, tmp_path):
    lbh, m1, m2, client = (lab.host(n) for n in ("lb", "m1", "m2", "client"))
    servers = []
    for host, name in ((m1, "member1"), (m2, "member2")):
        cert = pki.self_signed(tmp_path / name, name, dns=[f"{name}.example.test"], ips=[host.ip])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert.cert_path, cert.key_path)
        servers.append(in_host(host, ssl=ctx))
    s1, s2 = servers
    try:
        sni_map = {"member1.example.test": (m1.ip, s1.port), "member2.example.test": (m2.ip, s2.port)}
        # names outside the map fall back to the upstream group (here: only member2)
        with NginxLB(tmp_path, lbh, 443, [(m2.ip, s2.port)], ssl_preread_map=sni_map) as lb:
            cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            cctx.check_hostname = False
            cctx.verify_mode = ssl.CERT_NONE
            seen = {}
            for sni in ("member1.example.test", "member2.example.test", "member1.example.test",
                        "other.example.test"):
                with cctx.wrap_socket(client.create_connection(lb.address), server_hostname=sni) as tls:
                    seen.setdefault(sni, []).append(cert_cn(tls))
                    assert echo_roundtrip(tls, b"tls through the LB") == b"tls through the LB"
            assert seen == {"member1.example.test": ["member1", "member1"],
                            "member2.example.test": ["member2"], "other.example.test": ["member2"]}
            log = wait_until(lambda: len(lb.access_log()) >= 4 and lb.access_log(), 5.0)
            assert [e["sni"] for e in log] == ["member1.example.test", "member2.example.test",
                                               "member1.example.test", "other.example.test"]
    finally:
        for s in servers:
            s.stop()


def test_nginx_reload_swaps_backends_and_rejects_bad_config(tmp_path):
    # root namespace, loopback: NginxLB works without a lab too
    with EchoServer() as a, EchoServer() as b:
        lb = NginxLB(tmp_path, None, free_port(), [("127.0.0.1", a.port)], method="round_robin")
        with lb:
            for _ in range(2):
                with socket.create_connection(lb.address, timeout=scaled(5)) as s:
                    assert echo_roundtrip(s, b"x") == b"x"
            assert (a.connections, b.connections) == (2, 0)
            held = socket.create_connection(lb.address, timeout=scaled(5))
            assert echo_roundtrip(held, b"held") == b"held"
            lb.reload(backends=[("127.0.0.1", b.port)])
            # the old worker keeps serving what it has: a reload breaks no session
            assert echo_roundtrip(held, b"still there") == b"still there"
            held.close()
            for _ in range(2):
                with socket.create_connection(lb.address, timeout=scaled(5)) as s:
                    assert echo_roundtrip(s, b"y") == b"y"
            assert (a.connections, b.connections) == (3, 2)
            # an invalid change is refused before nginx sees it; the running LB is untouched
            lb.fail_timeout = "bogus"
            with pytest.raises(NginxConfigError, match="invalid"):
                lb.reload()
            assert lb.running

    bad = NginxLB(tmp_path, None, free_port(), [("127.0.0.1", 9)], fail_timeout="bogus", name="bad")
    with pytest.raises(NginxConfigError, match="fail_timeout"):
        bad.start()
    assert not bad.running


# --- teardown --------------------------------------------------------------------------------

def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def _forward_rules() -> str:
    return subprocess.run(["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True).stdout


def _assert_gone(lab: Lab, namespaces: list[str], veths: list[str]) -> None:
    links, nslist = _links(), _netns_list()
    assert lab.bridge not in links
    for v in veths:
        assert v not in links
    for ns in namespaces:
        assert ns not in nslist.split()
    assert f"intercloud-lab-{lab.id}" not in _forward_rules()
    assert not (STATE_DIR / f"{lab.id}.json").exists()


def test_teardown_removes_everything_and_kills_leftovers(tmp_path):
    try:
        lab = Lab(grace=1.0).__enter__()
    except Exception as exc:  # LabUnavailable: same reason as the fixture would give
        pytest.skip(str(exc))
    with lab:
        hosts = [lab.host(n) for n in ("x", "y")]
        namespaces, veths = [h.ns for h in hosts], [h.veth for h in hosts]
        hosts[0].partition()
        stubborn = hosts[0].spawn(["sh", "-c", "trap '' TERM; exec sleep 600"])  # ignores SIGTERM
        polite = socat_echo(hosts[1], PORT)
        assert lab.bridge in _links() and set(namespaces) <= set(_netns_list().split())
    _assert_gone(lab, namespaces, veths)
    assert stubborn.popen.wait(scaled(5)) == -9
    assert polite.popen.wait(scaled(5)) != 0
    assert set(lab.killed_at_teardown) >= {stubborn.pid, polite.pid}


def test_stale_lab_of_a_dead_run_is_cleaned_up():
    try:
        lab = Lab().__enter__()
    except Exception as exc:
        pytest.skip(str(exc))
    with lab:
        h = lab.host("orphan")
        namespaces, veths = [h.ns], [h.veth]
        # pretend the owning test run was SIGKILLed: its pid no longer exists
        dead = subprocess.Popen(["true"])
        dead.wait()
        path = STATE_DIR / f"{lab.id}.json"
        state = json.loads(path.read_text())
        state["pid"] = dead.pid
        path.write_text(json.dumps(state))
        assert lab.id in cleanup_stale_labs()
        _assert_gone(lab, namespaces, veths)
    # closing the (already cleaned) lab afterwards is harmless
    assert not os.path.exists(path)
