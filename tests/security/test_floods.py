"""Floods of unauthenticated connections to the cloud's tunnel.listen and cluster.listen (issue 12).

Before: every TCP connection left ~45 KB in the cloud for good (20 rounds of 2,000: 57 MB -> 1.09 GB)
and one log line each. Now: RSS returns to within 25 MB of where it started, legitimate clients of a
service keep working with bounded latency, and the log holds a few hundred lines.
"""

from __future__ import annotations

import time

from tests.support.timeouts import wait_until

from .conftest import Probe, flood, log_lines, rss_mb, start_site

ROUNDS = 20
PER_ROUND = 2000
RSS_BUDGET_MB = 25
MAX_LOG_LINES = 400
QUIET_PROBES = 300  # before and again after the floods


def test_floods_leave_memory_service_and_log_intact(tmp_path, gateways, echo):
    site = start_site(tmp_path, gateways, echo, cluster=True)
    cloud = site.cloud
    tunnels = site.tunnel_ids()

    quiet = Probe(site.pair.a_port)
    quiet.run_n(QUIET_PROBES)  # also warms the cloud up before the baseline
    assert not quiet.failures, quiet.failures[:5]
    baseline = rss_mb(cloud.pid)
    mark = cloud.log_mark()

    probe = Probe(site.pair.a_port).start()
    results = {}
    started = time.monotonic()
    try:
        for name, port in (("tunnel.listen", site.pair.tunnel_port), ("cluster.listen", site.cluster_port)):
            for mode in ("raw", "tls"):
                t0 = time.monotonic()
                r = results[f"{name} {mode}"] = flood(mode, port, rounds=ROUNDS, per_round=PER_ROUND, ca=site.ca)
                r["rss_mb"] = round(rss_mb(cloud.pid), 1)
                r["probe_p99_ms"] = round(probe.p(.99, t0, time.monotonic()) * 1e3, 1)
    finally:
        probe.stop()
    flood_s = time.monotonic() - started
    # The quiet reference is pooled from before and after the floods: this VM's 2 cores are shared,
    # and the machine's own load drifts over the ~2 minutes more than a single quiet window shows.
    quiet.run_n(QUIET_PROBES)
    assert not quiet.failures, quiet.failures[:5]

    report = (f"floods {flood_s:.0f}s: {results}; probes {probe.count}, failed {len(probe.failures)}; "
              f"p50/p99 quiet {quiet.p(.5) * 1e3:.1f}/{quiet.p(.99) * 1e3:.1f} ms, during floods "
              f"{probe.p(.5) * 1e3:.1f}/{probe.p(.99) * 1e3:.1f} ms; RSS baseline {baseline:.1f} MB")
    print(report)
    for name, r in results.items():  # the attacker really got through to the listener
        assert r["connections"] == ROUNDS * PER_ROUND, (name, r)
    assert not probe.failures, f"{len(probe.failures)} legitimate clients failed, e.g. {probe.failures[:5]}; {report}"
    assert probe.count >= 100, report
    assert probe.p(.99) <= 5 * quiet.p(.99), report

    # The heap pages of ended handshakes go back to the kernel shortly after the flood (tls_server._HeapTrim).
    seen: list[float] = []  # the RSS samples, for the failure message

    def settled() -> bool:
        seen.append(round(rss_mb(cloud.pid), 1))
        return seen[-1] <= baseline + RSS_BUDGET_MB

    try:
        wait_until(settled, 20, interval=0.5, what=f"cloud RSS <= {baseline:.1f} + {RSS_BUDGET_MB} MB")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; RSS samples every 0.5 s after the floods: {seen}; {report}") from None
    after = rss_mb(cloud.pid)
    lines = log_lines(cloud, mark)
    print(f"RSS after {after:.1f} MB (baseline {baseline:.1f}); {lines} log lines")
    assert lines <= MAX_LOG_LINES, f"{lines} log lines for {4 * ROUNDS * PER_ROUND} connections\n{cloud.log_tail(40)}"
    assert site.tunnel_ids() == tunnels, "the on-prem tunnel was dropped during the floods"
    assert cloud.http_get("/healthz")[0] == 200
