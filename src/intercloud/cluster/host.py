"""What the cluster needs of the cloud gateway it runs in (docs/architecture.md §3): a narrow
interface, so that cluster/ does not import cloud/ and no private attribute crosses the boundary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..tunnel.owner import GatewaySide

if TYPE_CHECKING:
    from ..revocation import Revocations
    from ..stats import GatewayStats
    from ..tunnel.owner import StreamEnd
    from ..tunnel.tunnel import Tunnel


class ClusterHost(GatewaySide, Protocol):
    draining: bool
    stats: GatewayStats  # the audit log's link records (tunnel_up, tunnel_down)

    def route_keys(self) -> set[str]:
        """"tenant/service" for every service our own on-prem tunnels connect (our route set)."""

    def routes_changed(self) -> None:
        """Peer links or member routes changed: waiting clients may have a route now."""

    def members_changed(self, view: list[dict]) -> None:
        """The member list on-prem gateways see changed: push it to our tunnels."""

    def relay_requested(self, link: Tunnel, sid: int, tenant: str, service: str, client: str) -> None:
        """A member asks us to carry a stream over one of our own tunnels (protocol §3.2)."""

    def relay_resume_requested(self, link: Tunnel, sid: int, tenant: str, service: str, resume: dict) -> None:
        """A member relays a RESUME to us (protocol §10.5): carry it to the far end instance only."""

    def park(self, end: StreamEnd, tunnel: Tunnel, reason: str, silent: bool) -> bool:
        """A stream on a peer link lost its path: park it (protocol §10.4)."""

    def stream_closed(self, tunnel: Tunnel, end: StreamEnd, reason: str) -> None:
        """Account for and log a stream that rode a peer link."""

    def watch_handshake(self, tunnel: Tunnel) -> None:
        """Watch an accepted peer link for liveness until its HELLO (like any tunnel)."""

    def handshake_done(self, tunnel: Tunnel) -> None: ...

    def add_listener(self, server) -> None:
        """A listening server to close at drain."""

    def event(self, kind: str, **fields) -> None:
        """A line for the dashboard's recent events."""

    def refuse_revoked(self, tunnel: Tunnel, revocations: Revocations, what: str) -> str | None:
        """Why a peer's certificate is refused as revoked (cluster.crl), logged and counted; or None."""

    def close_revoked(self, tunnels, revocations: Revocations, what: str) -> None:
        """After a reload: close the links whose peer certificate ``revocations`` now revokes."""
