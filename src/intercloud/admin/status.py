"""The status document served at /api/status (and read by ``intercloud status`` and tests)."""

from __future__ import annotations

import time


def status(gw) -> dict:
    now = time.time()
    tunnels, streams = [], []
    for t in sorted(gw.tunnels, key=lambda t: t.id):
        peer = t.conn.peer
        tunnels.append({
            "id": t.id, "peer_node": t.peer_node, "tenant": t.tenant, "peer_role": peer.role if peer else None,
            "peer_addr": t.peer_addr, "url": t.url or None, "age": round(now - t.opened_at, 3),
            "rtt_ms": round(t.rtt * 1000, 3) if t.rtt is not None else None,
            "streams": len(t.streams), "tls": t.tls.get("tls"), "cipher": t.tls.get("cipher"),
            "peer_cert": t.peer_cert.get("subject"), "peer_cert_sha256": t.peer_cert.get("fingerprint"),
            "peer_services": peer.services if peer else [],
            "draining": t.conn.goaway_received or t.conn.goaway_sent, "paused": t.paused,
        })
        for sid, s in t.streams.items():
            streams.append({
                "id": sid, "tunnel": t.id, "service": s.service, "side": s.side, "client": s.client,
                "target": s.target, "bytes_in": s.bytes_down, "bytes_out": s.bytes_up,
                "buffered": s.buffered, "send_credit": t.conn.credit(sid), "reading": s.reading,
                "age": round(time.monotonic() - s.started, 3),
            })
    services = []
    for svc in gw.config.services:
        entry = {"name": svc.name, "tenant": svc.tenant, "side": "accept" if svc.accept else "connect",
                 "endpoint": str(svc.accept or svc.connect)}
        if svc.accept:
            entry["routes"] = sorted({t.peer_node for t in gw.tunnels if svc.name in t.conn.peer.services
                                      and t.tenant == (svc.tenant or "default")})
        services.append(entry)
    tenants = []
    for spec in gw.config.tenants:
        tenants.append({"name": spec.name, "tunnels": sum(1 for t in gw.tunnels if t.tenant == spec.name),
                        "streams": gw.tenant_streams.get(spec.name, 0), "max_tunnels": spec.max_tunnels,
                        "max_streams": spec.max_streams})
    return {
        "node_id": gw.node_id, "tenants": tenants, "role": gw.role, "incarnation": gw.incarnation,
        "uptime": round(now - gw.started, 3), "ready": gw.is_ready(), "draining": gw.draining,
        "tunnels": tunnels, "streams": streams, "services": services,
        "counters": dict(gw.counters), "events": list(gw.events)[-50:],
    }
