"""HA on loopback (no root needed): a cluster of two members behind a real nginx stream load balancer,
two on-prem gateways that know only the load balancer's URL."""

from __future__ import annotations

import time

import pytest

from tests.support.netcat import nc_exchange
from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import wait_until

from .ha import HA, Addr, make_certs

pytestmark = pytest.mark.needs_binary("nginx", "nc")
L = "127.0.0.1"


def _coverage(gw) -> dict[str, int]:
    cov: dict[str, int] = {}
    for t in gw.status()["tunnels"]:
        cov[t["peer_node"]] = cov.get(t["peer_node"], 0) + 1
    return cov


@pytest.fixture
def ha_lb(tmp_path, gateways):
    from tests.support.nginx import NginxLB

    with EchoServer() as a, EchoServer() as b:
        certs = make_certs(tmp_path / "certs", ["cloud1", "cloud2"], ["onprem1", "onprem2"], sans=[])
        ports = iter(free_ports(16))
        clouds = {n: {k: Addr(L, next(ports)) for k in ("tunnel", "peer", "client", "admin")} for n in ("cloud1", "cloud2")}
        onprems = {n: {k: Addr(L, next(ports)) for k in ("client", "admin")} for n in ("onprem1", "onprem2")}
        lb_port = next(ports)
        ha = HA(certs, clouds, onprems, Addr(L, a.port), Addr(L, b.port),
                connect_urls=[f"wss://localhost:{lb_port}/intercloud"])
        lb = NginxLB(tmp_path, None, lb_port, [(L, c["tunnel"].port) for c in clouds.values()],
                     method="least_conn", fail_timeout="2s")
        lb.start()
        lb.wait_ready()
        gws = {n: gateways(n, ha.cloud_config(n)) for n in clouds}
        gws.update({n: gateways(n, ha.onprem_config(n)) for n in onprems})
        try:
            yield ha, gws, lb
        finally:
            lb.stop()


def test_lb_onprem_covers_every_member(ha_lb):
    ha, gws, lb = ha_lb
    for n in ("onprem1", "onprem2"):
        wait_until(lambda: _coverage(gws[n]) == {"cloud1": 2, "cloud2": 2}, 20,
                   what=f"{n} to hold 2 tunnels to each member through the load balancer")
    for c in ("cloud1", "cloud2"):
        port = ha.clouds[c]["client"].port
        assert nc_exchange(L, port, b"hello\n") == b"hello\n"


def test_restarted_member_serves_and_is_covered_again(ha_lb):
    ha, gws, lb = ha_lb
    for n in ("onprem1", "onprem2"):
        wait_until(lambda: _coverage(gws[n]) == {"cloud1": 2, "cloud2": 2}, 20, what=f"{n} full coverage")
    gws["cloud1"].kill()
    assert nc_exchange(L, ha.clouds["cloud2"]["client"].port, b"still\n") == b"still\n"
    gws["cloud1"].start()
    t0 = time.monotonic()
    gws["cloud1"].wait_ready()
    # the first client on the restarted member's own port gets its echo (relay or tunnel)
    assert nc_exchange(L, ha.clouds["cloud1"]["client"].port, b"first\n") == b"first\n"
    for n in ("onprem1", "onprem2"):
        wait_until(lambda: _coverage(gws[n]).get("cloud1", 0) == 2, 2 + 5,
                   what=f"{n} to cover the restarted cloud1 within fail_timeout + 5 s")
    print(f"restarted member covered after {time.monotonic() - t0:.2f}s")


def _transfer(port: int, size: int, seed: int, out: dict, key, gate=None) -> None:
    """One echo transfer that spans a failure: send half, wait until ``gate`` is set (the test sets it
    once the failure is injected), send the rest. Records (sent digest, received digest, error)."""
    import hashlib
    import random
    import socket
    import threading

    from tests.support.timeouts import scaled

    payload = random.Random(seed).randbytes(size)
    got = hashlib.sha256()
    try:
        s = socket.create_connection((L, port), timeout=scaled(30))

        def send():
            half = size // 2
            s.sendall(payload[:half])
            if gate is not None:
                gate.wait(scaled(30))
            s.sendall(payload[half:])
            s.shutdown(socket.SHUT_WR)

        th = threading.Thread(target=send, daemon=True)
        th.start()
        while chunk := s.recv(1 << 16):
            got.update(chunk)
        th.join()
        out[key] = (hashlib.sha256(payload).hexdigest(), got.hexdigest(), None)
    except OSError as exc:
        out[key] = (hashlib.sha256(payload).hexdigest(), got.hexdigest(), repr(exc))


