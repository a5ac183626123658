"""Early data (protocol §4.5): DATA after OPEN, before OPEN_OK, up to what the receiver announced."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercloud.protocol import frames
from intercloud.protocol.connection import (
    Connection, Data, Hello, LocalProtocolError, OpenRefused, ProtocolError, State,
)
from intercloud.protocol.frames import FrameType, Reason

from .sim import MISSING, hello_frame, make_pair

F = FrameType


def opened(early: int, window: int = 4096, max_frame: int = 1024):
    """(opener, receiver, sid): the client opened a stream, the server got the OPEN."""
    c, s = make_pair(client_window=window, server_window=window, client_max_frame=max_frame,
                     server_max_frame=max_frame, server_early=early)
    sid, frame = c.open_stream("svc", "192.0.2.1:1")
    s.receive(frame)
    return c, s, sid


def test_hello_announces_early_data_only_when_offered() -> None:
    a = Connection(client=True, window=4096, max_frame=1024, max_streams=4, early_data=100)
    b = Connection(client=True, window=4096, max_frame=1024, max_streams=4)
    body_a = frames.decode_json(a.hello("n", "onprem", [], "i")[frames.HEADER_SIZE:], "HELLO")
    body_b = frames.decode_json(b.hello("n", "onprem", [], "i")[frames.HEADER_SIZE:], "HELLO")
    assert body_a["early_data"] == 100 and "early_data" not in body_b


def test_early_data_is_capped_by_the_window() -> None:
    assert Connection(client=True, window=500, max_frame=1024, max_streams=4, early_data=65536).early_data == 500


def test_hello_without_the_key_means_none() -> None:
    conn = Connection(client=True, window=1024, max_frame=1024, max_streams=4)
    ev, _ = conn.receive(hello_frame(early_data=MISSING))
    assert isinstance(ev, Hello) and ev.early_data == 0 and "early_data" not in ev.extra


@pytest.mark.parametrize("bad", [-1, "lots", 2**40])
def test_hello_with_a_bad_value_is_a_protocol_error(bad) -> None:
    conn = Connection(client=True, window=1024, max_frame=1024, max_streams=4)
    with pytest.raises(ProtocolError, match="HELLO"):
        conn.receive(hello_frame(early_data=bad))


def test_without_the_announcement_the_opener_waits_and_the_receiver_refuses() -> None:
    c, s, sid = opened(early=0)
    assert c.state(sid) is State.OPENING_OUT and c.send_limit(sid) == 0
    with pytest.raises(LocalProtocolError):
        c.send_data(sid, 1)
    with pytest.raises(ProtocolError, match="DATA on stream .* OPENING_IN"):
        s.receive(frames.encode(F.DATA, sid, b"x"))


def test_opener_sends_at_most_the_announced_amount_then_credit_continues() -> None:
    c, s, sid = opened(early=1500, window=4096, max_frame=1024)
    assert c.send_limit(sid) == 1024  # max_frame caps one frame
    first = c.data(sid, b"a" * 1024)
    assert c.send_limit(sid) == 476  # what is left of 1,500
    second = c.data(sid, b"b" * 476)
    assert c.send_limit(sid) == 0
    with pytest.raises(LocalProtocolError, match="early DATA"):
        c.send_data(sid, 1)
    for f in (first, second):
        ev, reply = s.receive(f)
        assert isinstance(ev, Data) and reply is None and s.state(sid) is State.OPENING_IN
    c.receive(s.open_ok(sid))
    assert c.state(sid) is State.OPEN
    assert c.credit(sid) == 4096 - 1500 and c.send_limit(sid) == 1024  # early bytes used credit
    # the receiver returns their credit once delivered, as for any DATA (§6.2)
    window = s.delivered(sid, 1500)
    assert window is not None
    c.receive(window)
    assert c.credit(sid) == 4096


def test_receiver_refuses_more_than_it_announced() -> None:
    c, s, sid = opened(early=100)
    s.receive(frames.encode(F.DATA, sid, b"x" * 60))
    with pytest.raises(ProtocolError, match="early data") as exc:
        s.receive(frames.encode(F.DATA, sid, b"x" * 41))
    assert exc.value.stream_id == sid


def test_early_data_after_open_fail_is_ignored_and_the_opener_may_retry() -> None:
    c, s, sid = opened(early=100)
    refuse = s.open_fail(sid, Reason.REFUSED, "target refused")
    early = c.data(sid, b"hello")  # crossed the OPEN_FAIL on the wire
    assert s.receive(early) == (None, None)  # forgotten stream (§4.3)
    ev, _ = c.receive(refuse)
    assert isinstance(ev, OpenRefused) and c.state(sid) is State.CLOSED
    sid2, frame = c.open_stream("svc", "192.0.2.1:1")  # the same bytes again on a new stream
    s.receive(frame)
    assert c.send_limit(sid2) == 100
    ev, _ = s.receive(c.data(sid2, b"hello"))
    assert isinstance(ev, Data) and bytes(ev.data) == b"hello"


def test_fin_waits_for_open_ok() -> None:
    c, s, sid = opened(early=100)
    with pytest.raises(LocalProtocolError):
        c.fin(sid)
    with pytest.raises(ProtocolError):
        s.receive(frames.encode(F.FIN, sid))


def test_window_is_not_returned_before_open_ok() -> None:
    c, s, sid = opened(early=4096, window=4096)
    s.receive(c.data(sid, b"x" * 1024))
    assert s.delivered(sid, 1024) is None  # nothing is delivered before the target is up


@settings(max_examples=200, deadline=None)
@given(early=st.integers(0, 5000), window=st.integers(1, 5000), max_frame=st.integers(1024, 4096),
       chunks=st.lists(st.integers(1, 4096), max_size=20))
def test_opener_never_exceeds_what_the_receiver_accepts(early, window, max_frame, chunks) -> None:
    """Whatever the opener's sizes, a send it allows is one the receiver accepts, and it allows
    exactly min(announced early data, window) in total before OPEN_OK."""
    c, s, sid = opened(early=early, window=window, max_frame=max_frame)
    sent = 0
    for want in chunks:
        n = min(want, c.send_limit(sid))
        if n == 0:
            break
        ev, _ = s.receive(c.data(sid, b"z" * n))
        assert isinstance(ev, Data)
        sent += n
    assert sent <= min(early, window)
    if c.send_limit(sid) == 0:
        assert sent == min(early, window) or c.credit(sid) == 0
