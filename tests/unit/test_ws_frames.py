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
