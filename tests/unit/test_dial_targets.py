"""docs/ha.md §3: a tunnel.connect host name that resolves to several addresses counts as several
members (intercloud.transport.targets)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from intercloud.transport.targets import ConnectError, DialTarget, DialTargets, connect_in_order, member_orders

V4, V6 = socket.AF_INET, socket.AF_INET6


def v4(ip: str, port: int = 8443) -> tuple:
    return (V4, socket.SOCK_STREAM, 6, "", (ip, port))


def v6(ip: str, port: int = 8443) -> tuple:
    return (V6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))


def ips(order) -> list[str]:
    return [a[1][0] for a in order]


def test_each_address_of_a_round_robin_name_is_a_member() -> None:
    orders = member_orders([v4("10.0.0.1"), v4("10.0.0.2"), v4("10.0.0.3")])
    assert [ips(o) for o in orders] == [
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        ["10.0.0.2", "10.0.0.1", "10.0.0.3"],
        ["10.0.0.3", "10.0.0.1", "10.0.0.2"],
    ]


def test_a_dual_stack_host_is_one_member_that_falls_back_to_its_other_family() -> None:
    """localhost answers ::1 then 127.0.0.1: one member; a cloud listening on IPv4 only is still reached."""
    assert [ips(o) for o in member_orders([v6("::1"), v4("127.0.0.1")])] == [["::1", "127.0.0.1"]]


def test_dual_stack_members_pair_their_families_and_repeats_are_dropped() -> None:
    infos = [v6("2001:db8::1"), v6("2001:db8::2"), v4("10.0.0.1"), v4("10.0.0.2"), v4("10.0.0.1")]
    assert [ips(o) for o in member_orders(infos)] == [
        ["2001:db8::1", "10.0.0.1", "2001:db8::2", "10.0.0.2"],
        ["2001:db8::2", "10.0.0.2", "2001:db8::1", "10.0.0.1"],
    ]


addresses = st.lists(st.one_of(st.integers(1, 20).map(lambda i: v4(f"10.0.0.{i}")),
                               st.integers(1, 20).map(lambda i: v6(f"2001:db8::{i}"))), max_size=12)


@given(addresses)
def test_every_member_order_tries_every_answer_once(infos) -> None:
    distinct = list(dict.fromkeys((f, s) for f, _t, _p, _c, s in infos))
    orders = member_orders(infos)
    per_family = [sum(1 for f, _ in distinct if f == fam) for fam in (V4, V6)]
    assert len(orders) == max(per_family, default=0)
    for order in orders:
        assert sorted(order) == sorted(distinct)
    firsts = [o[0] for o in orders]
    assert len(set(firsts)) == len(firsts), "no two members start at the same address"


class FakeDNS:
    def __init__(self, answers: dict[str, list | Exception]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list:
        self.asked.append(host)
        a = self.answers[host]
        if isinstance(a, Exception):
            raise a
        if a == "hang":
            await asyncio.Event().wait()  # a resolver that never answers
        return [(f, t, p, c, (s[0], port, *s[2:])) for f, t, p, c, s in a]


def make(urls, dns, *, proxied=(), every=30.0):
    now = [0.0]
    targets = DialTargets(urls, by_name=lambda h: h in proxied, lookup=dns, clock=lambda: now[0], every=every)
    return targets, now


async def test_names_expand_ip_literals_and_proxied_names_do_not() -> None:
    dns = FakeDNS({"cloud.test": [v4("10.0.0.1"), v4("10.0.0.2")], "proxied.test": [v4("10.9.9.9")]})
    targets, _ = make(["wss://cloud.test:8443/intercloud", "wss://192.0.2.7/intercloud",
                       "wss://proxied.test/intercloud"], dns, proxied={"proxied.test"})
    assert await targets.refresh(5) is True
    got = [(str(t), ips(t.addresses)) for t in targets.targets]
    assert got == [
        ("wss://cloud.test:8443/intercloud", ["10.0.0.1", "10.0.0.2"]),
        ("wss://cloud.test:8443/intercloud", ["10.0.0.2", "10.0.0.1"]),
        ("wss://192.0.2.7/intercloud", []),  # the OS connects to a literal; nothing to expand
        ("wss://proxied.test/intercloud", []),  # the proxy resolves it
    ]
    assert dns.asked == ["cloud.test"]
    assert targets.view()[1] == {"url": "wss://cloud.test:8443/intercloud", "address": "10.0.0.2", "error": None}
    assert targets.view()[2]["address"] is None
    assert targets.targets[0].addresses[0][1] == ("10.0.0.1", 8443)
    assert targets.targets[1].where == "cloud.test:8443 (10.0.0.2)"


async def test_names_are_looked_up_again_only_when_due_and_changes_are_reported() -> None:
    dns = FakeDNS({"cloud.test": [v4("10.0.0.1")]})
    targets, now = make(["wss://cloud.test/intercloud"], dns, every=30)
    assert await targets.refresh(5) is True
    now[0] = 29
    assert not targets.due() and await targets.refresh(5) is False and len(dns.asked) == 1
    now[0] = 30
    assert await targets.refresh(5) is False, "same answer: nothing changed"
    dns.answers["cloud.test"] = [v4("10.0.0.1"), v4("10.0.0.3")]  # a member joined the name
    now[0] = 60
    assert await targets.refresh(5) is True and len(targets.targets) == 2


async def test_a_resolver_outage_keeps_the_last_answer() -> None:
    dns = FakeDNS({"cloud.test": [v4("10.0.0.1"), v4("10.0.0.2")]})
    targets, now = make(["wss://cloud.test/intercloud"], dns)
    await targets.refresh(5)
    dns.answers["cloud.test"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    now[0] = 100
    assert await targets.refresh(5) is False
    assert [ips(t.addresses)[0] for t in targets.targets] == ["10.0.0.1", "10.0.0.2"]


async def test_a_name_that_never_resolved_fails_its_dial_with_the_reason_and_is_retried() -> None:
    dns = FakeDNS({"nowhere.test": socket.gaierror(socket.EAI_NONAME, "Name or service not known")})
    targets, now = make(["wss://nowhere.test/intercloud"], dns)
    await targets.refresh(5)
    [t] = targets.targets
    assert t.addresses == () and t.error == ("cannot resolve nowhere.test: Name or service not known; "
                                             "check DNS and tunnel.connect")
    assert not targets.due(), "not looked up again at once (many workers ask)"
    now[0] = 1.0
    assert targets.due()
    dns.answers["nowhere.test"] = [v4("10.0.0.5")]
    assert await targets.refresh(5) is True and targets.targets[0].error is None


async def test_a_resolver_that_hangs_is_bounded() -> None:
    targets, _ = make(["wss://slow.test/intercloud"], FakeDNS({"slow.test": "hang"}))
    await targets.refresh(0.05)
    assert "no answer within 0.05s" in targets.targets[0].error


async def test_connect_falls_back_to_the_next_address_and_names_every_failure() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]  # bound, not listening: refused
        with socket.create_server(("127.0.0.1", 0)) as srv:
            live = srv.getsockname()[1]
            t = DialTarget("wss://cloud.test/intercloud", [(V4, ("127.0.0.1", dead)), (V4, ("127.0.0.1", live))])
            sock = await connect_in_order(t, 2.0)
            with sock:
                assert sock.getpeername()[1] == live
        t = DialTarget("wss://cloud.test/intercloud", [(V4, ("127.0.0.1", dead)), (V4, ("127.0.0.2", dead))])
        with pytest.raises(ConnectError) as err:
            await connect_in_order(t, 2.0)
    assert str(err.value) == ("cannot reach cloud.test:443 at 127.0.0.1: Connection refused; "
                              "127.0.0.2: Connection refused")


async def test_changed_urls_start_over_and_keep_answers_of_urls_still_listed() -> None:
    dns = FakeDNS({"a.test": [v4("10.0.0.1"), v4("10.0.0.2")], "b.test": [v4("10.0.1.1")]})
    targets, _ = make(["wss://a.test/intercloud"], dns)
    await targets.refresh(5)
    targets.use(["wss://a.test/intercloud"])
    assert not targets.due(), "the same list changes nothing"
    targets.use(["wss://a.test/intercloud", "wss://b.test/intercloud"])  # SIGHUP added a URL
    assert targets.due() and len(targets.targets) == 3, "a.test's answer is kept until the lookup"
    await targets.refresh(5)
    assert [ips(t.addresses)[0] for t in targets.targets] == ["10.0.0.1", "10.0.0.2", "10.0.1.1"]


async def test_workers_that_ask_during_the_first_lookup_wait_for_its_answer() -> None:
    gate = asyncio.Event()

    async def slow(host, port):
        await gate.wait()
        return [v4("10.0.0.1", port), v4("10.0.0.2", port)]

    targets, _ = make(["wss://cloud.test/intercloud"], slow)
    first = asyncio.create_task(targets.refresh(5))
    await asyncio.sleep(0)
    assert targets.due(), "a second worker must not dial the unexpanded name meanwhile"
    second = asyncio.create_task(targets.refresh(5))
    await asyncio.sleep(0)
    gate.set()
    assert await first is True and await second is False
    assert len(targets.targets) == 2


def test_without_fallback_a_member_is_only_its_own_addresses() -> None:
    """Peer links (one per member): landing on another member would only duplicate its link."""
    infos = [v6("2001:db8::1"), v6("2001:db8::2"), v4("10.0.0.1"), v4("10.0.0.2")]
    assert [ips(o) for o in member_orders(infos, fallback=False)] == [
        ["2001:db8::1", "10.0.0.1"], ["2001:db8::2", "10.0.0.2"]]


def test_a_rotating_resolver_keeps_every_member_on_its_target() -> None:
    """Round-robin DNS answers in a different order each time; target i must stay member i."""
    a, b, c = v4("10.0.0.9"), v4("10.0.0.10"), v4("10.0.0.2")
    assert member_orders([a, b, c]) == member_orders([b, c, a]) == member_orders([c, a, b])
    assert [ips(o)[0] for o in member_orders([a, b, c])] == ["10.0.0.2", "10.0.0.9", "10.0.0.10"]


async def test_wait_time_says_when_the_next_lookup_is_due() -> None:
    dns = FakeDNS({"cloud.test": [v4("10.0.0.1")], "nowhere.test": socket.gaierror(-2, "Name or service not known")})
    targets, now = make(["wss://cloud.test/intercloud"], dns, every=30)
    assert targets.wait_time() == 0
    await targets.refresh(5)
    now[0] = 10
    assert targets.wait_time() == 20
    failing, now2 = make(["wss://nowhere.test/intercloud"], dns)
    await failing.refresh(5)
    assert failing.wait_time() == 1.0, "a name that never resolved is retried within a second"


async def test_a_hung_resolver_gets_one_lookup_per_name_at_a_time() -> None:
    dns = FakeDNS({"slow.test": "hang"})
    targets, now = make(["wss://slow.test/intercloud"], dns)
    await targets.refresh(0.01)
    now[0] = 5
    await targets.refresh(0.01)
    assert dns.asked == ["slow.test"], "the first lookup is still running: waited on, not repeated"


# --- the on-prem gateway keeps resolving while its tunnels are up (docs/ha.md §3) -----------------

def onprem_gateway(connect: list[str]):
    from intercloud.config import parse_config
    from intercloud.onprem.dialer import OnpremGateway

    config = parse_config({
        "gateway": {"role": "onprem", "node_id": "onprem1"},
        "tls": {"insecure": True},
        "tunnel": {"connect": connect, "per_member": 2},
        "service": [{"name": "svc", "connect": "tcp://127.0.0.1:9"}],
    })
    return OnpremGateway(config)


async def test_a_member_added_to_the_name_gets_workers_without_any_dial_ending() -> None:
    gw = onprem_gateway(["ws://cloud.test:8443/intercloud"])
    dns = FakeDNS({"cloud.test": [v4("10.0.0.1")]})
    clock = [0.0]
    gw._dial_targets = DialTargets(gw.config.tunnel.connect, by_name=lambda h: False, lookup=dns,
                                   clock=lambda: clock[0], every=30)
    spawned = []
    gw._spawn_workers = lambda: spawned.append(gw._wanted_workers())
    task = asyncio.create_task(gw._keep_resolving())
    try:
        for _ in range(20):
            await asyncio.sleep(0)
        assert gw._wanted_workers() == 2 and dns.asked == ["cloud.test"]
        dns.answers["cloud.test"] = [v4("10.0.0.1"), v4("10.0.0.2")]  # a second member joins the name
        clock[0] = 31
        gw._reloaded.set()  # stands in for the 30 s timer (and is what SIGHUP does)
        for _ in range(20):
            await asyncio.sleep(0)
        assert gw._wanted_workers() == 4 and spawned[-1] == 4
    finally:
        task.cancel()


async def test_sighup_that_changes_tunnel_connect_applies_at_once() -> None:
    gw = onprem_gateway(["ws://a.test:8443/intercloud"])
    dns = FakeDNS({"a.test": [v4("10.0.0.1")], "b.test": [v4("10.0.1.1"), v4("10.0.1.2")]})
    gw._dial_targets = DialTargets(gw.config.tunnel.connect, by_name=lambda h: False, lookup=dns)
    gw._spawn_workers = lambda: None
    task = asyncio.create_task(gw._keep_resolving())
    try:
        for _ in range(20):
            await asyncio.sleep(0)
        gw.config = onprem_gateway(["ws://b.test:8443/intercloud"]).config  # what reload() installs
        gw._reloaded.set()
        for _ in range(20):
            await asyncio.sleep(0)
        assert [t["address"] for t in gw.dial_targets_view()] == ["10.0.1.1", "10.0.1.2"]
    finally:
        task.cancel()


# --- a replaced member comes back at a new address (a StatefulSet pod; docs/ha.md §3.2.1) ---------

async def test_a_member_change_brings_the_next_lookup_forward_to_a_second_later() -> None:
    dns = FakeDNS({"cloud.test": [v4("10.0.0.1"), v4("10.0.0.2")]})
    targets, now = make(["wss://cloud.test/intercloud"], dns, every=30)
    targets.look_again_soon()  # before the first lookup: nothing to bring forward
    assert targets.due()
    await targets.refresh(5)
    now[0] = 0.4
    targets.look_again_soon()
    assert not targets.due() and targets.wait_time() == 1.0, "RETRY_FAILED after the change"
    now[0] = 0.9
    targets.look_again_soon()  # a burst of member changes still means one lookup, not a later one
    assert targets.wait_time() == 0.5
    dns.answers["cloud.test"] = [v4("10.0.0.1"), v4("10.0.0.7")]  # 10.0.0.2 replaced by 10.0.0.7
    now[0] = 1.4
    assert await targets.refresh(5) is True and len(dns.asked) == 2
    assert [t["address"] for t in targets.view()] == ["10.0.0.1", "10.0.0.7"], "the old address is gone"
    now[0] = 20
    targets.look_again_soon()
    assert targets.wait_time() == 1.0, "a change long after the last lookup: a second later too"
    now[0] = 21
    await targets.refresh(5)
    assert targets.wait_time() == 30, "then the usual interval again"


async def test_an_onprem_gateway_looks_the_name_up_again_when_a_member_returns() -> None:
    """The cloud's MEMBERS names a new incarnation of cloud2 (replaced, now at 10.0.0.7): the gateway
    resolves tunnel.connect again within a second, not at the next 30 s lookup."""
    from types import SimpleNamespace

    gw = onprem_gateway(["ws://cloud.test:8443/intercloud"])
    dns = FakeDNS({"cloud.test": [v4("10.0.0.1"), v4("10.0.0.2")]})
    clock = [0.0]
    gw._dial_targets = DialTargets(gw.config.tunnel.connect, by_name=lambda h: False, lookup=dns,
                                   clock=lambda: clock[0], every=30)
    gw._spawn_workers = lambda: None
    tunnel = SimpleNamespace(peer_node="cloud1", peer=SimpleNamespace(incarnation="a1"), goaway_received=False,
                             members=[{"node_id": "cloud1", "incarnation": "a1"},
                                      {"node_id": "cloud2", "incarnation": "b1"}])
    gw.tunnels = [tunnel]
    task = asyncio.create_task(gw._keep_resolving())
    try:
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(dns.asked) == 1
        gw._members_maybe_changed()  # the members as first seen
        clock[0] = 5
        dns.answers["cloud.test"] = [v4("10.0.0.1"), v4("10.0.0.7")]
        gw.members_received(tunnel, [{"node_id": "cloud1", "incarnation": "a1"},
                                     {"node_id": "cloud2", "incarnation": "b2"}])
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(dns.asked) == 2
        assert [t["address"] for t in gw.dial_targets_view()] == ["10.0.0.1", "10.0.0.7"]
    finally:
        task.cancel()


def test_a_free_worker_skips_targets_whose_member_is_covered_and_finds_the_new_address() -> None:
    """cloud2 was replaced: 10.0.0.3 left the name, 10.0.0.10 joined. Sorted, the targets are now
    [.2 cloud1, .4 cloud3, .10 new cloud2]: the workers that held cloud2's tunnels (1 and 4, on target
    1) would dial cloud3's address, be refused as covered, and never reach .10."""
    from types import SimpleNamespace

    gw = onprem_gateway(["ws://cloud.test:8443/intercloud"])
    gw._dial_targets = DialTargets(gw.config.tunnel.connect, by_name=lambda h: False, lookup=FakeDNS({}))
    gw._dial_targets._answers = {"ws://cloud.test:8443/intercloud": member_orders(
        [v4("10.0.0.2"), v4("10.0.0.4"), v4("10.0.0.10")])}
    gw._dial_targets.targets = gw._dial_targets._build()

    def tunnel(node, ip):
        return SimpleNamespace(peer_node=node, peer_addr=f"{ip}:8443", goaway_received=False, members=[],
                               peer=SimpleNamespace(incarnation="x"))

    gw.tunnels = [tunnel("cloud1", "10.0.0.2"), tunnel("cloud1", "10.0.0.2"),
                  tunnel("cloud3", "10.0.0.4"), tunnel("cloud3", "10.0.0.4")]
    for worker in (1, 4, 0):
        target, node = gw._choose_target(worker)
        assert node is None and target.addresses[0][1][0] == "10.0.0.10", worker
    gw.tunnels = gw.tunnels[:3]  # cloud3 lacks a tunnel: its own target is fine again
    assert gw._choose_target(1)[0].addresses[0][1][0] == "10.0.0.4"
    gw.tunnels += [tunnel("cloud3", "10.0.0.4"), tunnel("cloud2", "10.0.0.10"), tunnel("cloud2", "10.0.0.10")]
    assert gw._choose_target(1)[0].addresses[0][1][0] == "10.0.0.4", "all covered: the worker's own target"


async def test_the_resolver_loop_ends_when_cancelled_as_a_member_change_wakes_it() -> None:
    """The drain closes every tunnel (a member change: the loop is woken) and cancels the loop in the
    same turn of the event loop; the loop must end, or the process never exits after SIGTERM."""
    gw = onprem_gateway(["ws://10.0.0.1:8443/intercloud"])
    gw._spawn_workers = lambda: None
    task = asyncio.create_task(gw._keep_resolving())
    for _ in range(20):
        await asyncio.sleep(0)
    gw._reloaded.set()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2)
    assert task in done and task.cancelled(), "the loop swallowed its cancellation"
