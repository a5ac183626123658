"""The gateway's accounting (docs/operations.md §6): counters, labelled counters for /metrics, each
tenant's stream slots, recent events for the dashboard, and the OPENED and CLOSED lines of every
stream. What the admin endpoint reads (``snapshot``); nothing here routes or holds a connection."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from . import logs

if TYPE_CHECKING:
    from .tunnel.owner import StreamEnd, Tunnel

slog = logging.getLogger("intercloud.stream")
COUNTERS = ("streams_opened", "streams_closed", "open_failures", "route_timeouts", "bytes_up", "bytes_down",
            "tunnels_opened", "tunnels_closed", "liveness_misses", "protocol_errors", "internal_errors",
            "connections_refused")
#: Why a connection or handshake was refused before it carried anything (``GatewayStats.refused``):
#: the ``kind`` label of intercloud_connections_refused_by_total and of the audit log's refusal records.
REFUSAL_KINDS = ("acl", "max_connections", "max_rate", "proxy_protocol", "revoked", "tenant", "draining",
                 "no_route", "identity")


class GatewayStats:
    def __init__(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # labelled counters for /metrics: (name, ((label, value), ...)) -> count. Label values come
        # from the config or validated identities only, never a per-tunnel value (issue 12)
        self.labelled: dict[tuple[str, tuple], float] = {}
        self.tenant_streams: dict[str, int] = {}  # slots held: open and opening streams per tenant
        self.events: deque[dict] = deque(maxlen=200)
        # the audit log ([gateway] audit_log) when configured: it gets every refusal, stream close,
        # tunnel and peer link up/down from here
        self.audit = None

    def snapshot(self) -> dict:
        """Copies of the counters, for a status document or a metrics page."""
        return {"counters": dict(self.counters), "labelled": dict(self.labelled),
                "tenant_streams": dict(self.tenant_streams), "events": list(self.events)}

    # A tenant's stream counts from the moment it is accepted or its OPEN arrives (relayed OPENs
    # included), not from OPEN_OK: otherwise a burst of 1,000 clients all pass a max_streams of 20
    # while the first OPEN is still in flight (issue 12). The slot is freed once: by stream_closed
    # for a stream that opened, by its task's end for one that never did (refused, no route, the
    # client left, the target refused, the task cancelled before it ran).
    # The same slot counts the stream against its service's max_connections (``gate``, an
    # admission.ServiceGate) on the accept and connect sides; relay bridges pass no gate.
    def hold_slot(self, stream, gate=None) -> None:
        stream.counted = True
        self.tenant_streams[stream.tenant] = self.tenant_streams.get(stream.tenant, 0) + 1
        if gate is not None:
            stream.gate = gate
            gate.active += 1

    def free_slot(self, stream) -> None:
        if stream.counted:
            stream.counted = False
            self.tenant_streams[stream.tenant] -= 1
            gate = stream.gate
            if gate is not None:
                stream.gate = None
                gate.active -= 1

    def stream_opened(self, tunnel: Tunnel, stream: StreamEnd) -> None:
        self.counters["streams_opened"] += 1
        self.count("streams_opened", service=stream.service, tenant=stream.tenant)
        if tunnel.kind == "peer" or stream.side.startswith("relay"):
            self.count("relays", service=stream.service, tenant=stream.tenant,
                       direction="out" if tunnel.kind == "peer" and stream.side == "accept" else "in")
        stream.in_service = True  # its slot is freed by stream_closed from now on
        relayed = tunnel.kind == "peer"
        peer = tunnel.peer_node
        logs.emit(slog, logging.INFO,
                  f"[{stream.service}] OPENED: stream {stream.sid} {stream.client} -> {stream.target or peer} "
                  f"via {peer}{' (relay)' if relayed else ''} ({stream.side})",
                  {"event": "stream.opened", "service": stream.service, "stream": stream.sid,
                   "tunnel": tunnel.id, "client": stream.client, "target": stream.target,
                   "peer_node": peer, "side": stream.side, "relayed": relayed})

    def stream_closed(self, tunnel: Tunnel, stream: StreamEnd, reason: str) -> bool:
        """Count and log a stream's end; False for the outer end of a relay (its inner end does)."""
        if stream.side == "relay-out":  # a relayed stream is logged and counted once, by its inner end
            return False
        self.counters["streams_closed"] += 1
        self.free_slot(stream)
        self.counters["bytes_up"] += stream.bytes_up
        self.counters["bytes_down"] += stream.bytes_down
        self.count("bytes_out", stream.bytes_up, service=stream.service, tenant=stream.tenant)
        self.count("bytes_in", stream.bytes_down, service=stream.service, tenant=stream.tenant)
        dur = time.monotonic() - stream.started
        peer = tunnel.peer_node
        logs.emit(slog, logging.INFO,
                  f"[{stream.service}] CLOSED: stream {stream.sid} {stream.client} -> {stream.target or peer} "
                  f"via {peer}, {stream.bytes_up} bytes out, {stream.bytes_down} bytes in, {dur:.3f}s: {reason}",
                  {"event": "stream.closed", "service": stream.service, "stream": stream.sid,
                   "tunnel": tunnel.id, "client": stream.client, "target": stream.target,
                   "peer_node": peer, "bytes_out": stream.bytes_up,
                   "bytes_in": stream.bytes_down, "duration": round(dur, 6), "reason": reason})
        if self.audit is not None and stream.in_service:  # one that never opened: StreamDispatch audits it
            self.audit.stream_closed(tunnel, stream, reason)
        return True

    def refused(self, kind: str, why: str, *, client: str = "", service: str | None = None,
                tenant: str | None = None, peer: str | None = None, rule: str | None = None,
                log: bool = True) -> None:
        """One connection, handshake or tunnel refused before it carried anything: count it
        (intercloud_connections_refused_by_total{kind, service}), log one line naming the peer and the rule,
        keep it for the dashboard and hand it to the audit log. ``kind`` is one of REFUSAL_KINDS;
        ``why`` says what happened and what to do; ``rule`` is the config rule that matched (e.g.
        ``deny 10.0.0.0/8``). The line goes through the refusal rate limiter (logs.limited_refusal:
        a flood on a service port must not flood the log); ``log`` False: the caller logs it (the
        tunnel listener, through its own)."""
        assert kind in REFUSAL_KINDS, kind
        self.counters["connections_refused"] += 1
        self.count("connections_refused", kind=kind, service=service or "")
        where = f"[{service}] " if service else ""
        who = client or peer or "?"
        if log:
            logs.limited_refusal(slog, kind, who.rsplit(":", 1)[0] if client else who,
                                 f"{where}REFUSED {who} ({kind}): {why}",
                                 {"event": "conn.refused", "kind": kind, "service": service, "tenant": tenant,
                                  "client": client, "peer_node": peer, "rule": rule, "reason": why})
        self.event("conn.refused", refusal=kind, service=service, client=client, peer_node=peer, rule=rule,
                   reason=why)
        if self.audit is not None:
            self.audit.refused(kind, why, client=client, service=service, tenant=tenant, peer=peer, rule=rule)

    def tunnel_up(self, tunnel: Tunnel) -> None:
        """A tunnel or peer link was admitted (the audit log's ``tunnel`` and ``link`` records)."""
        if self.audit is not None:
            self.audit.tunnel_up(tunnel)

    def tunnel_down(self, tunnel: Tunnel, reason: str) -> None:
        if self.audit is not None:
            self.audit.tunnel_down(tunnel, reason)

    def count(self, name: str, n: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.labelled[key] = self.labelled.get(key, 0) + n

    def event(self, kind: str, **fields) -> None:
        self.events.append({"ts": time.time(), "event": kind, **fields})
