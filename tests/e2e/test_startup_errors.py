"""A gateway that cannot start says why in one line and exits 1: no traceback, whichever task group
the failure came from (a service listener, the tunnel listener, the admin endpoint)."""

from __future__ import annotations

import socket

import pytest

from .topology import make_pair


@pytest.mark.parametrize("busy", ["service", "tunnel", "admin"])
def test_a_port_in_use_is_one_line_and_exit_1(tmp_path, gateways, busy):
    pair = make_pair(tmp_path, a_target=9, b_target=9)
    port = {"service": pair.a_port, "tunnel": pair.tunnel_port, "admin": pair.cloud_admin}[busy]
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        cloud = gateways("cloud1", pair.cloud_config(), ready=False)
        assert cloud.wait_exit(30) == 1
        assert "Traceback" not in cloud.log_text(), cloud.log_text()
        rec = cloud.wait_log(lambda r: r.get("event") == "gateway.failed")
        assert "cannot listen" in rec["msg"] and str(port) in rec["msg"], rec["msg"]
    finally:
        holder.close()
