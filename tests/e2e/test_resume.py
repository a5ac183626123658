"""Streams survive tunnel breaks (issue 15, protocol §10), on loopback with real gateway processes.

The break here is ``ss -K`` on the tunnel sockets (the kernel aborts them: the gateway sees
ECONNABORTED or a TCP reset), which is what a load balancer or a WAN blip does to a tunnel; where the
test counts replayed bytes, an iptables DROP on lo first leaves bytes in flight both ways.
The namespace tests (test_resume_netns.py) add the blackhole, the restarted nginx and killed relays.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import subprocess

import pytest

from tests.support.timeouts import scaled, wait_until

from .conftest import wait_tunnels
from .test_tcp_options import metrics
from .topology import make_pair

MiB = 1 << 20


async def _echo_transfer(port: int, size: int, seed: int, started: asyncio.Event | None = None,
                         pace: float = 0.0) -> tuple[str, str, int]:
    """Send ``size`` pseudo-random bytes in 64 KiB chunks (pausing ``pace`` s between them) and read
    the echo; returns (sha256 sent, sha256 received, bytes received)."""
    payload = random.Random(seed).randbytes(size)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = hashlib.sha256()
    n = 0

    async def send() -> None:
        for i in range(0, size, 64 * 1024):
            writer.write(payload[i:i + 64 * 1024])
            await writer.drain()
            if started is not None and i >= size // 4:
                started.set()
            if pace:
                await asyncio.sleep(pace)
        writer.write_eof()

    sender = asyncio.create_task(send())
    try:
        while chunk := await reader.read(1 << 16):
            got.update(chunk)
            n += len(chunk)
        await sender
    finally:  # a reset stream (the tests that expect one): the sender's error is not news
        if not sender.done():
            sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    return hashlib.sha256(payload).hexdigest(), got.hexdigest(), n


def _kill_tunnels(port: int) -> str:
    """Abort every TCP connection to ``port`` (the tunnel listener) from the dialing side."""
    r = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"], capture_output=True,
                       text=True, timeout=10)
    return r.stdout


def _send_queues(port: int) -> tuple[int, int]:
    """The largest Send-Q (bytes not yet acknowledged) of the tunnel sockets to ``port``: (the
    accepting end's, the dialing end's)."""
    out = subprocess.run(["ss", "-tnH", "state", "established", "(", "dport", "=", f":{port}", "or", "sport", "=",
                          f":{port}", ")"], capture_output=True, text=True, timeout=10).stdout
    ends = [0, 0]
    for line in out.splitlines():
        f = line.split()
        accepting = f[2].rsplit(":", 1)[1] == str(port)
        ends[0 if accepting else 1] = max(ends[0 if accepting else 1], int(f[1]))
    return ends[0], ends[1]


def _reset_with_bytes_in_flight(port: int, unacked: int = 64 * 1024) -> str:
    """Drop the tunnels' packets both ways on lo until each end holds ``unacked`` bytes the other never
    got, then abort both ends of every tunnel to ``port``: each gateway must replay. (A bare ``ss -K``
    on loopback, where every byte sent is in the peer's socket at once, leaves an end that kept up with
    nothing to replay.)"""
    rules = [["INPUT", "-i", "lo", "-p", "tcp", side, str(port), "-j", "DROP"] for side in ("--dport", "--sport")]
    added = []
    try:
        for rule in rules:
            subprocess.run(["iptables", "-w", "-I", *rule], check=True, capture_output=True, timeout=10)
            added.append(rule)
        wait_until(lambda: min(_send_queues(port)) >= unacked, scaled(10),
                   what=f"both ends of the tunnels to :{port} hold {unacked} bytes the other has not got")
        return subprocess.run(["ss", "-K", "(", "dport", "=", f":{port}", "or", "sport", "=", f":{port}", ")"],
                              capture_output=True, text=True, timeout=10).stdout
    finally:
        for rule in added:
            subprocess.run(["iptables", "-w", "-D", *rule], capture_output=True, timeout=10)


def _start(tmp_path, gateways, echo_a, echo_b, tunnel_extra: str = ""):
    pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port, per_member=2)
    pair.extra_onprem_tunnel = tunnel_extra
    cloud_cfg = pair.cloud_config().replace('ping_timeout = "4s"\n', f'ping_timeout = "4s"\n{tunnel_extra}\n')
    cloud = gateways("cloud1", cloud_cfg)
    onprem = gateways("onprem1", pair.onprem_config())
    wait_tunnels(cloud, 2)
    wait_tunnels(onprem, 2)
    return pair, cloud, onprem


@pytest.fixture
def resume_pair(tmp_path, gateways, echo_a, echo_b):
    return _start(tmp_path, gateways, echo_a, echo_b)


async def _transfers_through_a_break(pair, n: int, size: int, brk) -> list:
    """``n`` paced echo transfers each way; ``brk()`` (in a thread) once every one has moved a quarter."""
    started = [asyncio.Event() for _ in range(2 * n)]
    jobs = [asyncio.create_task(_echo_transfer(pair.a_port if i % 2 else pair.b_port, size, i, started[i],
                                               pace=0.002)) for i in range(2 * n)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), scaled(60))
    await asyncio.to_thread(brk)
    return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), scaled(120))


@pytest.mark.needs_root
@pytest.mark.needs_binary("iptables", "ss")
def test_streams_in_both_directions_survive_a_reset_of_every_tunnel(resume_pair):
    pair, cloud, onprem = resume_pair
    mark_c, mark_o = cloud.log_mark(), onprem.log_mark()
    n, size = 10, 8 * MiB

    def brk() -> None:
        killed = _reset_with_bytes_in_flight(pair.tunnel_port)
        assert "ESTAB" in killed, killed

    results = asyncio.run(_transfers_through_a_break(pair, n, size, brk))
    bad = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException) or r[0] != r[1] or r[2] != size]
    assert not bad, f"{len(bad)} of {2 * n} transfers broken, e.g. {bad[:3]}"
    lines = cloud.log_lines(mark_c) + onprem.log_lines(mark_o)
    resumed = [r for r in lines if r.get("event") == "stream.resumed"]
    failed = [r for r in lines if r.get("event") == "stream.resume_failed"]
    assert not failed, failed[:3]
    assert len(resumed) >= 2 * n, f"{len(resumed)} resumed lines for {2 * n} streams (both ends log)"
    gaps = sorted(r["gap"] for r in resumed)
    print(f"resumed {len(resumed)} stream ends, gap p50 {gaps[len(gaps) // 2] * 1e3:.0f} ms, "
          f"max {gaps[-1] * 1e3:.0f} ms, replayed {sum(r['bytes_replayed'] for r in resumed)} bytes")
    # operators see it: /api/status, /metrics and `intercloud status`
    for gw in (cloud, onprem):
        wait_until(lambda: gw.status()["resume"]["resumed"] >= n, 10, what=f"{gw.name} status counts the resumes")
        r = gw.status()["resume"]
        # each end held >= 64 KiB of wire bytes the other never got at the break (_reset_with_bytes_in_flight)
        assert r["parked"] == 0 and r["failed"] == 0 and r["bytes_replayed"] >= 32 * 1024, r
        m = metrics(gw)
        assert m["intercloud_streams_resumed_total"] >= n and m["intercloud_streams_parked_now"] == 0, m
        assert m["intercloud_bytes_replayed_total"] == r["bytes_replayed"]


def test_resume_off_resets_streams_with_their_tunnel(tmp_path, gateways, echo_a, echo_b):
    """resume_timeout = 0: no resume announced, streams are reset when their tunnel breaks (as before)."""
    pair, cloud, onprem = _start(tmp_path, gateways, echo_a, echo_b, 'resume_timeout = "0s"')
    results = asyncio.run(_transfers_through_a_break(pair, 3, 4 * MiB, lambda: _kill_tunnels(pair.tunnel_port)))
    broken = [r for r in results if isinstance(r, BaseException) or r[0] != r[1]]
    assert len(broken) == 6, results
    assert not [r for r in cloud.log_lines() if r.get("event") == "stream.parked"]
    assert cloud.status()["resume"]["resumed"] == 0


def test_a_restarted_far_end_resets_parked_streams_at_once(resume_pair):
    """The on-prem gateway holding the targets is killed and restarted (another incarnation): the cloud
    resets the streams it parked as soon as the new instance's tunnel is up (protocol §10.4), before
    its ping_timeout deadline, and says why."""
    pair, cloud, onprem = resume_pair
    mark = cloud.log_mark()

    async def run():
        started = [asyncio.Event() for _ in range(3)]
        jobs = [asyncio.create_task(_echo_transfer(pair.a_port, 16 * MiB, i, started[i], pace=0.005))
                for i in range(3)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), scaled(60))
        await asyncio.to_thread(onprem.restart, graceful=False)
        return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), scaled(60))

    results = asyncio.run(run())
    assert all(isinstance(r, BaseException) or r[0] != r[1] for r in results), results
    failed = cloud.wait_log(lambda r: r["event"] == "stream.resume_failed", since=mark, timeout=10)
    assert "restarted" in failed["reason"] or "incarnation" in failed["reason"], failed
    parked = [r for r in cloud.log_lines(mark) if r.get("event") == "stream.parked"]
    assert len(parked) == 3, parked
