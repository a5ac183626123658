"""Router.open_with_retry with real Tunnels over a fake wire (tests/support/fake_wire.py).

Each test builds gateways as FakeOwners joined by real Tunnel pairs (HELLO exchanged), with real
LocalStreams on loopback sockets or BridgeEnd pairs as the stream ends, and checks what the router
returns, what it told ``refused``, which instances it picked, what crossed each wire, and what the
far targets received. docs/ha.md §6, protocol §4.5 (early data), §3.2 (relay), §5.4 (instances).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import termios
import time

import pytest

from intercloud.protocol.frames import FLAG_RELAYED, FrameType, Reason, decode_open, decode_reason
from intercloud.router import OpenResult, Router
from intercloud.tunnel.bridge import BridgeEnd
from tests.support.fake_wire import (
    CongestedLink, FakeOwner, OpenRequest, World, bounded, dial, make_config, never_answer, refuse,
)
from tests.support.timeouts import FACTOR, async_wait_until, scaled

ANSWER = scaled(5.0)  # answer_within where the far side answers: never the limit under test
F = FrameType


def unread(fd: int) -> int:
    """Bytes waiting unread in the kernel on socket ``fd``."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return struct.unpack("i", buf)[0]


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await reader.read()  # until EOF


def cloud(world: World, router: Router, node_id: str = "cloud1") -> FakeOwner:
    """The near gateway: a cloud whose admitted tunnels wake the router, as Gateway.tunnel_ready does."""
    near = world.owner(node_id, role="cloud", services=())
    near.on_ready = lambda _t: router.routes_changed()
    return near


# --- retry on refusal ------------------------------------------------------------------------
@pytest.mark.parametrize("first_sent", [False, True], ids=["picked", "first-from-callback"])
@bounded()
async def test_refusal_is_retried_on_a_clone_with_another_incarnation(world, first_sent) -> None:
    """The first instance refuses; a clone (same node id, another incarnation) is still tried and
    accepts; the refusing tunnel forgets the stream; ``refused`` hears of the refusal once."""
    router = Router()
    target = await world.target()
    near = cloud(world, router)
    refuser = world.owner("onprem", incarnation="inc-1", on_open=refuse(Reason.REFUSED, "target down"))
    clone = world.owner("onprem", incarnation="inc-2", on_open=dial("127.0.0.1", target.port))
    w1 = await world.pair(near, refuser)
    w2 = await world.pair(near, clone)
    t1, t2 = w1.server, w2.server
    assert near.tunnels == [t1, t2] and t1.peer_key == ("onprem", "inc-1") and t2.peer_key == ("onprem", "inc-2")

    listener = await world.listener()
    reader, writer, stream = await world.client(listener)
    pick = near.pick("echo")
    refusals = []
    first = (t1, t1.open(stream)) if first_sent else None  # as Gateway.client_connected sends it
    result = await router.open_with_retry(stream, pick, answer_within=ANSWER, first=first,
                                          refused=lambda t, code, text: refusals.append((t, code, text)))

    assert result == OpenResult(t2, tried=1)
    assert refusals == [(t1, Reason.REFUSED, "target down")]
    assert near.picks == ([{("onprem", "inc-1")}] if first_sent else [set(), {("onprem", "inc-1")}])
    # detached from the refusing tunnel: no stream, no pending OPEN, the protocol stream closed
    assert t1.streams == {} and t1.pending_opens == {} and t1.stream_count == 0
    assert stream.tunnel is t2 and t2.streams == {stream.sid: stream}
    assert [r.answer for r in refuser.requests] == ["refused"]
    assert [r.answer for r in clone.requests] == ["accepted"]

    # and the stream it returned carries the client's bytes to the clone's target
    stream.start()
    writer.write(b"over the clone")
    writer.write_eof()
    await async_wait_until(lambda: target.conns and target.conns[0].eof, 5, what="EOF at the target")
    assert target.conns[0].data == b"over the clone" and len(target.conns) == 1
    assert await read_all(reader) == b""  # the target closed: FIN back to the client


