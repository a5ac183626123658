"""docs/ha.md §7: a silent tunnel is closed at tunnel.ping_timeout after its last frame, not up to one
ping_interval later; live tunnels get a PING every ping_interval and are left alone."""

from __future__ import annotations

import asyncio
import time

from intercloud.config import parse_config
from intercloud.gateway import Gateway

INTERVAL, TIMEOUT = 0.5, 0.8


def gateway() -> Gateway:
    config = parse_config({
        "gateway": {"role": "onprem", "node_id": "onprem1"},
        "tls": {"insecure": True},
        "tunnel": {"connect": ["ws://127.0.0.1:9/intercloud"], "ping_interval": f"{INTERVAL * 1000:g}ms",
                   "ping_timeout": f"{TIMEOUT * 1000:g}ms"},
    })
    return Gateway(config)


class FakeTunnel:
    """What _liveness uses of a Tunnel: kind, last_rx, close_reason, peer, ping(), fail()."""

    peer = object()  # HELLO exchanged

    def __init__(self, name: str) -> None:
        self.kind = "tunnel"
        self.peer_node = name
        self.last_rx = time.monotonic()
        self.close_reason = ""
        self.failed_at: float | None = None
        self.silence_at_fail: float | None = None
        self.pings: list[float] = []

    def ping(self) -> None:
        self.pings.append(time.monotonic())

    def fail(self, reason: str, code: int = 0, quiet: bool = False) -> None:
        self.close_reason = reason
        self.failed_at = time.monotonic()
        self.silence_at_fail = self.failed_at - self.last_rx


async def test_a_silent_tunnel_is_closed_at_ping_timeout_not_a_ping_interval_later() -> None:
    gw = gateway()
    start = time.monotonic()
    # Its last frame arrives 0.3 s after the loop starts: checking only with the PINGs (at 0.5, 1.0,
    # 1.5 s) would find it silent for 1.2 s, ping_timeout + 0.4 s.
    silent, chatty = FakeTunnel("silent"), FakeTunnel("chatty")
    gw.tunnels.update({silent, chatty})
    task = asyncio.get_running_loop().create_task(gw._liveness())
    try:
        await asyncio.sleep(0.3)
        silent.last_rx = time.monotonic()
        deadline = start + 3.0
        while silent.failed_at is None and time.monotonic() < deadline:
            chatty.last_rx = time.monotonic()  # frames keep arriving on this one
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert silent.failed_at is not None, "the silent tunnel was never closed"
    assert TIMEOUT <= silent.silence_at_fail <= TIMEOUT + 0.1, (
        f"closed after {silent.silence_at_fail:.3f}s of silence; tunnel.ping_timeout is {TIMEOUT}s")
    assert "tunnel.ping_timeout = 0.8s" in silent.close_reason
    assert chatty.failed_at is None
    assert gw.counters["liveness_misses"] == 1
    # PINGs keep their cadence: one per ping_interval, whatever the deadline wake-ups did
    gaps = [b - a for a, b in zip(chatty.pings, chatty.pings[1:])]
    assert chatty.pings and all(abs(g - INTERVAL) < 0.1 for g in gaps), gaps
