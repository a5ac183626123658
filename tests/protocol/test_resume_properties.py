"""Resume (docs/protocol.md §10) under arbitrary interleavings, with the real code: two real ``Tunnel``s
per wire over the fake WebSocket (tests/support/fake_wire.py), real ``LocalStream``s on loopback
sockets at both ends, a real ``resume.Parking`` and ``Router`` in each gateway.

One stream per example, opened before the interleaving starts. The client (at the opening gateway,
*near*) and the target (at the accepting gateway, *far*) are plain non-blocking sockets the test
drives by hand, with small kernel buffers, so that what the reader takes is what returns credit
(WINDOW, §6.2) and a reader that stops stops the writer. Hypothesis then interleaves:

- DATA both ways (the client or the target writes), and reads (credit flows back only as they read);
- network breaks: the wire is cut, losing what is in flight, and each side notices when hypothesis
  says, as a reset connection or by liveness (``silent``); a side that has not noticed still sends into
  the void, so the far end may answer a RESUME with BUSY;
- a new wire between the same two gateway instances (the opening end's Parking task sends RESUME over
  it; it may be cut again before or after the RESUME is answered), and a second wire beside a live one;
- virtual time (the loop's clock jumps 0.6 s: BUSY retries), FIN (half-close) and RST at either socket.

Then the example closes: every break is noticed, a wire comes up if none is, both sockets FIN and read
to the end. It must then hold that each socket received exactly what the other wrote, in order, and an
EOF (or, after an RST, a prefix and a reset or EOF as the rules below say), that nothing hangs, that no
stream is left parked or registered (``Parking.live`` and ``parked`` empty) and no task or callback
raised. The one exception allowed is the loss protocol §10.7 documents, recognized precisely
(``_lost_last_fin``): an end that finished both directions forgets the stream while the break lost its
last bytes or FIN on the way to the other end, whose resume then fails and whose socket is reset.

A second property breaks the wire for good or brings it back too late: the parked ends expire at their
deadlines (§10.4: ``resume_timeout`` after a silent death, ``min(ping_timeout, resume_timeout)`` after a
reset), each exactly then, and both sockets see a reset. A last test pins one interleaving the first
property found: the opening end gives up while its RESUME is out.

Loops and time: the first property runs on asyncio's loop and on uvloop (the gateway's loop on Linux;
it notices a socket reset while the stream does not read it, asyncio's does not). On asyncio's loop
the clock is virtual on top of the real one (``_ClockLoop``): deadlines of 600 s never pass unless the
test moves the clock, and an expiry is reached without waiting for it; under uvloop BUSY retries are
shortened and a deadline that must pass is run by hand. More examples:
``INTERCLOUD_RESUME_EXAMPLES=2000`` (about 30 ms each on asyncio's loop, 80 ms on uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field

import pytest
import uvloop
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from intercloud import resume as resume_mod
from intercloud.resume import Parking
from intercloud.router import Router
from intercloud.stats import GatewayStats
from intercloud.tunnel import stream as stream_mod
from intercloud.tunnel import tunnel as tunnel_mod
from intercloud.tunnel.stream import LocalStream, reset
from tests.support.fake_wire import AcceptListener, FakeOwner, FakeWire, OpenRequest, make_config, tunnel_pair

KiB = 1024
BUF = 4 * KiB  # SO_RCVBUF / SO_SNDBUF of every local socket (the kernel doubles it)
PER_DIRECTION = 400 * KiB  # at most this much written each way in one example
LONG = 600.0  # resume_timeout and ping_timeout of the main property: nothing expires unless forced
REAL_LIMIT = 20.0  # seconds of wall time one example may take before it counts as a hang
# examples per property; a longer search: INTERCLOUD_RESUME_EXAMPLES=2000 pytest ... (about 30 ms each)
EXAMPLES = int(os.environ.get("INTERCLOUD_RESUME_EXAMPLES", "60"))


# --- the event loop: a clock the test can move --------------------------------------------
class _ClockLoop(asyncio.SelectorEventLoop):
    """The standard loop whose clock the test moves forward (timers, deadlines, asyncio.sleep)."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped = 0.0

    def time(self) -> float:
        return super().time() + self.skipped

    def advance(self, seconds: float) -> None:
        self.skipped += seconds


