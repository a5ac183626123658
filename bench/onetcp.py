"""The floor of a one-connection tunnel, for bench/wan.py: many TCP streams over one TCP connection with
nothing else in the way.

    python bench/onetcp.py listen TUNNEL_HOST:PORT ID=LISTEN_HOST:PORT ...   # the cloud side
    python bench/onetcp.py dial   TUNNEL_HOST:PORT ID=TARGET_HOST:PORT ...   # the on-prem side

The dialing side connects to the listening side; a client of ``ID=LISTEN_HOST:PORT`` (listening side)
gets a stream to ``ID=TARGET_HOST:PORT`` (dialing side). There is no TLS, no WebSocket, no flow control
and no resume; frames are ``>IBI`` (stream id, kind, length) and a payload of at most 16 KiB. What it
keeps is what any multiplexing tunnel needs to not add its own queue in front of an interactive stream:

* the tunnel socket has ``TCP_NOTSENT_LOWAT`` 16 KiB and ``TCP_NODELAY``, and the process writes to it
  only while its own buffer holds less than 16 KiB: at most ~32 KiB ever waits in front of a new frame;
* streams with data queued send round robin, one frame each turn, so a ping waits behind at most one
  frame of each other stream;
* ``--cc`` sets the tunnel socket's congestion control (default bbr, as intercloud's default).

What is left between a ping and its echo is then the connection itself: a segment lost on the WAN
holds every later byte of the connection, the ping's too, until its retransmission arrives. bench/wan.py
runs this as the system ``onetcp`` to show that floor beside intercloud's same-tunnel figure
(docs/performance.md §8.2). It is a measuring instrument, not a product: a slow reader on the receiving
side makes it buffer without bound (iperf3 and the echo server read at line rate).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import socket
import struct
import sys

HDR = struct.Struct(">IBI")
OPEN, DATA, FIN, CLOSE = 0, 1, 2, 3
FRAME = 16 * 1024
LOWAT = 16 * 1024
READ_PAUSE, READ_RESUME = 256 * 1024, 64 * 1024  # a local socket's queue in front of the tunnel


class Tunnel(asyncio.Protocol):
    """The one connection: frames in, and a round-robin scheduler out."""

    def __init__(self, node: Node):
        self.node = node
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.ready: collections.deque[Local] = collections.deque()  # streams with frames queued, in turn
        self.writable = True

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, 25, LOWAT)  # TCP_NOTSENT_LOWAT
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.node.cc.encode())
        except OSError as exc:
            print(f"onetcp: congestion control {self.node.cc!r} refused ({exc}); the kernel default stays",
                  file=sys.stderr)
        transport.set_write_buffer_limits(high=LOWAT, low=0)
        self.node.tunnel = self
        print(f"onetcp: tunnel up with {transport.get_extra_info('peername')}", file=sys.stderr, flush=True)

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self.pump()

    def send(self, sid: int, kind: int, payload: bytes = b"") -> None:
        """A control frame: ahead of every stream's queue (they are few and small)."""
        self.transport.write(HDR.pack(sid, kind, len(payload)) + payload)

    def queue(self, stream: Local) -> None:
        if not stream.in_turn:
            stream.in_turn = True
            self.ready.append(stream)
        self.pump()

    def pump(self) -> None:
        """Round robin, one frame per stream per turn, while the socket takes more."""
        while self.writable and self.ready:
            s = self.ready.popleft()
            chunk = s.take(FRAME)
            if chunk:
                self.transport.write(HDR.pack(s.sid, DATA, len(chunk)) + chunk)
            if s.pending:
                self.ready.append(s)
            else:
                s.in_turn = False
                if s.fin_pending:
                    s.fin_pending = False
                    self.send(s.sid, FIN)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf, off = self.buf, 0
        while len(buf) - off >= HDR.size:
            sid, kind, n = HDR.unpack_from(buf, off)
            if len(buf) - off - HDR.size < n:
                break
            payload = bytes(buf[off + HDR.size:off + HDR.size + n])
            off += HDR.size + n
            self.node.frame(sid, kind, payload)
        del buf[:off]

    def connection_lost(self, exc) -> None:
        print(f"onetcp: tunnel lost ({exc})", file=sys.stderr)
        self.node.tunnel = None
        for s in list(self.node.streams.values()):
            s.transport.abort()
        self.node.lost.set()


