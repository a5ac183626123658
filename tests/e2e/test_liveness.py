"""Liveness and reconnect (docs/ha.md §3, §7): a silent peer is detected within ping_timeout, the tunnel
is closed and redialed with backoff; a restarted cloud gateway gets its tunnel back."""

from __future__ import annotations

import signal
import time

from tests.support.netcat import nc_exchange
from tests.support.timeouts import scaled, wait_until


def _tunnels(gw) -> list[dict]:
    return gw.status()["tunnels"]


def test_frozen_cloud_is_detected_and_redialed(started_pair):
    pair, cloud, onprem = started_pair
    first = _tunnels(onprem)[0]["id"]
    cloud.signal(signal.SIGSTOP)  # no FIN, no RST: the peer just goes silent
    try:
        t0 = time.monotonic()
        onprem.wait_log(lambda r: r.get("event") == "tunnel.closed", timeout=10)
        detected = time.monotonic() - t0
        closed = [r for r in onprem.log_lines() if r.get("event") == "tunnel.closed"][0]
        assert "ping_timeout" in closed["reason"]
        assert detected <= scaled(4 + 1 + 1.5), f"detected after {detected:.1f}s with ping_timeout 4s"
        assert not onprem.status()["tunnels"]
        code, _ = onprem.http_get("/readyz")
        assert code == 503
    finally:
        cloud.signal(signal.SIGCONT)
    wait_until(lambda: any(t["id"] != first for t in _tunnels(onprem)), 15, what="a new tunnel after SIGCONT")
    assert nc_exchange("127.0.0.1", pair.a_port, b"again\n") == b"again\n"


def test_restarted_cloud_gets_its_tunnel_back(started_pair):
    pair, cloud, onprem = started_pair
    cloud.kill()
    onprem.wait_log(lambda r: r.get("event") == "tunnel.closed", timeout=10)
    cloud.start()
    cloud.wait_ready()
    wait_until(lambda: len(_tunnels(cloud)) == 1, 10, what="the on-prem gateway to redial the restarted cloud")
    assert nc_exchange("127.0.0.1", pair.a_port, b"back\n") == b"back\n"
    assert nc_exchange("127.0.0.1", pair.b_port, b"both\n") == b"both\n"
    failures = [r for r in onprem.log_lines() if r.get("event") == "tunnel.dial_failed"]
    # one log line per distinct failure, not one per retry
    reasons = [r["reason"] for r in failures]
    assert len(reasons) == len(set(reasons)) or len(reasons) <= 3


def test_client_without_route_is_reset_within_route_wait(tmp_path, gateways, echo_a, echo_b):
    """No on-prem gateway up: a client is held at most route_wait (2s here), then reset, and the log says why."""
    from .topology import make_pair

    pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port)
    cloud = gateways("cloud1", pair.cloud_config())
    import socket

    s = socket.create_connection(("127.0.0.1", pair.a_port))
    s.settimeout(scaled(10))
    t0 = time.monotonic()
    try:
        data = s.recv(10)
    except ConnectionResetError:
        data = None  # a TCP reset: the client can tell it was refused, not served
    held = time.monotonic() - t0
    assert data is None, f"expected a TCP reset, got {data!r}"
    assert 1.5 <= held <= scaled(2 + 1.5), f"client held {held:.2f}s with route_wait 2s"
    rec = cloud.wait_log(lambda r: r.get("event") == "stream.refused", timeout=5)
    assert "no route" in rec["reason"] and "serviceA" in rec["reason"]