@pytest.mark.parametrize("tunnels", [1, 2], ids=["one-tunnel", "two-tunnels-same-instance"])
@bounded()
async def test_refusal_is_returned_when_no_other_instance_offers_the_service(world, tunnels) -> None:
    """Without another instance, the refusal is the result. A second tunnel of the *same* instance
    (node id and incarnation) is not tried: a refusal excludes the instance, not the tunnel."""
    router = Router()
    near = cloud(world, router)
    refuser = world.owner("onprem", incarnation="inc-1", on_open=refuse(Reason.REFUSED, "target down"))
    wires = [await world.pair(near, refuser) for _ in range(tunnels)]
    listener = await world.listener()
    _reader, _writer, stream = await world.client(listener)
    refusals = []
    result = await router.open_with_retry(stream, near.pick("echo"), answer_within=ANSWER,
                                          refused=lambda t, code, text: refusals.append((t, code, text)))
    assert result == OpenResult(None, Reason.REFUSED, "target down", "onprem", 1)
    assert not result.ok
    assert refusals == [(wires[0].server, Reason.REFUSED, "target down")]
    assert len(refuser.requests) == 1, "one OPEN in all: the instance's other tunnel is skipped"
    assert near.picks == [set(), {("onprem", "inc-1")}]
    assert stream.tunnel is None and stream.sid == 0 and not stream.finished
    for w in wires:
        assert w.server.streams == {} and w.server.stream_count == 0


# --- early data replay -----------------------------------------------------------------------
@pytest.mark.parametrize("near_dials", [False, True], ids=["near-is-server", "near-is-client"])
@bounded()
async def test_early_data_is_replayed_exactly_once_on_the_retry(world, near_dials) -> None:
    """Bytes the client sent before the OPEN (taken with it) and while the OPEN waited (read as early
    data) go to the first far side as early DATA; it refuses; the retry OPEN on the second carries
    them again, early, and the second target gets every byte exactly once; the first sees nothing
    after its refusal. Both orientations: the near side's OPEN + DATA leave as one corked write,
    masked when it is the WebSocket client."""
    router = Router()
    target = await world.target()
    release = asyncio.Event()
    near_role, far_role = ("onprem", "cloud") if near_dials else ("cloud", "onprem")
    near = world.owner("near", role=near_role, services=())
    near.on_ready = lambda _t: router.routes_changed()
    far1 = world.owner("far-a", role=far_role, on_open=refuse(Reason.UNREACHABLE, "no route", when=release))
    far2 = world.owner("far-b", role=far_role, on_open=dial("127.0.0.1", target.port))

    async def join(far: FakeOwner):  # (near's tunnel, what near receives, far's tunnel, what far receives)
        if near_dials:
            w = await world.pair(far, near)
            return w.client, w.client_ws, w.server, w.server_ws
        w = await world.pair(near, far)
        return w.server, w.server_ws, w.client, w.client_ws

    t1, _near_rx1, far_t1, far_rx1 = await join(far1)
    t2, near_rx2, _far_t2, far_rx2 = await join(far2)
    assert t1.client == near_dials and t1.peer.early_data > 0 and t2.peer.early_data > 0  # §4.5 announced

    listener = await world.listener()
    reader, writer, stream = await world.client(listener)
    writer.write(b"first-")  # before the OPEN: in the kernel, not read yet (the stream pauses reading)
    await async_wait_until(lambda: unread(stream.fd) == 6, 5, what="the client's bytes in the socket")

    task = asyncio.create_task(router.open_with_retry(stream, near.pick("echo"), answer_within=ANSWER))
    await async_wait_until(lambda: far1.requests or task.done(), 5, what="the OPEN at far1")
    if task.done():
        task.result()  # the open failed on our side: its error, not a timeout
    req1: OpenRequest = far1.requests[0]
    sid1 = req1.sid
    assert far_rx1.writes == 0 and far_rx1.peer.writes == 1, "OPEN and its early DATA left in one write"
    await async_wait_until(lambda: b"".join(far_t1.early.get(sid1, [])) == b"first-", 5,
                           what="early data at far1")
    writer.write(b"second-")  # while the OPEN waits: read by the stream and sent as early DATA
    await async_wait_until(lambda: b"".join(far_t1.early.get(sid1, [])) == b"first-second-", 5,
                           what="more early data at far1")
    at_refusal = far_rx1.frames(sid1)
    assert [f.type for f in at_refusal] == [F.OPEN, F.DATA, F.DATA]
    release.set()

    result = await task
    assert result == OpenResult(t2, tried=1)
    stream.start()  # as Gateway._route does with a result that is ok
    writer.write(b"third")
    writer.write_eof()
    await async_wait_until(lambda: target.conns and target.conns[0].eof, 5, what="EOF at the target")
    assert await read_all(reader) == b""

    # exactly once at the second far side, in order, and nothing else there
    assert target.conns[0].data == b"first-second-third" and len(target.conns) == 1
    assert req1.early_seen == b"first-second-" and req1.answer == "refused"
    assert far_rx1.frames(sid1) == at_refusal, "the refusing side got nothing after its refusal"
    assert len(far2.requests) == 1
    sid2 = far2.requests[0].sid
    seen = far_rx2.frames(sid2)
    assert seen[0].type is F.OPEN and seen[-1].type is F.FIN
    assert {f.type for f in seen[1:-1]} == {F.DATA}
    assert far_rx2.data(sid2) == b"first-second-third"
    # the replay was early data (protocol §4.5): it reached far2 before OPEN_OK reached us
    open_ok = next(f for f in near_rx2.frames(stream.sid) if f.type is F.OPEN_OK)
    replay = [f for f in seen if f.type is F.DATA and f.seq < open_ok.seq]
    assert b"".join(f.payload for f in replay) == b"first-second-"
    assert stream.bytes_up == len(b"first-second-third"), "replayed bytes are counted once"


