"""Sans-I/O core of the intercloud wire protocol (docs/protocol.md)."""

from .connection import (  # noqa: F401
    Acked, Connection, CreditAvailable, Data, GoAway, Hello, LocalProtocolError, Members, OpenAccepted,
    OpenRefused, Ping, Pong, ProtocolError, RemoteFin, RemoteReset, ServicesChanged, State, StreamOpened,
)
from .frames import FrameType, Reason  # noqa: F401
