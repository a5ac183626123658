"""Two real Tunnels in one event loop over a fake WebSocket (no socket, TLS or picows under them).

Why: the Router, the Tunnel and the stream ends (LocalStream, BridgeEnd) can then be tested together
in-process, fast and deterministically, with every frame that crosses the wire on record.

What is faked is exactly what ``tunnel/tunnel.py`` uses of a picows ``WSTransport`` (``send``,
``send_reuse_external_bytearray``, ``send_pong``, ``send_close``, ``disconnect``, ``is_disconnected``,
``close_handshake``, and ``underlying_transport.write / get_extra_info / set_write_buffer_limits``)
and of a picows ``WSFrame`` (``msg_type``, ``fin``, ``rsv1``, ``get_payload_as_memoryview / _bytes``,
``get_close_code / _reason``). Faithful where it matters:

* delivery is asynchronous (``loop.call_soon``), in order, one callback per write (as one TCP read
  would deliver it), so a tunnel is never re-entered from its own send;
* the corked path (``underlying_transport.write`` of raw RFC 6455 frames) is parsed: FIN + binary only,
  7/16-bit lengths, masked exactly when the writer is the client side (RFC 6455 §5.1), unmasked here;
* a frame's payload memoryview is overwritten once ``on_ws_frame`` returns, as picows reuses its read
  buffer: code that keeps the view instead of copying it sees garbage;
* ``disconnect`` reaches the peer after what was sent before it (a TCP FIN behind the data), and
  each side hears ``on_ws_disconnected`` exactly once;
* a network break (``FakeWire.cut``) loses what is in flight and everything sent later, both ways,
  and tells neither side: each hears of it when the test says (``FakeWire.lose``: its connection was
  reset) or when its own liveness fails the tunnel (``FakeWire.time_out``: ``Tunnel.silent``).

``FakeOwner`` is a minimal ``TunnelOwner`` whose OPEN handling is a per-test policy (``refuse``,
``never_answer``, ``dial``, or any callable), modelled on the Gateway's own: answers come from a task
registered with ``Tunnel.track_open``, so early data is kept for it and an RST cancels it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import struct
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import NamedTuple

from intercloud.config import parse_config
from intercloud.protocol.frames import HEADER, FrameType, Reason
from intercloud.transport.ws import CloseCode, MsgType
from intercloud.tunnel.budget import BufferBudget
from intercloud.tunnel.stream import LocalStream
from intercloud.tunnel.tunnel import Tunnel

from .timeouts import scaled

__all__ = [
    "FakeFrame", "FakeWS", "FakeWire", "FakeOwner", "OpenRequest", "make_config", "tunnel_pair",
    "parse_ws_frames", "refuse", "never_answer", "dial", "AcceptListener", "Target", "decode", "Seen",
]

_WS_ROOM = 14  # picows needs this much room in front of a send_reuse_external_bytearray message
_SCRIBBLE = 0xA5
_ports = itertools.count(40000)
_arrivals = itertools.count(1)  # one clock for every wire: which frame arrived first, across tunnels


# --- RFC 6455 ------------------------------------------------------------------------------
def parse_ws_frames(data: bytes, masked: bool) -> list[bytes]:
    """The payloads of the whole binary frames in ``data`` (what Tunnel.flush writes raw). Strict: a
    frame must be FIN + binary without RSV bits, masked iff ``masked``, and ``data`` must hold whole
    frames; anything else is an AssertionError (a picows peer would close the WebSocket)."""
    out, i = [], 0
    while i < len(data):
        assert len(data) - i >= 2, f"truncated frame header at {i}"
        b0, b1 = data[i], data[i + 1]
        assert b0 == 0x82, f"first byte 0x{b0:02x}: expected FIN + binary, no RSV bits"
        assert bool(b1 & 0x80) == masked, ("unmasked frame from the client side" if masked
                                           else "masked frame from the server side")
        n, i = b1 & 0x7F, i + 2
        if n == 126:
            (n,), i = struct.unpack_from("!H", data, i), i + 2
            assert n >= 126, "16-bit length for a frame that fits 7 bits"
        assert n != 127, "64-bit length in a corked write"
        key = b""
        if masked:
            key, i = data[i:i + 4], i + 4
        payload = data[i:i + n]
        assert len(payload) == n, f"frame of {n} bytes truncated to {len(payload)}"
        if masked:
            stream = (key * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")
        out.append(payload)
        i += n
    return out


class Seen(NamedTuple):
    """An intercloud frame delivered to one side, decoded; ``seq`` orders arrivals across all wires."""
    type: FrameType
    flags: int
    sid: int
    payload: bytes
    seq: int


def decode(frame: bytes, seq: int = 0) -> Seen:
    ftype, flags, sid = HEADER.unpack_from(frame, 0)
    return Seen(FrameType(ftype), flags, sid, frame[HEADER.size:], seq)


# --- the fake WebSocket --------------------------------------------------------------------
class FakeFrame:
    """What Tunnel.on_ws_frame reads of a picows WSFrame."""

    __slots__ = ("msg_type", "fin", "rsv1", "_mv")

    def __init__(self, msg_type: MsgType, payload: memoryview, fin: bool = True, rsv1: bool = False) -> None:
        self.msg_type = msg_type
        self.fin = fin
        self.rsv1 = rsv1
        self._mv = payload

    def get_payload_as_memoryview(self) -> memoryview:
        return self._mv

    def get_payload_as_bytes(self) -> bytes:
        return bytes(self._mv)

    def get_close_code(self) -> CloseCode:
        if len(self._mv) < 2:
            return CloseCode.NO_INFO
        return CloseCode(struct.unpack_from("!H", self._mv, 0)[0])

    def get_close_reason(self) -> str:
        return bytes(self._mv[2:]).decode("utf-8", "replace")


class _Underlying:
    """The TCP/TLS transport under the WebSocket: raw writes go through the same wire."""

    def __init__(self, ws: FakeWS) -> None:
        self._ws = ws
        self.write_buffer_limits: tuple[int, int] | None = None

    def write(self, data) -> None:
        self._ws._write_raw(bytes(data))

    def get_extra_info(self, name: str, default=None):
        return {"peername": self._ws.peername}.get(name, default)  # no "ssl_object", no "socket"

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.write_buffer_limits = (high, low)

    def is_closing(self) -> bool:
        return self._ws.is_disconnected


class FakeWS:
    """One side's WSTransport. ``received`` holds every intercloud frame delivered to this side, in
    order; ``writes`` counts raw (corked) writes made by this side, ``sends`` whole sends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: bool, peername: tuple[str, int]) -> None:
        self.loop = loop
        self.client = client
        self.peername = peername
        self.listener = None
        self.peer: FakeWS | None = None
        self.is_disconnected = False
        self.close_handshake = None  # picows: None until a close frame went either way
        self.underlying_transport = _Underlying(self)
        self.received: list[Seen] = []  # every binary message delivered to this side, decoded
        self.control: list[tuple[MsgType, bytes]] = []  # PING/PONG/CLOSE delivered to this side
        self.sends = 0
        self.writes = 0
        self.dropped = 0  # messages sent after this side disconnected, or lost in a network break
        self.severed = False  # the network between the two sides is broken (FakeWire.cut)
        self._lost = False  # on_ws_disconnected delivered

    # what Tunnel calls
    def send(self, msg_type: MsgType, message, fin: bool = True, rsv1: bool = False) -> None:
        if msg_type is MsgType.CLOSE:
            raise ValueError("use send_close for CLOSE")
        self.sends += 1
        self._post([(msg_type, bytes(message) if message is not None else b"")])

    def send_reuse_external_bytearray(self, msg_type: MsgType, buffer: bytearray, msg_offset: int,
                                      fin: bool = True, rsv1: bool = False) -> None:
        if not isinstance(buffer, bytearray):
            raise TypeError("send_reuse_external_bytearray takes a bytearray")
        if msg_offset < _WS_ROOM:
            raise ValueError("buffer must have at least 14 bytes available before message starts")
        if msg_type is MsgType.CLOSE:
            raise ValueError("use send_close for CLOSE")
        self.sends += 1
        self._post([(msg_type, bytes(buffer[msg_offset:]))])

    def send_ping(self, message=None) -> None:
        self._post([(MsgType.PING, bytes(message or b""))])

    def send_pong(self, message=None) -> None:
        self._post([(MsgType.PONG, bytes(message or b""))])

    def send_close(self, close_code: CloseCode = CloseCode.NO_INFO, close_message=None) -> None:
        hs = self.close_handshake
        if hs is not None and hs.sent is not None:
            return  # picows sends one close frame
        reason = bytes(close_message or b"")
        sent = SimpleNamespace(code=CloseCode(close_code), reason=reason.decode("utf-8", "replace"))
        if hs is None:
            self.close_handshake = SimpleNamespace(sent=sent, recv=None, recv_then_sent=False)
        else:
            hs.sent, hs.recv_then_sent = sent, hs.recv is not None
        self._post([(MsgType.CLOSE, struct.pack("!H", int(close_code)) + reason)])

    def disconnect(self, graceful: bool = True) -> None:
        """Close the connection: this side hears on_ws_disconnected soon, the peer once what was sent
        before has reached it."""
        if self.is_disconnected:
            return
        self.is_disconnected = True
        self.loop.call_soon(self._connection_lost)
        if self.peer is not None and not self.severed:  # across a broken network the peer hears nothing
            self.loop.call_soon(self.peer._peer_gone)

    # the wire
    def _write_raw(self, data: bytes) -> None:
        if self.is_disconnected or self.severed:
            self.dropped += 1
            return
        self.writes += 1
        self._post([(MsgType.BINARY, p) for p in parse_ws_frames(data, masked=self.client)])

    def _post(self, messages: list[tuple[MsgType, bytes]]) -> None:
        if self.is_disconnected or self.severed:
            self.dropped += len(messages)
            return
        self.loop.call_soon(self.peer._receive, messages)

    def _receive(self, messages: list[tuple[MsgType, bytes]]) -> None:
        for i, (msg_type, payload) in enumerate(messages):
            if self.severed:  # in flight when the network broke: lost
                self.peer.dropped += len(messages) - i
                return
            if self.is_disconnected:
                return  # arrived after this side closed: the socket is gone
            if msg_type is MsgType.BINARY:
                self.received.append(decode(payload, next(_arrivals)))
            else:
                self.control.append((msg_type, payload))
            if msg_type is MsgType.CLOSE:
                info = SimpleNamespace(code=CloseCode(struct.unpack_from("!H", payload)[0]),
                                       reason=payload[2:].decode("utf-8", "replace"))
                if self.close_handshake is None:
                    self.close_handshake = SimpleNamespace(sent=None, recv=info, recv_then_sent=False)
                else:
                    self.close_handshake.recv = info
            buf = bytearray(payload)
            self.listener.on_ws_frame(self, FakeFrame(msg_type, memoryview(buf)))
            buf[:] = bytes([_SCRIBBLE]) * len(buf)  # picows reuses its read buffer

    def _peer_gone(self) -> None:
        self.is_disconnected = True
        self._connection_lost()

    def _connection_lost(self) -> None:
        if not self._lost:
            self._lost = True
            self.listener.on_ws_disconnected(self)

    # for tests
    def frames(self, sid: int | None = None) -> list[Seen]:
        """The intercloud frames delivered to this side (of stream ``sid`` only, if given)."""
        return list(self.received) if sid is None else [f for f in self.received if f.sid == sid]

    def data(self, sid: int) -> bytes:
        """The DATA payloads of stream ``sid`` delivered to this side, joined."""
        return b"".join(f.payload for f in self.received if f.sid == sid and f.type is FrameType.DATA)