# --- no route yet ------------------------------------------------------------------------------
@bounded()
async def test_no_route_waits_route_wait_then_gives_up(world) -> None:
    router = Router()
    listener = await world.listener()
    _reader, _writer, stream = await world.client(listener)
    picks = []

    def pick(tried):
        picks.append(set(tried))
        return None

    started = time.monotonic()
    result = await router.open_with_retry(stream, pick, answer_within=ANSWER, route_wait=0.3)
    elapsed = time.monotonic() - started
    assert result == OpenResult(None, None, "", None, 0)
    assert 0.29 <= elapsed < 0.3 + scaled(0.5), elapsed
    assert picks == [set(), set()], "one look, one wait, one last look: no polling"
    assert not stream.finished and stream.tunnel is None


@bounded()
async def test_a_route_that_appears_during_route_wait_is_taken_at_once(world) -> None:
    router = Router()
    target = await world.target()
    near = cloud(world, router)
    listener = await world.listener()
    _reader, writer, stream = await world.client(listener)
    pick = near.pick("echo")
    route_wait = 5.0 * FACTOR

    started = time.monotonic()
    task = asyncio.create_task(router.open_with_retry(stream, pick, answer_within=ANSWER, route_wait=route_wait))
    await async_wait_until(lambda: router.waiting == 1, 2, interval=0.005, what="the open to wait for a route")
    assert not task.done() and near.picks == [set()]
    far = world.owner("onprem", on_open=dial("127.0.0.1", target.port))
    wire = await world.pair(near, far)  # near's tunnel_ready wakes the router
    result = await task
    elapsed = time.monotonic() - started
    assert result == OpenResult(wire.server, tried=0)
    assert elapsed < route_wait / 2, f"took {elapsed:.2f}s: woken by the route change, not the deadline"
    assert near.picks == [set(), set()]
    stream.start()
    writer.write(b"late route")
    writer.write_eof()
    await async_wait_until(lambda: target.conns and target.conns[0].eof, 5, what="EOF at the target")
    assert target.conns[0].data == b"late route"


@bounded()
async def test_stop_ends_the_wait_for_a_route(world) -> None:
    router = Router()
    listener = await world.listener()
    _reader, _writer, stream = await world.client(listener)
    draining = False
    picks = []

    def pick(tried):
        picks.append(set(tried))
        return None

    started = time.monotonic()
    task = asyncio.create_task(router.open_with_retry(stream, pick, answer_within=ANSWER, route_wait=60,
                                                      stop=lambda: draining))
    await async_wait_until(lambda: router.waiting == 1, 2, interval=0.005, what="the open to wait for a route")
    router.routes_changed()  # a route change that brings no route: it waits on
    await async_wait_until(lambda: len(picks) == 2 and router.waiting == 1, 2, interval=0.005,
                           what="a second pick, then waiting again")
    assert not task.done() and len(picks) == 2
    draining = True
    router.routes_changed()  # the gateway starts draining and wakes its waiters
    result = await asyncio.wait_for(task, scaled(1))
    assert result == OpenResult(None, tried=0)
    assert len(picks) == 3 and time.monotonic() - started < scaled(2)

    # already stopping: no wait at all
    started = time.monotonic()
    result = await router.open_with_retry(stream, pick, answer_within=ANSWER, route_wait=60, stop=lambda: True)
    assert result == OpenResult(None) and time.monotonic() - started < scaled(0.5)