# --- a gateway: a FakeOwner with a real Parking -------------------------------------------
class _Tasks:
    """The gateway's TaskGroup as far as Parking uses it (create_task); an exception is recorded."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()
        self.errors: list[BaseException] = []

    def create_task(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())


class _Host:
    """What Parking needs of its gateway (resume.ParkingHost), around a FakeOwner."""

    def __init__(self, owner: FakeOwner) -> None:
        self.owner = owner
        self.config = owner.config
        self.node_id = owner.node_id
        self.role = owner.role
        self.incarnation = owner.incarnation
        self.router = Router()
        self.tg = _Tasks()
        self.tunnels = owner.tunnels  # admitted and still up (FakeOwner keeps the list)

    def relay_link(self, route: str, exclude) -> None:
        return None  # no cluster: no peer link to relay a RESUME over

    def stream_closed(self, tunnel, end, reason: str) -> None:
        self.owner.stream_closed(tunnel, end, reason)


class _Gateway:
    def __init__(self, node_id: str, role: str, config, services: tuple[str, ...]) -> None:
        self.owner = FakeOwner(node_id, role=role, config=config, services=services)
        self.host = _Host(self.owner)
        self.stats = GatewayStats()
        self.parking = self.owner.parking = Parking(self.host, self.stats)
        self.owner.on_ready = lambda _t: self.host.router.routes_changed()  # as Gateway.tunnel_ready

    @property
    def counters(self) -> dict:
        return self.stats.counters


# --- a local socket the test drives --------------------------------------------------------
@dataclass
class _End:
    """The test's socket at one end of the stream (the client, or the target): what it wrote into the
    kernel, what it received, and how it ended."""
    name: str
    sock: socket.socket
    rng: random.Random
    pending: bytearray = field(default_factory=bytearray)  # queued by the test, not yet taken by the kernel
    wrote: bytearray = field(default_factory=bytearray)
    got: bytearray = field(default_factory=bytearray)
    queued: int = 0
    eof: bool = False  # read an EOF
    reset: bool = False  # saw ECONNRESET / EPIPE
    fin_wanted: bool = False
    shut: bool = False  # shutdown(SHUT_WR) done
    rst: bool = False  # the test reset this socket (SO_LINGER 0, close)
    shut_before_rst: bool = False

    @property
    def gone(self) -> bool:
        return self.rst or self.reset

    def queue(self, n: int) -> None:
        n = min(n, PER_DIRECTION - self.queued)
        if n > 0 and not self.fin_wanted and not self.gone:
            self.pending += self.rng.randbytes(n)
            self.queued += n

    def pump_write(self) -> bool:
        moved = False
        while self.pending and not self.gone:
            try:
                n = self.sock.send(self.pending[:256 * KiB])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.reset = True
                break
            self.wrote += self.pending[:n]
            del self.pending[:n]
            moved = True
        if self.fin_wanted and not self.pending and not self.shut and not self.gone:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.reset = True
            self.shut = True
            moved = True
        return moved

    def pump_read(self, limit: int) -> bool:
        moved = False
        while limit > 0 and not self.eof and not self.gone:
            try:
                data = self.sock.recv(min(limit, 256 * KiB))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                assert exc.errno in (errno.ECONNRESET, errno.EPIPE), exc
                self.reset = True
                moved = True
                break
            moved = True
            if not data:
                self.eof = True
                break
            self.got += data
            limit -= len(data)
        return moved

    def fin(self) -> None:
        self.fin_wanted = True
        self.pump_write()

    def abort(self) -> None:
        if self.rst:
            return
        self.shut_before_rst = self.shut
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        self.rst = True

    @property
    def settled(self) -> bool:
        """Nothing more will happen at this socket: it ended (EOF or reset) and has nothing to send."""
        return self.gone or (self.eof and self.shut)

    def close(self) -> None:
        if not self.rst:
            self.sock.close()


def _small_buffers(sock) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUF)


# --- one example's world -------------------------------------------------------------------
class _World:
    """Two gateways (a cloud and an on-prem one; the opener is either), the wires between them, one
    stream, and the two sockets at its ends."""

    def __init__(self, loop: _ClockLoop, *, opener_is_cloud: bool, config, seed: int) -> None:
        self.loop = loop
        self.cloud = _Gateway("cloud1", "cloud", config, () if opener_is_cloud else ("svc",))
        self.onprem = _Gateway("onprem1", "onprem", config, ("svc",) if opener_is_cloud else ())
        self.near, self.far = (self.cloud, self.onprem) if opener_is_cloud else (self.onprem, self.cloud)
        self.near_is_server = opener_is_cloud  # the cloud is the server side of every wire
        self.wires: list[FakeWire] = []
        self.seed = seed
        self.listener: AcceptListener | None = None
        self.target_server: socket.socket | None = None
        self.near_stream: LocalStream | None = None
        self.far_stream: LocalStream | None = None
        self.client: _End | None = None
        self.target: _End | None = None
        self.errors: list[dict] = []
        self.log: list[str] = []
        loop.set_exception_handler(lambda _l, ctx: self.errors.append(ctx))

    # wires
    async def connect(self) -> FakeWire:
        wire = await tunnel_pair(self.cloud.owner, self.onprem.owner)
        self.wires.append(wire)
        return wire

    def near_tunnel(self, wire: FakeWire):
        return wire.server if self.near_is_server else wire.client

    def far_tunnel(self, wire: FakeWire):
        return wire.client if self.near_is_server else wire.server

    def live_wires(self) -> list[FakeWire]:
        """Wires that carry frames (neither cut nor closed)."""
        return [w for w in self.wires if not w.server_ws.severed and not w.server_ws.is_disconnected
                and not w.client_ws.is_disconnected]

    # the stream
    def _accept_policy(self, owner: FakeOwner, req: OpenRequest) -> None:
        """The far gateway's answer to OPEN, as streams.py stream_requested / _dial_target /
        _target_connected: dial the target, OPEN_OK with a resume identity, register, start."""
        tunnel, sid = req.tunnel, req.sid
        parking = self.far.parking

        def connected(stream: LocalStream) -> None:
            if not tunnel.accept(sid, stream):
                reset(stream.transport)
                return
            req.answer, req.end = "accepted", stream
            if stream.finished:
                return
            if stream.token is not None:  # a cloud binds it to the opening gateway (protocol §10.2)
                stream.far = tunnel.peer_key if owner.role == "cloud" else None
                parking.register(stream)
            stream.start()
            stream.in_service = True  # GatewayStats.stream_opened

        stream = LocalStream(req.service, "connect", client=req.client, target="target", tenant=tunnel.tenant,
                             on_connected=connected)
        port = self.target_server.getsockname()[1]

        async def dial_it() -> None:
            await asyncio.get_running_loop().create_connection(lambda: stream, "127.0.0.1", port)

        owner.track(req, dial_it())

    async def open_stream(self) -> None:
        loop = self.loop
        self.far.owner.on_open = self._accept_policy
        self.target_server = socket.socket()
        _small_buffers(self.target_server)  # inherited by the accepted socket
        self.target_server.bind(("127.0.0.1", 0))
        self.target_server.listen()
        self.target_server.setblocking(False)
        self.listener = await AcceptListener("svc").start()
        wire = await self.connect()

        csock = socket.socket()
        _small_buffers(csock)
        csock.setblocking(False)
        await loop.sock_connect(csock, ("127.0.0.1", self.listener.port))
        stream = await asyncio.wait_for(self.listener.streams.get(), 5)
        self.near_stream = stream
        # the opening gateway, as streams.py client_connected / _route does after OPEN_OK
        result = await asyncio.wait_for(self.near_tunnel(wire).open(stream), 5)
        assert result is None, result
        stream.identify()
        stream.start()
        stream.in_service = True
        self.near.parking.register(stream)
        tsock, _ = await asyncio.wait_for(loop.sock_accept(self.target_server), 5)
        tsock.setblocking(False)
        for _ in range(100):
            if self.far.owner.requests and self.far.owner.requests[-1].end is not None:
                break
            await asyncio.sleep(0)
        self.far_stream = self.far.owner.requests[-1].end
        assert self.far_stream is not None and self.near_stream.token is not None
        assert self.near_stream.token == self.far_stream.token
        for s in (self.near_stream, self.far_stream):  # the gateway's side of each local socket (not its
            # receive buffer: shrunk after the handshake, a window can close for a zero-window probe's 200+ ms)
            s.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUF)
        self.client = _End("client", csock, random.Random(self.seed))
        self.target = _End("target", tsock, random.Random(self.seed + 1))

    def end(self, name: str) -> _End:
        return self.client if name == "client" else self.target

    # driving
    def pump(self) -> bool:
        moved = self.client.pump_write() | self.target.pump_write()
        return moved

    async def run(self, n: int = 1) -> None:
        for _ in range(n):
            self.pump()
            await asyncio.sleep(0)

    def notice(self, wire: FakeWire, side: str, how: str) -> None:
        """``side``'s gateway ("near" or "far") notices that ``wire`` broke: a reset connection, or
        liveness (silent)."""
        tunnel = self.near_tunnel(wire) if side == "near" else self.far_tunnel(wire)
        if how == "silent":
            wire.time_out(tunnel)
        else:
            wire.lose(tunnel)

    def settled(self) -> bool:
        return (self.client.settled and self.target.settled and self.near_stream.finished
                and self.far_stream.finished and not any(g.parking.live or g.parking.parked
                                                         for g in (self.near, self.far)))

    def describe(self) -> str:
        def s(x: LocalStream) -> str:
            return (f"finished={x.finished} parked={x.parked} sid={x.sid} tx={x.tx} down={x.bytes_down} "
                    f"up={x.bytes_up} kept={len(x.kept or b'')} fin_sent={x.fin_sent} eof={x.local_eof} "
                    f"credit_paused={x.credit_paused} reading={x.reading} replay_at={x._replay_at}")

        def e(x: _End) -> str:
            return (f"wrote={len(x.wrote)} pending={len(x.pending)} got={len(x.got)} eof={x.eof} "
                    f"reset={x.reset} shut={x.shut} rst={x.rst}")

        return (f"near: {s(self.near_stream)}\nfar: {s(self.far_stream)}\nclient: {e(self.client)}\n"
                f"target: {e(self.target)}\nnear parking {self.near.parking.snapshot()}, "
                f"far parking {self.far.parking.snapshot()}\nwires: "
                + ", ".join(f"{'cut' if w.server_ws.severed else 'up'}/{w.server_ws._lost}/{w.client_ws._lost}"
                            for w in self.wires))

    async def close_out(self, *, deadline_skip: float) -> dict:
        """The example's end: every break is noticed, a wire is up, both sockets FIN and read to the end.
        Returns what it had to do: ``skipped`` virtual seconds, ``expired`` when only a deadline
        (``deadline_skip``) ended the stream. Fails on a hang."""
        for wire in self.wires:
            if wire.server_ws.severed:
                self.notice(wire, "near", "reset")
                self.notice(wire, "far", "reset")
        await self.run(3)
        if not self.live_wires() and not (self.near_stream.finished and self.far_stream.finished):
            await self.connect()
        for end in (self.client, self.target):
            end.fin()
        real = time.monotonic()
        idle = 0
        skipped = 0.0
        expired = False
        while not self.settled():
            moved = self.pump()
            for end in (self.client, self.target):
                moved |= end.pump_read(1 << 30)
            await asyncio.sleep(0)
            idle = 0 if moved else idle + 1
            if idle > 100:  # nothing moved for a while
                idle = 0
                await asyncio.sleep(0.002)  # the kernel's own timers (delayed ACKs) run in real time
                if any(g.parking.parked for g in (self.near, self.far)):
                    # a parked stream waits for time to pass (BUSY retries, unanswered RESUMEs)...
                    if skipped < 30:
                        await self.pass_time(1.0)
                        skipped += 1.0
                    elif not expired:  # ... or, at last, for its deadline (protocol §10.4, §10.7)
                        self.log.append("forced expiry:\n" + self.describe())
                        self.pass_deadlines(deadline_skip)
                        expired = True
            assert time.monotonic() - real < REAL_LIMIT, "hang at the end of the example:\n" + self.describe()
        await self.run(5)
        return {"skipped": skipped, "expired": expired}

    async def pass_time(self, seconds: float) -> None:
        """Let ``seconds`` pass for the gateways' timers: the virtual clock jumps. Under uvloop (whose
        clock is libuv's own) a short real wait instead, enough for a BUSY retry (_timing shortens it)."""
        if isinstance(self.loop, _ClockLoop):
            self.loop.advance(seconds)
        else:
            await asyncio.sleep(0.02)

    def pass_deadlines(self, seconds: float) -> None:
        """``seconds`` pass: every parked stream's deadline with them. Under uvloop the deadline's own
        callback runs now."""
        if isinstance(self.loop, _ClockLoop):
            self.loop.advance(seconds)
            return
        for g in (self.near, self.far):
            for s, p in list(g.parking.parked.items()):
                p.timer.cancel()
                g.parking._expire(s, seconds)

    async def aclose(self) -> None:
        for end in (self.client, self.target):
            if end is not None:
                end.close()
        for wire in self.wires:
            wire.close()
        for g in (self.near, self.far):
            for t in list(g.host.tg.tasks):
                t.cancel()
            await g.owner.aclose()
        if self.listener is not None:
            await self.listener.aclose()
        if self.target_server is not None:
            self.target_server.close()
        for _ in range(5):
            await asyncio.sleep(0)

    def check_clean(self) -> None:
        """No stream left anywhere, nothing raised."""
        assert not self.errors, f"the event loop reported errors: {self.errors}"
        for g in (self.near, self.far):
            assert not g.host.tg.errors, f"a Parking task raised: {g.host.tg.errors}"
            assert not g.owner.errors, f"a task answering an OPEN raised: {g.owner.errors}"
            assert not g.parking.parked, f"{g.owner.node_id}: streams left parked"
            assert not g.parking.live, f"{g.owner.node_id}: resumable streams left registered"
            assert not g.host.tg.tasks, f"{g.owner.node_id}: resume tasks left running"
            for t in g.owner.tunnels:
                assert not t.streams and not t.resuming, f"{g.owner.node_id}: {t.label} still holds streams"
        assert self.near_stream.finished and self.far_stream.finished