class FakeWire:
    """A server Tunnel (client=False) and a client Tunnel (client=True) joined by two FakeWS."""

    def __init__(self, server: Tunnel, client: Tunnel) -> None:
        assert not server.client and client.client
        loop = asyncio.get_running_loop()
        port = next(_ports)
        self.server, self.client = server, client
        self.server_ws = FakeWS(loop, client=False, peername=("198.51.100.2", port))  # sees the dialer
        self.client_ws = FakeWS(loop, client=True, peername=("198.51.100.1", 443))
        self.server_ws.listener, self.client_ws.listener = server, client
        self.server_ws.peer, self.client_ws.peer = self.client_ws, self.server_ws

    def connect(self) -> None:
        """The WebSocket upgrade completed on both sides (the server sends its HELLO at once)."""
        self.server.on_ws_connected(self.server_ws)
        self.client.on_ws_connected(self.client_ws)

    def ws_of(self, tunnel: Tunnel) -> FakeWS:
        return self.server_ws if tunnel is self.server else self.client_ws

    def close(self) -> None:
        for t in (self.client, self.server):
            t.close("test over")

    # network breaks (protocol §10: streams park and resume on another tunnel)
    def cut(self) -> None:
        """The network between the two sides breaks: frames in flight are lost, both ways, and so is
        everything sent from now on. Neither side notices (a blackhole) until ``lose`` or ``time_out``."""
        self.server_ws.severed = self.client_ws.severed = True

    def lose(self, tunnel: Tunnel) -> None:
        """``tunnel``'s side notices the break as a reset connection (its socket failed): it hears
        on_ws_disconnected soon, with no close frame and nothing more delivered."""
        ws = self.ws_of(tunnel)
        if not ws.is_disconnected:
            ws.is_disconnected = True
            ws.loop.call_soon(ws._connection_lost)

    def time_out(self, tunnel: Tunnel) -> None:
        """``tunnel``'s side notices the break by liveness, as Gateway._liveness_round does: nothing was
        heard for ping_timeout, the tunnel is failed as ``silent`` (its parked streams wait
        resume_timeout, protocol §10.4)."""
        if not self.ws_of(tunnel).is_disconnected:
            tunnel.silent = True
            tunnel.fail(f"no frame from {tunnel.peer_node} (test: liveness)", code=CloseCode.INTERNAL_ERROR)

    @property
    def noticed(self) -> bool:
        """Both sides know the connection is gone."""
        return self.server_ws._lost and self.client_ws._lost