# --- no answer ---------------------------------------------------------------------------------
@bounded()
async def test_an_unanswered_open_is_reset_and_its_instance_skipped(world) -> None:
    router = Router()
    target = await world.target()
    near = cloud(world, router)
    silent = world.owner("onprem", incarnation="inc-1", on_open=never_answer())
    clone = world.owner("onprem", incarnation="inc-2", on_open=dial("127.0.0.1", target.port))
    w1 = await world.pair(near, silent)
    w2 = await world.pair(near, clone)
    listener = await world.listener()
    _reader, writer, stream = await world.client(listener)
    refusals = []
    within = scaled(0.3)

    started = time.monotonic()
    result = await router.open_with_retry(stream, near.pick("echo"), answer_within=within,
                                          refused=lambda t, code, text: refusals.append((t, code, text)))
    elapsed = time.monotonic() - started
    assert result == OpenResult(w2.server, tried=1)
    assert elapsed >= within - 0.01
    assert refusals == [(w1.server, Reason.TIMEOUT, "no answer to OPEN from onprem")]
    assert near.picks == [set(), {("onprem", "inc-1")}]
    assert w1.server.streams == {} and w1.server.pending_opens == {} and w1.server.stream_count == 0

    # the silent side got OPEN then RST TIMEOUT, and its answering task was cancelled by it
    req = silent.requests[0]
    await async_wait_until(lambda: req.task.done(), 5, what="the silent side's task to end")
    assert req.cancelled
    seen = w1.client_ws.frames(req.sid)
    assert [f.type for f in seen] == [F.OPEN, F.RST]
    assert decode_reason(seen[1].payload) == (Reason.TIMEOUT, "OPEN timed out")
    assert w1.client.stream_count == 0 and w1.client.open_tasks == {}

    stream.start()
    writer.write(b"after a timeout")
    writer.write_eof()
    await async_wait_until(lambda: target.conns and target.conns[0].eof, 5, what="EOF at the target")
    assert target.conns[0].data == b"after a timeout"


@bounded()
async def test_the_client_leaving_ends_the_open_at_once(world) -> None:
    router = Router()
    near = cloud(world, router)
    silent = world.owner("onprem", on_open=never_answer())
    wire = await world.pair(near, silent)
    listener = await world.listener()
    _reader, writer, stream = await world.client(listener)
    refusals = []
    task = asyncio.create_task(router.open_with_retry(stream, near.pick("echo"), answer_within=60,
                                                      refused=lambda *a: refusals.append(a)))
    await async_wait_until(lambda: silent.requests, 5, what="the OPEN")
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # the client resets its connection (a FIN alone would be a half-close)
    result = await asyncio.wait_for(task, scaled(2))
    assert result == OpenResult(None) and refusals == []
    assert stream.finished and wire.server.streams == {} and wire.server.pending_opens == {}
    req = silent.requests[0]
    await async_wait_until(lambda: req.task.done(), 5, what="the far side's task to end")
    assert req.cancelled and [f.type for f in wire.client_ws.frames(req.sid)] == [F.OPEN, F.RST]