def _example(coro_fn, *args, loop: str = "asyncio"):
    """Run one example in a fresh event loop: asyncio's with a movable clock, or uvloop (what the
    gateway runs on Linux: it notices a reset socket even while not reading it, asyncio does not)."""
    if loop == "uvloop":
        with _timing(resume_mod, BUSY_RETRY=0.01), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro_fn(*args))
    with asyncio.Runner(loop_factory=_ClockLoop) as runner:
        return runner.run(coro_fn(*args))


@contextlib.contextmanager
def _timing(module, **values):
    saved = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


class _AckEvery:
    """ACKs every ``n`` bytes instead of 512 KiB (stream.ACK_EVERY; tunnel.keep_max follows it), so
    that ACK trimming of the kept bytes happens within an example's few hundred KiB."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.saved = stream_mod.ACK_EVERY, tunnel_mod.ACK_EVERY
        stream_mod.ACK_EVERY = tunnel_mod.ACK_EVERY = self.n

    def __exit__(self, *exc):
        stream_mod.ACK_EVERY, tunnel_mod.ACK_EVERY = self.saved


# --- the interleavings ---------------------------------------------------------------------
_side = st.sampled_from(["client", "target"])
_notice = st.sampled_from(["", "reset", "silent"])  # "": that side has not noticed (yet)
_ACTIONS = {
    "send": st.tuples(st.just("send"), _side, st.sampled_from([1, 700, 16 * KiB + 3, 50 * KiB, 100 * KiB, 150 * KiB])),
    "read": st.tuples(st.just("read"), _side, st.sampled_from([1, 1000, 8 * KiB, 64 * KiB, 1 << 30])),
    "run": st.tuples(st.just("run"), st.integers(1, 40)),
    "break": st.tuples(st.just("break"), st.integers(0, 3), _notice, _notice),  # cut: in-flight frames lost
    "notice": st.tuples(st.just("notice"), st.sampled_from(["near", "far"]), st.sampled_from(["reset", "silent"])),
    "disconnect": st.tuples(st.just("disconnect"), st.integers(0, 3), st.sampled_from(["near", "far"])),
    "reconnect": st.just(("reconnect",)),
    "tick": st.just(("tick",)),
    "fin": st.tuples(st.just("fin"), _side),
}
# traffic between breaks: mostly DATA and reads, sometimes a FIN, a clock tick or a second wire
_TRAFFIC = {"send": 5, "read": 4, "run": 2, "fin": 1, "tick": 1, "reconnect": 1, "notice": 1}
_traffic = st.sampled_from([k for k, n in _TRAFFIC.items() for _ in range(n)]).flatmap(_ACTIONS.__getitem__)
_break = st.one_of(_ACTIONS["break"], _ACTIONS["break"], _ACTIONS["disconnect"])


@st.composite
def _segment(draw) -> list:
    """Traffic, a break (in flight: whatever the traffic left on the wire), what happens while the
    stream is parked (its sockets still read and write), then a new wire; the next segment's break
    may come before the RESUME is answered (no traffic in between) or well after."""
    return (draw(st.lists(_traffic, max_size=8)) + [draw(_break)] + draw(st.lists(_traffic, max_size=4))
            + [("reconnect",)] + draw(st.lists(_ACTIONS["run"], max_size=1)))


@st.composite
def _plans(draw):
    actions = [a for seg in draw(st.lists(_segment(), min_size=1, max_size=4)) for a in seg]
    actions += draw(st.lists(_traffic, max_size=6))
    rst = draw(st.sampled_from([False, False, True]))
    return {
        "opener_is_cloud": draw(st.booleans()),
        "stream_window": draw(st.sampled_from([64 * KiB, 256 * KiB])),
        "max_frame": draw(st.sampled_from([16 * KiB, 64 * KiB])),
        "ack_every": draw(st.sampled_from([2 * KiB, 16 * KiB, 512 * KiB])),
        "seed": draw(st.integers(0, 2**32)),
        "actions": actions,
        # (socket, before which action) or None
        "rst": draw(st.tuples(_side, st.integers(0, len(actions)))) if rst else None,
    }


async def _play(plan: dict) -> dict:
    config = make_config(resume_timeout=LONG, ping_timeout=LONG, ping_interval=1, stream_window=plan["stream_window"],
                         max_frame=plan["max_frame"])
    w = _World(asyncio.get_running_loop(), opener_is_cloud=plan["opener_is_cloud"], config=config, seed=plan["seed"])
    try:
        await w.open_stream()
        rst = plan["rst"]
        for i, action in enumerate(plan["actions"] + [("run", 1)]):
            if rst is not None and rst[1] == i:
                w.end(rst[0]).abort()
                w.log.append(f"rst {rst[0]}")
            await _act(w, action)
            _check_kept(w)
        outcome = await w.close_out(deadline_skip=LONG + 1)
        _check_bytes(w, plan, outcome)
        w.check_clean()
        _events(w, outcome)
        return outcome
    finally:
        note("\n".join(w.log))
        await w.aclose()


async def _act(w: _World, action: tuple) -> None:
    kind = action[0]
    if kind == "send":
        w.end(action[1]).queue(action[2])
        w.pump()
    elif kind == "read":
        w.end(action[1]).pump_read(action[2])
    elif kind == "run":
        await w.run(action[1])
    elif kind == "break":
        live = w.live_wires()
        if live:
            wire = live[action[1] % len(live)]
            wire.cut()
            for side, how in (("near", action[2]), ("far", action[3])):
                if how:
                    w.notice(wire, side, how)
    elif kind == "notice":
        for wire in w.wires:
            if wire.server_ws.severed:
                w.notice(wire, action[1], action[2])
    elif kind == "disconnect":  # one side closes the connection: the other hears after what is in flight
        live = w.live_wires()
        if live:
            wire = live[action[1] % len(live)]
            t = w.near_tunnel(wire) if action[2] == "near" else w.far_tunnel(wire)
            wire.ws_of(t).disconnect()
    elif kind == "reconnect":
        if len(w.live_wires()) < 2 and len(w.wires) < 8:
            await w.connect()
    elif kind == "tick":
        await w.pass_time(0.6)
    elif kind == "fin":
        w.end(action[1]).fin()
    w.log.append(f"{action}")
    await asyncio.sleep(0)


def _events(w: _World, outcome: dict) -> None:
    """What the example exercised (pytest --hypothesis-show-statistics)."""
    n, f = w.near.counters, w.far.counters
    event(f"resumed {min(n['streams_resumed'], 3)}+ times")
    if n["bytes_replayed"] or f["bytes_replayed"]:
        event("bytes replayed")
    if n["resume_refusals"] or f["resume_refusals"]:
        event("a RESUME refused (BUSY or NOT_RESUMABLE)")
    if n["resume_failures"] or f["resume_failures"]:
        event("resume failed")
    if outcome["expired"]:
        event("a deadline ended it")
    if w.client.rst or w.target.rst:
        event("RST")
    if len(w.client.wrote) + len(w.target.wrote) > 256 * KiB:
        event("over 256 KiB")


def _check_kept(w: _World) -> None:
    """protocol §10.3: an end keeps at most keep_max unacknowledged bytes, plus what one read or one
    flush of parked bytes adds before it stops reading."""
    for s in (w.near_stream, w.far_stream):
        if s.kept is not None and s.keep_max:
            assert len(s.kept) <= s.keep_max + 2 * 256 * KiB, f"{s.side} keeps {len(s.kept)} bytes"


def _closed_as(g: _Gateway, stream: LocalStream) -> str | None:
    """Why ``g`` logged ``stream`` closed (stream_closed), or None."""
    return next((reason for _t, end, reason in g.owner.closed if end is stream), None)


def _lost_last_fin(w: _World) -> bool:
    """The case protocol §10.7 says cannot survive: one end had finished both directions (sent and
    received FIN: it forgot the stream) while the other had not yet received its last bytes or its
    FIN, which the break lost; the other end's resume then fails (its RESUME is refused, or it waits
    for one until its deadline) and its socket is reset. Precisely that and nothing else: the finished
    end's socket got everything and an EOF, the other one a prefix and a reset."""
    ends = ((w.near, w.near_stream, w.client, w.far, w.far_stream, w.target),
            (w.far, w.far_stream, w.target, w.near, w.near_stream, w.client))
    for g, s, sock, og, os_, osock in ends:
        if (_closed_as(g, s) == "closed" and og.counters["resume_failures"] == 1
                and (_closed_as(og, os_) or "").startswith("reset: ABORTED resume failed")
                and sock.eof and not sock.reset and bytes(sock.got) == bytes(osock.wrote)
                and osock.reset and not osock.eof):
            return True
    return False


