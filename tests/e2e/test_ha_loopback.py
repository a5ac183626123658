"""HA on loopback (no root needed): a cluster of two members behind a real nginx stream load balancer,
two on-prem gateways that know only the load balancer's URL."""

from __future__ import annotations

import time

import pytest

from tests.support.netcat import nc_exchange
from tests.support.ports import free_port
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
        clouds = {n: {k: Addr(L, free_port()) for k in ("tunnel", "peer", "client", "admin")} for n in ("cloud1", "cloud2")}
        onprems = {n: {k: Addr(L, free_port()) for k in ("client", "admin")} for n in ("onprem1", "onprem2")}
        lb_port = free_port()
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
