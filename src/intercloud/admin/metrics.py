"""Prometheus metrics, computed from the gateway's state at scrape time (nothing on the hot path;
admin/server.py serves a render to all scrapers for a while, so their number does not matter)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..revocation import describe
from ..transport import sockopts


class _Collector:
    def __init__(self, gw):
        self.gw = gw

    def collect(self):
        gw = self.gw
        snap = gw.stats.snapshot()  # the accounting, copied once per scrape
        c = snap["counters"]
        # one pass over the streams (there may be 100,000s): bytes of live streams, streams per service
        live_up = live_down = kept = 0
        per_svc: dict[str, int] = {}
        for t in gw.tunnels:
            for st in t.streams.values():
                live_up += st.bytes_up
                live_down += st.bytes_down
                per_svc[st.service] = per_svc.get(st.service, 0) + 1
                kept += getattr(st, "kept_len", 0)  # a relay's BridgeEnd keeps nothing
        parking = gw.parking
        for st in parking.parked:
            kept += st.kept_len
        g = GaugeMetricFamily("intercloud_tunnels", "Live tunnels", labels=["peer_node"])
        per_peer: dict[str, int] = {}
        for t in gw.tunnels:
            per_peer[t.peer_node] = per_peer.get(t.peer_node, 0) + 1
        for peer, n in sorted(per_peer.items()):
            g.add_metric([peer], n)
        yield g
        s = GaugeMetricFamily("intercloud_streams", "Open streams", labels=["service"])
        for svc, n in sorted(per_svc.items()):
            s.add_metric([svc], n)
        yield s
        yield CounterMetricFamily("intercloud_bytes_out", "Bytes read from local sockets into tunnels",
                                  value=c["bytes_up"] + live_up)
        yield CounterMetricFamily("intercloud_bytes_in", "Bytes written from tunnels to local sockets",
                                  value=c["bytes_down"] + live_down)
        for key in ("streams_opened", "streams_closed", "open_failures", "route_timeouts", "tunnels_opened",
                    "tunnels_closed", "liveness_misses", "internal_errors", "connections_refused"):
            yield CounterMetricFamily(f"intercloud_{key}", key.replace("_", " "), value=c[key])
        # resume (protocol §10)
        yield GaugeMetricFamily("intercloud_streams_parked_now", "Streams parked now, waiting to resume on another path",
                                value=len(parking.parked))
        yield GaugeMetricFamily("intercloud_resume_kept_bytes",
                                "Bytes sent and kept until the far end ACKs them (resume), all streams",
                                value=kept)
        for key, text in (("streams_parked", "streams parked when their path broke"),
                          ("streams_resumed", "parked streams resumed on another path"),
                          ("resume_failures", "parked streams reset: no path in time, or the far end is gone"),
                          ("resume_refusals", "RESUMEs refused (unknown, forged or stale token, or stream busy)"),
                          ("bytes_replayed", "bytes sent again after resumes")):
            yield CounterMetricFamily(f"intercloud_{key}", text, value=c.get(key, 0))
        tt = GaugeMetricFamily("intercloud_tenant_tunnels", "Live tunnels per tenant", labels=["tenant"])
        ts = GaugeMetricFamily("intercloud_tenant_streams", "Open streams per tenant", labels=["tenant"])
        for spec in gw.config.tenants:
            tt.add_metric([spec.name], sum(1 for t in gw.tunnels if t.tenant == spec.name))
            ts.add_metric([spec.name], snap["tenant_streams"].get(spec.name, 0))
        yield tt
        yield ts
        families: dict[str, CounterMetricFamily] = {}
        for (name, labels), value in sorted(snap["labelled"].items()):
            keys = [k for k, _ in labels]
            fam_key = f"{name}|{','.join(keys)}"
            fam = families.get(fam_key)
            if fam is None:
                fam = families[fam_key] = CounterMetricFamily(
                    f"intercloud_{name}_by", f"{name.replace('_', ' ')} by {', '.join(keys)}", labels=keys)
            fam.add_metric([str(v) for _, v in labels], value)
        yield from families.values()
        dup = GaugeMetricFamily("intercloud_duplicate_identity",
                                "Live gateway instances (incarnations) sharing one node id, where more than one",
                                labels=["peer_node"])
        for node, incs in gw.duplicate_identities().items():
            dup.add_metric([node], len(incs))
        yield dup
        yield GaugeMetricFamily("intercloud_ready", "1 when /readyz is 200", value=1 if gw.is_ready() else 0)
        # the audit log (docs/operations.md §10.3); zeros without one, so alerts need no special case
        audit = gw.stats.audit
        dropped = CounterMetricFamily("intercloud_audit_dropped", "Audit log records dropped: queue full (the writer "
                                      "is behind) or write failed (disk full)", labels=["reason"])
        dropped.add_metric(["queue_full"], audit.dropped_full if audit is not None else 0)
        dropped.add_metric(["write_failed"], audit.dropped_failed if audit is not None else 0)
        yield dropped
        yield CounterMetricFamily("intercloud_audit_records", "Audit log records written",
                                  value=audit.written if audit is not None else 0)
        yield from _crl(gw)
        yield from _tcp(gw)
        b = getattr(gw, "budget", None)
        if b is not None:  # protocol §6.4
            yield GaugeMetricFamily("intercloud_buffered_bytes",
                                    "Bytes received from tunnels and queued in user space toward local sockets",
                                    value=b.buffered)
            yield GaugeMetricFamily("intercloud_buffer_committed_bytes",
                                    "Credit granted beyond the streams' initial windows (counts against the budget)",
                                    value=b.committed)
            yield GaugeMetricFamily("intercloud_buffer_budget_bytes", "[gateway] max_buffered", value=b.limit)
            yield GaugeMetricFamily("intercloud_buffer_waiting_streams",
                                    "Streams waiting for budget to grow their window", value=len(b.waiting))
            yield CounterMetricFamily("intercloud_buffer_budget_exhausted",
                                      "Times a stream wanted a larger window and the budget was spent",
                                      value=b.exhausted)


# (metric, help, TCP_INFO key, how the live connections' values combine, scale)
_TCP_GAUGES = (
    ("rtt_max_seconds", "Largest smoothed TCP round-trip time among live connections", "rtt", max, 1e-6),
    ("retransmits", "TCP segments retransmitted over the lives of the live connections", "total_retrans", sum, 1),
    ("sent_bytes", "Bytes the live connections sent, retransmissions included", "bytes_sent", sum, 1),
    ("retransmitted_bytes", "Bytes the live connections retransmitted", "bytes_retrans", sum, 1),
    ("notsent_bytes", "Bytes in the kernels' send queues not sent yet (tunnel.notsent_lowat bounds each)",
     "notsent_bytes", sum, 1),
    ("send_queue_bytes", "Bytes in the kernels' send queues not acknowledged yet (unsent included)", "send_queue",
     sum, 1),
)


def _tcp(gw):
    """TCP_INFO of the live tunnels and peer links (transport/sockopts.py), by kind. No series per
    tunnel: /metrics gains no series when tunnels come (tests/security/test_metric_series.py); each
    tunnel's own numbers are in /api/status (``tcp``)."""
    cluster = getattr(gw, "cluster", None)
    kinds = {"tunnel": [sockopts.tcp_info(t.sock) for t in gw.tunnels]}
    if cluster is not None:
        kinds["peer"] = [sockopts.tcp_info(t.sock) for t in cluster.links]
    for name, text, key, combine, scale in _TCP_GAUGES:
        fam = GaugeMetricFamily(f"intercloud_tunnel_tcp_{name}", f"{text} (kind: tunnel or peer link)",
                                labels=["kind"])
        for kind, infos in kinds.items():
            values = [i[key] for i in infos if i is not None and i.get(key) is not None]
            fam.add_metric([kind], combine(values) * scale if values else 0)
        yield fam
    configured = gw.config.tunnel.congestion
    in_use = sockopts.in_use_for(configured)
    info = GaugeMetricFamily("intercloud_tunnel_tcp_congestion_info",
                             "The TCP congestion control algorithm new tunnels and peer links get",
                             labels=["algorithm"])
    if in_use is not None:
        info.add_metric([in_use], 1)
    yield info
    yield GaugeMetricFamily("intercloud_tunnel_tcp_congestion_fallback",
                            "1 when the kernel refused tunnel.congestion and tunnels get its default instead",
                            value=1 if configured != sockopts.SYSTEM and in_use not in (None, configured) else 0)


