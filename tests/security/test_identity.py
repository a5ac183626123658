"""Gateway identity under attack (issue 12): a cloned on-prem VM must not black-hole a service, and
peer-chosen strings never reach a log line raw.

A clone is two on-prem gateways with the same certificate and node_id: retry exclusion keys on the
gateway instance (node id + incarnation), so a clone whose target is dead cannot hide the healthy one;
the duplicate is reported in the log, /api/status and /metrics.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl

import pytest
from picows import WSListener, WSMsgType, ws_connect

from tests.e2e.conftest import wait_tunnels
from tests.e2e.topology import make_pair, service
from tests.support.ports import free_ports
from tests.support.servers import EchoServer, RefusingPort
from tests.support.timeouts import wait_until

CLIENTS = 200


def _echo_once(port: int, payload: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            return got == payload
    except OSError:
        return False


@pytest.mark.needs_binary("nc")
def test_a_clone_with_a_dead_target_does_not_hide_the_healthy_one(tmp_path, gateways):
    with EchoServer() as echo_a, EchoServer() as echo_b, RefusingPort() as dead:
        pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port)
        cloud = gateways("cloud1", pair.cloud_config())
        pair.onprem_services = [service("serviceA", connect=dead.port), service("serviceB", accept=pair.b_port)]
        gateways("clone", pair.onprem_config("onprem1"))  # same certificate, same node_id
        admin2, b2 = free_ports(2)
        pair.onprem_services = [service("serviceA", connect=echo_a.port), service("serviceB", accept=b2)]
        gateways("onprem1", pair.onprem_config("onprem1", admin=admin2, b_port=b2))
        wait_tunnels(cloud, 2)

        served = sum(_echo_once(pair.a_port, f"client {i}\n".encode()) for i in range(CLIENTS))
        assert served >= CLIENTS - 1, f"only {served} of {CLIENTS} clients served while a healthy gateway was up"

        dups = cloud.status()["duplicate_identities"]
        assert list(dups) == ["onprem1"] and len(dups["onprem1"]) == 2, dups
        code, body = cloud.http_get("/metrics")
        assert code == 200 and b'intercloud_duplicate_identity{peer_node="onprem1"} 2.0' in body
        lines = [r for r in cloud.log_lines() if r.get("event") == "tunnel.duplicate_identity"]
        assert len(lines) == 1 and lines[0]["peer_node"] == "onprem1", lines


class _Quiet(WSListener):
    def __init__(self):
        self.closed = asyncio.get_event_loop().create_future()

    def on_ws_frame(self, transport, frame):
        pass

    def on_ws_disconnected(self, transport):
        if not self.closed.done():
            self.closed.set_result(None)


def _hello(node_id) -> bytes:
    from intercloud.protocol import frames
    body = {"version": 1, "node_id": node_id, "role": "onprem", "services": [], "window": 65536,
            "max_frame": 65536, "max_streams": 10, "incarnation": "abc123"}
    raw = json.dumps(body).encode()
    if node_id == "\udcff":  # not valid UTF-8 on the wire
        raw = raw.replace(b'"\\udcff"', b'"\xff\xfe"')
    return frames.encode(frames.FrameType.HELLO, 0, raw)


async def _send_hello(url: str, ctx: ssl.SSLContext, node_id) -> None:
    _tr, listener = await ws_connect(_Quiet, url, ssl_context=ctx,
                                     extra_headers={"Sec-WebSocket-Protocol": "intercloud.v1"})
    _tr.send(WSMsgType.BINARY, _hello(node_id))
    await asyncio.wait_for(listener.closed, 10)


@pytest.mark.parametrize("node_id", ["evil\nINFO forged line", "x" * 200_000, "\udcff"],
                         ids=["newline", "200KB", "not-utf8"])
def test_hostile_node_ids_are_refused_with_one_short_escaped_line(tmp_path, gateways, node_id):
    with EchoServer() as echo_a, EchoServer() as echo_b:
        pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port)
        cloud = gateways("cloud1", pair.cloud_config())
        ctx = ssl.create_default_context(cafile=str(pair.certs / "ca.pem"))
        ctx.load_cert_chain(pair.certs / "onprem1.pem", pair.certs / "onprem1.key")
        mark = cloud.log_mark()
        asyncio.run(_send_hello(pair.url, ctx, node_id))
        wait_until(lambda: "HELLO" in cloud.log_text(since=mark), 10, what="the refusal line")
        text = cloud.log_text(since=mark)
        refusals = [ln for ln in text.splitlines() if "HELLO" in ln]
        assert len(refusals) == 1, refusals
        assert len(refusals[0].encode()) <= 1024, len(refusals[0])
        assert "forged line" not in text or "\\n" in refusals[0] or "\\x0a" in refusals[0]
        assert not any(ln.startswith("INFO forged") for ln in text.splitlines())
        assert cloud.status()["tunnels"] == []