class Local(asyncio.Protocol):
    """One stream's local socket (a client on the listening side, a target on the dialing side)."""

    def __init__(self, node: Node, sid: int, service: str | None):
        self.node, self.sid, self.service = node, sid, service
        self.transport: asyncio.Transport | None = None
        self.q: collections.deque[bytes] = collections.deque()
        self.pending = 0
        self.in_turn = False
        self.fin_pending = False
        self.paused = False
        self.got_eof = self.sent_eof = False  # both: the stream is done, the socket is closed
        self.early: list[tuple[int, bytes]] = []  # frames for a target still connecting

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.node.streams[self.sid] = self
        if self.service is not None:  # a client: open the stream on the far side
            self.node.tunnel.send(self.sid, OPEN, self.service.encode())
        for kind, payload in self.early:
            self.deliver(kind, payload)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        self.q.append(data)
        self.pending += len(data)
        if self.pending > READ_PAUSE and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self.node.tunnel.queue(self)

    def take(self, n: int) -> bytes:
        out = bytearray()
        while self.q and len(out) < n:
            head = self.q[0]
            want = n - len(out)
            if len(head) <= want:
                out += self.q.popleft()
            else:
                out += head[:want]
                self.q[0] = head[want:]
        self.pending -= len(out)
        if self.paused and self.pending < READ_RESUME:
            self.paused = False
            self.transport.resume_reading()
        return bytes(out)

    def eof_received(self) -> bool:
        self.got_eof = True
        if self.in_turn:
            self.fin_pending = True  # after the data still queued (Tunnel.pump)
        else:
            self.node.tunnel.send(self.sid, FIN)
        if self.sent_eof:
            self.transport.close()
        return True  # half-close: keep writing what comes back

    def deliver(self, kind: int, payload: bytes) -> None:
        if self.transport is None:
            self.early.append((kind, payload))
        elif kind == DATA:
            self.transport.write(payload)
        elif kind == FIN:
            self.sent_eof = True
            if self.got_eof:
                self.transport.close()
            elif self.transport.can_write_eof():
                self.transport.write_eof()
        elif kind == CLOSE:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        done = self.got_eof and self.sent_eof  # a clean end: FIN went each way, no CLOSE needed
        if self.node.streams.pop(self.sid, None) is not None and self.node.tunnel is not None and not done:
            self.node.tunnel.send(self.sid, CLOSE)


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        transport.abort()


class Node:
    def __init__(self, role: str, services: dict[str, tuple[str, int]], cc: str):
        self.role, self.services, self.cc = role, services, cc
        self.tunnel: Tunnel | None = None
        self.streams: dict[int, Local] = {}
        self.next_sid = 1
        self.lost = asyncio.Event()
        self._connecting: dict[int, Local] = {}  # OPENed, the target not connected yet

    def client(self, service: str) -> asyncio.Protocol:
        if self.tunnel is None:  # not dialed yet (or lost): the client is closed at once
            return _Refuse()
        sid, self.next_sid = self.next_sid, self.next_sid + 1
        return Local(self, sid, service)

    def frame(self, sid: int, kind: int, payload: bytes) -> None:
        if kind == OPEN:
            self._open(sid, payload.decode())
            return
        s = self.streams.get(sid) or self._connecting.get(sid)
        if s is not None:
            s.deliver(kind, payload)

    def _open(self, sid: int, service: str) -> None:
        host, port = self.services[service]
        s = Local(self, sid, None)
        self._connecting[sid] = s

        async def connect() -> None:
            try:
                await asyncio.get_running_loop().create_connection(lambda: s, host, port)
            except OSError as exc:
                print(f"onetcp: {service} -> {host}:{port}: {exc}", file=sys.stderr)
                if self.tunnel is not None:
                    self.tunnel.send(sid, CLOSE)
            finally:
                self._connecting.pop(sid, None)

        asyncio.ensure_future(connect())


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("role", choices=("listen", "dial"))
    p.add_argument("tunnel", type=_addr, help="HOST:PORT the listening side listens on and the dialing side dials")
    p.add_argument("services", nargs="+", help="ID=HOST:PORT: listen there (listen) or connect there (dial)")
    p.add_argument("--cc", default="bbr", help="congestion control of the tunnel socket (default bbr)")
    a = p.parse_args(argv)
    services = {k: _addr(v) for k, v in (s.split("=", 1) for s in a.services)}
    loop = asyncio.get_running_loop()
    node = Node(a.role, services, a.cc)
    if a.role == "dial":
        deadline = loop.time() + 30  # the listening side may still be starting
        while True:
            try:
                await asyncio.wait_for(loop.create_connection(lambda: Tunnel(node), *a.tunnel), 5)
                break
            except (OSError, TimeoutError) as exc:
                print(f"onetcp: dialing {a.tunnel}: {exc!r}", file=sys.stderr, flush=True)
                if loop.time() > deadline:
                    raise SystemExit(f"onetcp: could not dial {a.tunnel} within 30 s") from None
                await asyncio.sleep(0.1)
        await node.lost.wait()
        return
    await loop.create_server(lambda: Tunnel(node), *a.tunnel, reuse_address=True)
    for name, (host, port) in services.items():
        await loop.create_server(lambda name=name: node.client(name), host, port, reuse_address=True)
    print(f"onetcp: listening on {a.tunnel} and {services}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
