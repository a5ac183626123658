"""The protocol's stream states and transition table (protocol §4.2), its errors, and the events
``Connection.receive`` returns."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .frames import FrameType

PROTOCOL_VERSION = 1


class State(enum.IntEnum):
    IDLE = 0
    OPENING_OUT = 1
    OPENING_IN = 2
    OPEN = 3
    HALF_CLOSED_LOCAL = 4
    HALF_CLOSED_REMOTE = 5
    CLOSED = 6


S = State
F = FrameType
SEND, RECV = "send", "recv"

# protocol §4.2: (state, direction, frame type) -> next state
_TRANSITIONS: dict[tuple[State, str, FrameType], State] = {
    (S.IDLE, SEND, F.OPEN): S.OPENING_OUT,
    (S.IDLE, RECV, F.OPEN): S.OPENING_IN,
    (S.IDLE, SEND, F.RESUME): S.OPENING_OUT,  # §10.5: a RESUME opens its new id as OPEN does
    (S.IDLE, RECV, F.RESUME): S.OPENING_IN,
    (S.OPENING_OUT, SEND, F.DATA): S.OPENING_OUT,  # early data, §4.5: only as much as the peer announced
    (S.OPENING_OUT, RECV, F.OPEN_OK): S.OPEN,
    (S.OPENING_OUT, RECV, F.OPEN_FAIL): S.CLOSED,
    (S.OPENING_OUT, SEND, F.RST): S.CLOSED,
    (S.OPENING_OUT, RECV, F.RST): S.CLOSED,
    (S.OPENING_IN, RECV, F.DATA): S.OPENING_IN,  # early data, §4.5: only as much as we announced
    (S.OPENING_IN, SEND, F.OPEN_OK): S.OPEN,
    (S.OPENING_IN, SEND, F.OPEN_FAIL): S.CLOSED,
    (S.OPENING_IN, SEND, F.RST): S.CLOSED,
    (S.OPENING_IN, RECV, F.RST): S.CLOSED,
    (S.OPEN, SEND, F.DATA): S.OPEN,
    (S.OPEN, RECV, F.DATA): S.OPEN,
    (S.OPEN, SEND, F.WINDOW): S.OPEN,
    (S.OPEN, RECV, F.WINDOW): S.OPEN,
    (S.OPEN, SEND, F.ACK): S.OPEN,  # §10.3
    (S.OPEN, RECV, F.ACK): S.OPEN,
    (S.OPEN, SEND, F.FIN): S.HALF_CLOSED_LOCAL,
    (S.OPEN, RECV, F.FIN): S.HALF_CLOSED_REMOTE,
    (S.OPEN, SEND, F.RST): S.CLOSED,
    (S.OPEN, RECV, F.RST): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, RECV, F.DATA): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, SEND, F.WINDOW): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, RECV, F.WINDOW): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, SEND, F.ACK): S.HALF_CLOSED_LOCAL,  # §10.3
    (S.HALF_CLOSED_LOCAL, RECV, F.ACK): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, RECV, F.FIN): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, SEND, F.RST): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, RECV, F.RST): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, SEND, F.DATA): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, SEND, F.WINDOW): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, RECV, F.WINDOW): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, SEND, F.ACK): S.HALF_CLOSED_REMOTE,  # §10.3
    (S.HALF_CLOSED_REMOTE, RECV, F.ACK): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, SEND, F.FIN): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, SEND, F.RST): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, RECV, F.RST): S.CLOSED,
}


def transition(state: State, direction: str, ftype: FrameType) -> State | None:
    """The next state, or None when the table has no such transition (protocol §4.2)."""
    return _TRANSITIONS.get((state, direction, ftype))


class ProtocolError(Exception):
    """The peer broke the protocol. The tunnel must be closed (protocol §9.2)."""

    def __init__(self, message: str, stream_id: int = 0):
        super().__init__(message)
        self.stream_id = stream_id


class LocalProtocolError(RuntimeError):
    """This side tried something the protocol forbids: a bug in the caller."""


# --- events ------------------------------------------------------------------------------

@dataclass(slots=True)
class Hello:
    node_id: str
    role: str
    services: list[str]
    window: int
    max_frame: int
    max_streams: int
    incarnation: str
    early_data: int = 0  # bytes the peer accepts on a stream before it answers OPEN (§4.5)
    extra: dict = field(default_factory=dict)


@dataclass(slots=True)
class StreamOpened:
    stream_id: int
    service: str
    client: str
    relayed: bool = False  # OPEN flag RELAYED (protocol §3.2): never relay it again
    resume: dict | None = None  # a RESUME (§10.5): token (bytes), far (node, incarnation), offset


@dataclass(slots=True)
class Acked:
    stream_id: int
    held: int  # the far end holds this many bytes of the stream (§10.3)


@dataclass(slots=True)
class OpenAccepted:
    stream_id: int
    payload: bytes = b""  # resume identity (§10.2) or, answering a RESUME, {"offset": N} (§10.5)


@dataclass(slots=True)
class OpenRefused:
    stream_id: int
    code: int
    text: str


@dataclass(slots=True)
class Data:
    stream_id: int
    data: memoryview


@dataclass(slots=True)
class CreditAvailable:
    stream_id: int
    credit: int


@dataclass(slots=True)
class RemoteFin:
    stream_id: int
    closed: bool  # both directions are now finished


@dataclass(slots=True)
class RemoteReset:
    stream_id: int
    code: int
    text: str


@dataclass(slots=True)
class Ping:
    payload: bytes


@dataclass(slots=True)
class Pong:
    payload: bytes


@dataclass(slots=True)
class GoAway:
    code: int
    text: str


@dataclass(slots=True)
class Members:
    members: list


@dataclass(slots=True)
class ServicesChanged:
    services: list[str]


Event = (
    Hello | StreamOpened | OpenAccepted | OpenRefused | Data | CreditAvailable | RemoteFin
    | RemoteReset | Ping | Pong | GoAway | Members | ServicesChanged
)