# --- config and owner ----------------------------------------------------------------------
def make_config(**tunnel):
    """A real, validated Config (defaults everywhere): what Tunnel reads is ``config.tunnel``."""
    return parse_config({
        "gateway": {"role": "onprem", "node_id": "test"},
        "tls": {"insecure": True},
        "tunnel": {"connect": ["ws://127.0.0.1:9/intercloud"], **tunnel},
    })


@dataclass
class OpenRequest:
    """One OPEN the peer sent to a FakeOwner (stream_requested)."""
    tunnel: Tunnel
    sid: int
    service: str
    client: str
    task: asyncio.Task | None = None  # the tracked task answering it, if the policy made one
    cancelled: bool = False  # that task was cancelled (an RST from the opener, or the tunnel closed)
    answer: str = ""  # "accepted" / "refused" / "" (none yet)
    early_seen: bytes = b""  # early data held for it when it was answered (refuse policy)
    end: object = None  # the StreamEnd that took the stream


Policy = Callable[["FakeOwner", OpenRequest], None]


class FakeOwner:
    """A minimal TunnelOwner: one gateway instance (``node_id``, ``incarnation``) that connects
    ``services`` (``routes`` on peer links). Every callback is recorded in ``calls``; OPENs go to
    ``on_open`` (a policy)."""

    def __init__(self, node_id: str, *, role: str = "onprem", incarnation: str = "inc-1",
                 services: tuple[str, ...] = ("echo",), routes: tuple[str, ...] = (), config=None,
                 on_open: Policy | None = None) -> None:
        self.config = config if config is not None else make_config()
        self.node_id = node_id
        self.role = role
        self.incarnation = incarnation
        self.services = list(services)  # what our HELLO says we connect, on a tunnel
        self.routes = list(routes)  # "tenant/service" we carry, in our HELLO on a peer link (protocol §3.2)
        self.budget = BufferBudget(self.config.gateway.max_buffered)
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.on_open: Policy = on_open or refuse(Reason.UNKNOWN_SERVICE, f"{node_id} connects nothing")
        self.on_ready: Callable[[Tunnel], None] | None = None  # e.g. a Router's routes_changed
        self.tunnels: list[Tunnel] = []  # admitted, still up, in order
        self.calls: list[tuple] = []
        self.requests: list[OpenRequest] = []
        self.closed: list[tuple[Tunnel, object, str]] = []  # stream_closed(tunnel, end, reason)
        self.tasks: set[asyncio.Task] = set()
        self.picks: list[set] = []  # the ``tried`` of each call of the latest pick()
        self.errors: list[BaseException] = []  # exceptions raised by answering tasks (a test checks none)
        self.parking = None  # a resume.Parking, where a test wants streams to park (protocol §10)

    # TunnelOwner
    def classify(self, tunnel: Tunnel) -> None:
        self.calls.append(("classify", tunnel))

    def screen(self, tunnel: Tunnel) -> str | None:
        self.calls.append(("screen", tunnel))
        return None

    def connect_service_names(self, tunnel: Tunnel) -> list[str]:
        return list(self.routes if tunnel.kind == "peer" else self.services)

    def hello_extra(self, tunnel: Tunnel) -> dict:
        return {"link": "peer"} if tunnel.kind == "peer" else {}

    def tunnel_ready(self, tunnel: Tunnel) -> None:
        self.calls.append(("tunnel_ready", tunnel))
        if tunnel.client:
            tunnel.send_hello()  # protocol §5.2: the dialer answers after admitting the peer
        self.tunnels.append(tunnel)
        if self.parking is not None:
            self.parking.peer_up(tunnel)  # as Gateway.tunnel_ready: a restarted far end's streams go now
        if self.on_ready is not None:
            self.on_ready(tunnel)

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        self.calls.append(("tunnel_closed", tunnel, reason))
        if tunnel in self.tunnels:
            self.tunnels.remove(tunnel)

    def stream_requested(self, tunnel: Tunnel, sid: int, service: str, client: str) -> None:
        req = OpenRequest(tunnel, sid, service, client)
        self.calls.append(("stream_requested", tunnel, sid, service, client))
        self.requests.append(req)
        self.on_open(self, req)

    def stream_closed(self, tunnel: Tunnel, end, reason: str) -> None:
        self.calls.append(("stream_closed", tunnel, end, reason))
        self.closed.append((tunnel, end, reason))
        if self.parking is not None:
            self.parking.forget(end)  # as Gateway.stream_closed: its token resumes nothing any more

    def park(self, end, tunnel: Tunnel, reason: str, silent: bool) -> bool:
        """protocol §10.4: parks only where a test gave this owner a ``parking`` registry."""
        self.calls.append(("park", end, tunnel, reason, silent))
        return self.parking is not None and self.parking.park(end, tunnel, reason, silent)

    def resume_requested(self, tunnel: Tunnel, sid: int, service: str, resume: dict) -> None:
        self.calls.append(("resume_requested", tunnel, sid, service, resume))
        if self.parking is not None:
            self.parking.resume_requested(tunnel, sid, service, resume)
        else:
            tunnel.refuse(sid, Reason.NOT_RESUMABLE, f"{self.node_id} resumes nothing")

    def goaway_received(self, tunnel: Tunnel) -> None:
        self.calls.append(("goaway_received", tunnel))

    def services_changed(self, tunnel: Tunnel) -> None:
        self.calls.append(("services_changed", tunnel))

    def members_received(self, tunnel: Tunnel, members: list) -> None:
        self.calls.append(("members_received", tunnel, members))

    # helpers
    def track(self, req: OpenRequest, coro) -> asyncio.Task:
        """Answer ``req`` from a task the tunnel tracks (as the Gateway does): early data is held for
        it, an RST or the tunnel's end cancels it."""
        task = asyncio.get_running_loop().create_task(coro)
        req.task = task
        self.tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            req.cancelled = t.cancelled()
            if not req.cancelled and t.exception() is not None:
                self.errors.append(t.exception())

        task.add_done_callback(done)
        req.tunnel.track_open(req.sid, task)
        return task

    def pick(self, service: str, tenant: str = "default", kind: str = "tunnel"):
        """A ``pick`` for Router.open_with_retry over this owner's tunnels, in the order they came up:
        the first live one whose peer connects ``service`` and whose instance was not tried (as
        Gateway.pick_tunnel, but in a fixed order). Each call's ``tried`` is recorded in ``picks``."""
        self.picks = []

        def pick(tried):
            self.picks.append(set(tried))
            for t in self.tunnels:
                if (t.kind == kind and t.tenant == tenant and t.usable and not t.goaway_received
                        and t.peer_key not in tried and service in t.peer.services):
                    return t
            return None

        return pick

    async def aclose(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


# --- OPEN policies -------------------------------------------------------------------------
def refuse(code: int, text: str, *, when: asyncio.Event | None = None) -> Policy:
    """Answer OPEN_FAIL ``code``/``text``: at once, or once ``when`` is set (from a tracked task,
    which holds the early data meanwhile; what it held is kept in ``req.early_seen``)."""

    def policy(owner: FakeOwner, req: OpenRequest) -> None:
        if when is None:
            req.answer = "refused"
            req.tunnel.refuse(req.sid, code, text)
            return

        async def later() -> None:
            await when.wait()
            req.early_seen = b"".join(req.tunnel.early.get(req.sid, []))
            req.answer = "refused"
            req.tunnel.refuse(req.sid, code, text)

        owner.track(req, later())

    return policy


def never_answer() -> Policy:
    """Never answer the OPEN (a hung far gateway); the tracked task waits until cancelled."""

    async def hang() -> None:
        await asyncio.get_running_loop().create_future()

    def policy(owner: FakeOwner, req: OpenRequest) -> None:
        owner.track(req, hang())

    return policy


def dial(host: str, port: int) -> Policy:
    """Dial the target at host:port and answer OPEN_OK once connected, as Gateway.stream_requested,
    _dial_target and _target_connected do: a LocalStream "connect" end, early data delivered by
    Tunnel.accept. A refused connection is answered OPEN_FAIL REFUSED."""

    def policy(owner: FakeOwner, req: OpenRequest) -> None:
        tunnel, sid = req.tunnel, req.sid

        def connected(stream: LocalStream) -> None:
            if not tunnel.accept(sid, stream):
                stream.transport.abort()
                return
            req.answer, req.end = "accepted", stream
            if not stream.finished:
                stream.start()

        stream = LocalStream(req.service, "connect", client=req.client, target=f"{host}:{port}",
                             tenant=tunnel.tenant, on_connected=connected)

        async def dial_it() -> None:
            try:
                await asyncio.get_running_loop().create_connection(lambda: stream, host, port)
            except OSError as exc:
                req.answer = "refused"
                tunnel.refuse(sid, Reason.REFUSED, f"{host}:{port}: {exc}")

        owner.track(req, dial_it())

    return policy


async def tunnel_pair(server_owner: FakeOwner, client_owner: FakeOwner, *, kind: str = "tunnel",
                      timeout: float = 5.0) -> FakeWire:
    """A connected server/client Tunnel pair with HELLO exchanged both ways (both ``ready``)."""
    server = Tunnel(server_owner, client=False, kind=kind)
    client = Tunnel(client_owner, client=True, kind=kind, url="wss://fake.invalid/intercloud")
    wire = FakeWire(server, client)
    wire.connect()
    async with asyncio.timeout(scaled(timeout)):
        await server.ready
        await client.ready
    return wire


# --- local sockets -------------------------------------------------------------------------
class AcceptListener:
    """A loopback listener whose connections become LocalStream "accept" ends (as a gateway's accept
    listener), handed to the test through ``streams`` instead of being routed."""

    def __init__(self, service: str = "echo") -> None:
        self.service = service
        self.streams: asyncio.Queue[LocalStream] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> AcceptListener:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: LocalStream(self.service, "accept", on_connected=self.streams.put_nowait), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def connect(self, timeout: float = 5.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, LocalStream]:
        """A client connection and the LocalStream that accepted it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        async with asyncio.timeout(scaled(timeout)):
            stream = await self.streams.get()
        return reader, writer, stream

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class _Conn:
    data: bytearray = field(default_factory=bytearray)
    eof: bool = False


class Target:
    """A loopback target: records what each connection sends until EOF; ``echo`` also sends it back
    as it arrives and half-closes after the EOF, then closes."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.conns: list[_Conn] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Target:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn()
        self.conns.append(conn)
        self._writers.append(writer)
        try:
            while chunk := await reader.read(65536):
                conn.data += chunk
                if self.echo:
                    writer.write(chunk)
                    await writer.drain()
            conn.eof = True
            if self.echo:
                writer.write_eof()
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self._writers:
                w.close()
            await self.server.wait_closed()


# --- a congested tunnel ------------------------------------------------------------------
class CongestedLink:
    """A slow link under the wire's server tunnel: counts the bytes it sends and pauses it (as the TLS
    transport does above max_tunnel_buffer) once ``cap`` went out since the last drain()."""

    def __init__(self, wire: FakeWire, cap: int) -> None:
        self.tunnel = wire.server
        self.peer = wire.client_ws
        self.cap = cap
        self.since_drain = 0
        ws = wire.server_ws
        send, reuse = ws.send, ws.send_reuse_external_bytearray

        def counted(n: int) -> None:
            self.since_drain += n
            if self.since_drain >= self.cap and not self.tunnel.paused:
                self.tunnel.pause_writing()

        def send_(msg_type, message, *a, **k):
            send(msg_type, message, *a, **k)
            counted(len(message))

        def reuse_(msg_type, buffer, offset, *a, **k):
            reuse(msg_type, buffer, offset, *a, **k)
            counted(len(buffer) - offset)

        ws.send, ws.send_reuse_external_bytearray = send_, reuse_

    def congest(self) -> None:
        self.tunnel.pause_writing()

    def drain(self) -> None:
        self.since_drain = 0
        self.tunnel.resume_writing()

    def data_frames(self) -> list[tuple[int, int]]:
        """(stream id, payload bytes) of every DATA frame the peer received, in order."""
        return [(f.sid, len(f.payload)) for f in self.peer.received if f.type is FrameType.DATA]


# --- a test's world ------------------------------------------------------------------------
def bounded(seconds: float = 10.0):
    """Run the test body under asyncio.timeout (scaled): a hang fails the test, it does not stall."""

    def deco(fn):
        @functools.wraps(fn)
        async def run(*args, **kwargs):
            async with asyncio.timeout(scaled(seconds)):
                await fn(*args, **kwargs)

        return run

    return deco


class World:
    """What a test started, closed at teardown whatever happened."""

    def __init__(self) -> None:
        self.wires: list[FakeWire] = []
        self.owners: list[FakeOwner] = []
        self.servers: list = []
        self.writers: list[asyncio.StreamWriter] = []

    def owner(self, *args, **kwargs) -> FakeOwner:
        owner = FakeOwner(*args, **kwargs)
        self.owners.append(owner)
        return owner

    async def pair(self, server: FakeOwner, client: FakeOwner, kind: str = "tunnel") -> FakeWire:
        wire = await tunnel_pair(server, client, kind=kind)
        self.wires.append(wire)
        return wire

    async def listener(self, service: str = "echo") -> AcceptListener:
        listener = await AcceptListener(service).start()
        self.servers.append(listener)
        return listener

    async def target(self, echo: bool = False) -> Target:
        target = await Target(echo).start()
        self.servers.append(target)
        return target

    async def client(self, listener: AcceptListener):
        reader, writer, stream = await listener.connect()
        self.writers.append(writer)
        return reader, writer, stream

    async def aclose(self) -> None:
        for w in self.writers:
            w.close()
        for wire in self.wires:
            wire.close()
        for owner in self.owners:
            await owner.aclose()
        for server in self.servers:
            await server.aclose()
        await asyncio.sleep(0.02)  # disconnects and socket closes run
