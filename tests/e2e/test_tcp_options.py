"""[tunnel] congestion and notsent_lowat reach the sockets of real gateways, on both ends of a tunnel and
of a peer link, and show in /api/status and /metrics; an algorithm the kernel refuses costs nothing but
one warning line per gateway (transport/sockopts.py, docs/configuration.md)."""

from __future__ import annotations

import socket

from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import wait_until

from .conftest import wait_tunnels
from .ha import HA, Addr, make_certs
from .topology import make_pair

KIB = 1024


def kernel_default() -> str:
    """What a new TCP socket gets here (the gateways run in this network namespace)."""
    with socket.socket() as s:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()


def not_the_default() -> str:
    """reno (always built in), unless it is the default: then an algorithm that cannot be the default's."""
    return "reno" if kernel_default() != "reno" else "cubic"


def with_tunnel_keys(config: str, keys: str) -> str:
    """``config`` with ``keys`` added to its [tunnel] table."""
    head, sep, rest = config.partition("[tunnel]\n")
    assert sep, "no [tunnel] table"
    return f"{head}[tunnel]\n{keys}\n{rest}"


def metrics(gw) -> dict[str, float]:
    code, body = gw.http_get("/metrics", timeout=10)
    assert code == 200, body[:300]
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def test_congestion_and_notsent_lowat_on_both_ends_of_a_tunnel(tmp_path, gateways, echo_a, echo_b):
    algorithm = not_the_default()
    keys = f'congestion = "{algorithm}"\nnotsent_lowat = "64KiB"'
    pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port, extra_onprem_tunnel=keys)
    cloud = gateways("cloud1", with_tunnel_keys(pair.cloud_config(), keys))
    onprem = gateways("onprem1", pair.onprem_config())
    wait_tunnels(cloud, 1)
    wait_tunnels(onprem, 1)
    with socket.create_connection(("127.0.0.1", pair.a_port), timeout=10) as c:  # some traffic for RTT samples
        for _ in range(20):
            c.sendall(b"x" * 1000)
            got = 0
            while got < 1000:
                got += len(c.recv(65536))

    for gw in (cloud, onprem):
        # /api/status and /metrics bodies are reused for up to a second (admin/server.py): wait for the
        # ones rendered after the traffic
        wait_until(lambda gw=gw: gw.status()["tunnels"][0]["tcp"]["bytes_sent"] >= 20 * 1000, 5,
                   what=f"{gw.name}'s tunnel to show the bytes it sent")
        (tunnel,) = gw.status()["tunnels"]
        tcp = tunnel["tcp"]
        assert tcp["congestion"] == algorithm, f"{gw.name}: {tcp}"
        assert tcp["notsent_lowat"] == 64 * KIB, f"{gw.name}: {tcp}"
        assert tcp["rtt_ms"] > 0 and tcp["cwnd"] > 0 and tcp["retransmits"] == 0, f"{gw.name}: {tcp}"
        assert tcp["send_queue_bytes"] >= 0 and tcp["delivery_rate_bps"] > 0, f"{gw.name}: {tcp}"
        wait_until(lambda gw=gw: metrics(gw).get('intercloud_tunnel_tcp_sent_bytes{kind="tunnel"}', 0) >= 20 * 1000,
                   5, what=f"{gw.name}'s /metrics to count the bytes its tunnel sent")
        m = metrics(gw)
        assert m.get(f'intercloud_tunnel_tcp_congestion_info{{algorithm="{algorithm}"}}') == 1, gw.name
        assert m.get("intercloud_tunnel_tcp_congestion_fallback") == 0, gw.name
        assert m.get('intercloud_tunnel_tcp_rtt_max_seconds{kind="tunnel"}', 0) > 0, gw.name
        assert not [r for r in gw.log_lines() if str(r.get("event", "")).endswith("_fallback")], gw.name


def test_an_algorithm_the_kernel_refuses_falls_back_with_one_warning_per_gateway(tmp_path, gateways, echo_a,
                                                                                   echo_b):
    keys = 'congestion = "nosuchcc"'
    pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port, extra_onprem_tunnel=keys, per_member=2)
    cloud = gateways("cloud1", with_tunnel_keys(pair.cloud_config(), keys))
    onprem = gateways("onprem1", pair.onprem_config())
    wait_tunnels(cloud, 2)
    wait_tunnels(onprem, 2)
    default = kernel_default()
    for gw in (cloud, onprem):
        tunnels = gw.status()["tunnels"]
        assert len(tunnels) == 2 and all(t["tcp"]["congestion"] == default for t in tunnels), (gw.name, tunnels)
        warnings = [r for r in gw.log_lines() if r.get("event") == "tunnel.congestion_fallback"]
        assert len(warnings) == 1, f"{gw.name}: {len(warnings)} fallback lines for 2 tunnels: {warnings}"
        (w,) = warnings
        assert w["level"] == "WARNING" and w["configured"] == "nosuchcc" and w["algorithm"] == default
        assert str(gw.config_path) in w["msg"] and '[tunnel] congestion = "nosuchcc"' in w["msg"]
        assert "modprobe tcp_nosuchcc" in w["msg"] and 'congestion = "system"' in w["msg"]
        m = metrics(gw)
        assert m.get(f'intercloud_tunnel_tcp_congestion_info{{algorithm="{default}"}}') == 1, gw.name
        assert m.get("intercloud_tunnel_tcp_congestion_fallback") == 1, gw.name


def test_peer_links_get_the_options_too(tmp_path, gateways):
    algorithm = not_the_default()
    with EchoServer() as a, EchoServer() as b:
        certs = make_certs(tmp_path / "certs", ["cloud1", "cloud2"], [], sans=[])
        ports = iter(free_ports(8))
        clouds = {n: {k: Addr("127.0.0.1", next(ports)) for k in ("tunnel", "peer", "client", "admin")}
                  for n in ("cloud1", "cloud2")}
        ha = HA(certs, clouds, {}, Addr("127.0.0.1", a.port), Addr("127.0.0.1", b.port))
        keys = f'congestion = "{algorithm}"\nnotsent_lowat = "32KiB"'
        gws = [gateways(n, with_tunnel_keys(ha.cloud_config(n), keys)) for n in clouds]
        for gw in gws:
            wait_until(lambda gw=gw: gw.status()["peer_links"], 15, what=f"{gw.name}'s peer link")
            links = gw.status()["peer_links"]
            assert all(link["tcp"]["congestion"] == algorithm and link["tcp"]["notsent_lowat"] == 32 * KIB
                       for link in links), (gw.name, links)
            assert 'intercloud_tunnel_tcp_send_queue_bytes{kind="peer"}' in metrics(gw), gw.name
