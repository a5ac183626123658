"""Frame layout of the intercloud wire protocol (docs/protocol.md §2, §3).

Pure functions over bytes: no I/O, no clock. The hot path (DATA) never goes through
``encode``: the tunnel packs the 6-byte header straight into its send buffer with
``HEADER.pack_into`` so the payload is copied once, by the kernel read.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">BBI")
HEADER_SIZE = HEADER.size  # 6
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
TOKEN_SIZE = 16  # resume token bytes (protocol §10.2)
MAX_STREAM_ID = 0xFFFFFFFF
FLAG_RELAYED = 0x01  # on OPEN: a cloud member relays this stream for another member (protocol §3.2)


class FrameType(enum.IntEnum):
    """protocol §3."""

    HELLO = 0x01
    OPEN = 0x02
    OPEN_OK = 0x03
    OPEN_FAIL = 0x04
    DATA = 0x05
    WINDOW = 0x06
    FIN = 0x07
    RST = 0x08
    PING = 0x09
    PONG = 0x0A
    GOAWAY = 0x0B
    MEMBERS = 0x0C
    SERVICES = 0x0D
    RESUME = 0x0E
    ACK = 0x0F


CONNECTION_TYPES = frozenset(
    {FrameType.HELLO, FrameType.PING, FrameType.PONG, FrameType.GOAWAY, FrameType.MEMBERS, FrameType.SERVICES}
)
STREAM_TYPES = frozenset(set(FrameType) - CONNECTION_TYPES)


class Reason(enum.IntEnum):
    """protocol §7."""

    UNKNOWN_SERVICE = 1
    REFUSED = 2
    UNREACHABLE = 3
    LIMIT = 4
    DRAINING = 5
    ABORTED = 6
    PROTOCOL_ERROR = 7
    TIMEOUT = 8
    VERSION = 9
    FORBIDDEN = 10
    INTERNAL = 11
    PATH_LOST = 12  # a relay lost the other side: park and resume (§10)
    NOT_RESUMABLE = 13
    BUSY = 14

    @classmethod
    def name_of(cls, code: int) -> str:
        try:
            return cls(code).name
        except ValueError:
            return f"CODE_{code}"

    @classmethod
    def label(cls, code: int) -> str:
        """The code as a metric label value: its name, or OTHER for a code §7 does not define. The
        code comes from the peer (OPEN_FAIL, RST): CODE_<n> would let it create up to 65,536 series."""
        try:
            return cls(code).name
        except ValueError:
            return "OTHER"


class FrameError(ValueError):
    """A frame that cannot be decoded. The receiver treats it as a protocol error."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    stream_id: int
    payload: bytes = b""


def encode(ftype: int, stream_id: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    return HEADER.pack(ftype, 0, stream_id) + bytes(payload)


def decode(message: bytes | bytearray | memoryview) -> Frame:
    """Split one WebSocket message into a frame (protocol §2). Raises FrameError."""
    if len(message) < HEADER_SIZE:
        raise FrameError(f"frame of {len(message)} bytes is shorter than the 6-byte header")
    ftype, _flags, sid = HEADER.unpack_from(message, 0)
    try:
        ft = FrameType(ftype)
    except ValueError:
        raise FrameError(f"unknown frame type 0x{ftype:02x}") from None
    return Frame(ft, sid, bytes(message[HEADER_SIZE:]))


# --- payload codecs (protocol §3) -----------------------------------------------------

def encode_open(service: str, client: str) -> bytes:
    name = service.encode()
    if not 0 < len(name) < 256:
        raise ValueError(f"service name must be 1..255 bytes, got {len(name)}")
    return bytes((len(name),)) + name + client.encode()[:200]


def decode_open(payload: bytes) -> tuple[str, str]:
    if not payload:
        raise FrameError("OPEN without a service name")
    n = payload[0]
    if n == 0 or len(payload) < 1 + n:
        raise FrameError("OPEN service-name length runs past the frame")
    try:
        return payload[1 : 1 + n].decode(), payload[1 + n :].decode(errors="replace")
    except UnicodeDecodeError:
        raise FrameError("OPEN service name is not UTF-8") from None


def encode_reason(code: int, text: str) -> bytes:
    return _U16.pack(code) + text.encode()[:1000]


def decode_reason(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        raise FrameError("reason payload shorter than its 2-byte code")
    # capped as encode_reason caps it: a peer's text goes into log lines (protocol §5.3)
    return _U16.unpack_from(payload)[0], bytes(payload[2:4002]).decode(errors="replace")[:1000]


def encode_window(increment: int) -> bytes:
    return _U32.pack(increment)


def decode_window(payload: bytes) -> int:
    if len(payload) != 4:
        raise FrameError(f"WINDOW payload must be 4 bytes, got {len(payload)}")
    inc = _U32.unpack(payload)[0]
    if inc == 0:
        raise FrameError("WINDOW increment of 0")
    return inc


def encode_ack(held: int) -> bytes:
    return _U64.pack(held)


def decode_ack(payload: bytes) -> int:
    if len(payload) != 8:
        raise FrameError(f"ACK payload must be 8 bytes, got {len(payload)}")
    return _U64.unpack(payload)[0]


def encode_identity(token: bytes, node_id: str, incarnation: str) -> bytes:
    """OPEN_OK payload of a resumable stream (protocol §10.2)."""
    node, inc = node_id.encode(), incarnation.encode()
    return token + bytes((len(node),)) + node + bytes((len(inc),)) + inc


def decode_identity(payload: bytes) -> tuple[bytes, str, str] | None:
    """(token, node id, incarnation) from an OPEN_OK payload; None when empty (not resumable)."""
    if not payload:
        return None
    try:
        token = bytes(payload[:TOKEN_SIZE])
        n = payload[TOKEN_SIZE]
        node = bytes(payload[TOKEN_SIZE + 1:TOKEN_SIZE + 1 + n]).decode()
        m = payload[TOKEN_SIZE + 1 + n]
        inc = bytes(payload[TOKEN_SIZE + 2 + n:TOKEN_SIZE + 2 + n + m]).decode()
    except (IndexError, UnicodeDecodeError):
        raise FrameError("OPEN_OK resume identity is truncated or not UTF-8") from None
    if len(token) != TOKEN_SIZE or len(payload) != TOKEN_SIZE + 2 + n + m:
        raise FrameError(f"OPEN_OK resume identity of {len(payload)} bytes does not add up")
    return token, node, inc


def encode_json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def decode_json(payload: bytes, what: str) -> object:
    try:
        return json.loads(payload)
    # ValueError covers JSONDecodeError and int() digit limits; RecursionError deep nesting
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"{what} payload is not valid JSON: {exc}") from None
