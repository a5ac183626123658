"""Per-service source allow/deny lists and connection limits (docs/operations.md §10.4), end to end
with real gateways.

1. ACLs: a cloud gateway and an on-prem gateway in the root namespace, listening on the address of a
   lab bridge (IPv4, and an IPv6 ULA the test adds to the bridge); two client hosts, each its own
   network namespace with its own IPv4 and IPv6 address. Service ``acl4`` allows the lab's IPv4
   network and denies client 2; service ``acl6`` allows the IPv6 /64 and denies client 2's IPv6
   address. Each refused client gets a TCP RST
   at accept, the gateway logs one line naming the rule, and client 1, in the same run, gets its echo.
   The same rules apply on the on-prem side (the side that dials the target) against the client
   address the OPEN carries: service ``aclB`` allows only client 1 there, so client 2 matches no
   allow entry and the OPEN is refused (FORBIDDEN).
2. Limits, on loopback: a burst of 10x ``max_connections`` concurrent clients and of 10x ``max_rate``
   new connections: exactly the limit is served (the rate: the bucket plus what it earns during the
   burst), every allowed connection carries data, the rest get an RST and are counted in /metrics.
"""

from __future__ import annotations

import concurrent.futures
import random
import socket
import subprocess
import time

import pytest

from tests.support.netns import lab_fixture
from tests.support.ports import free_ports
from tests.support.timeouts import scaled, wait_until

from .conftest import wait_tunnels
from .topology import make_pair

pytestmark = [pytest.mark.e2e]


def _svc(name: str, accept: str, **rules) -> str:
    lines = [f'[[service]]\nname = "{name}"\naccept = "{accept}"']
    for key, value in rules.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"


def _connect_svc(name: str, port: int, **rules) -> str:
    return _svc(name, f"tcp://127.0.0.1:{port}", **rules).replace("accept =", "connect =")


def _exchange(sock: socket.socket, payload: bytes) -> str:
    """'ok' when the echo comes back whole, 'reset' when the gateway reset the connection."""
    try:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                return f"closed after {len(got)} bytes"
            got += chunk
        return "ok" if got == payload else "corrupt"
    except ConnectionResetError:
        return "reset"
    finally:
        sock.close()


def _refusals(gw, since: int = 0) -> list[dict]:
    return [r for r in gw.log_lines(since=since) if r.get("event") == "conn.refused"]


@pytest.fixture
def lab():
    yield from lab_fixture()


@pytest.mark.netns
@pytest.mark.needs_root
@pytest.mark.needs_binary("ip")
def test_allow_and_deny_ipv4_and_ipv6_from_clients_in_their_own_namespaces(tmp_path, gateways, echo_a, lab):
    c1, c2 = lab.host("client1"), lab.host("client2")
    prefix = f"fd7c:{random.randrange(1 << 16):x}:{random.randrange(1 << 16):x}:1"
    root6, c1_6, c2_6 = f"{prefix}::1", f"{prefix}::11", f"{prefix}::12"
    subprocess.run(["ip", "addr", "add", f"{root6}/64", "dev", lab.bridge, "nodad"], check=True)
    for host, addr in ((c1, c1_6), (c2, c2_6)):
        host.run(["ip", "addr", "add", f"{addr}/64", "dev", host.iface, "nodad"])
    p4, p6, pb = free_ports(3)
    pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_a.port)
    pair.cloud_services = [
        _svc("acl4", f"tcp://{lab.root_ip}:{p4}", allow=[str(lab.subnet)], deny=[c2.ip]),
        _svc("acl6", f"tcp://[{root6}]:{p6}", allow=[f"{prefix}::/64"], deny=[c2_6]),
        _svc("aclB", f"tcp://{lab.root_ip}:{pb}"),
    ]
    pair.onprem_services = [
        _connect_svc("acl4", echo_a.port), _connect_svc("acl6", echo_a.port),
        # the on-prem side's own rule: only client 1 may reach this target, whatever the cloud admits
        _connect_svc("aclB", echo_a.port, allow=[c1.ip]),
    ]
    cloud = gateways("cloud1", pair.cloud_config())
    onprem = gateways("onprem1", pair.onprem_config())
    wait_tunnels(cloud, 1)

    def attempt(host, family, addr, port) -> str:
        with host.entered():
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(scaled(5))
        try:
            sock.connect((addr, port))
        except ConnectionResetError:  # the RST can beat a slow connect() back to this thread
            sock.close()
            return "reset"
        return _exchange(sock, b"hello from " + host.name.encode() * 100)

    cases = [  # (client, family, address, port, expected, rule)
        (c1, socket.AF_INET, lab.root_ip, p4, "ok", None),
        (c2, socket.AF_INET, lab.root_ip, p4, "reset", f"deny {c2.ip}/32"),
        (c1, socket.AF_INET6, root6, p6, "ok", None),
        (c2, socket.AF_INET6, root6, p6, "reset", f"deny {c2_6}/128"),
        (c1, socket.AF_INET, lab.root_ip, pb, "ok", None),
    ]
    for host, family, addr, port, expected, rule in cases:
        mark = cloud.log_mark()
        got = attempt(host, family, addr, port)
        assert got == expected, f"{host.name} -> [{addr}]:{port}: {got}, expected {expected}"
        if rule is not None:
            line = cloud.wait_log(lambda r: r.get("event") == "conn.refused" and r.get("rule") == rule, since=mark)
            client_ip = c2.ip if family == socket.AF_INET else c2_6
            assert line["kind"] == "acl" and line["client"].startswith(client_ip), line
            assert rule in cloud.log_path.read_text(), "the text line names the rule"

    # the on-prem gateway's allow list: client 2 is admitted by the cloud (no rule there) and refused
    # where the target is dialed, against the client address the OPEN carried; no allow entry matches
    mark_c, mark_o = cloud.log_mark(), onprem.log_mark()
    got = attempt(c2, socket.AF_INET, lab.root_ip, pb)
    assert got in ("reset", "closed after 0 bytes"), got
    line = onprem.wait_log(lambda r: r.get("event") == "conn.refused", since=mark_o)
    assert line["rule"] == "allow" and line["client"].startswith(c2.ip) and line["peer_node"] == "cloud1", line
    cloud.wait_log(lambda r: r.get("event") == "stream.refused" and "FORBIDDEN" in r.get("reason", ""),
                   since=mark_c)

    # a permitted client in the same run still gets through every service
    for host, family, addr, port in ((c1, socket.AF_INET, lab.root_ip, p4), (c1, socket.AF_INET6, root6, p6),
                                     (c1, socket.AF_INET, lab.root_ip, pb)):
        assert attempt(host, family, addr, port) == "ok"
    for svc in ("acl4", "acl6"):  # /metrics bodies may be up to a second old: wait for a fresh one
        wait_until(lambda: cloud.metric(f'intercloud_connections_refused_by_total{{kind="acl",service="{svc}"}}') == 1,
                   10, what=f"the {svc} refusal in /metrics")


