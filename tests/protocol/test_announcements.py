"""Announcement sizes (protocol §5.5): no table of members and routes outgrows a frame the peer
accepts; MEMBERS are cut to the peer's max_frame and a member's routes go in parts when they must."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercloud.protocol import frames, peer_input
from intercloud.protocol.connection import HELLO_MAX, Connection, Hello, Members, ProtocolError
from intercloud.protocol.frames import HEADER_SIZE, FrameType

from .sim import make_pair

F = FrameType


def _route(i: int, width: int = 60) -> str:
    """A valid route about ``width`` characters long (each name at most 64)."""
    service = f"service{i:05d}".ljust(min(width, 64), "x")
    tenant = f"tenant{i % 97:02d}".ljust(max(8, min(64, width - 64)), "y")
    return f"{tenant}/{service}"


def _entry(node: str, n_routes: int, width: int = 60) -> dict:
    return {"node_id": node, "incarnation": f"{node}-boot", "url": f"wss://{node}.example:8443/intercloud",
            "services": sorted(_route(i, width) for i in range(n_routes)), "age": 0.5}


def _receive_all(conn: Connection, frames_out: list[bytes]) -> list[dict]:
    got = []
    for f in frames_out:
        ev, reply = conn.receive(f)
        assert isinstance(ev, Members) and reply is None
        got.extend(ev.members)
    return got


def _peer_link_pair(max_frame: int) -> tuple[Connection, Connection]:
    a = Connection(client=True, window=65536, max_frame=max_frame, max_streams=100)
    b = Connection(client=False, window=65536, max_frame=max_frame, max_streams=100)
    ev, _ = b.receive(a.hello("a", "cloud", [], "boot-a", link="peer"))
    assert isinstance(ev, Hello)
    ev, _ = a.receive(b.hello("b", "cloud", [], "boot-b", link="peer"))
    assert isinstance(ev, Hello)
    return a, b


def test_a_table_larger_than_max_frame_is_cut_and_means_the_same():
    a, b = _peer_link_pair(16 * 1024)
    table = [_entry(f"m{i}", 400) for i in range(6)]  # ~26 KB per member, 160 KB in all
    out = a.members(table)
    assert len(out) > 6
    for f in out:  # what b's WebSocket accepts: its max_frame plus the frame header
        assert len(f) <= b.max_frame + HEADER_SIZE, len(f)
    assert _receive_all(b, out) == table


def test_one_member_with_4096_long_routes_goes_in_parts():
    a, b = _peer_link_pair(16 * 1024)
    big = _entry("m1", peer_input.MAX_ROUTES, width=120)
    out = a.members([big, _entry("m2", 3)])
    assert len(out) >= 30
    assert all(len(f) <= b.max_frame + HEADER_SIZE for f in out)
    got = _receive_all(b, out)
    assert got == [big, _entry("m2", 3)]


def test_small_tables_stay_one_frame():
    a, b = _peer_link_pair(256 * 1024)
    table = [_entry("m1", 5), _entry("m2", 0)]
    out = a.members(table)
    assert out == [frames.encode(F.MEMBERS, 0, frames.encode_json(table))]
    assert a.members([]) == [frames.encode(F.MEMBERS, 0, b"[]")]


def test_more_than_256_members_split_by_count():
    a, b = _peer_link_pair(1024 * 1024)
    table = [{"node_id": f"m{i:03d}", "incarnation": "x", "url": None} for i in range(600)]
    out = a.members(table)
    assert len(out) == 3
    assert _receive_all(b, out) == table


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1500), st.integers(1, 128)), max_size=8),
       st.sampled_from([16 * 1024, 20_000, 64 * 1024]))
def test_any_table_round_trips_within_the_peer_frame(members, max_frame):
    a, b = _peer_link_pair(max_frame)
    table = [_entry(f"m{i}", n, w) for i, (n, w) in enumerate(members)]
    out = a.members(table)
    assert all(len(f) <= max_frame + HEADER_SIZE for f in out)
    assert _receive_all(b, out) == table


def _part(node: str, inc: str, routes: list[str], more: bool) -> dict:
    e = {"node_id": node, "incarnation": inc, "url": None, "services": routes}
    if more:
        e["more"] = True
    return e


def _members_frame(entries: list[dict]) -> bytes:
    return frames.encode(F.MEMBERS, 0, frames.encode_json(entries))


def test_a_part_of_another_incarnation_is_a_protocol_error():
    c, _s = make_pair()
    ev, _ = c.receive(_members_frame([_part("m1", "one", ["t/a"], True)]))
    assert ev.members == []
    with pytest.raises(ProtocolError, match="incarnation"):
        c.receive(_members_frame([_part("m1", "two", ["t/b"], False)]))


def test_parts_adding_up_to_more_than_4096_routes_are_a_protocol_error():
    c, _s = make_pair()
    chunk = [f"t/s{i}" for i in range(2048)]
    c.receive(_members_frame([_part("m1", "one", chunk, True)]))
    c.receive(_members_frame([_part("m1", "one", chunk, True)]))
    with pytest.raises(ProtocolError, match="4097 routes"):
        c.receive(_members_frame([_part("m1", "one", ["t/x"], False)]))


def test_too_many_members_in_progress_is_a_protocol_error():
    c, _s = make_pair()
    c.receive(_members_frame([_part(f"m{i}", "one", ["t/a"], True) for i in range(256)]))
    with pytest.raises(ProtocolError, match="in progress"):
        c.receive(_members_frame([_part("m999", "one", ["t/a"], True)]))


def test_more_must_be_a_boolean():
    c, _s = make_pair()
    with pytest.raises(ProtocolError, match="more"):
        c.receive(_members_frame([{**_part("m1", "one", [], False), "more": "yes"}]))


def test_a_peer_link_hello_too_big_for_any_peer_leaves_its_tables_out():
    conn = Connection(client=False, window=65536, max_frame=256 * 1024, max_streams=100)
    routes = [_route(i) for i in range(peer_input.MAX_ROUTES)]
    members = [_entry(f"m{i}", 100) for i in range(3)]
    frame = conn.hello("m0", "cloud", routes, "boot", link="peer", advertise=None, members=members)
    assert len(frame) <= HELLO_MAX
    body = frames.decode_json(frame[HEADER_SIZE:], "HELLO")
    assert body["services"] == [] and "members" not in body and body["link"] == "peer"


def test_a_small_hello_keeps_its_tables():
    conn = Connection(client=False, window=65536, max_frame=256 * 1024, max_streams=100)
    members = [_entry("m1", 3)]
    frame = conn.hello("m0", "cloud", ["t/a"], "boot", link="peer", advertise=None, members=members)
    body = frames.decode_json(frame[HEADER_SIZE:], "HELLO")
    assert body["services"] == ["t/a"] and body["members"] == members
