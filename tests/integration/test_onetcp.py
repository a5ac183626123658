"""bench/onetcp.py, the one-connection floor of bench/wan.py (docs/performance.md §8.5), on loopback.

Why: the WAN benchmark needs root and minutes, so nothing else would notice when the floor's relay
breaks. Its figures are only worth something if it carries bytes exactly, half-closes as TCP does and
keeps a ping moving beside a bulk stream; and a client that comes before the tunnel is closed, not a
traceback.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import scaled, wait_until

pytestmark = pytest.mark.needs_binary("ss")
REPO = Path(__file__).resolve().parents[2]
L = "127.0.0.1"


def _relay(role: str, tunnel: int, service: str, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{role}.log"
    f = log.open("wb")
    p = subprocess.Popen([sys.executable, str(REPO / "bench" / "onetcp.py"), role, f"{L}:{tunnel}", service,
                          "--cc", "cubic"], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    f.close()
    return p, log


def _echo_through(port: int, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and read until the far end closes."""
    with socket.create_connection((L, port), timeout=scaled(10)) as s:
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)), daemon=True)
        sender.start()
        got = bytearray()
        while chunk := s.recv(1 << 16):
            got += chunk
        sender.join(scaled(10))
        return bytes(got)


def test_onetcp_carries_streams_exactly_over_one_connection(tmp_path):
    tunnel, port = free_ports(2)
    with EchoServer() as echo:
        listen, llog = _relay("listen", tunnel, f"echo={L}:{port}", tmp_path)
        dial = None
        try:
            wait_until(lambda: b"listening" in llog.read_bytes(), 15, what="onetcp listen to start")
            # no tunnel yet: a client is closed at once, and the relay logs no traceback
            with socket.create_connection((L, port), timeout=scaled(5)) as early:
                try:
                    assert early.recv(1) == b""
                except ConnectionResetError:
                    pass
            dial, dlog = _relay("dial", tunnel, f"echo={L}:{echo.port}", tmp_path)
            wait_until(lambda: b"tunnel up" in llog.read_bytes(), 15, what="the tunnel to come up")

            bulk = os.urandom(8 << 20)
            out: dict = {}
            t = threading.Thread(target=lambda: out.setdefault("bulk", _echo_through(port, bulk)), daemon=True)
            t.start()
            # a ping-pong beside the bulk stream, on the same connection
            with socket.create_connection((L, port), timeout=scaled(10)) as ping:
                for i in range(20):
                    msg = i.to_bytes(4, "big") * 16
                    ping.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        got += ping.recv(len(msg) - len(got))
                    assert got == msg
            t.join(scaled(60))
            assert hashlib.sha256(out["bulk"]).digest() == hashlib.sha256(bulk).digest()
            assert echo.connections == 2  # one stream each, over the one tunnel connection
            tunnels = subprocess.run(["ss", "-tnH", "state", "established", "dport", "=", f":{tunnel}"],
                                     capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
            assert len(tunnels) == 1, tunnels
            assert b"Traceback" not in llog.read_bytes() and b"Traceback" not in dlog.read_bytes()
        finally:
            for p in (listen, dial):
                if p is not None:
                    p.terminate()
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        p.kill()