def _check_bytes(w: _World, plan: dict, outcome: dict) -> None:
    c, t = w.client, w.target
    for src, dst in ((c, t), (t, c)):
        assert bytes(dst.got) == bytes(src.wrote[:len(dst.got)]), (
            f"{dst.name} received bytes that {src.name} did not write there (a gap, a duplicate or a swap) "
            f"at offset {next(i for i, (a, b) in enumerate(zip(dst.got, src.wrote)) if a != b)}")
    if plan["rst"] is None or not (c.rst or t.rst):
        # no RST: everything arrives, exactly once and in order, and so do both FINs...
        if c.reset or t.reset or outcome["expired"]:
            # ... but for the one loss protocol §10.7 documents
            assert _lost_last_fin(w), ("a socket was reset (or a parked end had to expire) although no one reset "
                                       "the stream:\n" + w.describe() + "\n" + "\n".join(w.log[-1:]))
            event("protocol §10.7: the last FIN or bytes lost after the other end closed")
            return
        assert c.eof and t.eof
        assert bytes(t.got) == bytes(c.wrote) and bytes(c.got) == bytes(t.wrote)
        for g, s in ((w.near, w.near_stream), (w.far, w.far_stream)):
            assert _closed_as(g, s) == "closed", f"{s.side} end closed as {_closed_as(g, s)!r}"
        return
    # one socket was reset by the test: the other sees the reset, or an EOF after everything the reset
    # one wrote before it (it had half-closed first); never a clean EOF with bytes missing
    x = c if c.rst else t
    y = t if x is c else c
    assert y.reset or y.eof
    if y.eof and not y.reset:
        assert x.shut_before_rst and bytes(y.got) == bytes(x.wrote), (
            f"{y.name} saw a clean EOF after {len(y.got)} of the {len(x.wrote)} bytes {x.name} wrote before "
            f"its reset")


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_plans())
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_every_byte_arrives_once_and_in_order_whatever_breaks(loop, plan) -> None:
    with _AckEvery(plan["ack_every"]):
        _example(_play, plan, loop=loop)


