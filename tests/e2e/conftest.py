"""Fixtures for end-to-end tests: echo servers and a started cloud + on-prem pair."""

from __future__ import annotations

import pytest

from tests.support.servers import EchoServer

from .topology import make_pair


@pytest.fixture
def echo_a():
    with EchoServer() as s:
        yield s


@pytest.fixture
def echo_b():
    with EchoServer() as s:
        yield s


def wait_tunnels(gw, n: int, timeout: float = 10.0):
    from tests.support.timeouts import wait_until

    wait_until(lambda: len(gw.status()["tunnels"]) >= n, timeout,
               what=f"{gw.name} to hold {n} tunnels")


@pytest.fixture
def started_pair(tmp_path, gateways, echo_a, echo_b):
    """A 2-tls pair (mutual TLS) with both gateways ready and the tunnel up."""
    pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port)
    cloud = gateways("cloud1", pair.cloud_config())
    onprem = gateways("onprem1", pair.onprem_config())
    wait_tunnels(cloud, 1)
    return pair, cloud, onprem
