"""Frame layout and payload codecs (docs/protocol.md §2, §3, §7)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercloud.protocol import frames
from intercloud.protocol.frames import (
    CONNECTION_TYPES, HEADER_SIZE, STREAM_TYPES, Frame, FrameError, FrameType, Reason,
)

F = FrameType
FAST = settings(max_examples=200, deadline=None)
DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def utf8_max(n: int) -> st.SearchStrategy[str]:
    """Text whose UTF-8 encoding is at most n bytes."""
    return st.text(max_size=n).filter(lambda t: len(t.encode()) <= n)


# --- header ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_header_round_trip(ftype: FrameType) -> None:
    wire = frames.encode(ftype, 0x01020304, b"payload")
    assert wire == bytes((ftype, 0, 1, 2, 3, 4)) + b"payload"
    assert frames.decode(wire) == Frame(ftype, 0x01020304, b"payload")
    assert frames.decode(frames.encode(ftype, 0)) == Frame(ftype, 0, b"")


@pytest.mark.parametrize("n", range(HEADER_SIZE))
def test_short_frame(n: int) -> None:
    with pytest.raises(FrameError, match=f"frame of {n} bytes is shorter"):
        frames.decode(bytes([F.DATA] * n))


@pytest.mark.parametrize("code", [0x00, max(FrameType) + 1, max(FrameType) + 2, 0x7F, 0x80, 0xFF])
def test_unknown_type(code: int) -> None:
    with pytest.raises(FrameError, match=f"unknown frame type 0x{code:02x}"):
        frames.decode(bytes((code, 0, 0, 0, 0, 1)) + b"xyz")


def test_flags_are_ignored_and_sent_as_zero() -> None:
    assert frames.encode(F.PING, 0, bytes(8))[1] == 0
    assert frames.decode(bytes((F.FIN, 0xA5, 0, 0, 0, 7))) == Frame(F.FIN, 7, b"")


def test_stream_and_connection_types_partition_the_types() -> None:
    assert CONNECTION_TYPES | STREAM_TYPES == set(FrameType)
    assert not CONNECTION_TYPES & STREAM_TYPES
    assert STREAM_TYPES == {F.OPEN, F.OPEN_OK, F.OPEN_FAIL, F.DATA, F.WINDOW, F.FIN, F.RST, F.RESUME, F.ACK}


# --- OPEN ------------------------------------------------------------------------------------

@FAST
@given(service=utf8_max(255).filter(lambda t: t != ""), client=utf8_max(200))
def test_open_round_trip(service: str, client: str) -> None:
    payload = frames.encode_open(service, client)
    assert payload[0] == len(service.encode())
    assert frames.decode_open(payload) == (service, client)


def test_open_client_address_is_truncated_to_200_bytes() -> None:
    service, client = frames.decode_open(frames.encode_open("svc", "a" * 199 + "é" + "b" * 50))
    assert service == "svc"
    assert client == "a" * 199 + "\ufffd"  # cut inside the 2-byte "é": replaced, not an error


@pytest.mark.parametrize("service", ["", "x" * 256, "é" * 128])
def test_encode_open_bad_name_length(service: str) -> None:
    with pytest.raises(ValueError, match="service name must be 1..255 bytes"):
        frames.encode_open(service, "client")


def test_encode_open_longest_name() -> None:
    assert frames.decode_open(frames.encode_open("x" * 255, "")) == ("x" * 255, "")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "without a service name"),
        (b"\x00", "runs past the frame"),  # a zero-length name
        (b"\x00client", "runs past the frame"),
        (b"\x05abcd", "runs past the frame"),
        (b"\xffabc", "runs past the frame"),
        (b"\x02\xff\xfe", "not UTF-8"),
    ],
)
def test_decode_open_errors(payload: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        frames.decode_open(payload)


def test_decode_open_exact_and_bad_client_text() -> None:
    assert frames.decode_open(b"\x03abc") == ("abc", "")
    assert frames.decode_open(b"\x03abc\xff") == ("abc", "\ufffd")  # client is for logs only


# --- reasons (OPEN_FAIL, RST, GOAWAY) --------------------------------------------------------

@FAST
@given(code=st.integers(0, 0xFFFF), text=utf8_max(1000))
def test_reason_round_trip(code: int, text: str) -> None:
    payload = frames.encode_reason(code, text)
    assert payload[:2] == code.to_bytes(2, "big")
    assert frames.decode_reason(payload) == (code, text)


def test_reason_text_is_truncated_to_1000_bytes() -> None:
    code, text = frames.decode_reason(frames.encode_reason(Reason.INTERNAL, "z" * 5000))
    assert (code, text) == (Reason.INTERNAL, "z" * 1000)


@pytest.mark.parametrize("payload", [b"", b"\x00"])
def test_decode_reason_short(payload: bytes) -> None:
    with pytest.raises(FrameError, match="shorter than its 2-byte code"):
        frames.decode_reason(payload)


def test_decode_reason_bare_code_and_bad_text() -> None:
    assert frames.decode_reason(b"\x00\x07") == (7, "")
    assert frames.decode_reason(b"\x00\x02\xc3") == (2, "\ufffd")


def test_reason_names() -> None:
    assert Reason.name_of(4) == "LIMIT"
    assert Reason.name_of(999) == "CODE_999"


def test_reason_labels_are_a_closed_set() -> None:
    # metric labels: a peer's made-up codes all count as OTHER, not one series each
    assert Reason.label(4) == "LIMIT"
    assert {Reason.label(code) for code in range(1 << 16)} == {r.name for r in Reason} | {"OTHER"}


# --- WINDOW ----------------------------------------------------------------------------------

@FAST
@given(st.integers(1, 2**32 - 1))
def test_window_round_trip(increment: int) -> None:
    payload = frames.encode_window(increment)
    assert len(payload) == 4 and int.from_bytes(payload, "big") == increment
    assert frames.decode_window(payload) == increment


def test_window_of_zero() -> None:
    with pytest.raises(FrameError, match="WINDOW increment of 0"):
        frames.decode_window(bytes(4))


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 8])
def test_window_of_wrong_size(size: int) -> None:
    with pytest.raises(FrameError, match=f"WINDOW payload must be 4 bytes, got {size}"):
        frames.decode_window(b"\x01" * size)


# --- JSON (HELLO, MEMBERS) -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@FAST
@given(json_values)
def test_json_round_trip(value) -> None:
    payload = frames.encode_json(value)
    assert frames.decode_json(payload, "HELLO") == value
    assert payload == json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


@pytest.mark.parametrize(
    "payload",
    [
        b"", b"{", b"{'a': 1}", b"[1,]", b"\xff\xfe\xfa", b"{\"a\": 1} trailing", b"\xc3\x28",
        b"[" * 100_000,  # nesting deeper than the recursion limit
        b"1" * 5000,  # beyond Python's int-from-string digit limit
    ],
    ids=["empty", "open-brace", "single-quotes", "trailing-comma", "binary", "trailing-data",
         "bad-utf8", "deep-nesting", "huge-int"],
)
def test_bad_json(payload: bytes) -> None:
    with pytest.raises(FrameError, match="MEMBERS payload is not valid JSON"):
        frames.decode_json(payload, "MEMBERS")


# --- the doc's tables are the code's tables --------------------------------------------------

def doc_table(section: str) -> list[list[str]]:
    text = DOC.read_text()
    start = text.index(f"\n## {section}")
    body = text[start : text.index("\n## ", start + 1)]
    rows = [ln for ln in body.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows[2:]]


def test_frame_types_match_doc() -> None:
    rows = doc_table("3. Frame types")
    assert {name: int(code, 16) for code, name, *_ in rows} == {t.name: t.value for t in FrameType}
    assert {FrameType[name] for _, name, sid, _ in rows if sid == "0"} == CONNECTION_TYPES


def test_reasons_match_doc() -> None:
    rows = doc_table("7. Reason codes")
    assert {name: int(code) for code, name, _ in rows} == {r.name: r.value for r in Reason}


def test_header_size_matches_doc() -> None:
    assert re.search(r"The header is (\d+) bytes", DOC.read_text()).group(1) == str(HEADER_SIZE)
