"""KWIC 1-simple and 2-tls scenarios end to end: real gateway processes, echo servers, real ``nc``."""

from __future__ import annotations

import pytest

from tests.support.netcat import nc_exchange
from tests.support.servers import EchoServer
from tests.support.timeouts import wait_until

from .conftest import wait_tunnels
from .topology import make_pair, service

pytestmark = pytest.mark.needs_binary("nc")


def test_1_simple_four_services_both_directions(tmp_path, gateways):
    """1-simple: services A and C go cloud -> on-prem, B and D on-prem -> cloud (plain ws, opted in)."""
    with EchoServer() as a, EchoServer() as b, EchoServer() as c, EchoServer() as d:
        pair = make_pair(tmp_path, a_target=a.port, b_target=b.port, insecure=True)
        from tests.support.ports import free_ports

        c_port, d_port = free_ports(2)
        pair.cloud_services += [service("serviceC", accept=c_port), service("serviceD", connect=d.port)]
        pair.onprem_services += [service("serviceC", connect=c.port), service("serviceD", accept=d_port)]
        cloud = gateways("cloud1", pair.cloud_config())
        gateways("onprem1", pair.onprem_config())
        wait_tunnels(cloud, 1)
        for port, word, server in ((pair.a_port, b"hello\n", a), (pair.b_port, b"foo\n", b),
                                   (c_port, b"world\n", c), (d_port, b"bar\n", d)):
            assert nc_exchange("127.0.0.1", port, word) == word
            assert server.connections >= 1
        assert (a.connections, b.connections, c.connections, d.connections) == (1, 1, 1, 1)


def test_2_tls_mutual_both_directions(started_pair, echo_a, echo_b):
    pair, cloud, onprem = started_pair
    assert nc_exchange("127.0.0.1", pair.a_port, b"hello\n") == b"hello\n"
    assert nc_exchange("127.0.0.1", pair.b_port, b"foo\n") == b"foo\n"
    assert echo_a.connections == 1 and echo_b.connections == 1
    t = cloud.status()["tunnels"][0]
    assert t["tls"] in ("TLSv1.3", "TLSv1.2") and t["peer_cert"] == "onprem1"
    opened = [r for r in cloud.log_lines() if r.get("event") == "tunnel.opened"]
    assert opened and opened[0]["peer_node"] == "onprem1" and opened[0]["cipher"]
    # nc returns when the echo is back; the onprem side logs the close a moment later.
    wait_until(lambda: any(r.get("event") == "stream.closed" and r["service"] == "serviceB"
                           and r["bytes_out"] == 4 and r["bytes_in"] == 4 for r in onprem.log_lines()),
               10, what="onprem logs serviceB's stream.closed with 4 bytes each way")


def test_half_close_delivers_the_reply(started_pair):
    """nc -N sends FIN after its input; the echo must still come back through both gateways."""
    pair, cloud, onprem = started_pair
    payload = b"x" * 300_000 + b"\n"
    assert nc_exchange("127.0.0.1", pair.a_port, payload, half_close=True) == payload
    assert nc_exchange("127.0.0.1", pair.b_port, payload, half_close=True) == payload


def test_insecure_must_be_explicit(tmp_path, gateways):
    """ws:// without tls.insecure is a config error, reported by check and by run."""
    import subprocess
    import sys

    pair = make_pair(tmp_path, a_target=1, b_target=1, insecure=True)
    text = pair.cloud_config().replace("insecure = true", "")
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    out = subprocess.run([sys.executable, "-m", "intercloud", "check", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "insecure" in (out.stdout + out.stderr)
