"""Metric series from peers (issue 12): 1,000 silent tunnels with distinct identities leave /metrics
exactly as they found it once they close.

Why: every label value a peer can choose is a series Prometheus stores for good. /metrics may show a
series per *live* tunnel (``intercloud_tunnels{peer_node}``), named by an identity the certificate
vouches for, but nothing may outlive the tunnel, or anyone with a certificate could grow the cloud's
memory and every scraper's storage by reconnecting under new names. The clients here are raw: a TLS
WebSocket with its own client certificate whose CN and DNS SAN are its node id (so the test holds where a
node id must be a name of the certificate, as protocol §5.4 asks of peer links), one HELLO, then nothing
until they close. The cloud's RSS must come back too: a closed tunnel's transport is freed at once.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import re
import ssl
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from picows import WSListener, WSMsgType, ws_connect

from intercloud.protocol import frames
from tests.support import pki
from tests.support.ports import free_ports
from tests.support.timeouts import scaled, wait_until

from .conftest import rss_mb

N = 1000
IN_FLIGHT = 100  # handshakes at once: 2 cores cope, and the cloud's cap below is above it
SERVICE = "serviceA"
# label values that come from the config (or the code) rather than from a peer
CONFIG_VALUES = {SERVICE, "default", "cloud1", "tunnel", "peer"}
# name{labels} value: the series is the part before the value
_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+\S+$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _cloud_config(certs, tunnel_port: int, admin: int, accept: int) -> str:
    return (f'[gateway]\nrole = "cloud"\nnode_id = "cloud1"\nadmin = "127.0.0.1:{admin}"\n\n'
            f'[tls]\ncert = "{certs}/cloud1.pem"\nkey = "{certs}/cloud1.key"\nca = "{certs}/ca.pem"\n\n'
            f'[tunnel]\nlisten = "wss://127.0.0.1:{tunnel_port}/intercloud"\n'
            # silent clients never answer PINGs: no tunnel may close for liveness during the test
            'ping_interval = "5s"\nping_timeout = "120s"\nhandshake_timeout = "30s"\n\n'
            f'[cluster]\nmax_handshakes = {2 * IN_FLIGHT}\nmax_handshakes_per_source = {2 * IN_FLIGHT}\n\n'
            f'[[service]]\nname = "{SERVICE}"\naccept = "tcp://127.0.0.1:{accept}"\n')


def _leaf_certs(ca: pki.CertKey, certs, names: list[str]):
    """One client certificate per name (CN and DNS SAN), all on one key: signing is the cheap part."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_path = certs / "leaf.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    now = dt.datetime.now(dt.timezone.utc)
    paths = []
    for name in names:
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca.key, hashes.SHA256()))
        path = certs / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths.append(path)
    return key_path, paths


def _hello(node_id: str, incarnation: str) -> bytes:
    body = {"version": 1, "node_id": node_id, "role": "onprem", "services": [], "window": 65536,
            "max_frame": 65536, "max_streams": 10, "incarnation": incarnation}
    return frames.encode(frames.FrameType.HELLO, 0, json.dumps(body).encode())


class _Silent(WSListener):
    """Answers the cloud's HELLO with its own (protocol §5.2), then ignores everything (PINGs too)."""

    def __init__(self, hello: bytes):
        loop = asyncio.get_running_loop()
        self.hello = hello
        self.answered = loop.create_future()
        self.closed = loop.create_future()

    def on_ws_frame(self, transport, frame):
        if not self.answered.done() and frame.msg_type == WSMsgType.BINARY:
            transport.send(WSMsgType.BINARY, self.hello)
            self.answered.set_result(None)

    def on_ws_disconnected(self, transport):
        if not self.answered.done():
            self.answered.set_exception(ConnectionError("the cloud closed before HELLO"))
        if not self.closed.done():
            self.closed.set_result(None)


def series(body: bytes) -> list[str]:
    """The series of a /metrics body (its non-comment lines, without the values)."""
    out = []
    for line in body.decode().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = _SERIES.match(line)
        assert m, f"unparsable /metrics line {line!r}"
        out.append(m.group(1) + (m.group(2) or ""))
    return out


def label_values(names: list[str]) -> set[str]:
    return {v for s in names for _k, v in _LABEL.findall(s)}


def _metrics(cloud) -> list[str]:
    code, body = cloud.http_get("/metrics", timeout=10)
    assert code == 200, (code, body[:300])
    return series(body)


