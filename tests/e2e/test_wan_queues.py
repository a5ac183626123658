"""A congested tunnel sizes its queues to its path (docs/protocol.md §6.3), on a real slow WAN link.

The link is the userspace WAN emulator of ../shared/tools/wan (this kernel has no sch_netem): 20 ms
round trip, a 20 Mbit/s bottleneck with a 20 ms queue, no loss. The cloud gateway runs in its
``-cloud`` namespace, the on-prem gateway in ``-onprem`` (it dials across the WAN), a discard and an
echo server in ``-srv``, the clients in ``-cli``. A bulk client fills the tunnel for a few seconds
while a ping-pong client shares it; the cloud gateway's /api/status (read from a thread switched
into its namespace) must then show the tunnel's queues sized to about 10 ms of 20 Mbit/s (32 KiB, down from
the starting 256 KiB and 128 KiB), and every bulk byte must arrive. Latency itself is measured by
bench/wan.py, not asserted here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.support.gateway import Gateway
from tests.support.netns import _setns
from tests.support.pki import issue_cert, make_ca
from tests.support.timeouts import scaled, wait_until

WAN = Path(__file__).resolve().parents[3] / "shared" / "tools" / "wan" / "wan.sh"
KIB = 1024

SERVERS = textwrap.dedent('''
    import asyncio, sys
    class Echo(asyncio.Protocol):
        def connection_made(self, t): self.t = t
        def data_received(self, d): self.t.write(d)
    class Discard(asyncio.Protocol):
        n = 0
        def data_received(self, d): self.n += len(d)
        def eof_received(self):
            print("discarded", self.n, flush=True)
    async def main():
        loop = asyncio.get_running_loop()
        await loop.create_server(Echo, "0.0.0.0", 7007)
        await loop.create_server(Discard, "0.0.0.0", 9009)
        print("ready", flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
''')

CLIENTS = textwrap.dedent('''
    import json, socket, sys, threading, time
    host, bulk_port, echo_port, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    sent = 0
    def bulk():
        global sent
        s = socket.create_connection((host, bulk_port), timeout=30)
        chunk = b"z" * 65536
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # until the far end closes
    t = threading.Thread(target=bulk)
    t.start()
    time.sleep(1)
    e = socket.create_connection((host, echo_port), timeout=30)
    e.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    while t.is_alive() and len(rtts) < 10000:
        t0 = time.monotonic()
        e.sendall(b"p" * 64)
        got = 0
        while got < 64:
            got += len(e.recv(64 - got))
        rtts.append(time.monotonic() - t0)
        time.sleep(0.02)
    t.join()
    print(json.dumps({"sent": sent, "rtts": rtts}), flush=True)
''')


def in_namespace(ns: str, fn):
    """``fn()`` from a thread switched into network namespace ``ns`` (its sockets are made there)."""
    box: list = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                _setns(fd)  # os.setns is Python 3.12
            finally:
                os.close(fd)
            box.append((True, fn()))
        except BaseException as exc:  # handed to the caller
            box.append((False, exc))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=60)


@pytest.fixture
def wan(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if not WAN.exists() or shutil.which("cc") is None:
        pytest.skip(f"needs the WAN emulator {WAN} and a C compiler")
    prefix = f"q{os.getpid() % 100000}"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    _run("bash", str(WAN), "down", prefix, check=False)
    up = subprocess.run(["bash", str(WAN), "up", prefix], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, f"wan.sh up failed: {up.stdout}{up.stderr}"
        # 10 ms each way, no loss, 20 Mbit/s, a 50,000-byte (20 ms) queue
        params = subprocess.run(["bash", str(WAN), "params", "10000", "0", "20000", "50000", prefix], env=env,
                                capture_output=True, text=True, timeout=30)
        assert params.returncode == 0, params.stderr
        yield prefix
    finally:
        subprocess.run(["bash", str(WAN), "down", prefix], env=env, capture_output=True, timeout=60)


def test_a_congested_tunnel_sizes_its_queues_to_a_slow_path(tmp_path, wan):
    ns = {role: ["ip", "netns", "exec", f"{wan}-{role}"] for role in ("cli", "cloud", "onprem", "srv")}
    ca = make_ca(tmp_path / "pki")
    cloud_cert = issue_cert(ca, tmp_path / "pki", "cloud1", dns=["cloud1"], ips=["10.77.2.1"], client=True)
    onprem_cert = issue_cert(ca, tmp_path / "pki", "onprem1", dns=["onprem1"], ips=[], server=False, client=True)
    servers = subprocess.Popen([*ns["srv"], sys.executable, "-c", SERVERS], stdout=subprocess.PIPE, text=True)
    cloud = onprem = None
    try:
        assert servers.stdout.readline().strip() == "ready"
        cloud = Gateway(tmp_path, "cloud1", f'''
[gateway]
role = "cloud"
node_id = "cloud1"
admin = "127.0.0.1:9901"
[tls]
cert = "{cloud_cert.cert_path}"
key = "{cloud_cert.key_path}"
ca = "{ca.cert_path}"
[tunnel]
listen = "wss://10.77.2.1:8443/intercloud"
[[service]]
name = "bulk"
accept = "tcp://10.77.1.1:19009"
[[service]]
name = "echo"
accept = "tcp://10.77.1.1:17007"
''', argv_prefix=ns["cloud"]).start()
        onprem = Gateway(tmp_path, "onprem1", f'''
[gateway]
role = "onprem"
node_id = "onprem1"
[tls]
cert = "{onprem_cert.cert_path}"
key = "{onprem_cert.key_path}"
ca = "{ca.cert_path}"
[tunnel]
connect = ["wss://10.77.2.1:8443/intercloud"]
per_member = 1
[[service]]
name = "bulk"
connect = "tcp://10.77.3.2:9009"
[[service]]
name = "echo"
connect = "tcp://10.77.3.2:7007"
''', argv_prefix=ns["onprem"]).start()
        def status() -> dict:
            return in_namespace(f"{wan}-cloud", lambda: json.loads(urllib.request.urlopen(
                "http://127.0.0.1:9901/api/status", timeout=5).read()))

        wait_until(lambda: len(status()["tunnels"]) == 1, scaled(20), what="the tunnel across the WAN",
                   ignore=(OSError,))
        (before,) = status()["tunnels"]
        assert before["queue_limit"] == 256 * KIB and before["tcp"]["notsent_lowat"] == 128 * KIB, before

        clients = subprocess.Popen([*ns["cli"], sys.executable, "-c", CLIENTS, "10.77.1.1", "19009", "17007", "6"],
                                   stdout=subprocess.PIPE, text=True)
        seen: list[dict] = []

        def sized() -> bool:
            (t,) = status()["tunnels"]
            seen.append({k: t[k] for k in ("queue_limit", "turn", "paused")} | {"lowat": t["tcp"]["notsent_lowat"]})
            return t["queue_limit"] <= 64 * KIB and t["tcp"]["notsent_lowat"] <= 64 * KIB

        wait_until(sized, scaled(8), interval=0.2, what="the tunnel's queues sized to 20 Mbit/s")
        out, _ = clients.communicate(timeout=scaled(60))
        result = json.loads(out)
        (t,) = status()["tunnels"]
        assert t["queue_limit"] >= 32 * KIB and t["turn"] >= 16 * KIB, t
        servers.terminate()
        discarded = [int(line.split()[1]) for line in servers.communicate(timeout=10)[0].splitlines()
                     if line.startswith("discarded")]
        assert discarded == [result["sent"]], f"sent {result['sent']}, the target got {discarded}"
        assert result["rtts"], "no ping-pong round trip beside the bulk stream"
    finally:
        for gw in (cloud, onprem):
            if gw is not None:
                gw.stop()
        if servers.poll() is None:
            servers.kill()
