"""Bad input at the cloud's tunnel port: not TLS, the wrong certificates, the wrong names, expired
certificates, a client breaking the wire protocol by hand, OPENs the cloud cannot serve, targets
that refuse.

For every case the cloud logs one clear line (never a traceback), keeps running, and the tunnel
that was already up keeps carrying streams.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
import time
from pathlib import Path

import pytest
from picows import WSCloseCode, WSListener, WSMsgType, ws_connect

from intercloud import certs as icerts
from intercloud.protocol.frames import FrameType, Reason, decode, decode_reason, encode, encode_open
from tests.support.netcat import nc_exchange
from tests.support.ports import free_ports
from tests.support.servers import RefusingPort
from tests.support.timeouts import scaled, wait_until

from .conftest import wait_tunnels
from .topology import make_pair, service

pytestmark = pytest.mark.needs_binary("nc")

SUBPROTOCOL = "intercloud.v1"


# --- helpers -------------------------------------------------------------------------------------

def assert_cloud_unharmed(pair, cloud, since: int = 0) -> None:
    """The cloud still runs, logged no traceback, and the good tunnel still carries service A."""
    assert cloud.running, cloud.log_tail()
    text = cloud.log_text()
    assert "Traceback" not in text, text
    assert all(line.startswith("{") for line in cloud.log_text(since).splitlines() if line.strip()), \
        "every cloud log line is one JSON record:\n" + cloud.log_text(since)
    wait_until(lambda: [t["peer_node"] for t in cloud.status()["tunnels"]] == ["onprem1"], 10,
               what="the cloud to hold exactly the good tunnel from onprem1")
    assert nc_exchange("127.0.0.1", pair.a_port, b"still there?\n") == b"still there?\n"


def cloud_event(cloud, event: str, since: int, pred=lambda r: True, timeout: float = 10.0) -> dict:
    return cloud.wait_log(lambda r: r["event"] == event and pred(r), timeout=timeout, since=since)


def write_leaf(directory: Path, stem: str, leaf: icerts.Issued) -> tuple[Path, Path]:
    cert = icerts.write_certificate(directory / f"{stem}.pem", leaf.cert)
    key = icerts.write_private_key(directory / f"{stem}.key", leaf.key)
    return cert, key


def pair_ca(pair) -> icerts.Issued:
    ca = icerts.load_ca(pair.certs)
    assert ca is not None
    return ca


def expired_window() -> dict:
    now = dt.datetime.now(dt.UTC)
    return {"not_before": now - dt.timedelta(days=30), "not_after": now - dt.timedelta(days=1)}


def onprem_config(pair, name: str, cert: Path, key: Path, *, url: str | None = None, extra_tls: str = "",
                  a_target: int = 1) -> str:
    """A second on-prem gateway with its own certificate; it only connects (binds no service port)."""
    return (f'[gateway]\nrole = "onprem"\nnode_id = "{name}"\nadmin = "127.0.0.1:{unused_ports(pair, 1)[0]}"\n\n'
            f'[tls]\ncert = "{cert}"\nkey = "{key}"\nca = "{pair.certs}/ca.pem"\n{extra_tls}\n'
            f'[tunnel]\nconnect = ["{url or pair.url}"]\nper_member = 1\n'
            f'reconnect_min = "100ms"\nreconnect_max = "1s"\nhandshake_timeout = "3s"\n\n'
            + service("serviceA", connect=a_target))


def unused_ports(pair, n: int) -> list[int]:
    """``n`` free ports, distinct from each other and from the pair's (which may not be bound yet)."""
    taken = {pair.tunnel_port, pair.cloud_admin, pair.onprem_admin, pair.a_port, pair.b_port}
    while True:
        ports = free_ports(n)
        if not taken & set(ports):
            return ports


def dial_failure(gw, timeout: float = 15.0) -> str:
    return gw.wait_log(lambda r: r["event"] == "tunnel.dial_failed", timeout=timeout)["reason"]


def client_context(pair, cert: str | None = "onprem2") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pair.certs / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(pair.certs / f"{cert}.pem"), str(pair.certs / f"{cert}.key"))
    return ctx


# --- not TLS at all ------------------------------------------------------------------------------