def test_1000_silent_tunnels_leave_no_series_behind(tmp_path, gateways):
    started = time.monotonic()
    certs = tmp_path / "certs"
    ca = pki.make_ca(certs, "ca")
    pki.issue_cert(ca, certs, "cloud1", dns=("localhost",), ips=("127.0.0.1",))
    nodes = [f"node-{i:04d}" for i in range(N)]
    key_path, cert_paths = _leaf_certs(ca, certs, nodes)
    cadata = ca.cert_path.read_text()

    tunnel_port, admin, accept = free_ports(3)
    cloud = gateways("cloud1", _cloud_config(certs, tunnel_port, admin, accept))
    url = f"wss://127.0.0.1:{tunnel_port}/intercloud"
    base = _metrics(cloud)
    base_rss = rss_mb(cloud.pid)
    base_opened = cloud.status()["counters"]["tunnels_opened"]
    mark = cloud.log_mark()
    setup = time.monotonic() - started

    async def scenario():
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(i: int):
            async with gate:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_verify_locations(cadata=cadata)
                ctx.load_cert_chain(cert_paths[i], key_path)
                hello = _hello(nodes[i], f"inc{i:04d}")
                tr, listener = await ws_connect(lambda: _Silent(hello), url, ssl_context=ctx,
                                                websocket_handshake_timeout=scaled(30),
                                                extra_headers={"Sec-WebSocket-Protocol": "intercloud.v1"})
                await asyncio.wait_for(listener.answered, scaled(30))
                return tr, listener

        links = await asyncio.gather(*(one(i) for i in range(N)))
        opened = time.monotonic()
        await asyncio.to_thread(wait_until, lambda: len(cloud.status()["tunnels"]) == N, 30,
                                interval=0.2, what=f"{N} tunnels in /api/status")
        up = await asyncio.to_thread(_metrics, cloud)
        for tr, _listener in links:
            tr.disconnect()
        await asyncio.wait_for(asyncio.gather(*(lis.closed for _tr, lis in links)), scaled(30))
        return up, opened

    up, opened_at = asyncio.run(scenario())
    wait_until(lambda: cloud.status()["tunnels"] == [], 30, interval=0.2, what="every tunnel closed in /api/status")
    closed_at = time.monotonic()
    assert cloud.status()["counters"]["tunnels_opened"] - base_opened == N  # every one was a real tunnel

    # after: exactly the baseline, series for series
    after = _metrics(cloud)
    left = sorted((collections.Counter(after) - collections.Counter(base)).elements())
    gone = sorted((collections.Counter(base) - collections.Counter(after)).elements())
    assert len(after) == len(base) and not left and not gone, \
        (f"/metrics has {len(after)} series after {N} tunnels closed, {len(base)} before; "
         f"{len(left)} stayed, e.g. {left[:20]}; {len(gone)} went, e.g. {gone[:20]}")

    # while up: at most a series per live tunnel, each named by the identity its certificate carries
    extra_up = collections.Counter(up) - collections.Counter(base)
    # values /metrics had before any peer connected (e.g. the TCP congestion algorithm in use, which the
    # config and the kernel choose) came from no peer either
    strangers = label_values(up) - set(nodes) - CONFIG_VALUES - label_values(base)
    assert not strangers, f"label values that are neither config names nor identities: {sorted(strangers)[:20]}"
    nameless = [s for s in extra_up if not label_values([s]) & set(nodes)]
    assert not nameless, f"series that came with the tunnels but name no identity: {nameless[:20]}"
    assert len(extra_up) <= N, f"{len(extra_up)} series for {N} tunnels: {sorted(extra_up)[:20]}"

    # memory: closed tunnels are freed at once (no reference cycle waits for a full GC) and the heap is
    # trimmed soon after the closes (tls_server.heap_churn), so the RSS returns near its start value
    rss = []
    try:
        wait_until(lambda: rss.append(rss_mb(cloud.pid)) or rss[-1] <= base_rss + 30, 25, interval=0.5,
                   what="the cloud's RSS back within 30 MB of its start value")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {base_rss:.0f} MB before the tunnels, {rss[0]:.0f} MB after they "
                             f"closed, {rss[-1]:.0f} MB at the end") from None

    # logs: one OPENED and one CLOSED line per tunnel, and nothing else per tunnel
    events = collections.Counter(r.get("event") for r in cloud.log_lines(since=mark))
    assert events["tunnel.opened"] == N and events["tunnel.closed"] == N, events
    others = {e: n for e, n in events.items() if e not in ("tunnel.opened", "tunnel.closed")}
    assert sum(others.values()) <= 20, f"lines besides OPENED/CLOSED for {N} tunnels: {others}"
    print(f"\nsetup {setup:.1f}s, open {opened_at - started - setup:.1f}s, close {closed_at - opened_at:.1f}s; "
          f"series {len(base)} -> {len(up)} -> {len(after)}; RSS {base_rss:.0f} -> {rss_mb(cloud.pid):.0f} MB; "
          f"other log lines {others}")
