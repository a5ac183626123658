"""PROXY protocol v1/v2 parsing and building (src/intercloud/proxy_protocol.py): every header we build
parses back to the same addresses, byte by byte arrival gives the same answer as all at once, and
hostile input (garbage, over-long lines, truncated or lying TLVs) is a ProxyHeaderError, never
another exception."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings, strategies as st

from intercloud import proxy_protocol as pp
from intercloud.proxy_protocol import ProxyHeaderError, build, parse

V4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
V6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)).filter(lambda a: a.ipv4_mapped is None)
PORT = st.integers(0, 65535)


def _pair(addrs):
    return st.tuples(st.tuples(addrs, PORT), st.tuples(addrs, PORT))


@settings(max_examples=300, deadline=None)
@given(version=st.sampled_from(["v1", "v2"]), pair=_pair(V4) | _pair(V6), tail=st.binary(max_size=64))
def test_build_then_parse_round_trips_and_leaves_the_client_bytes(version, pair, tail):
    src, dst = pair
    raw = build(version, src, dst)
    header = parse(raw + tail)
    assert header is not None and header.length == len(raw)
    assert header.version == (1 if version == "v1" else 2)
    assert header.source == src and header.destination == dst
    assert (raw + tail)[header.length:] == tail


@settings(max_examples=100, deadline=None)
@given(version=st.sampled_from(["v1", "v2"]), pair=_pair(V4) | _pair(V6))
def test_a_header_arriving_byte_by_byte_is_incomplete_until_its_last_byte(version, pair):
    raw = build(version, *pair)
    for n in range(len(raw)):
        assert parse(raw[:n]) is None, n
    assert parse(raw).length == len(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200) | st.binary(max_size=40).map(lambda b: pp.V2_SIGNATURE + b)
       | st.binary(max_size=120).map(lambda b: b"PROXY " + b))
def test_garbage_is_incomplete_a_header_or_a_proxy_header_error(data):
    try:
        parse(data)
    except ProxyHeaderError as exc:
        assert str(exc)


def test_mixed_families_are_sent_as_ipv6():
    src = (ipaddress.ip_address("2001:db8::7"), 5000)
    dst = (ipaddress.ip_address("10.0.0.1"), 80)
    mapped = ipaddress.ip_address("::ffff:10.0.0.1")
    assert build("v1", src, dst) == f"PROXY TCP6 2001:db8::7 {mapped} 5000 80\r\n".encode()
    assert parse(build("v2", src, dst)).destination == (ipaddress.ip_address("::ffff:10.0.0.1"), 80)


def test_no_source_is_unknown_or_local_and_parses_to_no_client():
    assert build("v1", None, None) == b"PROXY UNKNOWN\r\n"
    assert parse(b"PROXY UNKNOWN\r\n").client is None
    local = build("v2", None, None)
    assert parse(local).client is None and parse(local).length == 16


def test_v2_local_ignores_addresses_and_unknown_tlvs_are_skipped():
    body = bytes(12) + bytes([0xEE, 0, 3]) + b"abc" + bytes([0x01, 0, 2]) + b"h2"
    raw = pp.V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(body)) + body
    header = parse(raw + b"DATA")
    assert header.tlvs == (0xEE, 0x01) and header.length == len(raw)
    assert header.client == "0.0.0.0:0"
    local = pp.V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x11, len(body)) + body
    assert parse(local).source is None


@pytest.mark.parametrize("raw, words", [
    (b"GET / HTTP/1.1\r\n", "not a PROXY header"),
    (b"\x16\x03\x01\x02\x00\x01", "not a PROXY header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "is not"),
    (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "is not IPv4"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "is not IPv6"),
    (b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n", "not an IP address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "not a number"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "not a number"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "not ended by CRLF"),
    (b"PROXY TCP4 " + b"1" * 200 + b"\r\n", "within 107 bytes"),
    (b"PROXY \xff\xfe 1 2\r\n", "not ASCII"),
    (pp.V2_SIGNATURE + bytes([0x31, 0x11, 0, 12]) + bytes(12), "version 3"),
    (pp.V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12), "command 2"),
    (pp.V2_SIGNATURE + bytes([0x21, 0x11, 0, 4]) + bytes(4), "fewer than its addresses"),
    (pp.V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]), "longer than this gateway takes"),
    (pp.V2_SIGNATURE + bytes([0x21, 0x11, 0, 14]) + bytes(12) + b"\x05\x00", "cut short"),
    (pp.V2_SIGNATURE + bytes([0x21, 0x11, 0, 16]) + bytes(12) + b"\x05\x00\x09\x00", "claims 9 bytes"),
    (pp.V2_SIGNATURE + bytes([0x21, 0x51, 0, 0]), "unknown address family"),
])
def test_bad_headers_say_what_is_wrong(raw, words):
    with pytest.raises(ProxyHeaderError, match=words):
        parse(raw)


def test_a_v1_line_of_exactly_the_longest_length_is_taken():
    src = "ffff:" * 7 + "ffff"
    line = f"PROXY TCP6 {src} {src} 65535 65535\r\n".encode()
    assert len(line) == 104 and parse(line).source[1] == 65535
    assert parse(b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n").length == 107


@pytest.mark.parametrize("text, expected", [
    ("10.1.2.3:443", ("10.1.2.3", 443)),
    ("2001:db8::1:22", ("2001:db8::1", 22)),
    ("[2001:db8::1]:22", ("2001:db8::1", 22)),
    ("::ffff:10.0.0.9:80", ("10.0.0.9", 80)),
    ("?", None),
    ("", None),
    ("10.0.0.1:99999", None),
])
def test_address_of_a_client_text(text, expected):
    got = pp.address(text)
    assert (None if got is None else (str(got[0]), got[1])) == expected
