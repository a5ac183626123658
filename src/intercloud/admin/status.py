"""The status document served at /api/status (and read by ``intercloud status`` and tests)."""

from __future__ import annotations

import asyncio
import itertools
import time

from ..transport.sockopts import tcp_info


#: Streams listed per /api/status by default (?limit= up to MAX_STREAMS_LIMIT; ?offset= pages on).
#: A gateway may carry 100,000s of streams; listing them all would cost the event loop ~10 µs each
#: per scrape. ``streams_total`` always counts them all.
STREAMS_LIMIT = 1000
MAX_STREAMS_LIMIT = 10_000


def status(gw, limit: int = STREAMS_LIMIT, offset: int = 0) -> dict:
    """The status document, listing streams[offset:offset + limit] (in tunnel order, then stream id)."""
    now = time.time()
    snap = gw.stats.snapshot()
    tunnels, streams = [], []
    for t in sorted(gw.tunnels, key=lambda t: t.id):
        peer = t.peer
        tunnels.append({
            "id": t.id, "peer_node": t.peer_node, "tenant": t.tenant, "peer_role": peer.role if peer else None,
            "peer_addr": t.peer_addr, "url": t.url or None, "age": round(now - t.opened_at, 3),
            "rtt_ms": round(t.rtt * 1000, 3) if t.rtt is not None else None,
            "streams": len(t.streams), "tls": t.tls.get("tls"), "cipher": t.tls.get("cipher"),
            "peer_cert": t.peer_cert.get("subject"), "peer_cert_sha256": t.peer_cert.get("fingerprint"),
            "peer_services": peer.services if peer else [],
            "draining": t.goaway_received or t.goaway_sent, "paused": t.paused,
            "waiting_turns": t.turns_waiting, "queued": t.queued, "queue_limit": t.queue_limit, "turn": t.turn,
            "tcp": tcp_view(t.sock),
        })
    streams_total, skip, mono = 0, offset, time.monotonic()
    for t in gw.all_tunnels():
        n = len(t.streams)
        streams_total += n
        if skip >= n or len(streams) >= limit:  # a whole tunnel before the page, or the page is full
            skip -= min(skip, n)
            continue
        for sid, s in itertools.islice(t.streams.items(), skip, skip + limit - len(streams)):
            streams.append({
                "id": sid, "tunnel": t.id, "relay": t.kind == "peer", "service": s.service, "side": s.side, "client": s.client,
                "target": s.target, "bytes_in": s.bytes_down, "bytes_out": s.bytes_up,
                "buffered": s.buffered, "send_credit": t.send_credit(sid), "reading": s.reading,
                "age": round(mono - s.started, 3),
            })
        skip = 0
    services = []
    for svc in gw.config.services:
        entry = {"name": svc.name, "tenant": svc.tenant, "side": "accept" if svc.accept else "connect",
                 "endpoint": str(svc.accept or svc.connect)}
        if svc.accept:
            entry["routes"] = sorted({t.peer_node for t in gw.tunnels if svc.name in t.peer.services
                                      and t.tenant == (svc.tenant or "default")})
        services.append(entry)
    members = _members(gw, now)
    tenants = []
    for spec in gw.config.tenants:
        tenants.append({"name": spec.name, "tunnels": sum(1 for t in gw.tunnels if t.tenant == spec.name),
                        "streams": snap["tenant_streams"].get(spec.name, 0), "max_tunnels": spec.max_tunnels,
                        "max_streams": spec.max_streams})
    cluster = getattr(gw, "cluster", None)
    if hasattr(gw, "dial_targets_view"):
        dial_targets = gw.dial_targets_view()
    else:
        dial_targets = cluster.peer_targets.view() if cluster is not None else []
    peer_links = [{"id": t.id, "peer_node": t.peer_node, "peer_addr": t.peer_addr, "url": t.url or None,
                   "age": round(now - t.opened_at, 3),
                   "rtt_ms": round(t.rtt * 1000, 3) if t.rtt is not None else None,
                   "streams": len(t.streams), "tcp": tcp_view(t.sock)}
                  for t in sorted(cluster.links, key=lambda t: t.id)] if cluster is not None else []
    return {
        "node_id": gw.node_id, "members": members, "dial_targets": dial_targets, "tenants": tenants, "role": gw.role, "incarnation": gw.incarnation,
        "uptime": round(now - gw.started, 3), "ready": gw.is_ready(), "draining": gw.draining,
        "tunnels": tunnels, "peer_links": peer_links, "streams": streams, "streams_total": streams_total,
        "streams_offset": offset, "streams_limit": limit, "services": services,
        "counters": snap["counters"], "events": snap["events"][-50:],
        "duplicate_identities": gw.duplicate_identities(),
        "buffers": _buffers(gw),  # protocol §6.4
        "resume": gw.parking.snapshot(),  # protocol §10: parked now, resumed, failed, bytes replayed
        "crl": gw.crl_view(),  # [tls] crl and [cluster] crl: dates, revoked count, stale (operations §10.2)
        "tasks": len(asyncio.all_tasks()),  # asyncio tasks of the process (the chaos soak checks it stays flat)
    }