@pytest.mark.parametrize(("payload", "says"), [
    (bytes(range(256)) * 4, "does not speak TLS"),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "plain HTTP"),
], ids=["garbage", "plain-http-get"])
def test_not_tls_on_the_tunnel_port(started_pair, payload, says):
    pair, cloud, _onprem = started_pair
    mark = cloud.log_mark()
    with socket.create_connection(("127.0.0.1", pair.tunnel_port), timeout=scaled(10)) as sock:
        local = "%s:%d" % sock.getsockname()
        sock.sendall(payload)
        answer = b""
        try:
            while chunk := sock.recv(4096):  # until the cloud closes
                answer += chunk
        except ConnectionResetError:
            pass
    assert b"HTTP/1.1 101" not in answer
    rec = cloud_event(cloud, "tunnel.tls_failed", mark)
    assert rec["peer_addr"] == local, rec
    assert local in rec["msg"] and "TLS handshake" in rec["msg"] and says in rec["msg"], rec
    assert_cloud_unharmed(pair, cloud, mark)


# --- the wrong client certificates ---------------------------------------------------------------

def test_client_certificate_from_another_ca(started_pair, gateways, tmp_path):
    pair, cloud, _onprem = started_pair
    other_ca = icerts.create_ca("some other CA")
    cert, key = write_leaf(tmp_path, "foreign", icerts.issue(other_ca, "foreign", dns_names=["foreign"],
                                                            server=False, client=True))
    mark = cloud.log_mark()
    bad = gateways("foreign", onprem_config(pair, "foreign", cert, key), ready=False)
    reason = dial_failure(bad)
    assert "TLS handshake" in reason and "failed" in reason, reason
    assert "client certificate" in reason and "tls.cert" in reason, reason
    rec = cloud_event(cloud, "tunnel.tls_failed", mark)
    assert rec["peer_addr"] and rec["peer_addr"].startswith("127.0.0.1:") and rec["peer_addr"] in rec["msg"], rec
    assert bad.http_get("/readyz")[0] == 503
    assert_cloud_unharmed(pair, cloud, mark)


def test_no_client_certificate(started_pair):
    pair, cloud, _onprem = started_pair
    mark = cloud.log_mark()
    ctx = client_context(pair, cert=None)
    raw = socket.create_connection(("127.0.0.1", pair.tunnel_port), timeout=scaled(10))
    local = "%s:%d" % raw.getsockname()
    answer = b""
    refused_by = None
    try:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /intercloud HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: intercloud.v1\r\n\r\n")
            while chunk := tls.recv(4096):
                answer += chunk
    except (ssl.SSLError, ConnectionResetError) as exc:  # the cloud's alert: certificate required
        refused_by = exc
    finally:
        raw.close()
    assert b"101" not in answer, answer
    assert refused_by is not None or answer == b""
    rec = cloud_event(cloud, "tunnel.tls_failed", mark, lambda r: r["peer_addr"] == local)
    assert local in rec["msg"] and "certificate" in rec["msg"], rec
    assert_cloud_unharmed(pair, cloud, mark)


def test_expired_client_certificate(started_pair, gateways, tmp_path):
    pair, cloud, _onprem = started_pair
    cert, key = write_leaf(tmp_path, "expired-onprem", icerts.issue(
        pair_ca(pair), "expired-onprem", dns_names=["expired-onprem"], server=False, client=True,
        **expired_window()))
    mark = cloud.log_mark()
    bad = gateways("expired-onprem", onprem_config(pair, "expired-onprem", cert, key), ready=False)
    reason = dial_failure(bad)
    assert "TLS handshake" in reason and "client certificate" in reason, reason
    rec = cloud_event(cloud, "tunnel.tls_failed", mark)
    assert "expired" in rec["msg"], rec
    assert rec["peer_addr"] in rec["msg"], rec
    assert_cloud_unharmed(pair, cloud, mark)


# --- the wrong server certificate ----------------------------------------------------------------

def test_wrong_server_name(started_pair, gateways):
    pair, cloud, _onprem = started_pair
    mark = cloud.log_mark()
    bad = gateways("misnamed", onprem_config(pair, "onprem2", pair.certs / "onprem2.pem",
                                             pair.certs / "onprem2.key",
                                             extra_tls='server_name = "wrong.example"\n'), ready=False)
    reason = dial_failure(bad)
    assert "failed verification" in reason, reason
    assert "wrong.example" in reason and "tls.server_name" in reason, reason
    rec = cloud_event(cloud, "tunnel.tls_failed", mark)  # the client hung up mid-handshake
    assert rec["peer_addr"] in rec["msg"], rec
    assert "its log says why" in rec["msg"] or "does not trust" in rec["msg"], rec
    assert_cloud_unharmed(pair, cloud, mark)


