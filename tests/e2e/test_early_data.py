"""Early data (protocol §4.5) end to end: a client's first bytes cross the tunnel right behind the
OPEN, and when that OPEN is refused the gateway opens the stream elsewhere and sends the same bytes
again, so the client never notices."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

from tests.support.ports import free_ports
from tests.support.servers import RefusingPort

from .conftest import wait_tunnels
from .topology import make_pair, service

SIZE = 100 * 1024  # more than the 64 KiB a gateway accepts early: early data, then parked bytes
CLIENTS = 8


def _echo_through(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)  # at once: before the cloud has an answer to its OPEN
    got = bytearray()
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return bytes(got)


@pytest.mark.needs_binary("nc")
def test_refused_open_is_retried_with_the_same_first_bytes(tmp_path, gateways, echo_a, echo_b):
    """onprem1's target for service A refuses, onprem2's echoes. Clients come one after another and
    stay connected, so onprem1 (no stream) is the least loaded gateway and tried first by every
    client after the first: each such client's first 64 KiB went to onprem1 as early data, came
    back refused, and must reach onprem2's target intact and in order."""
    with RefusingPort() as closed:
        pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port)
        cloud = gateways("cloud1", pair.cloud_config())
        pair.onprem_services = [service("serviceA", connect=closed.port), service("serviceB", accept=pair.b_port)]
        onprem1 = gateways("onprem1", pair.onprem_config("onprem1"))
        admin2, b2 = free_ports(2)
        pair.onprem_services = [service("serviceA", connect=echo_a.port), service("serviceB", accept=b2)]
        gateways("onprem2", pair.onprem_config("onprem2", admin=admin2, b_port=b2))
        wait_tunnels(cloud, 2)
        mark = cloud.log_mark()

        payloads = [os.urandom(SIZE) for _ in range(CLIENTS)]
        socks: list[socket.socket] = []
        try:
            answers = []
            for p in payloads:
                socks.append(socket.create_connection(("127.0.0.1", pair.a_port), timeout=20))
                answers.append(_echo_through(socks[-1], p))
        finally:
            for s in socks:
                s.close()

        for i, (sent, got) in enumerate(zip(payloads, answers)):
            assert len(got) == len(sent), f"client {i}: {len(got)} of {len(sent)} bytes came back"
            assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest(), f"client {i}: bytes differ"
        refused = [r for r in cloud.log_lines(since=mark)
                   if r.get("event") == "stream.open_failed" and r.get("reason") == "REFUSED"]
        assert len(refused) >= CLIENTS - 1, f"expected the refusing gateway to be tried first: {refused}"
        assert all(r["peer_node"] == "onprem1" for r in refused), refused
        onprem1.wait_log(lambda r: r.get("event") == "stream.target_failed")
        assert "Traceback" not in cloud.log_text() + onprem1.log_text()
