"""SIGHUP under load: certificates and services reload without dropping streams that stay valid."""

from __future__ import annotations

import signal
import socket
import threading

from intercloud.certs import init_certs
from tests.support.ports import free_ports
from tests.support.timeouts import wait_until

from .test_ha_loopback import _transfer
from .topology import make_pair, service


def test_sighup_rotates_certificate_and_services_under_load(tmp_path, gateways, echo_a, echo_b):
    pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port)
    x_port, = free_ports(1)
    base_services = list(pair.cloud_services)
    pair.cloud_services = base_services + [service("serviceX", accept=x_port)]
    cloud = gateways("cloud1", pair.cloud_config())
    onprem = gateways("onprem1", pair.onprem_config())
    wait_until(lambda: len(onprem.status()["tunnels"]) == 1, 10, what="the tunnel")
    old_fp = onprem.status()["tunnels"][0]["peer_cert_sha256"]
    socket.create_connection(("127.0.0.1", x_port)).close()  # serviceX listens before the reload

    results: dict = {}
    gate = threading.Event()
    threads = [threading.Thread(target=_transfer, args=(pair.a_port, 2 << 20, i, results, i, gate), daemon=True)
               for i in range(4)]
    for th in threads:
        th.start()
    wait_until(lambda: len(cloud.status()["streams"]) >= 4, 10, what="transfers in flight")

    init_certs(pair.certs, cloud=["cloud1"], onprem=[])  # a new key and certificate, same CA
    pair.cloud_services = base_services  # serviceX removed
    cloud.config_text = pair.cloud_config()
    mark = cloud.log_mark()
    cloud.signal(signal.SIGHUP)
    cloud.wait_log(lambda r: r.get("event") == "gateway.reloaded", since=mark, timeout=10)
    gate.set()  # the second halves flow after the reload

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", x_port), timeout=1).close()
            return False
        except ConnectionRefusedError:
            return True

    wait_until(refused, 5, what="the removed service's listener to close")
    for th in threads:
        th.join(timeout=60)
    broken = {k: v for k, v in results.items() if v[2] is not None or v[0] != v[1]}
    assert len(results) == 4 and not broken, broken

    # a tunnel made after the reload sees the new certificate; the old tunnel kept running
    second = gateways("onprem2", pair.onprem_config("onprem2", admin=free_ports(1)[0], b_port=pair.b_port + 0)
                      .replace(f"{pair.certs}/onprem1.", f"{pair.certs}/onprem2.")
                      .replace(f"tcp://127.0.0.1:{pair.b_port}", f"tcp://127.0.0.1:{free_ports(1)[0]}"))
    wait_until(lambda: len(second.status()["tunnels"]) == 1, 10, what="a new tunnel")
    new_fp = second.status()["tunnels"][0]["peer_cert_sha256"]
    assert new_fp and new_fp != old_fp
    assert onprem.status()["tunnels"][0]["peer_cert_sha256"] == old_fp  # not dropped by the reload


def test_sighup_new_connect_service_is_announced_and_bad_config_is_refused(tmp_path, gateways, echo_a, echo_b):
    from tests.support.netcat import nc_exchange

    pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port)
    c_port, = free_ports(1)
    pair.cloud_services.append(service("serviceC", accept=c_port))
    cloud = gateways("cloud1", pair.cloud_config())
    onprem = gateways("onprem1", pair.onprem_config())
    wait_until(lambda: len(cloud.status()["tunnels"]) == 1, 10, what="the tunnel")
    svc = [s for s in cloud.status()["services"] if s["name"] == "serviceC"][0]
    assert svc["routes"] == []

    # a broken config is refused and the running one stays
    good = onprem.config_text
    onprem.config_text = good + "\n[bogus]\nx = 1\n"
    mark = onprem.log_mark()
    onprem.signal(signal.SIGHUP)
    rec = onprem.wait_log(lambda r: r.get("event") == "gateway.reload_failed", since=mark, timeout=10)
    assert "bogus" in rec["msg"]
    assert nc_exchange("127.0.0.1", pair.a_port, b"still\n") == b"still\n"

    onprem.config_text = good + service("serviceC", connect=echo_a.port)
    onprem.signal(signal.SIGHUP)
    onprem.wait_log(lambda r: r.get("event") == "gateway.reloaded", since=mark, timeout=10)
    wait_until(lambda: [s for s in cloud.status()["services"] if s["name"] == "serviceC"][0]["routes"] == ["onprem1"],
               10, what="the cloud to learn serviceC from the SERVICES frame")
    assert nc_exchange("127.0.0.1", c_port, b"new service\n") == b"new service\n"