def test_expired_cloud_certificate(started_pair, gateways, tmp_path):
    pair, cloud, _onprem = started_pair
    cert, key = write_leaf(tmp_path, "cloud2", icerts.issue(
        pair_ca(pair), "cloud2", dns_names=["cloud2", "localhost", "127.0.0.1"], server=True, client=True,
        **expired_window()))
    port, admin, z_port = unused_ports(pair, 3)
    cloud2 = gateways("cloud2", (
        f'[gateway]\nrole = "cloud"\nnode_id = "cloud2"\nadmin = "127.0.0.1:{admin}"\n\n'
        f'[tls]\ncert = "{cert}"\nkey = "{key}"\nca = "{pair.certs}/ca.pem"\n\n'
        f'[tunnel]\nlisten = "wss://127.0.0.1:{port}/intercloud"\n\n' + service("serviceZ", accept=z_port)))
    mark = cloud.log_mark()
    bad = gateways("onprem2", onprem_config(pair, "onprem2", pair.certs / "onprem2.pem", pair.certs / "onprem2.key",
                                            url=f"wss://localhost:{port}/intercloud"), ready=False)
    reason = dial_failure(bad)
    assert "failed verification" in reason and "expired" in reason, reason
    assert cloud2.status()["tunnels"] == []
    cloud2.wait_log(lambda r: r["event"] == "tunnel.tls_failed")
    assert "Traceback" not in cloud2.log_text()
    assert_cloud_unharmed(pair, cloud, mark)


# --- a client that breaks the wire protocol ------------------------------------------------------

class RawClient(WSListener):
    """Speaks intercloud by hand: every received message is decoded into ``frames``."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue = asyncio.Queue()
        self.close: tuple[int, str] | None = None
        self.gone = asyncio.get_running_loop().create_future()
        self.ws = None

    def on_ws_connected(self, transport) -> None:
        self.ws = transport

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            self.close = (int(frame.get_close_code()), frame.get_close_reason() or "")
            transport.disconnect()
        elif frame.msg_type is WSMsgType.BINARY:
            self.frames.put_nowait(decode(frame.get_payload_as_bytes()))

    def on_ws_disconnected(self, transport) -> None:
        if not self.gone.done():
            self.gone.set_result(None)

    def send(self, message: bytes) -> None:
        self.ws.send(WSMsgType.BINARY, message)

    async def next_frame(self, ftype: FrameType):
        async with asyncio.timeout(scaled(10)):
            while True:
                f = await self.frames.get()
                if f.type is ftype:
                    return f

    async def closed(self) -> tuple[int, str] | None:
        async with asyncio.timeout(scaled(10)):
            await self.gone
        return self.close


async def raw_session(pair, script) -> tuple[RawClient, dict]:
    """Connect with onprem2's certificate, exchange HELLOs, run ``script(client, cloud_hello)``."""
    _transport, client = await ws_connect(
        RawClient, f"wss://localhost:{pair.tunnel_port}/intercloud", ssl_context=client_context(pair),
        extra_headers={"Sec-WebSocket-Protocol": SUBPROTOCOL}, websocket_handshake_timeout=scaled(10))
    hello = json.loads((await client.next_frame(FrameType.HELLO)).payload)
    assert hello["role"] == "cloud" and hello["node_id"] == "cloud1"
    client.send(encode(FrameType.HELLO, 0, json.dumps({
        "version": 1, "node_id": "onprem2", "role": "onprem", "services": [], "window": 1 << 20,
        "max_frame": 64 * 1024, "max_streams": 10, "incarnation": "raw-test"}).encode()))
    try:
        result = await script(client, hello)
    finally:
        if not client.gone.done():
            client.ws.disconnect()
    return client, result


async def _unknown_type(c, hello):
    c.send(encode(0x7F, 0))
    return await c.closed()


async def _oversized_data(c, hello):
    c.send(encode(FrameType.OPEN, 1, encode_open("serviceB", "raw-client")))
    await c.next_frame(FrameType.OPEN_OK)
    c.send(encode(FrameType.DATA, 1, b"x" * (hello["max_frame"] + 1)))
    return await c.closed()


async def _reused_stream_id(c, hello):
    c.send(encode(FrameType.OPEN, 1, encode_open("serviceB", "raw-client")))
    c.send(encode(FrameType.OPEN, 1, encode_open("serviceB", "raw-client")))
    return await c.closed()


async def _short_message(c, hello):
    c.send(b"\x05\x00\x00")
    return await c.closed()


