"""Whatever a peer sends, ``Connection.receive`` either returns or raises ProtocolError.

The tunnel driver closes the tunnel on ProtocolError (protocol §9.2); any other exception escaping
from peer-controlled bytes would be an unhandled crash instead of a clean close 1002.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercloud.protocol import frames
from intercloud.protocol.connection import Connection, Hello, ProtocolError
from intercloud.protocol.frames import HEADER_SIZE, FrameType

from .sim import MISSING, hello_body, hello_frame, make_pair

F = FrameType
FUZZ = settings(max_examples=300, deadline=None)

payloads = st.one_of(
    st.binary(max_size=40),
    st.integers(0, 2**32 - 1).map(frames.encode_window),
    st.tuples(st.integers(0, 0xFFFF), st.text(max_size=10)).map(lambda t: frames.encode_reason(*t)),
    st.tuples(st.text(min_size=1, max_size=5), st.text(max_size=5)).map(
        lambda t: frames.encode_open(*t) if 0 < len(t[0].encode()) < 256 else b""),
    st.sampled_from([b"[]", b'["svc"]', b"[1]", b"{}", b"[" * 5000, b"1" * 5000, b"[Infinity]",
                     b"null", b"\xff"]),
)
messages = st.one_of(
    st.binary(max_size=HEADER_SIZE + 8),
    st.builds(
        lambda t, sid, p: bytes((t, 0)) + sid.to_bytes(4, "big") + p,
        st.one_of(st.sampled_from(list(FrameType)), st.integers(0, 255)),
        st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)),
        payloads,
    ),
)


def feed(conn: Connection, batch: list[bytes]) -> None:
    for message in batch:
        try:
            ev, reply = conn.receive(message)
        except ProtocolError as exc:
            assert str(exc) and isinstance(exc.stream_id, int)
            return  # the tunnel is closed: nothing more is read
        if reply is not None:
            frames.decode(reply)  # replies are well-formed frames


@FUZZ
@given(st.lists(messages, max_size=10))
def test_fresh_connection(batch: list[bytes]) -> None:
    feed(Connection(client=False, window=1024, max_frame=1024, max_streams=2), batch)


@FUZZ
@given(st.lists(messages, max_size=20))
def test_connection_with_streams(batch: list[bytes]) -> None:
    c, s = make_pair(client_window=8, server_window=8, client_max_streams=4)
    # streams 1, 3 (client) and 2 (server) in assorted states; stream 5 already closed
    for _ in range(3):
        sid, f = c.open_stream("svc", "x")
        s.receive(f)
    c.receive(s.open_ok(1))
    c.receive(s.fin(1))
    sid, f = s.open_stream("svc", "x")
    c.receive(f)
    c.receive(s.reset(5, 6, "gone"))
    feed(c, batch)


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000,
        b'{"version":1,"node_id":"n","role":"cloud","window":' + b"1" * 5000 + b"}",
        frames.encode_json(hello_body(window=float("inf"))),  # Infinity: int() overflows
        frames.encode_json(hello_body(max_frame=float("nan"))),
        frames.encode_json(hello_body(window=-(2**70))),
        frames.encode_json(hello_body(window=0)),
        frames.encode_json(hello_body(max_frame=1023)),
        frames.encode_json(hello_body(max_streams=0)),
        frames.encode_json(hello_body(role="admin")),
        frames.encode_json(hello_body(services=5)),
        frames.encode_json(hello_body(window="many")),
        frames.encode_json(hello_body(node_id=MISSING)),
        frames.encode_json([1]),
        b"\xff",
    ],
    ids=["deep-nesting", "huge-int", "infinity", "nan", "negative", "zero-window",
         "small-max-frame", "no-streams", "bad-role", "services-int", "window-str", "no-node-id",
         "array", "not-utf8"],
)
def test_bad_hello_is_a_protocol_error(payload: bytes) -> None:
    conn = Connection(client=True, window=1024, max_frame=1024, max_streams=4)
    with pytest.raises(ProtocolError):
        conn.receive(frames.encode(F.HELLO, 0, payload))
    assert conn.peer is None


def test_good_hello_keeps_known_extra_keys_only() -> None:
    conn = Connection(client=True, window=1024, max_frame=1024, max_streams=4)
    member = {"node_id": "a", "incarnation": "1f", "url": "wss://a:8443/x", "services": ["t/s"], "age": 1.5}
    ev, reply = conn.receive(hello_frame(members=[member], later_key={"x": 1}, advertise=None))
    assert isinstance(ev, Hello) and reply is None
    assert ev.extra == {"members": [member], "advertise": None}  # unknown keys ignored, not kept


def test_hello_without_incarnation_is_a_protocol_error() -> None:
    conn = Connection(client=True, window=1024, max_frame=1024, max_streams=4)
    with pytest.raises(ProtocolError, match="incarnation"):
        conn.receive(hello_frame(incarnation=MISSING))


@pytest.mark.parametrize("payload", [b"[" * 100_000, b"[" + b"1" * 5000 + b"]", b"{}", b"\xff"])
def test_bad_members_is_a_protocol_error(payload: bytes) -> None:
    c, s = make_pair()
    with pytest.raises(ProtocolError, match="MEMBERS"):
        c.receive(frames.encode(F.MEMBERS, 0, payload))


@pytest.mark.parametrize("payload", [b"[" * 100_000, b"[1]", b'["a", null]', b'{"a": 1}', b"\xff"])
def test_bad_services_is_a_protocol_error(payload: bytes) -> None:
    c, s = make_pair()
    with pytest.raises(ProtocolError, match="SERVICES"):
        c.receive(frames.encode(F.SERVICES, 0, payload))
    assert c.peer.services == ["svc"]
