"""PROXY protocol (docs/operations.md §10.1) with real gateways and a real nginx, on loopback.

1. Bad input on a service listener with ``accept_proxy_protocol``: garbage instead of a header, a v1
   line longer than the protocol's 107 bytes, a connection from outside ``trusted_proxies``, a client
   that closes mid-header: each is reset with one log line naming the peer and the rule, counted in
   /metrics, no traceback, while a stream opened before them (v1 header) and one after (a v2 header
   with TLVs of types nobody defined) carry data byte-exact with the client address their header
   named.
2. The tunnel listener behind nginx (``proxy_protocol on``, connecting from 127.0.0.5 with
   ``proxy_bind``): with ``[tunnel] accept_proxy_protocol`` the cloud's status shows the on-prem
   gateway's own address (127.0.0.1), not the balancer's; a direct connection from outside
   ``trusted_proxies`` is refused before TLS.

The end-to-end path of a client's address through both sides and a relay, with nginx in front and
nginx as the target, in network namespaces, is tests/e2e/test_proxy_protocol_netns.py.
"""

from __future__ import annotations

import socket
import struct

import pytest

from intercloud import proxy_protocol
from tests.support.ports import free_ports
from tests.support.timeouts import scaled, wait_until

from .conftest import wait_tunnels
from .topology import make_pair

pytestmark = [pytest.mark.e2e]


def _accept_pp(name: str, port: int, trusted: str = "127.0.0.1/32") -> str:
    return (f'[[service]]\nname = "{name}"\naccept = "tcp://127.0.0.1:{port}"\n'
            f'accept_proxy_protocol = true\ntrusted_proxies = ["{trusted}"]\n')


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(scaled(5))
    s.connect(("127.0.0.1", port))
    return s


def _echo(s: socket.socket, payload: bytes) -> bytes:
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got



def _reset(s: socket.socket) -> str:
    """'reset' once the gateway has reset the connection; what else happened otherwise."""
    try:
        data = s.recv(100)
        return f"read {data!r}"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timed out"
    finally:
        s.close()


def test_bad_proxy_headers_and_untrusted_sources_are_refused_other_streams_unaffected(tmp_path, gateways, echo_a):
    pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_a.port)
    (pa,) = free_ports(1)
    pair.cloud_services = [_accept_pp("pp", pa)]
    pair.onprem_services = [f'[[service]]\nname = "pp"\nconnect = "tcp://127.0.0.1:{echo_a.port}"\n']
    cloud = gateways("cloud1", pair.cloud_config())
    gateways("onprem1", pair.onprem_config())
    wait_tunnels(cloud, 1)

    def opened(client: str):
        return cloud.wait_log(lambda r: r.get("event") == "stream.opened" and r.get("client") == client)

    # a stream opened before the bad input, through a v1 header (with its first bytes in the same write)
    keep = _connect(pa)
    keep.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\nfirst")
    assert keep.recv(5) == b"first"
    opened("203.0.113.7:4242")

    cases = [  # (what the client sends, bound source, words of the refusal, rule)
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.1", "not a PROXY header", "accept_proxy_protocol"),
        (b"PROXY TCP4 " + b"9" * 150 + b"\r\n", "127.0.0.1", "within 107 bytes", "accept_proxy_protocol"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhello", "127.0.0.2", "not in service pp's trusted_proxies",
         "trusted_proxies"),
        (proxy_protocol.V2_SIGNATURE[:8], "127.0.0.1", "no complete PROXY header", "accept_proxy_protocol"),
    ]
    for payload, source, words, rule in cases:
        mark = cloud.log_mark()
        try:  # the RST at accept can beat connect() or the send back to this thread
            s = _connect(pa, source)
            s.sendall(payload)
            if payload == proxy_protocol.V2_SIGNATURE[:8]:
                s.shutdown(socket.SHUT_WR)  # then closes mid-header
        except ConnectionResetError:
            got = "reset"
        else:
            got = _reset(s)
        assert got == "reset", payload
        line = cloud.wait_log(lambda r: r.get("event") == "conn.refused" and r.get("kind") == "proxy_protocol",
                              since=mark)
        assert words in line["reason"] and line["rule"] == rule and line["client"].startswith(source), line
        assert line["service"] == "pp"

    # a v2 header with TLVs of types nobody defined: skipped, the stream carries the address it names
    tlvs = bytes([0xE0, 0, 4]) + b"abcd" + bytes([0x30, 0, 0])
    body = bytes([198, 51, 100, 9, 127, 0, 0, 1]) + struct.pack("!HH", 5151, pa) + tlvs
    v2 = proxy_protocol.V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(body)) + body
    s = _connect(pa)
    s.sendall(v2)
    assert _echo(s, b"v2 payload" * 1000) == b"v2 payload" * 1000
    s.close()
    opened("198.51.100.9:5151")

    # the stream from before every refusal is untouched
    blob = bytes(range(256)) * 400
    assert _echo(keep, blob) == blob
    keep.close()
    assert "Traceback" not in cloud.log_path.read_text()
    wait_until(lambda: cloud.metric('intercloud_connections_refused_by_total{kind="proxy_protocol",service="pp"}')
               == 4, scaled(5), what="the 4 refusals in /metrics")


@pytest.mark.needs_binary("nginx")
def test_tunnel_listener_behind_nginx_sees_the_onprem_gateways_address(tmp_path, gateways, echo_a):
    from tests.support.nginx import NginxLB

    pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_a.port)
    (lb_port,) = free_ports(1)
    cloud_cfg = pair.cloud_config().replace(
        'ping_interval = "1s"', 'accept_proxy_protocol = true\ntrusted_proxies = ["127.0.0.5/32"]\n'
                                'ping_interval = "1s"', 1)
    onprem_cfg = pair.onprem_config().replace(f":{pair.tunnel_port}/", f":{lb_port}/")
    with NginxLB(tmp_path, None, lb_port, [("127.0.0.1", pair.tunnel_port)], send_proxy_protocol=True,
                 proxy_bind="127.0.0.5", name="tunnel-lb") as _lb:
        cloud = gateways("cloud1", cloud_cfg)
        gateways("onprem1", onprem_cfg)
        wait_tunnels(cloud, 1)
        tunnels = cloud.status()["tunnels"]
        assert all(t["peer_addr"].startswith("127.0.0.1:") for t in tunnels), tunnels
        s = _connect(pair.a_port)
        assert _echo(s, b"through the balancer") == b"through the balancer"
        s.close()

        # straight to the tunnel listener, from outside trusted_proxies: refused before any TLS
        mark = cloud.log_mark()
        try:
            raw = _connect(pair.tunnel_port)
            raw.sendall(b"\x16\x03\x01\x00\x05hello")
        except ConnectionResetError:
            got = "reset"
        else:
            got = _reset(raw)
        assert got == "reset"
        line = cloud.wait_log(lambda r: r.get("event") == "tunnel.proxy_refused", since=mark)
        assert "tunnel.trusted_proxies" in line["msg"] and line["peer_addr"].startswith("127.0.0.1:"), line
        wait_until(lambda: cloud.metric('intercloud_connections_refused_by_total{kind="proxy_protocol",service=""}')
                   == 1, scaled(5), what="the refusal in /metrics")
