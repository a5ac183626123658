"""A closed tunnel is freed by reference counting as soon as its WebSocket is gone, not by a later full
GC or a later liveness round: each one holds a TLS transport (~130 KiB), and 1,000 closed tunnels kept
the cloud ~120 MB larger (tests/security/test_metric_series.py). The same for a failed TLS handshake on
a listener: the ones a flood left to the cyclic GC kept the cloud 11-25+ MB larger after it
(tests/security/test_floods.py, transport/tls_server.drop_frames)."""

from __future__ import annotations

import asyncio
import gc
import ssl
import weakref

from intercloud.certs import init_certs
from intercloud.transport import tls_server
from intercloud.transport.tls import server_context
from intercloud.tunnel.tunnel import Tunnel

from .test_liveness import FakeTunnel, gateway


class _GoneTransport:
    close_handshake = None  # the peer just went away


async def test_a_disconnected_tunnel_is_freed_without_the_cyclic_gc() -> None:
    gw = gateway()
    tunnel = Tunnel(gw, client=True, url="ws://127.0.0.1:9/intercloud")
    ref = weakref.ref(tunnel)
    gc.disable()
    try:
        tunnel.on_ws_disconnected(_GoneTransport())
        assert tunnel.done.done()
        del tunnel
        holders = [type(r).__name__ for r in gc.get_referrers(ref())] if ref() is not None else []
        assert not holders, f"a closed tunnel is still referenced by {holders}"
    finally:
        gc.enable()


async def test_the_liveness_loop_holds_no_tunnel_while_it_sleeps() -> None:
    gw = gateway()
    tunnel = FakeTunnel("gone")
    ref = weakref.ref(tunnel)
    gw.tunnels.add(tunnel)
    task = asyncio.get_running_loop().create_task(gw._liveness())
    try:
        await asyncio.sleep(0.05)  # one round ran and saw the tunnel; the next is ping_interval away
        gw.tunnels.discard(tunnel)
        del tunnel
        assert ref() is None, "the liveness loop keeps a closed tunnel alive until its next round"
    finally:
        task.cancel()


def _tls_engines() -> int:
    return sum(1 for o in gc.get_objects() if type(o).__name__ in ("SSLTransport_Socket", "SSLEngineDirect"))


async def test_a_failed_tls_handshake_is_freed_without_the_cyclic_gc(tmp_path) -> None:
    init_certs(tmp_path, cloud=["cloud1"], onprem=["onprem1"])
    server = await tls_server.create_server(
        lambda request, peer: None, "127.0.0.1", 0,
        server_context(tmp_path / "cloud1.pem", tmp_path / "cloud1.key", tmp_path / "ca.pem", verify_client=True),
        handshake_timeout=5, max_frame_size=1 << 20, name="tunnel.listen", max_handshakes=64, per_source=8)
    port = server._socks[0].getsockname()[1]
    no_cert = ssl.create_default_context()
    no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
    gc.disable()
    try:
        before = _tls_engines()
        for _ in range(5):  # an attacker without a client certificate: the server's handshake fails
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=no_cert)
            except (ssl.SSLError, ConnectionError):
                continue
            try:
                await reader.read()  # TLS 1.3: the client is done first; the server's alert or EOF follows
            except (ssl.SSLError, ConnectionError):
                pass
            writer.close()
        for _ in range(200):
            if not server._tasks and server.slots.total == 0:
                break
            await asyncio.sleep(0.01)
        assert not server._tasks, "the server still handles the failed handshakes"
        await asyncio.sleep(0)  # the transports' last callbacks
        left = _tls_engines() - before
        assert left <= 0, f"{left} TLS transports and engines of failed handshakes wait for the cyclic GC"
    finally:
        gc.enable()
        server.close()
        if tls_server._HeapTrim.timer is not None:  # scheduled on this test's loop
            tls_server._HeapTrim.timer.cancel()
            tls_server._HeapTrim.timer = None
