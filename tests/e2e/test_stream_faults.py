"""Per-stream fault containment: an unexpected exception in one stream's task resets that stream and
is logged; the gateway and every other stream go on (they used to share the gateway's TaskGroup, so
one exception cancelled the whole multi-tenant gateway)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

from tests.support.netcat import nc_exchange
from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import scaled, wait_until

from .topology import make_pair, service

MiB = 1 << 20


def test_an_exception_in_one_stream_resets_only_that_stream(tmp_path, gateways):
    with EchoServer() as echo:
        pair = make_pair(tmp_path, a_target=echo.port, b_target=echo.port)
        boom_port = free_ports(1)[0]  # serviceA is the healthy service, "boom" the faulty one
        pair.cloud_services.append(service("boom", accept=boom_port))
        pair.onprem_services.append(service("boom", connect=echo.port))
        cloud = gateways("cloud1", pair.cloud_config(), env={"INTERCLOUD_TEST_STREAM_FAULT": "boom"})
        gateways("onprem1", pair.onprem_config())
        wait_until(lambda: len(cloud.status()["tunnels"]) == 1, 10, what="the tunnel")

        # a long transfer on the healthy service is in flight when the fault hits
        payload = os.urandom(32 * MiB)
        got = hashlib.sha256()
        received = [0]
        healthy = socket.create_connection(("127.0.0.1", pair.a_port))
        healthy.settimeout(scaled(30))

        def reader():
            while received[0] < len(payload):
                chunk = healthy.recv(1 << 20)
                if not chunk:
                    break
                got.update(chunk)
                received[0] += len(chunk)

        t = threading.Thread(target=reader)
        t.start()
        healthy.sendall(payload[: 8 * MiB])
        wait_until(lambda: received[0] > 0, 10, what="the healthy transfer to be under way")

        victim = socket.create_connection(("127.0.0.1", boom_port))
        victim.settimeout(scaled(5))
        victim.sendall(b"x")
        try:  # the echo of the early byte may arrive before the reset; then the stream must end
            while victim.recv(1024):
                pass
        except ConnectionResetError:
            pass  # reset: what a failed stream looks like to its client (a timeout here fails the test)
        rec = cloud.wait_log(lambda r: r.get("event") == "internal.error")
        assert rec["service"] == "boom" and "RuntimeError: fault injected" in rec["error"]
        assert rec["level"] == "ERROR"

        healthy.sendall(payload[8 * MiB:])
        t.join(scaled(60))
        healthy.close()
        assert received[0] == len(payload) and got.hexdigest() == hashlib.sha256(payload).hexdigest()
        assert cloud.running
        assert nc_exchange("127.0.0.1", pair.a_port, b"still here\n") == b"still here\n"
        st = cloud.status()
        assert st["counters"]["internal_errors"] == 1
        code, metrics = cloud.http_get("/metrics")
        assert code == 200 and 'intercloud_internal_errors_by_total{service="boom",tenant="default"} 1.0' in metrics.decode()
        wait_until(lambda: cloud.status()["streams_total"] == 0, 10, what="no stream left behind")
