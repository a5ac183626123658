"""Property tests: frames survive encode/decode, and byte streams survive two Connections.

protocol §2, §3 (frame layout), §4 (streams), §6 (flow control).
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from intercloud.protocol import frames
from intercloud.protocol.frames import HEADER_SIZE, MAX_STREAM_ID, Frame, FrameError, FrameType

from .sim import Sim, make_pair

FAST = settings(max_examples=300, deadline=None)
# Whole-tunnel simulations: no shrinking, which can take minutes on a failure here; the
# failing example is still printed and replayed from the hypothesis database.
SIM = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow],
               phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])

KNOWN_CODES = {int(t) for t in FrameType}
stream_ids = st.one_of(st.integers(0, 8), st.integers(0, MAX_STREAM_ID), st.just(MAX_STREAM_ID))


@FAST
@given(ftype=st.sampled_from(list(FrameType)), sid=stream_ids, payload=st.binary(max_size=300))
def test_frame_encode_decode_identity(ftype: FrameType, sid: int, payload: bytes) -> None:
    wire = frames.encode(ftype, sid, payload)
    assert len(wire) == HEADER_SIZE + len(payload)
    assert wire[0] == ftype and wire[1] == 0 and int.from_bytes(wire[2:6], "big") == sid
    for message in (wire, bytearray(wire), memoryview(wire)):
        frame = frames.decode(message)
        assert frame == Frame(ftype, sid, payload)
        assert type(frame.type) is FrameType and type(frame.payload) is bytes
    # the hot path packs the header in place; it must agree with encode()
    buf = bytearray(HEADER_SIZE + len(payload))
    frames.HEADER.pack_into(buf, 0, ftype, 0, sid)
    buf[HEADER_SIZE:] = payload
    assert bytes(buf) == wire


@FAST
@given(code=st.integers(0, 255), flags=st.integers(0, 255), sid=stream_ids,
       payload=st.binary(max_size=64))
def test_decode_arbitrary_header(code: int, flags: int, sid: int, payload: bytes) -> None:
    message = bytes((code, flags)) + sid.to_bytes(4, "big") + payload
    if code in KNOWN_CODES:
        # flags are reserved: receivers ignore them (protocol §2.2)
        assert frames.decode(message) == Frame(FrameType(code), sid, payload)
    else:
        with pytest.raises(FrameError, match="unknown frame type"):
            frames.decode(message)


@FAST
@given(st.binary(max_size=HEADER_SIZE - 1))
def test_decode_short_message(message: bytes) -> None:
    with pytest.raises(FrameError, match="shorter than the 6-byte header"):
        frames.decode(message)


# --- two peers --------------------------------------------------------------------------

windows = st.one_of(st.integers(1, 64), st.integers(65, 6000), st.sampled_from([1, 4, 5, 1024, 2**31]))
max_frames = st.one_of(st.integers(1024, 1100), st.sampled_from([1024, 4096, 16 * 2**20]))
# arbitrary content: small payloads byte by byte from hypothesis, larger ones from a seeded PRNG
payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda n, seed: random.Random(seed).randbytes(n), st.integers(0, 3000), st.integers()),
)
stream_specs = st.lists(st.tuples(st.integers(0, 1), payloads, payloads), min_size=1, max_size=3)
schedules = st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 2**16)), max_size=200)
kinds = ("pump", "send", "deliver", "fin")
weights = st.fixed_dictionaries({k: st.integers(1, 20) for k in kinds})
tails = st.one_of(st.none(), st.randoms(use_true_random=False))


@SIM
@given(cw=windows, sw=windows, cf=max_frames, sf=max_frames, streams=stream_specs,
       schedule=schedules, rng=tails, w=weights)
@example(cw=1, sw=1, cf=1024, sf=1024, streams=[(0, b"ab" * 700, b"z" * 1500)], schedule=[],
         rng=None, w={})
@example(cw=5, sw=7, cf=1024, sf=1024,
         streams=[(0, bytes(range(256)) * 5, b""), (1, b"", bytes(range(256)) * 5)], schedule=[],
         rng=None, w={})
def test_streams_arrive_byte_exact(cw, sw, cf, sf, streams, schedule, rng, w) -> None:
    """Arbitrary bytes, chunked arbitrarily within credit and max_frame, in both directions of up
    to three concurrent streams opened by either side, arrive byte-exact; WINDOW frames returned
    through delivered() keep the senders going until every stream is closed on both sides.
    Hypothesis picks the interleaving: which side acts next (send, deliver, carry a frame, FIN)
    and the chunk and delivery sizes."""
    c, s = make_pair(client_window=cw, server_window=sw, client_max_frame=cf, server_max_frame=sf)
    sim = Sim((c, s), streams)
    sim.run(schedule, rng, w)
    for fl in sim.flows.values():
        receiver_window = (s, c)[fl.src].window
        # a payload larger than the window can only have arrived because credit came back
        if len(fl.payload) > receiver_window:
            assert fl.window_frames > 0


def test_large_transfer_uses_max_frame_chunks() -> None:
    """A window far above max_frame: senders are capped by the peer's max_frame, not by credit."""
    c, s = make_pair(client_window=256 * 1024, server_window=64 * 1024,
                     client_max_frame=16 * 1024, server_max_frame=4096)
    payload_c = os.urandom(1_000_003)
    payload_s = os.urandom(300_001)
    sim = Sim((c, s), [(0, payload_c, payload_s)])
    sizes: list[int] = []
    real_send = sim._send

    def spy(fl, size_sel):
        before = fl.sent
        real_send(fl, size_sel)
        sizes.append((fl.src, fl.sent - before))

    sim._send = spy
    sim.run([])
    assert max(n for side, n in sizes if side == 0) == 4096  # server's max_frame
    assert max(n for side, n in sizes if side == 1) == 16 * 1024  # client's max_frame
    assert sim.flows[1, 0].window_frames >= (1_000_003 - 64 * 1024) // (64 * 1024)
