"""An on-prem gateway spoken by hand: TLS with an on-prem certificate, the WebSocket upgrade, HELLO, and
then whatever frames a test crafts (protocol §2-5, §10). It keeps just enough state to carry streams
honestly: the peer's credit (§6), WINDOW for what it receives, PONG for PING, and per stream what was
received, whether FIN or RST came, and the answer to each OPEN or RESUME.

Why not tests/e2e/test_bad_input.py's RawClient: that one waits for one frame type and drops the rest,
which loses DATA and WINDOW frames; a client that must keep a stream working byte-exact while it sends
forged RESUMEs needs every frame accounted for.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field

from picows import WSListener, WSMsgType, ws_connect

from intercloud.protocol.frames import (
    FrameType, decode, decode_identity, decode_reason, decode_window, encode, encode_ack, encode_json, encode_open,
    encode_window,
)

from .timeouts import scaled

SUBPROTOCOL = "intercloud.v1"
F = FrameType


@dataclass
class RawStream:
    sid: int
    credit: int  # what we may still send (the peer's window, §6.1)
    rx: bytearray = field(default_factory=bytearray)
    answer: asyncio.Future | None = None  # ("ok", payload) or ("fail", code, text)
    fin: bool = False
    rst: tuple[int, str] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class RawOnprem(WSListener):
    """One tunnel to a cloud. ``node`` and ``incarnation`` go into our HELLO; the certificate decides the
    tenant (and must name ``node``, protocol §5.4)."""

    def __init__(self, node: str, incarnation: str, window: int = 1 << 20, resume: bool = True) -> None:
        self.node, self.incarnation, self.window, self.resume_on = node, incarnation, window, resume
        self.ws = None
        self.hello: asyncio.Future = asyncio.get_running_loop().create_future()
        self.gone: asyncio.Future = asyncio.get_running_loop().create_future()
        self.close: tuple[int, str] | None = None
        self.streams: dict[int, RawStream] = {}
        self.next_sid = 1  # the dialer opens odd ids (§4.1)
        self.peer_window = 0
        self.others: list = []  # frames nobody asked for (GOAWAY, MEMBERS...)

    # --- picows ------------------------------------------------------------------------
    def on_ws_connected(self, transport) -> None:
        self.ws = transport

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            self.close = (int(frame.get_close_code()), frame.get_close_reason() or "")
            transport.disconnect()
            return
        if frame.msg_type is WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
            return
        if frame.msg_type is not WSMsgType.BINARY:
            return
        f = decode(frame.get_payload_as_bytes())
        s = self.streams.get(f.stream_id)
        if f.type is F.HELLO:
            body = json.loads(f.payload)
            self.peer_window = body["window"]
            if not self.hello.done():
                self.hello.set_result(body)
        elif f.type is F.PING:
            self.send(encode(F.PONG, 0, f.payload))
        elif s is None:
            self.others.append(f)
        elif f.type is F.DATA:
            s.rx += f.payload
            self.send(encode(F.WINDOW, s.sid, encode_window(len(f.payload))))  # delivered at once
        elif f.type is F.WINDOW:
            s.credit += decode_window(f.payload)
        elif f.type is F.FIN:
            s.fin = True
        elif f.type is F.RST:
            s.rst = decode_reason(f.payload)
            if not s.answer.done():
                s.answer.set_result(("fail", *s.rst))
        elif f.type is F.OPEN_OK:
            s.answer.set_result(("ok", f.payload))
        elif f.type is F.OPEN_FAIL:
            s.answer.set_result(("fail", *decode_reason(f.payload)))
        elif f.type is F.ACK:
            pass  # the cloud holds what we sent up to here; we keep everything anyway
        s = self.streams.get(f.stream_id)
        if s is not None:
            s.changed.set()

    def on_ws_disconnected(self, transport) -> None:
        if not self.gone.done():
            self.gone.set_result(None)
        for s in self.streams.values():
            if s.answer is not None and not s.answer.done():
                s.answer.set_result(("fail", -1, "tunnel closed"))
            s.changed.set()

    # --- sending -----------------------------------------------------------------------
    def send(self, message: bytes) -> None:
        if self.ws is not None and not self.gone.done():
            self.ws.send(WSMsgType.BINARY, message)

    def _new_stream(self) -> RawStream:
        sid = self.next_sid
        self.next_sid += 2
        s = self.streams[sid] = RawStream(sid, self.peer_window)
        s.answer = asyncio.get_running_loop().create_future()
        return s

    def open(self, service: str, client: str = "127.0.0.1:1") -> RawStream:
        s = self._new_stream()
        self.send(encode(F.OPEN, s.sid, encode_open(service, client)))
        return s

    def resume(self, body: dict, flags: int = 0) -> RawStream:
        """RESUME with a JSON body as the test crafts it (protocol §10.5)."""
        s = self._new_stream()
        frame = bytearray(encode(F.RESUME, s.sid, encode_json(body)))
        frame[1] = flags
        self.send(bytes(frame))
        return s

    async def answer(self, s: RawStream, timeout: float = 10.0) -> tuple:
        return await asyncio.wait_for(asyncio.shield(s.answer), scaled(timeout))

    async def send_data(self, s: RawStream, data: bytes, timeout: float = 10.0) -> None:
        """DATA within the peer's credit, waiting for WINDOW when it runs out."""
        view = memoryview(data)
        async with asyncio.timeout(scaled(timeout)):
            while view:
                while s.credit <= 0:
                    if s.rst is not None or self.gone.done():
                        raise ConnectionError(f"stream {s.sid} reset or tunnel gone: {s.rst}")
                    s.changed.clear()
                    await s.changed.wait()
                n = min(len(view), s.credit, 16 * 1024)
                self.send(encode(F.DATA, s.sid, view[:n]))
                s.credit -= n
                view = view[n:]

    def fin(self, s: RawStream) -> None:
        self.send(encode(F.FIN, s.sid))

    def ack(self, s: RawStream) -> None:
        self.send(encode(F.ACK, s.sid, encode_ack(len(s.rx))))

    async def wait_rx(self, s: RawStream, n: int, timeout: float = 10.0) -> bytes:
        """Until ``n`` bytes of the stream arrived (in total)."""
        async with asyncio.timeout(scaled(timeout)):
            while len(s.rx) < n:
                if s.rst is not None or s.fin or self.gone.done():
                    raise ConnectionError(f"stream {s.sid} ended after {len(s.rx)} of {n} bytes: "
                                          f"rst {s.rst}, fin {s.fin}")
                s.changed.clear()
                await s.changed.wait()
        return bytes(s.rx)

    async def wait_fin(self, s: RawStream, timeout: float = 10.0) -> None:
        async with asyncio.timeout(scaled(timeout)):
            while not s.fin:
                if s.rst is not None or self.gone.done():
                    raise ConnectionError(f"stream {s.sid} reset before FIN: {s.rst}")
                s.changed.clear()
                await s.changed.wait()

    def abort(self) -> None:
        """Drop the TCP connection without a WebSocket close (what a network break does)."""
        if self.ws is not None:
            self.ws.underlying_transport.abort()


async def connect(url: str, ctx: ssl.SSLContext, node: str, incarnation: str, *, window: int = 1 << 20,
                  resume: bool = True, services: list[str] | None = None) -> RawOnprem:
    """Dial, upgrade, take the cloud's HELLO and answer with ours (protocol §5.2)."""
    _transport, c = await ws_connect(
        lambda: RawOnprem(node, incarnation, window, resume), url, ssl_context=ctx,
        extra_headers={"Sec-WebSocket-Protocol": SUBPROTOCOL}, websocket_handshake_timeout=scaled(10))
    await asyncio.wait_for(c.hello, scaled(10))
    hello = {"version": 1, "node_id": node, "role": "onprem", "services": services or [], "window": window,
             "max_frame": 64 * 1024, "max_streams": 100, "incarnation": incarnation}
    if resume:
        hello["resume"] = True
    c.send(encode(F.HELLO, 0, json.dumps(hello).encode()))
    return c


def identity(payload: bytes) -> tuple[bytes, str, str]:
    """(token, node id, incarnation) of an OPEN_OK payload (protocol §10.2)."""
    ident = decode_identity(payload)
    assert ident is not None, "OPEN_OK carried no resume identity"
    return ident
