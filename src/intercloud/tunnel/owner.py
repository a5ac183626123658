"""The two interfaces of a Tunnel (docs/architecture.md §2).

A :class:`Tunnel` owns one WebSocket, its protocol ``Connection`` and every stream on it. Above it
sits its owner (the gateway for tunnels, the cluster for peer links), which it tells what happened
(:class:`TunnelOwner`); on each stream sits an end (:class:`StreamEnd`): the local TCP socket
(``LocalStream``) or one half of a relay (``BridgeEnd``). Nothing else writes a tunnel's state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .turns import TurnTaker

if TYPE_CHECKING:
    from ..config import Config
    from ..protocol import Connection
    from .budget import BufferBudget


class Tunnel(Protocol):
    """What a stream end and an owner see of a tunnel (tunnel.Tunnel is the one implementation; this
    name keeps the modules of tunnel/ free of import cycles)."""

    id: int
    conn: Connection  # for the ends inside tunnel/ only: nothing outside tunnel/ touches it
    kind: str
    tenant: str
    peer_node: str
    label: str

    resumable: bool
    keep_max: int

    def send_frame(self, frame: bytes) -> None: ...

    def send_data(self, end: StreamEnd, n: int) -> None: ...

    def send_payload(self, sid: int, payload: memoryview) -> None: ...

    def read_buffer(self, sid: int) -> memoryview: ...

    def hold(self) -> None: ...

    def flush(self) -> None: ...

    def stream_finished(self, end: StreamEnd, reason: str) -> None: ...


class StreamEnd(TurnTaker, Protocol):
    """What a tunnel needs of the thing at the end of one of its streams."""

    service: str
    tenant: str
    side: str  # "accept", "connect", "relay-in", "relay-out"
    client: str
    target: str
    tunnel: Tunnel | None
    sid: int
    started: float
    bytes_up: int
    bytes_down: int
    counted: bool  # holds one of its tenant's stream slots (the gateway's accounting)
    in_service: bool  # opened and logged
    finished: bool

    def attach(self, tunnel: Tunnel, sid: int) -> None: ...

    def take_sent(self) -> None:
        """Before OPEN: pick up what the client sent already, to leave with the OPEN."""

    def begin_early(self) -> None:
        """After OPEN: send early data while the peer's allowance lasts (protocol §4.5)."""

    def start(self) -> None: ...

    def deliver(self, data: memoryview) -> None: ...

    def on_credit(self) -> None: ...

    def on_remote_fin(self, closed: bool) -> None: ...

    def on_ack(self, held: int) -> None:
        """The far end holds ``held`` bytes of what this end sent (protocol §10.3)."""

    def path_lost(self, reason: str, silent: bool) -> None:
        """The tunnel closed and the stream could not park: end it (a relay end: PATH_LOST)."""

    def abort(self, code: int, text: str, tell_peer: bool = True) -> None: ...


class GatewaySide(Protocol):
    """Who this side of a tunnel is and what it shares: the gateway's config, identity, buffer
    budget and counters (a TunnelOwner has them, and so does the gateway behind a cluster)."""

    config: Config
    node_id: str
    role: str
    incarnation: str
    budget: BufferBudget
    counters: dict[str, int]


class TunnelOwner(GatewaySide, Protocol):
    """What a tunnel tells, and asks, whoever holds it (the gateway, or the cluster for peer links)."""

    def classify(self, tunnel: Tunnel) -> None:
        """The TLS session is up: decide what the tunnel is (a cloud: its tenant) before HELLO."""

    def screen(self, tunnel: Tunnel) -> str | None:
        """A reason to refuse an accepted tunnel on its certificate alone, before our HELLO."""

    def connect_service_names(self, tunnel: Tunnel) -> list[str]:
        """What our HELLO says this side connects."""

    def hello_extra(self, tunnel: Tunnel) -> dict:
        """Further HELLO keys (members, advertise, link)."""

    def tunnel_ready(self, tunnel: Tunnel) -> None:
        """The peer's HELLO arrived: admit or refuse the tunnel."""

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None: ...

    def stream_requested(self, tunnel: Tunnel, sid: int, service: str, client: str) -> None:
        """The peer sent OPEN: answer it with tunnel.accept/refuse (maybe from a tracked task)."""

    def stream_closed(self, tunnel: Tunnel, end: StreamEnd, reason: str) -> None: ...

    def park(self, end: StreamEnd, tunnel: Tunnel, reason: str, silent: bool) -> bool:
        """``end``'s path broke: park it to resume elsewhere (protocol §10.4), or False to reset it."""

    def resume_requested(self, tunnel: Tunnel, sid: int, service: str, resume: dict) -> None:
        """The peer sent RESUME (protocol §10.5): answer it with tunnel.accept_resume/refuse."""

    def goaway_received(self, tunnel: Tunnel) -> None: ...

    def services_changed(self, tunnel: Tunnel) -> None: ...

    def members_received(self, tunnel: Tunnel, members: list) -> None: ...