# --- deadlines (protocol §10.4) ------------------------------------------------------------
@st.composite
def _expiry_plans(draw):
    ping = draw(st.sampled_from([2.0, 10.0]))
    resume = draw(st.sampled_from([3.0, 20.0]))
    near_how = draw(st.sampled_from(["reset", "silent"]))
    far_how = draw(st.sampled_from(["reset", "silent"]))
    deadline = {"silent": resume, "reset": min(ping, resume)}
    dn, df = deadline[near_how], deadline[far_how]
    # when a new wire comes up (None: never): before both deadlines, between them, after both
    points = [min(dn, df) / 2, max(dn, df) + 1] + ([(dn + df) / 2] if dn != df else [])
    return {
        "opener_is_cloud": draw(st.booleans()),
        "ping_timeout": ping, "resume_timeout": resume, "near_how": near_how, "far_how": far_how,
        "near_deadline": dn, "far_deadline": df,
        "back_at": draw(st.sampled_from([None, *points])),
        "up": draw(st.sampled_from([0, 3000, 100 * KiB])),  # client -> target before the break
        "down": draw(st.sampled_from([0, 3000, 100 * KiB])),
        "seed": draw(st.integers(0, 2**32)),
    }


async def _play_expiry(plan: dict) -> None:
    config = make_config(resume_timeout=plan["resume_timeout"], ping_timeout=plan["ping_timeout"], ping_interval=1,
                         stream_window=64 * KiB, max_frame=16 * KiB)
    loop = asyncio.get_running_loop()
    w = _World(loop, opener_is_cloud=plan["opener_is_cloud"], config=config, seed=plan["seed"])
    try:
        await w.open_stream()
        w.client.queue(plan["up"])
        w.target.queue(plan["down"])
        await w.run(20)
        wire = w.wires[0]
        wire.cut()  # bytes in flight are lost with it
        w.notice(wire, "near", plan["near_how"])
        w.notice(wire, "far", plan["far_how"])
        await w.run(5)
        assert w.near_stream.parked and w.far_stream.parked
        back = plan["back_at"]
        now = back if back is not None else max(plan["near_deadline"], plan["far_deadline"]) + 1
        loop.advance(now)
        await w.run(5)
        # each end gave up exactly when its own deadline passed, and reset its socket then
        for s, deadline in ((w.near_stream, plan["near_deadline"]), (w.far_stream, plan["far_deadline"])):
            assert s.finished == (now > deadline), f"{s.side} end at {now}s, deadline {deadline}s: {w.describe()}"
        if back is not None:
            await w.connect()
        await w.close_out(deadline_skip=plan["resume_timeout"] + 1)
        w.check_clean()
        c, t = w.client, w.target
        for src, dst in ((c, t), (t, c)):
            assert bytes(dst.got) == bytes(src.wrote[:len(dst.got)]), f"{dst.name}: not a prefix of what was written"
        n, f = w.near.counters, w.far.counters
        if back is not None and back < min(plan["near_deadline"], plan["far_deadline"]):
            # back in time: the stream resumed and completed, byte-exact
            event("resumed in time")
            assert n["streams_resumed"] == f["streams_resumed"] == 1
            assert c.eof and t.eof and not c.reset and not t.reset
            assert bytes(t.got) == bytes(c.wrote) and bytes(c.got) == bytes(t.wrote)
            return
        # too late, or never: each end gave up once (its own deadline, or the far end's NOT_RESUMABLE),
        # and both sockets were reset, whatever they had received
        event("expired" if back is None else "back too late")
        assert n["resume_failures"] == 1 and f["resume_failures"] == 1, (n, f)
        assert n["streams_resumed"] == f["streams_resumed"] == 0
        assert c.reset and t.reset, w.describe()
        for g, s in ((w.near, w.near_stream), (w.far, w.far_stream)):
            assert (_closed_as(g, s) or "").startswith("reset: ABORTED resume failed"), _closed_as(g, s)
    finally:
        note("\n".join(w.log))
        await w.aclose()


