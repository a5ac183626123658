"""Handshake-slot lockout (issue 12): a tenant's gateway with a valid certificate opened upgrades and
kept them alive with unsolicited PONGs before HELLO (every frame refreshed the tunnel's liveness), so it
held every cluster.max_handshakes slot and other tenants got 503. Now HELLO has a hard deadline from
accept, whatever frames arrive, and one source or certificate holds at most its share of the slots."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

from picows import WSListener, WSMsgType, ws_connect

from tests.support.timeouts import async_wait_until, scaled, wait_until

from .conftest import start_site

MAX_HANDSHAKES = 16  # per source and certificate: max(1, 16 / 8) = 2
DEADLINE = 3.0  # tunnel.handshake_timeout


class Squatter(WSListener):
    """Upgrades, then sends PONGs and PINGs, never HELLO."""

    def __init__(self) -> None:
        self.connected_at: float | None = None
        self.closed_at: float | None = None
        self.close_code = None
        self.task: asyncio.Task | None = None

    def on_ws_connected(self, transport) -> None:
        self.connected_at = time.monotonic()

        async def chatter():
            while True:
                transport.send_pong(b"unsolicited")
                transport.send_ping(b"keepalive")
                await asyncio.sleep(0.2)
        self.task = asyncio.get_running_loop().create_task(chatter())

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            self.close_code = frame.get_close_code()

    def on_ws_disconnected(self, transport) -> None:
        self.closed_at = time.monotonic()
        if self.task is not None:
            self.task.cancel()


def from_source(source: str):
    """A picows socket_factory: connect from ``source`` (a loopback address of its own)."""
    async def factory(parsed):
        s = socket.socket()
        s.setblocking(False)
        s.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(s, (parsed.host, parsed.port))
        return s
    return factory


async def squat(url: str, ctx: ssl.SSLContext, source: str, n: int) -> list[tuple[float, Squatter | None]]:
    """Open ``n`` upgrades from ``source`` at once; (start time, listener or None when refused)."""

    async def one():
        sock_from_source = from_source(source)
        started = time.monotonic()
        try:
            _tr, listener = await ws_connect(Squatter, url, ssl_context=ctx, websocket_handshake_timeout=5,
                                             extra_headers={"Sec-WebSocket-Protocol": "intercloud.v1"},
                                             socket_factory=sock_from_source)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, Exception):  # noqa: BLE001 - refused is expected
            return started, None
        return started, listener

    return list(await asyncio.gather(*(one() for _ in range(n))))


def test_pongs_before_hello_do_not_hold_slots(tmp_path, gateways, echo):
    site = start_site(tmp_path, gateways, echo, handshake_timeout=f"{DEADLINE:g}s",
                      cloud_extra=f"\n[cluster]\nmax_handshakes = {MAX_HANDSHAKES}\n")
    cloud, onprem, certs = site.cloud, site.onprem, site.pair.certs
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(certs / "onprem2.pem", certs / "onprem2.key")  # a valid tenant certificate
    url = f"wss://localhost:{site.pair.tunnel_port}/intercloud"
    mark = cloud.log_mark()
    old = site.tunnel_ids()

    async def attack_while_onprem_restarts():
        loop = asyncio.get_running_loop()
        # one source asks for every slot, and keeps asking while the on-prem gateway restarts
        first = await squat(url, ctx, "127.0.0.2", MAX_HANDSHAKES)
        restart = loop.run_in_executor(None, lambda: onprem.restart(graceful=False, ready=False))
        waves = [first]
        t_restart = time.monotonic()
        while not restart.done() or time.monotonic() - t_restart < 2:
            waves.append(await squat(url, ctx, "127.0.0.2", MAX_HANDSHAKES))
            await asyncio.sleep(0.3)
        await restart
        # meanwhile the legitimate gateway (127.0.0.1, its own certificate) gets a tunnel within seconds
        await loop.run_in_executor(None, lambda: wait_until(lambda: site.tunnel_ids() - old, 8,
                                                            what="the restarted on-prem gateway's tunnel"))
        back = time.monotonic() - t_restart
        # every squatter is closed at the HELLO deadline from accept, PONGs or not (the client loop must
        # run to see it)
        squatters = [sq for wave in waves for _t, sq in wave if sq is not None and sq.connected_at is not None]
        await async_wait_until(lambda: all(sq.closed_at for sq in squatters), DEADLINE + 5,
                               what="every squatting upgrade to be closed")
        return first, squatters, back

    first, squatters, back = asyncio.run(attack_while_onprem_restarts())
    print(f"tunnel back {back:.1f}s after the restart began; {len(squatters)} squatters, all closed")

    # per-source fairness: at most 2 of 16 got through the upgrade, the rest were reset at accept
    upgraded = [(t, sq) for t, sq in first if sq is not None and sq.connected_at is not None]
    assert 1 <= len(upgraded) <= 2, f"{len(upgraded)} upgrades from one source (max_handshakes_per_source = 2)"

    for t0, sq in upgraded:
        held = sq.closed_at - t0
        assert DEADLINE - 0.5 <= held <= DEADLINE + scaled(1.5), f"squatter held its slot {held:.2f}s"
        assert sq.close_code in (None, 1008)  # 1008 when the close frame made it before the reset
    line = cloud.wait_log(lambda r: r["event"] == "tunnel.hello_timeout", since=mark)
    assert "127.0.0.2" in line["peer_addr"] and f"{DEADLINE:g}s" in line["msg"]
    shed = cloud.wait_log(lambda r: r["event"] == "tunnel.shed", since=mark)
    assert "max_handshakes_per_source" in shed["reason"]