def _crl(gw):
    """The CRLs in force, per config key (tls.crl, cluster.crl): alert on the earliest nextUpdate
    coming close (``intercloud_crl_next_update_timestamp_seconds - time() < 86400``) or on a stale one."""
    nxt = GaugeMetricFamily("intercloud_crl_next_update_timestamp_seconds",
                            "Earliest nextUpdate among the CRLs of the key, Unix time", labels=["key"])
    stale = GaugeMetricFamily("intercloud_crl_stale", "CRLs of the key past their nextUpdate (still used)",
                              labels=["key"])
    revoked = GaugeMetricFamily("intercloud_crl_revoked_certificates", "Certificates the CRLs of the key revoke",
                                labels=["key"])
    for key, revs in gw.crl_sets():
        if not revs:
            continue
        dates = [c.next_update.timestamp() for c in revs.crls if c.next_update is not None]
        if dates:
            nxt.add_metric([key], min(dates))
        entries = describe(revs, key)
        stale.add_metric([key], sum(1 for e in entries if e["stale"]))
        revoked.add_metric([key], sum(e["revoked"] for e in entries))
    yield nxt
    yield stale
    yield revoked


def render(gw) -> bytes:
    reg = CollectorRegistry()
    reg.register(_Collector(gw))
    return generate_latest(reg)
