"""A client's real address through a load balancer, the tunnel and a relay, to the target: real nginx
on both sides (docs/operations.md §10.1).

Two clients, each in its own network namespace with its own address, reach:
- service A through an nginx ``stream`` front end (``proxy_protocol on``, a v1 header) in front of a
  cloud member's service port (``accept_proxy_protocol``): client 1 via cloud2, which holds the
  on-prem gateway's tunnel, client 2 via cloud1, which has no tunnel and relays the stream over its
  peer link to cloud2. The on-prem gateway dials the target with ``proxy_protocol = "v1"``;
- service B at the on-prem gateway's own listener; cloud2 dials its target with ``proxy_protocol =
  "v2"``.
Each target is an nginx ``stream`` server listening with ``proxy_protocol`` in front of an echo
server; its access log's ``$proxy_protocol_addr`` must be the client's namespace address, for every
path, and each echo must come back whole.
"""

from __future__ import annotations

import socket

import pytest

from tests.support.netns import lab_fixture
from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import scaled, wait_until

from .ha import HA, Addr, make_certs

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.needs_root,
              pytest.mark.needs_binary("ip", "nginx")]
L = "127.0.0.1"


@pytest.fixture
def lab():
    yield from lab_fixture()


def _add(config: str, after: str, lines: str) -> str:
    assert after in config, after
    return config.replace(after, f"{after}\n{lines}", 1)


def test_the_real_client_address_reaches_nginx_targets_direct_relayed_and_in_both_directions(tmp_path, gateways,
                                                                                            lab):
    from tests.support.nginx import NginxLB

    c1, c2 = lab.host("client1"), lab.host("client2")
    with EchoServer() as echo:
        ports = iter(free_ports(14))
        certs = make_certs(tmp_path / "certs", ["cloud1", "cloud2"], ["onprem1"], sans=[])
        clouds = {n: {k: Addr(L, next(ports)) for k in ("tunnel", "peer", "client", "admin")}
                  for n in ("cloud1", "cloud2")}
        onprems = {"onprem1": {"client": Addr(lab.root_ip, next(ports)), "admin": Addr(L, next(ports))}}
        target_a, target_b, front1, front2 = (next(ports) for _ in range(4))
        ha = HA(certs, clouds, onprems, Addr(L, target_a), Addr(L, target_b), per_member=1,
                connect_urls=[f"wss://localhost:{clouds['cloud2']['tunnel'].port}/intercloud"])
        nginx = [
            NginxLB(tmp_path, None, target_a, [(L, echo.port)], listen_ip=L, listen_proxy_protocol=True,
                    name="target-a"),
            NginxLB(tmp_path, None, target_b, [(L, echo.port)], listen_ip=L, listen_proxy_protocol=True,
                    name="target-b"),
            NginxLB(tmp_path, None, front1, [(L, clouds["cloud1"]["client"].port)], listen_ip=lab.root_ip,
                    send_proxy_protocol=True, name="front-cloud1"),
            NginxLB(tmp_path, None, front2, [(L, clouds["cloud2"]["client"].port)], listen_ip=lab.root_ip,
                    send_proxy_protocol=True, name="front-cloud2"),
        ]
        for lb in nginx:
            lb.start()
        try:
            for lb in nginx:
                lb.wait_ready()
            gws = {}
            for name, c in clouds.items():
                cfg = _add(ha.cloud_config(name), f'accept = "tcp://{L}:{c["client"].port}"',
                           f'accept_proxy_protocol = true\ntrusted_proxies = ["{L}/32"]')
                cfg = _add(cfg, f'connect = "tcp://{L}:{target_b}"', 'proxy_protocol = "v2"')
                gws[name] = gateways(name, cfg)
            gws["onprem1"] = gateways("onprem1", _add(ha.onprem_config("onprem1"),
                                                      f'connect = "tcp://{L}:{target_a}"', 'proxy_protocol = "v1"'))
            wait_until(lambda: len(gws["cloud2"].status()["tunnels"]) == 1, scaled(15),
                       what="onprem1's tunnel to cloud2")
            wait_until(lambda: any(p["peer_node"] == "cloud2" for p in gws["cloud1"].status()["peer_links"]),
                       scaled(15), what="cloud1's peer link to cloud2")

            def exchange(host, port: int, payload: bytes) -> int:
                with host.entered():
                    s = socket.socket()
                s.settimeout(scaled(10))
                s.connect((lab.root_ip, port))
                local_port = s.getsockname()[1]
                s.sendall(payload)  # no half-close: nginx's stream proxy ends the session on the first FIN
                got = b""
                while len(got) < len(payload) and (chunk := s.recv(65536)):
                    got += chunk
                s.close()
                assert got == payload, f"{host.name} -> {port}: {len(got)} of {len(payload)} bytes back"
                return local_port

            b_port = onprems["onprem1"]["client"].port
            paths = [  # (client, port it dials, the target that must name it, what the path is)
                (c1, front2, nginx[0], "A direct: nginx v1 -> cloud2 -> onprem1 -> v1 -> nginx"),
                (c2, front1, nginx[0], "A relayed: nginx v1 -> cloud1 -> peer link -> cloud2 -> onprem1 -> v1"),
                (c1, b_port, nginx[1], "B: onprem1 -> cloud2 -> v2 -> nginx"),
                (c2, b_port, nginx[1], "B from the other client"),
            ]
            for i, (host, port, target, what) in enumerate(paths):
                payload = f"{what} ".encode() * 500
                exchange(host, port, payload)
                expected = host.ip
                wait_until(lambda: any(r.get("proxy_protocol_client", "").split(":")[0] == expected
                                       for r in target.access_log()), scaled(10),
                           what=f"{target.name}'s log to name {expected} for {what}")
            # the relay really went over the peer link, with the real client in the OPEN it carried
            line = gws["cloud1"].wait_log(lambda r: r.get("event") == "stream.opened" and r.get("relayed") is True
                                          and r.get("client", "").startswith(c2.ip + ":") and r["side"] == "accept")
            assert line["peer_node"] == "cloud2", line
            gws["cloud2"].wait_log(lambda r: r.get("event") == "stream.opened" and r.get("side") == "relay-in"
                                   and r.get("client", "").startswith(c2.ip + ":"))
            # every session the targets logged came with a header naming a lab client, none the gateway's
            for target in nginx[:2]:
                seen = {r["proxy_protocol_client"].split(":")[0] for r in target.access_log()}
                assert seen == {c1.ip, c2.ip}, (target.name, seen)
        finally:
            for lb in nginx:
                lb.stop()