# --- relay -------------------------------------------------------------------------------------
@pytest.mark.parametrize("congested", [False, True], ids=["fast", "congested"])
@bounded(15)
async def test_relay_bridges_a_peer_link_and_a_tunnel_both_ways(world, congested) -> None:
    """Member X has no tunnel for the service; it opens it on its peer link to member Y, which carries
    it over its own tunnel to the on-prem gateway with a BridgeEnd pair (as Gateway._relay). Bytes go
    through both ways byte-exact, and FIN both ways ends every stream on all four tunnels. Congested:
    Y's tunnel takes 32 KiB per drain, every millisecond, so the bridge forwards in its turns
    (protocol §6.3), and still nothing is lost, duplicated or reordered."""
    target = await world.target(echo=True)
    router_x, router_y = Router(), Router()
    x = cloud(world, router_x, "cloud-x")
    y = world.owner("cloud-y", role="cloud", services=(), routes=("default/echo",))
    # the on-prem side grants small windows: the bridge must hold what X sends faster than that
    onprem = world.owner("onprem", on_open=dial("127.0.0.1", target.port),
                         config=make_config(stream_window="64KiB", max_frame="16KiB"))
    link = await world.pair(y, x, kind="peer")  # X dialed Y's member URL
    tunnel = await world.pair(y, onprem)  # the on-prem gateway dialed Y
    assert link.client.peer.services == ["default/echo"] and link.client.peer.early_data == 0
    ends: list[tuple[BridgeEnd, BridgeEnd]] = []
    relayed: list[OpenResult] = []

    def relay(owner: FakeOwner, req: OpenRequest) -> None:  # Gateway.relay_requested + _relay
        tenant, service = req.service.split("/", 1)
        inner, outer = BridgeEnd.pair(service, req.client, target="", tenant=tenant)
        ends.append((inner, outer))

        async def run() -> None:
            inner.attach(req.tunnel, req.sid)
            result = await router_y.open_with_retry(outer, owner.pick(service, tenant), answer_within=ANSWER)
            relayed.append(result)
            if not result.ok:
                req.tunnel.refuse(req.sid, result.code or Reason.UNKNOWN_SERVICE, "relay failed")
                return
            assert req.tunnel.accept(req.sid, inner)
            req.answer, req.end = "accepted", inner
            inner.start()
            outer.start()

        owner.track(req, run())

    y.on_open = relay
    joined = []  # ends that joined the ring of Y's tunnel
    if congested:
        slow = CongestedLink(tunnel, cap=32 * 1024)
        slow.congest()
        wait_turn = tunnel.server.wait_turn
        tunnel.server.wait_turn = lambda end: (joined.append(end), wait_turn(end))

        async def drain() -> None:
            while True:
                await asyncio.sleep(0.001)
                slow.drain()

        drainer = asyncio.create_task(drain())
    listener = await world.listener()
    reader, writer, stream = await world.client(listener)
    payload = os.urandom(1 << 20)  # many windows' worth: credit must flow back through the bridge
    writer.write(payload[:1000])  # before OPEN_OK: no early data on a peer link, so it is parked

    result = await router_x.open_with_retry(stream, x.pick("default/echo", kind="peer"), answer_within=ANSWER)
    assert result == OpenResult(link.client, tried=0)
    assert relayed == [OpenResult(tunnel.server, tried=0)]
    stream.start()

    async def send() -> None:
        writer.write(payload[1000:])
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    echoed = await read_all(reader)
    await sender
    if congested:
        drainer.cancel()
        assert joined and all(end is ends[0][1] for end in joined), f"no bridge sent in turns: {joined}"
    assert len(echoed) == len(payload) and echoed == payload
    assert target.conns[0].data == payload and target.conns[0].eof and len(target.conns) == 1

    # the wire: a RELAYED OPEN "tenant/service" on the link, a plain OPEN "echo" on the tunnel
    link_open = next(f for f in link.server_ws.frames() if f.type is F.OPEN)
    tunnel_open = next(f for f in tunnel.client_ws.frames() if f.type is F.OPEN)
    assert link_open.flags & FLAG_RELAYED and decode_open(link_open.payload)[0] == "default/echo"
    assert not tunnel_open.flags & FLAG_RELAYED and decode_open(tunnel_open.payload)[0] == "echo"
    assert link.server_ws.data(link_open.sid) == payload == tunnel.client_ws.data(tunnel_open.sid)
    for ws, sid in ((link.server_ws, link_open.sid), (link.client_ws, link_open.sid),
                    (tunnel.client_ws, tunnel_open.sid), (tunnel.server_ws, tunnel_open.sid)):
        kinds = [f.type for f in ws.frames(sid)]
        assert kinds.count(F.FIN) == 1 and F.DATA not in kinds[kinds.index(F.FIN):], kinds  # FIN each way
        assert F.RST not in kinds, kinds

    # FIN both ways closed the stream everywhere
    (inner, outer), = ends
    tunnels = [link.client, link.server, tunnel.server, tunnel.client]
    await async_wait_until(lambda: all(t.stream_count == 0 and not t.streams for t in tunnels), 5,
                           what="every stream closed on all four tunnels")
    assert stream.finished and inner.finished and outer.finished
    assert inner.bytes_down == outer.bytes_up == len(payload) == outer.bytes_down == inner.bytes_up
    assert {e.side for _t, e, _r in y.closed} == {"relay-in", "relay-out"}
    assert [r for _t, _e, r in x.closed] == ["closed"]
