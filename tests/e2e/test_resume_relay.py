"""Resume through a relay whose member dies (protocol §10.4-10.6, docs/ha.md §5), on loopback.

Three cloud members and one on-prem gateway. onprem1 dials only cloud1's and cloud3's tunnel URLs
(members advertise none), so cloud2 never gets a tunnel of its own: every client of cloud2 is
relayed through cloud1 or cloud3, whichever has fewer streams. Four 16 MiB echo transfers run through
cloud2, paced until a quarter is through, then as fast as the path takes them; once that burst is under
way the member that carries the first of them is SIGKILLed, with megabytes in flight through it both
ways. Both ends park (cloud2 holds the client, onprem1 the target), cloud2 resumes over its peer link to
the surviving member, each end replays what the other lacks, and every transfer must come back
byte-exact (SHA-256 of what was sent against what was echoed). Streams the survivor carried are not
touched.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time

import pytest

from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import async_wait_until, scaled, wait_until

from .ha import HA, Addr, make_certs

L = "127.0.0.1"
MiB = 1 << 20
CLOUDS = ("cloud1", "cloud2", "cloud3")
CARRIERS = ("cloud1", "cloud3")  # the members with tunnels to onprem1
STREAMS = 4
SIZE = 16 * MiB
CHUNK = 32 * 1024
PACE = 0.002  # seconds between chunks (16 MB/s a stream): the relay is never idle long, the kill lands mid-stream


async def _paced_echo(port: int, seed: int, ready: asyncio.Event, gate: asyncio.Event, progress: list[int],
                      i_: int) -> dict:
    """Send SIZE pseudo-random bytes in paced chunks and read the echo. Sets ``ready`` after a quarter
    and waits for ``gate`` before the next chunk, so that every transfer spans the kill; from the gate on
    it sends as fast as the path takes it, so that bytes are in flight both ways when the member dies.
    ``progress[i_]`` counts the echoed bytes."""
    payload = random.Random(seed).randbytes(SIZE)
    reader, writer = await asyncio.open_connection(L, port)
    local = "%s:%d" % writer.get_extra_info("sockname")[:2]
    got = hashlib.sha256()
    n = 0

    async def send() -> None:
        for i in range(0, SIZE, CHUNK):
            writer.write(payload[i:i + CHUNK])
            await writer.drain()
            if i >= SIZE // 4 and not ready.is_set():
                ready.set()
                await gate.wait()
            if not gate.is_set():
                await asyncio.sleep(PACE)
        writer.write_eof()

    sender = asyncio.create_task(send())
    try:
        while chunk := await reader.read(1 << 16):
            got.update(chunk)
            n += len(chunk)
            progress[i_] = n
        await sender
    finally:
        sender.cancel()
        writer.close()
    return {"client": local, "sent": hashlib.sha256(payload).hexdigest(), "got": got.hexdigest(), "n": n}


@pytest.fixture
def cluster(tmp_path, gateways):
    with EchoServer() as a, EchoServer() as b:
        certs = make_certs(tmp_path / "certs", list(CLOUDS), ["onprem1"], sans=[])
        ports = iter(free_ports(4 * len(CLOUDS) + 2))
        clouds = {n: {k: Addr(L, next(ports)) for k in ("tunnel", "peer", "client", "admin")} for n in CLOUDS}
        onprems = {"onprem1": {k: Addr(L, next(ports)) for k in ("client", "admin")}}
        # cloud2's URL is in no connect list and no member advertises one (HA.advertise False):
        # onprem1 knows cloud2 from the member table but can never dial it (docs/ha.md §3.3).
        ha = HA(certs, clouds, onprems, Addr(L, a.port), Addr(L, b.port), per_member=1,
                connect_urls=[f"wss://localhost:{clouds[c]['tunnel'].port}/intercloud" for c in CARRIERS])
        gws = {n: gateways(n, ha.cloud_config(n)) for n in CLOUDS}
        gws["onprem1"] = gateways("onprem1", ha.onprem_config("onprem1"))
        yield ha, gws


def _members_up(gw) -> dict[str, list[str]]:
    return {m["node_id"]: m["routes"] for m in gw.status()["members"] if m["up"] and not m["self"]}


def test_killed_relay_member_stream_resumes_through_the_other_member(cluster):
    ha, gws = cluster
    onprem, cloud2 = gws["onprem1"], gws["cloud2"]
    wait_until(lambda: sorted(t["peer_node"] for t in onprem.status()["tunnels"]) == list(CARRIERS), 20,
               what="onprem1 to hold one tunnel to cloud1 and one to cloud3")
    wait_until(lambda: all("default/serviceA" in _members_up(cloud2).get(c, []) for c in CARRIERS), 20,
               what="cloud2 to see cloud1 and cloud3 up, each with the route default/serviceA")
    assert not cloud2.status()["tunnels"], "cloud2 must have no tunnel of its own"
    port = ha.clouds["cloud2"]["client"].port
    mark2, marko = cloud2.log_mark(), onprem.log_mark()

    async def run() -> tuple[list, str, dict, float]:
        ready = [asyncio.Event() for _ in range(STREAMS)]
        gate = asyncio.Event()
        progress = [0] * STREAMS
        jobs = [asyncio.create_task(_paced_echo(port, 100 + i, ready[i], gate, progress, i)) for i in range(STREAMS)]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), scaled(30))
            opened = await asyncio.to_thread(
                wait_until, lambda: _relayed_opens(cloud2, mark2), 10, what=f"{STREAMS} relayed stream.opened lines")
        finally:
            gate.set()
        # the carrier of the first stream to open is the victim; it may carry others too
        victim = opened[0]["peer_node"]
        assert victim in CARRIERS, opened
        # kill once the burst is under way (every stream echoed 256 KiB more), from a thread: this loop
        # keeps sending and reading while the victim dies
        at_gate = list(progress)
        await async_wait_until(lambda: all(p >= g + 256 * 1024 for p, g in zip(progress, at_gate)), 10,
                               what="the burst after the gate to be under way")
        killed_at = time.monotonic()
        await asyncio.to_thread(gws[victim].kill)
        results = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), scaled(90))
        return results, victim, {r["client"]: r["peer_node"] for r in opened}, time.monotonic() - killed_at

    results, victim, carrier_of, tail = asyncio.run(run())
    survivor = next(c for c in CARRIERS if c != victim)
    bad = [r for r in results if isinstance(r, BaseException) or r["sent"] != r["got"] or r["n"] != SIZE]
    assert not bad, f"{len(bad)} of {STREAMS} transfers broken after {victim} was killed: {bad}"

    lines = cloud2.log_lines(mark2)
    resumed = {r["client"]: r for r in lines if r.get("event") == "stream.resumed"}
    failed = [r for r in lines + onprem.log_lines(marko) if r.get("event") == "stream.resume_failed"]
    assert not failed, failed
    hit = [c for c, node in carrier_of.items() if node == victim]
    assert hit, carrier_of
    for client in hit:  # every stream the victim carried resumed on cloud2, relayed by the survivor
        r = resumed.get(client)
        assert r is not None, f"no stream.resumed on cloud2 for {client} (carried by {victim}): {lines[-20:]}"
        assert r["relayed"] is True and r["peer_node"] == survivor, r
    for client, node in carrier_of.items():  # the streams through the survivor were never touched
        if node == survivor:
            assert client not in resumed, resumed[client]
    ends = [r for r in onprem.log_lines(marko) if r.get("event") == "stream.resumed"]
    assert len(ends) == len(hit), f"onprem1 resumed {len(ends)} stream ends, {len(hit)} were cut: {ends}"
    assert all(r["peer_node"] == survivor and r["relayed"] is False for r in ends), ends
    replayed = sum(r["bytes_replayed"] for r in resumed.values()) + sum(r["bytes_replayed"] for r in ends)
    assert replayed > 0, "nothing was in flight through the victim: the kill tested no replay"
    gaps = ", ".join(f"{r['gap'] * 1e3:.0f}" for r in resumed.values())
    end_gaps = ", ".join(f"{r['gap'] * 1e3:.0f}" for r in ends)
    print(f"\n{victim} killed: {len(hit)} of {STREAMS} streams resumed on cloud2 via {survivor} (relay), "
          f"gap {gaps} ms (onprem1: {end_gaps} ms), replayed "
          f"{sum(r['bytes_replayed'] for r in resumed.values())} + {sum(r['bytes_replayed'] for r in ends)} "
          f"bytes; transfers done {tail:.1f}s after the kill")
    wait_until(lambda: cloud2.status()["resume"]["parked"] == 0 and onprem.status()["resume"]["parked"] == 0, 10,
               what="nothing parked on cloud2 and onprem1")


def _relayed_opens(gw, since: int) -> list[dict] | None:
    opens = [r for r in gw.log_lines(since) if r.get("event") == "stream.opened" and r.get("side") == "accept"]
    if len(opens) < STREAMS:
        return None
    assert all(r["relayed"] is True and r["peer_node"] in CARRIERS for r in opens), opens
    return opens
