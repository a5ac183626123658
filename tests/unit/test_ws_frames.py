"""Corked control frames (tunnel.ws_frames) are valid RFC 6455 frames, masked on the client side."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from intercloud.tunnel.tunnel import _CORK_MAX, ws_frames


def parse(data: bytes, client: bool) -> list[bytes]:
    """A reference RFC 6455 §5.2 decoder for what a server (client=True) or client reads."""
    out, i = [], 0
    while i < len(data):
        b0, b1 = data[i], data[i + 1]
        assert b0 == 0x82, "FIN + binary opcode, no RSV bits"
        assert bool(b1 & 0x80) == client, "clients mask, servers do not (§5.1)"
        n, i = b1 & 0x7F, i + 2
        if n == 126:
            (n,), i = struct.unpack_from("!H", data, i), i + 2
            assert n >= 126, "the shortest length encoding is used"
        assert n != 127
        key = b""
        if client:
            key, i = data[i:i + 4], i + 4
        payload = data[i:i + n]
        assert len(payload) == n
        if client:
            payload = bytes(b ^ key[j % 4] for j, b in enumerate(payload))
        out.append(payload)
        i += n
    return out


@given(frames=st.lists(st.binary(max_size=_CORK_MAX), max_size=8), client=st.booleans())
def test_frames_round_trip(frames, client) -> None:
    assert parse(ws_frames(frames, client), client) == frames


def test_each_client_frame_has_its_own_key() -> None:
    data = ws_frames([b"\0" * 8] * 3, client=True)
    keys = {data[i * 14 + 2:i * 14 + 6] for i in range(3)}  # 2 header + 4 key + 8 payload each
    assert len(keys) == 3


def test_large_frames_are_not_corked() -> None:
    with pytest.raises(ValueError, match="too large"):
        ws_frames([b"x" * 65536], client=False)


# ---------------------------------------------------------------------------------------------
# Tunnel.send_frame / hold / flush: what reaches the wire, in which order
# ---------------------------------------------------------------------------------------------

class FakeWS:
    """Records what a Tunnel hands to picows: whole messages (send) and pre-framed bytes (write)."""

    is_disconnected = False

    def __init__(self, client: bool) -> None:
        self.client = client
        self.wire: list[tuple[str, bytes]] = []
        self.underlying_transport = self

    def send(self, _type, data) -> None:
        self.wire.append(("message", bytes(data)))

    def write(self, data: bytes) -> None:
        self.wire.append(("write", bytes(data)))

    def frames(self) -> list[bytes]:
        out = []
        for kind, data in self.wire:
            out.extend([data] if kind == "message" else parse(data, self.client))
        return out


def make_tunnel(client: bool):
    import asyncio
    from types import SimpleNamespace

    from intercloud.tunnel.tunnel import Tunnel

    cfg = SimpleNamespace(tunnel=SimpleNamespace(stream_window=1 << 20, max_frame=1 << 16, max_streams=100))
    tunnel = Tunnel(SimpleNamespace(config=cfg, budget=None), client=client)
    tunnel.ws = FakeWS(client)
    return tunnel, asyncio.get_running_loop()


async def next_iteration() -> None:
    import asyncio

    await asyncio.sleep(0)
    await asyncio.sleep(0)


@pytest.mark.parametrize("client", [True, False])
async def test_first_frame_leaves_at_once_later_small_ones_together(client) -> None:
    tunnel, _ = make_tunnel(client)
    tunnel.send_frame(b"open")
    assert tunnel.ws.wire == [("message", b"open")]
    tunnel.send_frame(b"window")
    tunnel.send_frame(b"fin")
    assert len(tunnel.ws.wire) == 1, "small frames after the first wait for the end of the iteration"
    await next_iteration()
    assert tunnel.ws.wire[1][0] == "write", "held frames leave as one write"
    assert tunnel.ws.frames() == [b"open", b"window", b"fin"]


async def test_a_large_frame_flushes_what_is_held_first() -> None:
    tunnel, _ = make_tunnel(True)
    big = bytes(_CORK_MAX + 1)
    tunnel.send_frame(b"a")
    tunnel.send_frame(b"b")
    tunnel.send_frame(big)
    assert tunnel.ws.frames() == [b"a", b"b", big]


async def test_hold_keeps_even_the_first_frame_until_flush() -> None:
    tunnel, _ = make_tunnel(False)
    tunnel.hold()
    tunnel.send_frame(b"open_ok")
    tunnel.send_frame(b"rst")
    assert tunnel.ws.wire == []
    tunnel.flush()
    assert tunnel.ws.frames() == [b"open_ok", b"rst"]
    tunnel.hold()  # and a hold nobody flushes ends with the iteration
    tunnel.send_frame(b"window")
    await next_iteration()
    assert tunnel.ws.frames()[-1] == b"window"