def _burst(port: int, n: int, hold: bool) -> tuple[list[str], list[socket.socket]]:
    """``n`` clients at once; each sends and waits for its echo. With ``hold`` the served ones stay
    open (returned) so that the concurrent limit stays reached."""
    held: list[socket.socket] = []

    def one(i: int) -> str:
        sock = None
        payload = f"client {i} ".encode() * 50
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=scaled(10))
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    return "closed"
                got += chunk
            if got != payload:
                return "corrupt"
            if hold:
                held.append(sock)
                sock = None
            return "ok"
        except ConnectionResetError:
            return "reset"
        finally:
            if sock is not None:
                sock.close()

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    return results, held



def test_max_connections_and_max_rate_hold_under_a_burst_of_ten_times_the_limit(tmp_path, gateways, echo_a):
    pc, pr = free_ports(2)
    pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_a.port)
    pair.cloud_services = [_svc("capped", f"tcp://127.0.0.1:{pc}", max_connections=5),
                           _svc("paced", f"tcp://127.0.0.1:{pr}", max_rate=5)]
    pair.onprem_services = [_connect_svc("capped", echo_a.port), _connect_svc("paced", echo_a.port)]
    cloud = gateways("cloud1", pair.cloud_config())
    gateways("onprem1", pair.onprem_config())
    wait_tunnels(cloud, 1)

    results, held = _burst(pc, 50, hold=True)
    try:
        assert results.count("ok") == 5 and results.count("reset") == 45, results
        wait_until(lambda: cloud.metric('intercloud_connections_refused_by_total{kind="max_connections",service="capped"}')
                   == 45, 10, what="45 refusals counted")
        # the slots come back when the held connections end
        for s in held:
            s.close()
        held = []
        wait_until(lambda: not [s for s in cloud.status()["streams"] if s["service"] == "capped"], 10,
                   what="the capped streams to end")
        again, held = _burst(pc, 5, hold=True)
        assert again == ["ok"] * 5
    finally:
        for s in held:
            s.close()

    start = time.monotonic()
    results, _ = _burst(pr, 50, hold=False)
    elapsed = time.monotonic() - start
    served = results.count("ok")
    # the bucket holds 5 tokens and earns 5 a second while the burst lasts
    assert 5 <= served <= 5 + int(5 * elapsed) + 1, (served, elapsed, results)
    assert results.count("reset") == 50 - served, results
    wait_until(lambda: cloud.metric('intercloud_connections_refused_by_total{kind="max_rate",service="paced"}')
               == 50 - served, 10, what="the rate refusals counted")
    lines = _refusals(cloud)
    assert any(r["kind"] == "max_rate" and r["rule"] == "max_rate 5" for r in lines)
    assert any(r["kind"] == "max_connections" and r["rule"] == "max_connections 5" for r in lines)
