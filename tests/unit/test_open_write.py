"""P13 (docs/performance.md §7): what a client sent before the accepting gateway looked at its socket
leaves in the same write as the OPEN, as early data (protocol §4.5); nothing sent yet costs nothing."""

from __future__ import annotations

import socket

from intercloud.protocol import frames
from intercloud.protocol.frames import FrameType
from intercloud.tunnel.stream import LocalStream

from ..protocol.sim import hello_frame
from .test_ws_frames import make_tunnel


class FakeTransport:
    """What LocalStream asks of its transport here: reading is resumed for more early data."""

    def __init__(self) -> None:
        self.reading = False
        self.aborted = False

    def resume_reading(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def get_extra_info(self, _name):
        return None

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        pass


def accepted_stream(client: socket.socket, server: socket.socket) -> LocalStream:
    stream = LocalStream("svc", "accept", client="192.0.2.1:1")
    server.setblocking(False)
    stream.fd = server.fileno()  # as connection_made sets it
    stream.transport = FakeTransport()
    return stream


async def open_through(early: int, sent: bytes) -> list[frames.Frame]:
    tunnel, _ = make_tunnel(client=False)  # the cloud side accepts clients
    tunnel.conn.receive(hello_frame(early_data=early))
    client, server = socket.socketpair()
    with client, server:
        if sent:
            client.sendall(sent)
        stream = accepted_stream(client, server)
        tunnel.open(stream)  # OPEN, then the early data, in one write (P13)
        writes = len(tunnel.ws.wire)
        out = [frames.decode(f) for f in tunnel.ws.frames()]
        assert writes == 1, f"OPEN and the client's first bytes leave in one write, got {tunnel.ws.wire}"
        if sent and not early:
            assert stream._park_len == len(sent), "kept for after OPEN_OK when the peer takes no early data"
        return out


async def test_first_bytes_ride_in_the_open_write() -> None:
    got = await open_through(65536, b"GET / HTTP/1.1\r\n\r\n")
    assert [f.type for f in got] == [FrameType.OPEN, FrameType.DATA]
    assert got[0].stream_id == got[1].stream_id and bytes(got[1].payload) == b"GET / HTTP/1.1\r\n\r\n"


async def test_nothing_sent_yet_means_only_the_open() -> None:
    got = await open_through(65536, b"")
    assert [f.type for f in got] == [FrameType.OPEN]


async def test_peer_without_early_data_gets_only_the_open() -> None:
    got = await open_through(0, b"hello")
    assert [f.type for f in got] == [FrameType.OPEN]


async def test_more_than_a_small_frame_still_goes_whole_and_in_order() -> None:
    tunnel, _ = make_tunnel(client=False)
    tunnel.conn.receive(hello_frame(early_data=65536))
    client, server = socket.socketpair()
    with client, server:
        payload = bytes(range(256)) * 40  # 10 KiB: larger than a corked frame, read in one go
        client.sendall(payload)
        tunnel.open(accepted_stream(client, server))
        got = [frames.decode(f) for f in tunnel.ws.frames()]
    assert [f.type for f in got] == [FrameType.OPEN, FrameType.DATA]
    assert bytes(got[1].payload) == payload


async def test_a_client_that_reset_gets_no_open_and_its_stream_ends() -> None:
    """ECONNRESET is reported once: read here, it must end the stream, not become an EOF later."""
    import struct

    tunnel, _ = make_tunnel(client=False)
    tunnel.conn.receive(hello_frame(early_data=65536))
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        server, _ = srv.accept()
        with server:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # RST
            stream = accepted_stream(client, server)
            fut = tunnel.open(stream)
            assert fut.done() and fut.result()[0] == frames.Reason.ABORTED
            assert stream.finished and stream.transport.aborted
            assert tunnel.ws.wire == [], "no OPEN for a client that is gone"
