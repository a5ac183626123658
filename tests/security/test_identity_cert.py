"""A gateway's identity comes from its certificate (issue 12, protocol §5.4).

The node id a gateway claims in HELLO must be one of the names (CN or DNS SAN) of the certificate the
other side verified: the cloud checks an on-prem gateway's client certificate, the on-prem gateway the
cloud's server certificate. Otherwise anyone holding a certificate of the CA could pose as any other
gateway in logs, coverage, member lists and duplicate reports. A refused tunnel is refused in admission,
before it carries anything: one log line on the refusing side, naming the node id and the certificate
and saying what to do.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import wait_tunnels
from tests.e2e.topology import make_pair
from tests.support.netcat import nc_exchange
from tests.support.servers import EchoServer
from tests.support.timeouts import wait_until

pytestmark = pytest.mark.needs_binary("nc")
L = "127.0.0.1"
PROBLEMS = ("WARNING", "ERROR", "CRITICAL")


def _no_stream_gets_through(gw, port: int, service: str, echo) -> None:
    """A client of ``service`` at ``gw`` gets nothing and the echo server on the far side of the refused
    tunnel never sees a connection. (A dialer counts a tunnel as up from the cloud's HELLO until the
    cloud's GOAWAY refuses its own HELLO, protocol §5.2: a client there may be reset rather than refused.)"""
    mark = gw.log_mark()
    assert nc_exchange(L, port, b"through a refused tunnel?\n", check=False) == b""
    gw.wait_log(lambda r: r["event"] in ("stream.refused", "stream.closed") and r["service"] == service,
                since=mark, timeout=10)
    assert echo.connections == 0


def test_onprem_node_id_not_in_its_certificate_is_refused_by_the_cloud(tmp_path, gateways):
    with EchoServer() as echo_a, EchoServer() as echo_b:
        pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port)
        audit = tmp_path / "audit.jsonl"
        cloud = gateways("cloud1", pair.cloud_config().replace("[gateway]\n", f'[gateway]\naudit_log = "{audit}"\n', 1))
        mark = cloud.log_mark()
        pair.onprem_cert = "onprem1"  # onprem1's certificate, but it says it is onprem2
        onprem = gateways("onprem2", pair.onprem_config("onprem2"), ready=False)

        rec = cloud.wait_log(lambda r: r["event"] == "tenant.refused", since=mark, timeout=15)
        reason = rec["reason"]
        assert rec["peer_node"] == "onprem2" and rec["subject"] == "onprem1", rec
        assert "on-prem gateway 'onprem2': that node id is not a name of its client certificate (subject 'onprem1')" \
            in reason, reason
        assert "set gateway.node_id of that gateway to one of: 'onprem1'" in reason, reason
        assert "issue it a certificate for 'onprem2'" in reason and "--onprem onprem2" in reason, reason
        # the on-prem side is told why (GOAWAY FORBIDDEN) and says so in its own log
        told = onprem.wait_log(lambda r: r["event"] == "tunnel.dial_failed" and "onprem2" in r["reason"], timeout=15)
        assert "cloud1 refused this gateway" in told["reason"] and "'onprem1'" in told["reason"], told

        _no_stream_gets_through(cloud, pair.a_port, "serviceA", echo_a)
        _no_stream_gets_through(onprem, pair.b_port, "serviceB", echo_b)
        assert cloud.status()["tunnels"] == []
        lines = cloud.log_lines(since=mark)
        assert not [r for r in lines if r["event"] in ("tunnel.opened", "tunnel.closed")], lines
        # one line per refused tunnel: the tenant.refused line, no "closing" line beside it
        problems = [r for r in lines if r["level"] in PROBLEMS and r["event"] != "stream.refused"]
        assert problems and all(r["event"] == "tenant.refused" for r in problems), problems
        # counted and audited as an identity refusal (not as a tenant's)
        assert cloud.metric('intercloud_connections_refused_by_total{kind="identity",service=""}') >= 1
        wait_until(lambda: audit.exists() and '"identity"' in audit.read_text(), 10, what="the audit record")
        recs = [json.loads(line) for line in audit.read_text().splitlines()]
        ident = [r for r in recs if r["type"] == "refused" and r["kind"] == "identity"]
        assert ident and ident[0]["peer_node"] == "onprem2" and ident[0]["rule"] == "node_id", recs
        assert "not a name of its client certificate" in ident[0]["reason"], ident[0]
        assert not [r for r in recs if r["type"] == "refused" and r["kind"] == "tenant"], recs


def test_cloud_node_id_not_in_its_certificate_is_refused_by_the_onprem_gateway(tmp_path, gateways):
    with EchoServer() as echo_a, EchoServer() as echo_b:
        pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port)
        # cloud1's certificate, but it says it is cloud2 (it starts: config.load only warns)
        cloud = gateways("cloud1", pair.cloud_config().replace('node_id = "cloud1"', 'node_id = "cloud2"'))
        onprem = gateways("onprem1", pair.onprem_config(), ready=False)

        rec = onprem.wait_log(lambda r: r["event"] == "tunnel.dial_failed", timeout=15)
        reason = rec["reason"]
        assert "cloud gateway 'cloud2': that node id is not a name of its server certificate (subject 'cloud1')" \
            in reason, reason
        assert "set gateway.node_id of that gateway to one of: 'cloud1'" in reason, reason
        assert "issue it a certificate for 'cloud2'" in reason and "--cloud cloud2" in reason, reason

        # refused before the on-prem HELLO: the cloud never counts the tunnel as live
        _no_stream_gets_through(cloud, pair.a_port, "serviceA", echo_a)
        _no_stream_gets_through(onprem, pair.b_port, "serviceB", echo_b)
        assert cloud.status()["tunnels"] == [] and onprem.status()["tunnels"] == []
        assert not [r for r in cloud.log_lines() + onprem.log_lines() if r["event"] == "tunnel.opened"]
        # one line: redials that fail the same way are not logged again, and no "closing" line beside it
        problems = [r for r in onprem.log_lines() if r["level"] in PROBLEMS and r["event"] != "stream.refused"]
        assert [r["event"] for r in problems] == ["tunnel.dial_failed"], problems
        assert onprem.http_get("/readyz")[0] == 503


def test_without_a_verified_client_certificate_the_node_id_is_taken_on_trust(tmp_path, gateways):
    """tls.verify_client = false: the cloud asks for no client certificate, so there is nothing to check
    an on-prem node id against; the tunnel works as before (docs/configuration.md, [tls])."""
    with EchoServer() as echo_a, EchoServer() as echo_b:
        pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port)
        cloud = gateways("cloud1", pair.cloud_config().replace("[tls]\n", "[tls]\nverify_client = false\n", 1))
        pair.onprem_cert = "onprem1"
        gateways("onprem2", pair.onprem_config("onprem2"), ready=False)
        wait_tunnels(cloud, 1)
        (tunnel,) = cloud.status()["tunnels"]
        assert tunnel["peer_node"] == "onprem2" and not tunnel.get("peer_cert"), tunnel
        assert nc_exchange(L, pair.a_port, b"unverified\n") == b"unverified\n"
