"""docs/ha.md §4: cluster.peers as one name for every member. One dial loop per member address; the
loop of an address that left the name retires after its link ends and never cancels that link;
readiness waits until every current address was tried once."""

from __future__ import annotations

import asyncio
import socket

from intercloud.cloud.server import CloudGateway
from intercloud.config import parse_config
from intercloud.transport.targets import DialTargets

from tests.support.timeouts import async_wait_until

from .test_dial_targets import FakeDNS, v4


def cloud(peers: list[str]) -> CloudGateway:
    config = parse_config({
        "gateway": {"role": "cloud", "node_id": "cloud1"},
        "tls": {"insecure": True},
        "tunnel": {"listen": "ws://127.0.0.1:0/intercloud", "reconnect_min": "10ms", "reconnect_max": "20ms"},
        "cluster": {"listen": "ws://127.0.0.1:0/cluster", "peers": peers},
        "service": [{"name": "svc", "accept": "tcp://127.0.0.1:0"}],
    })
    return CloudGateway(config)


class FakeLink:
    def __init__(self) -> None:
        self.done = asyncio.get_running_loop().create_future()


async def spin(n: int = 30) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_an_address_that_leaves_the_name_is_not_redialed_and_its_link_is_not_cut() -> None:
    gw = cloud(["ws://cluster.test:9443/cluster"])
    cl = gw.cluster
    dns = FakeDNS({"cluster.test": [v4("10.0.0.1", 9443), v4("10.0.0.2", 9443)]})
    cl.peer_targets = DialTargets(cl.cfg.peers, by_name=lambda h: False, fallback=False, lookup=dns,
                                  every=0.02)  # the supervisor looks the name up again every 20 ms
    dialed: list[str] = []
    links: dict[str, FakeLink] = {}

    async def fake_dial(target):
        ip = target.addresses[0][1][0]
        dialed.append(ip)
        links[ip] = FakeLink()
        return links[ip]

    cl._dial = fake_dial
    gw.routes_changed = lambda: None
    assert not cl.ready(), "nothing tried yet"
    async with asyncio.TaskGroup() as tg:
        supervisor = tg.create_task(cl._dial_peers(tg))
        await spin()
        assert sorted(dialed) == ["10.0.0.1", "10.0.0.2"] and cl.ready()
        dns.answers["cluster.test"] = [v4("10.0.0.1", 9443)]  # 10.0.0.2 left the name
        asked = len(dns.asked)
        await async_wait_until(lambda: len(dns.asked) >= asked + 2, 5, what="two more lookups")
        assert not links["10.0.0.2"].done.done(), "the live link to the departed address is not cut"
        departed = next(k for k in cl._loops if k[1] and k[1][0][1][0] == "10.0.0.2")
        links["10.0.0.2"].done.set_result(None)  # that link ends on its own
        await async_wait_until(lambda: departed not in cl._loops, 5, what="the departed address's loop to retire")
        assert dialed.count("10.0.0.2") == 1, f"the departed address was redialed: {dialed}"
        links["10.0.0.1"].done.set_result(None)  # a link to a listed address ends: redialed once
        await async_wait_until(lambda: dialed.count("10.0.0.1") == 2, 5, what="10.0.0.1 redialed")
        supervisor.cancel()
        for task in list(cl._loops.values()):
            task.cancel()


async def test_the_same_url_listed_twice_is_one_loop_and_does_not_block_readiness() -> None:
    gw = cloud(["ws://10.0.0.7:9443/cluster", "ws://10.0.0.7:9443/cluster"])
    cl = gw.cluster
    calls = []

    async def refused(target):
        calls.append(str(target))
        raise ConnectionRefusedError(socket.errno.ECONNREFUSED, "refused")

    cl._dial = refused
    gw.routes_changed = lambda: None
    async with asyncio.TaskGroup() as tg:
        supervisor = tg.create_task(cl._dial_peers(tg))
        await spin()
        assert cl.ready(), "a lone survivor serves once every distinct peer was tried"
        supervisor.cancel()
        for task in list(cl._loops.values()):
            task.cancel()
    assert len(set(calls)) == 1


async def test_a_change_of_the_member_table_looks_the_name_up_again_within_a_second() -> None:
    """A replaced member (a StatefulSet pod) comes back at a new address: when the member table changes
    the supervisor looks the peers name up again RETRY_FAILED (1 s) later, not at the next 30 s lookup,
    and dials the new address (docs/ha.md §4.1, §12)."""
    gw = cloud(["ws://cluster.test:9443/cluster"])
    cl = gw.cluster
    dns = FakeDNS({"cluster.test": [v4("10.0.0.1", 9443), v4("10.0.0.2", 9443)]})
    now = [0.0]
    cl.peer_targets = DialTargets(cl.cfg.peers, by_name=lambda h: False, fallback=False, lookup=dns,
                                  clock=lambda: now[0])  # every 30 s
    dialed: list[str] = []

    async def fake_dial(target):
        dialed.append(target.addresses[0][1][0])
        return FakeLink()

    cl._dial = fake_dial
    gw.routes_changed = lambda: None
    gw.members_changed = lambda view: None  # no on-prem tunnels here
    async with asyncio.TaskGroup() as tg:
        supervisor = tg.create_task(cl._dial_peers(tg))
        await spin()
        assert sorted(dialed) == ["10.0.0.1", "10.0.0.2"] and len(dns.asked) == 1
        dns.answers["cluster.test"] = [v4("10.0.0.1", 9443), v4("10.0.0.9", 9443)]  # cloud2 replaced
        now[0] = 5
        assert cl.table.heard({"node_id": "cloud2", "incarnation": "b2"}, now[0], direct=True)  # its HELLO
        cl.members_changed()
        await spin()
        assert len(dns.asked) == 1, "not before RETRY_FAILED"
        now[0] = 6
        await async_wait_until(lambda: "10.0.0.9" in dialed, 5, what="the new address to be dialed")
        assert len(dns.asked) == 2
        supervisor.cancel()
        for task in list(cl._loops.values()):
            task.cancel()