@pytest.mark.parametrize("victim", ["cloud1", "onprem1"])
def test_sigterm_drain_breaks_no_stream(ha_lb, victim):
    """SIGTERM with streams in flight: GOAWAY, listeners closed, streams finish, zero broken."""
    import threading

    ha, gws, lb = ha_lb
    for n in ("onprem1", "onprem2"):
        wait_until(lambda: _coverage(gws[n]) == {"cloud1": 2, "cloud2": 2}, 20, what=f"{n} full coverage")
    results: dict = {}
    threads = []
    gate = threading.Event()
    ports = [ha.clouds[c]["client"].port for c in ("cloud1", "cloud2")] + \
            [ha.onprems[o]["client"].port for o in ("onprem1", "onprem2")]
    for i in range(12):
        th = threading.Thread(target=_transfer, args=(ports[i % 4], 3 << 20, i, results, i, gate), daemon=True)
        th.start()
        threads.append(th)
    wait_until(lambda: sum(len(gws[c].status()["streams"]) for c in ("cloud1", "cloud2")) >= 12, 10,
               what="all transfers to be in flight")
    gws[victim].terminate()
    gws[victim].wait_log(lambda r: r.get("event") == "gateway.draining", timeout=10)
    gate.set()  # the second halves flow while the victim drains
    # new clients keep working through the others while the victim drains
    other_port = ha.clouds["cloud2"]["client"].port if victim == "cloud1" else ha.onprems["onprem2"]["client"].port
    assert nc_exchange(L, other_port, b"during drain\n") == b"during drain\n"
    for th in threads:
        th.join(timeout=60)
    broken = {k: v for k, v in results.items() if v[2] is not None or v[0] != v[1]}
    assert len(results) == 12 and not broken, f"broken streams: {broken}"
    assert gws[victim].wait_exit(timeout=15) == 0
    stopped = [r for r in gws[victim].log_lines() if r.get("event") == "gateway.stopped"]
    assert stopped and stopped[0]["streams_cut"] == 0


def test_peer_link_refuses_tenant_and_unlisted_certificates(ha_lb, tmp_path, gateways):
    """No tenant certificate can pose as a member: wrong CA, or the cluster CA but a name outside peer_names."""
    from intercloud.certs import init_certs

    ha, gws, lb = ha_lb
    wait_until(lambda: any(r.get("event") == "cluster.link_up" for r in gws["cloud1"].log_lines()), 10,
               what="cloud1's peer link")
    mark = gws["cloud1"].log_mark()
    intruders = tmp_path / "intruders"
    init_certs(intruders, cloud=["intruder"], onprem=[])
    ha.clouds["cloud3"] = {k: Addr(L, p) for k, p in zip(("tunnel", "peer", "client", "admin"), free_ports(4))}
    # (1) a tenant (on-prem) certificate presented on a peer link: not signed by the cluster CA
    text = ha.cloud_config("cloud3", peer_names=["cloud1", "cloud2", "cloud3"]).replace(
        f'"{ha.certs}/cloud3.', f'"{ha.certs}/cloud1.')  # its tunnel certificate is not what is tested
    text = text.replace(f"{ha.certs}/cluster/cloud3.pem", f"{ha.certs}/onprem1.pem") \
               .replace(f"{ha.certs}/cluster/cloud3.key", f"{ha.certs}/onprem1.key")
    rogue = gateways("cloud3", text, ready=False)
    gws["cloud1"].wait_log(lambda r: r.get("event") == "tunnel.tls_failed", since=mark, timeout=10)
    rogue.kill()
    assert not [r for r in gws["cloud1"].log_lines(since=mark) if r.get("event") == "cluster.link_up"]
    # (2) signed by the cluster CA but named "intruder", which is not in cluster.peer_names
    init_certs(ha.certs / "cluster", cloud=["intruder"], onprem=[])
    text2 = ha.cloud_config("cloud3", peer_names=["cloud1", "cloud2", "intruder"]).replace(
        "cluster/cloud3.", "cluster/intruder.").replace(f'"{ha.certs}/cloud3.', f'"{ha.certs}/cloud1.')
    rogue2 = gateways("cloud3b", text2, ready=False)
    rec = gws["cloud1"].wait_log(lambda r: r.get("event") == "tunnel.error" and "peer_names" in r.get("reason", ""),
                                 since=mark, timeout=10)
    assert "intruder" in rec["reason"]
    rogue2.kill()
    assert not [r for r in gws["cloud1"].log_lines(since=mark) if r.get("event") == "cluster.link_up"]
    assert nc_exchange(L, ha.clouds["cloud1"]["client"].port, b"ok\n") == b"ok\n"
