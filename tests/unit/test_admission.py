"""Per-service admission (intercloud.admission, docs/operations.md §10.4): allow/deny source networks,
max_connections, max_rate. Pure logic; the end-to-end tests are tests/e2e/test_service_controls.py."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from intercloud.admission import ServiceGate, TokenBucket, client_address, gates_for
from intercloud.config.model import Service
from intercloud.stats import GatewayStats


def svc(**kw) -> Service:
    return Service(name=kw.pop("name", "web"), accept="tcp://127.0.0.1:1", **kw)


@pytest.mark.parametrize("text, addr", [
    ("10.1.2.3:5000", "10.1.2.3"),
    ("fd00::7:5000", "fd00::7"),
    ("[fd00::7]:5000", "fd00::7"),
    ("::ffff:10.1.2.3:80", "10.1.2.3"),  # a dual-stack listener's view of an IPv4 client
    ("::1:1", "::1"),
])
def test_client_address(text, addr):
    assert client_address(text) == ipaddress.ip_address(addr)


@pytest.mark.parametrize("text", ["?", "", "host.example:80", "10.1.2:80", "x:y"])
def test_client_address_of_no_address(text):
    assert client_address(text) is None


def test_no_rules_admit_everyone():
    g = ServiceGate(svc())
    assert g.admit("10.0.0.1:1") is None and g.admit("?") is None


def test_deny_wins_over_allow_and_names_the_rule():
    g = ServiceGate(svc(allow=["10.0.0.0/8"], deny=["10.9.0.0/16", "fd00::/8"]))
    assert g.admit("10.1.0.1:1") is None
    r = g.admit("10.9.3.4:1")
    assert r.kind == "acl" and r.rule == "deny 10.9.0.0/16" and "10.9.3.4" in r.why
    r = g.admit("fd00::1:1")
    assert r.rule == "deny fd00::/8"


def test_allow_list_refuses_the_rest_and_unknown_addresses():
    g = ServiceGate(svc(allow=["192.0.2.0/24", "2001:db8::/32"]))
    assert g.admit("192.0.2.9:1") is None
    assert g.admit("2001:db8::5:443") is None
    for client in ("198.51.100.1:1", "2001:db9::1:1", "?"):
        r = g.admit(client)
        assert r.kind == "acl" and r.rule == "allow", client
        assert "allow" in r.why
    # an IPv4 address is never inside an IPv6 network and the other way round
    g = ServiceGate(svc(allow=["::/0"]))
    assert g.admit("10.0.0.1:1").rule == "allow"


def test_deny_only_lets_an_unknown_address_through():
    # nothing to match a deny entry against; allow is empty, so it passes (documented)
    assert ServiceGate(svc(deny=["0.0.0.0/0"])).admit("?") is None


def test_max_connections_counts_held_slots():
    stats = GatewayStats()
    g = ServiceGate(svc(max_connections=2))
    streams = [SimpleNamespace(tenant="default", counted=False, gate=None) for _ in range(3)]
    for s in streams[:2]:
        assert g.admit("10.0.0.1:1") is None
        stats.hold_slot(s, g)
    r = g.admit("10.0.0.1:1")
    assert r.kind == "max_connections" and r.rule == "max_connections 2"
    stats.free_slot(streams[0])
    stats.free_slot(streams[0])  # freed once only
    assert g.active == 1
    assert g.admit("10.0.0.1:1") is None


def test_rate_bucket_holds_one_second_and_refills():
    b = TokenBucket(10.0)
    now = b.stamp
    assert sum(b.take(now=now) for _ in range(30)) == 10
    assert not b.take(now=now + 0.05)
    assert b.take(now=now + 0.11)  # 0.1 s earns one token
    assert sum(b.take(now=now + 100) for _ in range(30)) == 10  # never more than one second's worth
    slow = TokenBucket(0.5)  # below 1/s the bucket still holds one token
    assert slow.take(now=slow.stamp) and not slow.take(now=slow.stamp + 1) and slow.take(now=slow.stamp + 2.01)


def test_refused_by_the_acl_spends_no_rate_token():
    g = ServiceGate(svc(deny=["10.9.0.0/16"], max_rate=1))
    assert g.admit("10.9.0.1:1").kind == "acl"
    assert g.admit("10.1.0.1:1") is None
    assert g.admit("10.1.0.1:1").kind == "max_rate"


def test_reload_keeps_counts_and_tokens():
    old = gates_for([svc(max_connections=5), svc(name="gone", max_rate=3)])
    old[("default", "web")].active = 4
    new = gates_for([svc(max_connections=4, tenant="default"), svc(name="fresh")], old)
    assert new[("default", "web")] is old[("default", "web")]
    assert new[("default", "web")].admit("10.0.0.1:1").kind == "max_connections"
    assert ("default", "gone") not in new and ("default", "fresh") in new


def test_refusals_are_counted_and_audited():
    stats = GatewayStats()
    seen = []
    stats.audit = SimpleNamespace(refused=lambda *a, **kw: seen.append((a, kw)))
    stats.refused("acl", "source 10.9.0.1 matches deny", client="10.9.0.1:5", service="web", rule="deny 10.9.0.0/16")
    assert stats.counters["connections_refused"] == 1
    assert stats.labelled[("connections_refused", (("kind", "acl"), ("service", "web")))] == 1
    assert seen and seen[0][0][0] == "acl" and seen[0][1]["rule"] == "deny 10.9.0.0/16"


@given(st.ip_addresses(), st.integers(0, 65535), st.lists(st.ip_addresses(), max_size=4),
       st.integers(0, 128))
def test_acl_matches_ipaddress_semantics(addr, port, nets, plen):
    networks = [str(ipaddress.ip_network(f"{n}/{min(plen, n.max_prefixlen)}", strict=False)) for n in nets]
    g = ServiceGate(svc(allow=networks))
    client = f"{addr}:{port}"
    expect = any(addr.version == ipaddress.ip_network(n).version and addr in ipaddress.ip_network(n)
                 for n in networks) or not networks
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return  # mapped addresses are checked as IPv4 (test_client_address)
    assert (g.admit(client) is None) == expect


@pytest.mark.parametrize("value, message", [
    (["10.0.0.1/8"], "write '10.0.0.0/8'"),
    (["nonsense"], "invalid network"),
    ([7], "expected a network string"),
])
def test_config_rejects_bad_networks(value, message):
    with pytest.raises(Exception) as info:
        svc(deny=value)
    assert message in str(info.value)


@pytest.mark.parametrize("kw, message", [
    ({"max_rate": 0}, "between 0.01"), ({"max_rate": "5"}, "connections per second"),
    ({"max_connections": 0}, "between 1"),
])
def test_config_rejects_bad_limits(kw, message):
    with pytest.raises(Exception) as info:
        svc(**kw)
    assert message in str(info.value)


def test_proxy_refusal_only_with_accept_proxy_protocol_and_names_trusted_proxies():
    assert ServiceGate(svc()).proxy_refusal("203.0.113.9:4000") is None  # no header expected: no check
    g = ServiceGate(svc(accept_proxy_protocol=True, trusted_proxies=["10.0.0.0/24", "fd00::/64"]))
    assert g.proxy_refusal("10.0.0.7:4000") is None
    assert g.proxy_refusal("fd00::9:4000") is None
    assert g.proxy_refusal("::ffff:10.0.0.7:4000") is None  # a dual-stack listener's view
    refusal = g.proxy_refusal("10.0.1.7:4000")
    assert refusal.kind == "proxy_protocol" and refusal.rule == "trusted_proxies"
    assert "10.0.1.7:4000" in refusal.why and "10.0.0.0/24" in refusal.why
    assert g.proxy_refusal("?").kind == "proxy_protocol"
    g.configure(svc())  # a reload that turns it off
    assert g.proxies is None and g.proxy_refusal("10.0.1.7:4000") is None