_U64_MAX = (1 << 64) - 1


def tcp_view(sock) -> dict | None:
    """The ``tcp`` object of a tunnel or peer link: its TCP connection as the kernel sees it (TCP_INFO,
    transport/sockopts.py), in the units its keys name. None when the socket is gone or not TCP."""
    i = tcp_info(sock)
    if i is None:
        return None

    def ms(key: str) -> float | None:
        return round(i[key] / 1000, 3) if key in i else None

    def bps(key: str) -> int | None:  # bytes/s in TCP_INFO; ~0 means no pacing
        v = i.get(key)
        return None if v is None or v == _U64_MAX else v * 8

    return {"congestion": i["congestion"], "rtt_ms": ms("rtt"), "rttvar_ms": ms("rttvar"), "min_rtt_ms": ms("min_rtt"),
            "cwnd": i["snd_cwnd"], "retransmits": i["total_retrans"], "bytes_retrans": i.get("bytes_retrans"),
            "bytes_sent": i.get("bytes_sent"), "unacked": i["unacked"], "notsent_bytes": i.get("notsent_bytes"),
            "send_queue_bytes": i["send_queue"], "notsent_lowat": i["notsent_lowat"],
            "delivery_rate_bps": bps("delivery_rate"), "pacing_rate_bps": bps("pacing_rate")}


def _buffers(gw) -> dict | None:
    """The process-wide buffer budget (protocol §6.4)."""
    b = getattr(gw, "budget", None)
    if b is None:
        return None
    return {"buffered": b.buffered, "committed": b.committed, "budget": b.limit, "holders": b.holders,
            "waiting": len(b.waiting), "exhausted": b.exhausted}


def _members(gw, now: float) -> list[dict]:
    """Cloud members as this gateway sees them, each marked up or down.

    A cloud member: itself, plus the cluster table; a peer is "up" while a peer link to it is live.
    An on-prem gateway: the members vouched for by a live member; "up" while it holds a tunnel to it.
    """
    mono = time.monotonic()
    out = []
    cluster = getattr(gw, "cluster", None)
    if gw.role == "cloud":
        linked = {l.peer_node for l in cluster.links} if cluster else set()
        table = cluster.table.members.values() if cluster else []
        seen = set()
        for m in sorted(table, key=lambda m: m.node_id):
            seen.add(m.node_id)
            me = m.node_id == gw.node_id
            out.append({"node_id": m.node_id, "self": me, "up": me or m.node_id in linked, "url": m.url,
                        "incarnation": m.incarnation, "routes": sorted(m.services),
                        "last_heard_s": round(mono - m.last_heard, 3)})
        if gw.node_id not in seen:
            out.insert(0, {"node_id": gw.node_id, "self": True, "up": True, "url": None,
                           "incarnation": gw.incarnation, "routes": [], "last_heard_s": 0.0})
        return out
    cov: dict[str, int] = {}
    for t in gw.tunnels:
        cov[t.peer_node] = cov.get(t.peer_node, 0) + 1
    known = gw.known_members() if hasattr(gw, "known_members") else {}
    for node in sorted(set(known) | set(cov)):
        m = known.get(node, {})
        out.append({"node_id": node, "self": False, "up": cov.get(node, 0) > 0, "tunnels": cov.get(node, 0),
                    "wanted": gw.config.tunnel.per_member, "url": m.get("url"), "incarnation": m.get("incarnation")})
    return out