@settings(max_examples=max(30, EXAMPLES // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_expiry_plans())
def test_a_parked_stream_expires_at_its_deadline_and_both_sockets_are_reset(plan) -> None:
    """Nobody resumes in time: each end resets its socket at its own deadline (``resume_timeout`` when
    its tunnel died of silence, ``min(ping_timeout, resume_timeout)`` when it was reset), or when the
    far end, already expired, refuses the late RESUME (NOT_RESUMABLE). A wire back before both
    deadlines resumes the stream byte-exact instead."""
    _example(_play_expiry, plan)


# --- one interleaving, pinned ----------------------------------------------------------------
async def _play_end_while_resume_out() -> None:
    config = make_config(resume_timeout=LONG, ping_timeout=LONG, ping_interval=1)
    w = _World(asyncio.get_running_loop(), opener_is_cloud=True, config=config, seed=1)
    try:
        await w.open_stream()
        w.client.queue(5000)
        await w.run(20)
        wire = w.wires[0]
        wire.cut()
        w.notice(wire, "near", "reset")
        w.notice(wire, "far", "reset")
        await w.run(3)
        assert w.near_stream.parked and w.far_stream.parked
        new = await w.connect()  # the near end's Parking task sends RESUME over it
        near_tunnel = w.near_tunnel(new)
        for _ in range(50):
            if near_tunnel.resuming:
                break
            await asyncio.sleep(0)
        assert near_tunnel.resuming and w.far_stream.parked, "the RESUME is on its way"
        # the near end gives up now (its deadline, a restarted far end: Parking.fail); the far end will
        # take the RESUME and answer OPEN_OK
        w.near.parking.fail(w.near_stream, "test: given up while the RESUME was out")
        for _ in range(200):
            await w.run(1)
            w.target.pump_read(1 << 30)
            if w.far_stream.finished and w.target.gone:
                break
        assert w.far_stream.finished and w.target.reset, "the far end kept a stream whose other end is gone:\n" + \
            w.describe()
        w.client.pump_read(1 << 30)
        assert w.client.reset
        w.check_clean()
        assert not near_tunnel.streams
    finally:
        await w.aclose()


def test_a_stream_that_ends_while_its_resume_is_out_resets_the_far_end() -> None:
    """The opening end gives up on a parked stream (its deadline passed, its client left, its far end
    restarted) while its RESUME is out; the far end takes the RESUME, attaches its end to the new id and
    answers OPEN_OK. That answer must reset the far end's stream, not resume the finished one: that left
    the far end's socket open with nobody at the other end, and the finished stream in the tunnel.
    (The property above found it with the client's reset noticed while parked, under uvloop.)"""
    _example(_play_end_while_resume_out)
