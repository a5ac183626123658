"""Fair sending on a congested tunnel (docs/protocol.md §6.3), with real LocalStreams on loopback
sockets over the fake wire (tests/support/fake_wire.py).

The wire stands in for a slow tunnel: ``CongestedLink`` says the tunnel's outgoing queue is full (the
transport's pause_writing) after ``cap`` DATA bytes and drains it when the test says so
(resume_writing). What the peer received, frame by frame, shows who waited behind whom.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from intercloud.gateway import Gateway
from intercloud.tunnel.turns import TURN
from tests.support.fake_wire import CongestedLink, World, bounded, dial
from tests.support.timeouts import async_wait_until


async def open_stream(world: World, tunnel, listener):
    reader, writer, stream = await world.client(listener)
    assert await tunnel.open(stream) is None
    stream.start()
    return reader, writer, stream


async def setup(world: World, cap: int):
    target = await world.target()
    near = world.owner("cloud1", role="cloud", services=())
    far = world.owner("onprem1", on_open=dial("127.0.0.1", target.port))
    wire = await world.pair(near, far)
    listener = await world.listener()
    return target, wire, listener, CongestedLink(wire, cap)


@bounded(20)
async def test_an_interactive_message_is_not_held_behind_a_congested_bulk_stream(world) -> None:
    """The tunnel is congested and a bulk stream has megabytes waiting: a 64-byte message on another
    stream still leaves at once, and the bulk stream sends nothing more until the tunnel drains.
    (Before fair sending, a congested tunnel paused every stream's reading: the message waited for
    the whole queue to drain.)"""
    target, wire, listener, link = await setup(world, cap=1 << 30)
    _, bulk_w, bulk = await open_stream(world, wire.server, listener)
    _, chat_w, chat = await open_stream(world, wire.server, listener)
    await async_wait_until(lambda: len(target.conns) == 2, timeout=5, what="both targets connected")
    bulk_conn, chat_conn = target.conns

    link.congest()
    bulk_w.write(b"b" * (4 << 20))
    await async_wait_until(lambda: bulk.in_turns, timeout=5, what="the bulk stream waits for turns")
    bulk_frames = [f for f in link.data_frames() if f[0] == bulk.sid]
    sent = sum(n for _, n in bulk_frames)
    assert sent <= 2 * TURN, f"a bulk stream sent {sent} bytes into a congested tunnel outside its turns"

    chat_w.write(b"m" * 64)
    await async_wait_until(lambda: len(chat_conn.data) == 64, timeout=5, what="the interactive message at its target")
    assert [f for f in link.data_frames() if f[0] == bulk.sid] == bulk_frames, "the bulk stream sent while congested"
    assert not chat.in_turns, "a short read put the interactive stream in the ring"
    assert wire.server.turns_waiting == 1

    # drained: the bulk stream gets its turns, then reads on its own again; every byte arrives in order
    link.cap = 1 << 30
    link.drain()
    await async_wait_until(lambda: len(bulk_conn.data) == 4 << 20, timeout=15, what="the bulk bytes at the target")
    assert bytes(bulk_conn.data) == b"b" * (4 << 20)
    assert not bulk.in_turns and wire.server.turns_waiting == 0


@bounded(30)
async def test_bulk_streams_share_a_congested_tunnel_turn_by_turn(world) -> None:
    """Three bulk streams on a tunnel that takes two turns per drain: they alternate, a turn each,
    their byte counts stay close, and each stream's bytes and its half-close arrive complete and in
    order (the EOF is read only once the stream has left the ring)."""
    target, wire, listener, link = await setup(world, cap=2 * TURN)
    ends = [await open_stream(world, wire.server, listener) for _ in range(3)]
    await async_wait_until(lambda: len(target.conns) == 3, timeout=5, what="the targets connected")
    size = 3 << 20
    link.congest()
    for i, (_, w, _) in enumerate(ends):
        w.write(bytes([65 + i]) * size)
        w.write_eof()
    await async_wait_until(lambda: all(s.in_turns for _, _, s in ends), timeout=5, what="all three in the ring")
    start = len(link.data_frames())

    for _ in range(12):
        link.drain()
        await asyncio.sleep(0)  # the far side writes, WINDOWs come back
        await async_wait_until(lambda: all(s.in_turns or s.credit_paused for _, _, s in ends) or not wire.server.paused,
                               timeout=5, what="the round ran")
    turns = link.data_frames()[start:]
    sids = [sid for sid, _ in turns]
    # strict round robin: any three frames in a row are one from each stream (a turn each; what a
    # turn carries may be less than TURN when the stream's credit is short: flow control, not order)
    assert len(sids) >= 12
    for i in range(len(sids) - 2):
        assert len(set(sids[i:i + 3])) == 3, f"not round robin at frame {i}: {sids}"

    link.cap = 1 << 30
    link.drain()
    for i, conn in enumerate(target.conns):
        await async_wait_until(lambda c=conn: c.eof, timeout=20, what=f"stream {i} complete with its EOF")
        assert bytes(conn.data) == bytes([65 + i]) * size


def test_a_new_stream_avoids_a_congested_tunnel() -> None:
    """Gateway.pick_tunnel: an uncongested tunnel before a congested one (paused, or streams waiting
    for turns), whatever their stream counts; among equals, the fewest streams."""
    def tunnel(name: str, streams: int, paused: bool = False, waiting: int = 0):
        return SimpleNamespace(name=name, tenant="default", goaway_received=False, peer_key=(name, "i"),
                               peer=SimpleNamespace(services=["db"]), paused=paused, turns_waiting=waiting,
                               stream_count=streams)

    def pick(*tunnels):
        return Gateway.pick_tunnel(SimpleNamespace(tunnels=list(tunnels)), "db", set()).name

    assert pick(tunnel("bulk", 1, paused=True), tunnel("idle", 5)) == "idle"
    assert pick(tunnel("bulk", 1, waiting=2), tunnel("idle", 5)) == "idle"
    assert pick(tunnel("a", 3), tunnel("b", 2)) == "b"
    assert pick(tunnel("a", 3, paused=True), tunnel("b", 2, paused=True)) == "b"
