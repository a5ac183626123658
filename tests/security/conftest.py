"""Helpers for the attacker tests (issue 12): a cloud + on-prem pair with a working service, an
attacker process (tests/security/flood.py), a legitimate client probe, the cloud's RSS.

Why: these tests check what anyone who can reach the cloud's ports can do to it, so the attacker runs
as a separate process (it must not steal the test process's GIL from the probe) and the legitimate
traffic is a real client through service A (client -> cloud -> tunnel -> on-prem -> echo server).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.topology import make_pair
from tests.support.gateway import REPO_ROOT
from tests.support.ports import free_port
from tests.support.servers import EchoServer
from tests.support.timeouts import scaled, wait_until

#: Attacker source addresses (all loopback); the legitimate on-prem gateway and clients use 127.0.0.1.
ATTACKERS = [f"127.0.0.{i}" for i in range(2, 18)]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def flood(mode: str, port: int, *, rounds: int = 20, per_round: int = 2000, sources=ATTACKERS,
          ca: Path | None = None, timeout: float = 300) -> dict:
    """Run the attacker process to completion; its JSON summary."""
    argv = [sys.executable, "-m", "tests.security.flood", mode, "127.0.0.1", str(port), "--rounds", str(rounds),
            "--per-round", str(per_round), "--sources", ",".join(sources)]
    if ca is not None:
        argv += ["--ca", str(ca)]
    # niced: on the internet the attacker does not share the gateway's CPUs; here it would otherwise
    # take most of the 2 cores from the gateways and the probe, and the test would measure the attacker
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=scaled(timeout),
                          preexec_fn=lambda: os.nice(19))
    assert done.returncode == 0, f"flood {mode} failed ({done.returncode}): {done.stderr[-3000:]}"
    return json.loads(done.stdout)


def echo_once(port: int, payload: bytes = b"ping-intercloud", timeout: float = 10.0) -> float:
    """One legitimate client: connect to a service, send, read the echo back, close; seconds taken."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(timeout)) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(len(payload) - len(got))
            if not chunk:
                raise ConnectionError(f"service closed after {len(got)} of {len(payload)} echoed bytes")
            got += chunk
        if got != payload:
            raise AssertionError(f"echo mismatch: {got!r}")
    return time.perf_counter() - started


@dataclass
class Probe:
    """Legitimate clients in a loop on a thread: latencies of successes, and every failure."""

    port: int
    pause: float = 0.02  # between clients: a steady trickle, not a load test
    latencies: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # monotonic end time of each success
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def run_n(self, n: int) -> None:
        for _ in range(n):
            self._one()
            self._stop.wait(self.pause)

    def _one(self) -> None:
        try:
            self.latencies.append(echo_once(self.port))
            self.times.append(time.monotonic())
        except (OSError, AssertionError) as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")

    def start(self) -> "Probe":
        def loop():
            while not self._stop.wait(self.pause):
                self._one()
        self._thread = threading.Thread(target=loop, name="probe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(scaled(30))

    @property
    def count(self) -> int:
        return len(self.latencies) + len(self.failures)

    def p(self, q: float, since: float = 0.0, until: float = float("inf")) -> float:
        lat = sorted(x for x, t in zip(self.latencies, self.times) if since <= t < until)
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")


@dataclass
class Site:
    pair: object
    cloud: object
    onprem: object
    echo: EchoServer
    cluster_port: int | None

    @property
    def ca(self) -> Path:
        return self.pair.certs / "ca.pem"

    def tunnel_ids(self) -> set[int]:
        return {t["id"] for t in self.cloud.status()["tunnels"]}


@pytest.fixture
def echo():
    with EchoServer() as s:
        yield s


def start_site(tmp_path, gateways, echo, *, cluster: bool = False, cloud_extra: str = "",
               argv_prefix=(), handshake_timeout: str = "10s", onprem_extra_tunnel: str = "") -> Site:
    """Cloud (optionally with ``[cluster] listen``) + on-prem with service A working; waits for the tunnel."""
    cluster_port = free_port() if cluster else None
    pair = make_pair(tmp_path, a_target=echo.port, b_target=echo.port, extra_onprem_tunnel=onprem_extra_tunnel)
    certs = pair.certs
    section = cloud_extra
    if cluster:
        section += (f'\n[cluster]\nlisten = "wss://127.0.0.1:{cluster_port}/cluster"\nca = "{certs}/ca.pem"\n'
                    f'peer_names = ["cloud1"]\n')
    pair.extra_cloud = section
    text = pair.cloud_config().replace('ping_timeout = "4s"\n',
                                       f'ping_timeout = "4s"\nhandshake_timeout = "{handshake_timeout}"\n', 1)
    cloud = gateways("cloud1", text, argv_prefix=argv_prefix)
    onprem = gateways("onprem1", pair.onprem_config())
    wait_until(lambda: len(cloud.status()["tunnels"]) == 1, 15, what="the on-prem tunnel to be up")
    wait_until(lambda: _works(pair.a_port), 15, what="service A to echo end to end")
    return Site(pair, cloud, onprem, echo, cluster_port)


def _works(port: int) -> bool:
    try:
        echo_once(port, timeout=2)
        return True
    except OSError:
        return False


def log_lines(gw, since: int = 0) -> int:
    """Lines the gateway logged, without the per-stream OPENED/CLOSED lines of the legitimate probe."""
    return sum(1 for line in gw.log_text(since).splitlines()
               if line.strip() and '"event": "stream.' not in line)