@pytest.mark.parametrize(("script", "fault"), [
    (_unknown_type, "unknown frame type 0x7f"),
    (_oversized_data, "exceeds max_frame"),
    (_reused_stream_id, "reuses stream id 1"),
    (_short_message, "frame of 3 bytes is shorter than the 6-byte header"),
], ids=["unknown-type", "oversized-data", "reused-stream-id", "3-byte-message"])
def test_protocol_abuse_closes_only_that_tunnel(started_pair, script, fault):
    pair, cloud, _onprem = started_pair
    mark = cloud.log_mark()
    _client, close = asyncio.run(raw_session(pair, script))
    assert close is not None, "the cloud must close with a WebSocket close frame"
    code, reason = close
    assert code == WSCloseCode.PROTOCOL_ERROR == 1002, close
    assert fault in reason, close
    rec = cloud_event(cloud, "tunnel.error", mark)
    assert fault in rec["msg"] and "onprem2" in rec["msg"], rec
    assert rec["level"] == "WARNING"
    assert_cloud_unharmed(pair, cloud, mark)


def test_oversized_control_frame_is_refused_not_read(started_pair):
    """A SERVICES frame over the 256 KiB every gateway takes (protocol §5.5): picows answers 1009 but goes
    on reading and, when the rest arrives within its 10 ms disconnect delay, still delivers the frame; the
    tunnel acts on nothing once a close is out, so the frame is never decoded (issue 12)."""
    pair, cloud, _onprem = started_pair
    mark = cloud.log_mark()
    payload = json.dumps([f"s{i:063d}" for i in range(4500)]).encode()  # 301,500 bytes, 4,500 names

    async def script(c, hello):
        c.send(encode(FrameType.SERVICES, 0, payload))
        return await c.closed()

    _client, close = asyncio.run(raw_session(pair, script))
    assert close is not None and close[0] == WSCloseCode.MESSAGE_TOO_BIG == 1009, close
    rec = cloud.wait_log(lambda r: r["event"] in ("tunnel.ws_violation", "tunnel.error"), since=mark)
    assert rec["event"] == "tunnel.ws_violation", f"the oversized frame was read: {rec['msg']}"
    assert "1009" in rec["msg"] and "exceeding max allowed size" in rec["msg"], rec
    assert_cloud_unharmed(pair, cloud, mark)


def test_open_for_unknown_service(started_pair):
    pair, cloud, _onprem = started_pair
    mark = cloud.log_mark()

    async def script(c, hello):
        c.send(encode(FrameType.OPEN, 1, encode_open("noSuchService", "raw-client")))
        fail = await c.next_frame(FrameType.OPEN_FAIL)
        # the tunnel stays usable: a valid OPEN afterwards is served
        c.send(encode(FrameType.OPEN, 3, encode_open("serviceB", "raw-client")))
        ok = await c.next_frame(FrameType.OPEN_OK)
        return fail, ok

    client, (fail, ok) = asyncio.run(raw_session(pair, script))
    assert fail.stream_id == 1 and ok.stream_id == 3
    code, text = decode_reason(fail.payload)
    assert code == Reason.UNKNOWN_SERVICE == 1
    assert "noSuchService" in text and "serviceB" in text, text
    assert client.close is None  # not a protocol error
    rec = cloud_event(cloud, "stream.open_refused", mark)
    assert rec["service"] == "noSuchService" and "noSuchService" in rec["msg"], rec
    assert_cloud_unharmed(pair, cloud, mark)


# --- a target that refuses -----------------------------------------------------------------------

def test_refusing_target_fails_the_client_at_once(tmp_path, gateways, echo_a, echo_b):
    with RefusingPort() as closed:
        pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port)
        (r_port,) = unused_ports(pair, 1)
        pair.cloud_services.append(service("serviceR", accept=r_port))
        pair.onprem_services.append(service("serviceR", connect=closed.port))
        at_once = scaled(2.0)  # a refusal answers the client this fast; route_wait is far longer
        route_wait = 5 * at_once
        cloud_text = pair.cloud_config().replace('route_wait = "2s"', f'route_wait = "{route_wait:g}s"')
        assert f'route_wait = "{route_wait:g}s"' in cloud_text
        cloud = gateways("cloud1", cloud_text)
        onprem = gateways("onprem1", pair.onprem_config())
        wait_tunnels(cloud, 1)
        mark = cloud.log_mark()

        started = time.monotonic()
        got = nc_exchange("127.0.0.1", r_port, b"anyone?\n", check=False)
        elapsed = time.monotonic() - started
        assert got == b""
        assert elapsed < at_once, f"client held {elapsed:.2f}s; a refusal must not wait for route_wait"

        target = f"127.0.0.1:{closed.port}"
        rec = cloud_event(cloud, "stream.refused", mark)
        assert rec["service"] == "serviceR" and "REFUSED" in rec["reason"] and target in rec["reason"], rec
        orec = onprem.wait_log(lambda r: r["event"] == "stream.target_failed")
        assert orec["reason"] == "REFUSED" and orec["target"] == target and target in orec["msg"], orec
        assert_cloud_unharmed(pair, cloud, mark)
