"""Descriptor exhaustion (issue 12): with `ulimit -n 1024`, 2,000 idle connections to tunnel.listen
used to cut legitimate clients' success to 53 % (nothing capped connections waiting for TLS) and,
at 512, closed accepted tunnels without a word. Now the listener holds at most max_handshakes of them
and keeps a descriptor reserve: service clients, tunnels and /healthz keep working."""

from __future__ import annotations

import socket

from tests.support.timeouts import wait_until

from .conftest import ATTACKERS, Probe, open_fds, start_site

IDLE = 2000
LIMIT = 1024


def test_idle_flood_at_1024_descriptors_starves_nobody(tmp_path, gateways, echo):
    # hard = soft = 1024: the gateway raises its soft limit to the hard one at start
    site = start_site(tmp_path, gateways, echo, argv_prefix=["prlimit", f"--nofile={LIMIT}:{LIMIT}", "--"])
    cloud = site.cloud
    assert cloud.wait_log(lambda r: r["event"] == "gateway.nofile")["limit"] == LIMIT
    tunnels = site.tunnel_ids()
    base_fds = open_fds(cloud.pid)

    held: list[socket.socket] = []
    try:
        for i in range(IDLE):  # opened and held, never a byte sent
            s = socket.socket()
            s.bind((ATTACKERS[i % len(ATTACKERS)], 0))
            try:
                s.connect(("127.0.0.1", site.pair.tunnel_port))
            except OSError:  # reset at accept meanwhile is fine: it is what the listener does over its caps
                pass
            held.append(s)
        fds = open_fds(cloud.pid)
        probe = Probe(site.pair.a_port)
        probe.run_n(200)
        assert not probe.failures, f"{len(probe.failures)}/200 legitimate clients failed: {probe.failures[:5]}"
        assert cloud.http_get("/healthz")[0] == 200
        assert site.tunnel_ids() == tunnels
        # the listener holds at most max_handshakes (64) of the idle connections, far from the limit
        assert fds < LIMIT // 2, f"cloud holds {fds} descriptors with {IDLE} idle connections"
        shed = cloud.wait_log(lambda r: r["event"] == "tunnel.shed")
        assert "cluster.max_handshakes" in shed["reason"]
    finally:
        for s in held:
            s.close()
    wait_until(lambda: open_fds(cloud.pid) <= base_fds + 2, 20, what=f"the cloud back to ~{base_fds} descriptors")
    assert site.tunnel_ids() == tunnels
