"""A member's route set larger than a frame the other member accepts (protocol §5.5): the peer link
stays up, the routes arrive (MEMBERS cut to the peer's max_frame, HELLO without its tables) and a
stream is relayed to one of them."""

from __future__ import annotations

import re

from tests.support.netcat import nc_exchange
from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import wait_until

from .ha import HA, Addr, make_certs

L = "127.0.0.1"
N = 300  # services with 64-character names: ~23 KB of routes against a 16 KiB max_frame


def _name(i: int) -> str:
    return f"svc{i:04d}".ljust(64, "z")


def test_a_route_set_bigger_than_max_frame_does_not_break_the_peer_link(tmp_path, gateways):
    with EchoServer() as a, EchoServer() as b:
        certs = make_certs(tmp_path / "certs", ["cloud1", "cloud2"], ["onprem1"], sans=[])
        # every listener gets its port from one free_ports() call: 600 port-0 listeners inside the
        # gateways would take random ephemeral ports, which collided with the ones handed out here
        ports = iter(free_ports(12 + 2 * N))
        clouds = {n: {k: Addr(L, next(ports)) for k in ("tunnel", "peer", "client", "admin")}
                  for n in ("cloud1", "cloud2")}
        onprems = {"onprem1": {k: Addr(L, next(ports)) for k in ("client", "admin")}}
        service_ports = {n: [next(ports) for _ in range(N)] for n in clouds}
        last_port = {n: service_ports[n][-1] for n in clouds}
        # onprem1 dials cloud1 only: cloud2 reaches the services by relay through cloud1
        ha = HA(certs, clouds, onprems, Addr(L, a.port), Addr(L, b.port),
                connect_urls=[f"wss://localhost:{clouds['cloud1']['tunnel'].port}/intercloud"], per_member=1)

        def cloud(n: str) -> str:
            extra = "".join(f'\n[[service]]\nname = "{_name(i)}"\n'
                            f'accept = "tcp://{L}:{service_ports[n][i]}"\n' for i in range(N))
            return ha.cloud_config(n).replace("[tunnel]\n", '[tunnel]\nmax_frame = "16KiB"\n', 1) + extra

        extra = "".join(f'\n[[service]]\nname = "{_name(i)}"\nconnect = "tcp://{L}:{a.port}"\n' for i in range(N))
        onprem_text = ha.onprem_config("onprem1").replace("[tunnel]\n", '[tunnel]\nmax_frame = "16KiB"\n', 1) + extra
        c1 = gateways("cloud1", cloud("cloud1"))
        c2 = gateways("cloud2", cloud("cloud2"))
        gateways("onprem1", onprem_text)
        wait_until(lambda: len(c1.status()["tunnels"]) == 1, 20, what="onprem1's tunnel to cloud1")
        # cloud2 relays to the last of the 300 routes through cloud1: it learned the whole route set
        assert nc_exchange(L, last_port["cloud2"], b"relayed\n") == b"relayed\n"
        rec = c2.wait_log(lambda r: r.get("event") == "stream.opened" and r.get("service") == _name(N - 1))
        assert rec["peer_node"] == "cloud1"
        for gw in (c1, c2):
            # close code 1009 as a word: a port such as 127.0.0.1:51009 in a message is not one
            downs = [r for r in gw.log_lines() if r.get("event") in ("cluster.link_down", "tunnel.protocol_error")
                     or re.search(r"\b1009\b", r.get("msg", ""))]
            assert not downs, f"{gw.name}: the peer link broke: {downs[:3]}"
