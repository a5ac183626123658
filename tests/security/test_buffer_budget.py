"""Issue 12: streams into targets that never read must not grow a gateway's memory without bound.

300 clients each push 8 MiB through the tunnel (cloud accepts, on-prem connects) into a target that
accepts and never reads; before the budget (docs/protocol.md §6.4) that took an on-prem gateway to
1.04 GB. With ``[gateway] max_buffered = "64MiB"`` the on-prem gateway's RSS must stay within
baseline + 64 MiB + 50 MB while, on the same tunnel, one more stream moves 256 MiB into a reader
that reads (byte count and SHA-256 checked).
"""

from __future__ import annotations

import hashlib
import random
import resource
import selectors
import socket
import threading
import time

from tests.e2e.topology import make_pair, service
from tests.support.ports import free_ports
from tests.support.timeouts import scaled, wait_until

MiB = 1 << 20
BUDGET = 64 * MiB
SLACK = 50 * 1000 * 1000  # the 50 MB
STUCK = 300
STUCK_BYTES = 8 * MiB
HEALTHY_BYTES = 256 * MiB
BLOCK = random.Random(12).randbytes(MiB)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class _NeverReads:
    """Accepts connections and keeps them open without ever reading."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


class _Sink:
    """Reads everything of each connection, counting and hashing it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.done = threading.Event()
        self.count = 0
        self.sha = hashlib.sha256()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            while chunk := conn.recv(1 << 20):
                self.count += len(chunk)
                self.sha.update(chunk)
        self.done.set()

    def close(self):
        self.sock.close()


class _StuckClients:
    """``n`` clients that each try to send ``size`` bytes as fast as the tunnel takes them."""

    def __init__(self, port: int, n: int, size: int):
        self.socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
        self.sent = {s: 0 for s in self.socks}
        self.size = size
        self.stop = threading.Event()
        self.payload = memoryview(BLOCK * (size // MiB))
        self.thread = threading.Thread(target=self._push, daemon=True)
        self.thread.start()

    def _push(self):
        sel = selectors.DefaultSelector()
        for s in self.socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_WRITE)
        while not self.stop.is_set() and sel.get_map():
            for key, _ in sel.select(0.2):
                s = key.fileobj
                off = self.sent[s]
                try:
                    self.sent[s] += s.send(self.payload[off:off + 256 * 1024])
                except BlockingIOError:
                    continue
                except OSError:
                    sel.unregister(s)
                    continue
                if self.sent[s] >= self.size:
                    sel.unregister(s)
        sel.close()

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for s in self.socks:
            s.close()


def test_300_streams_into_readers_that_never_read_stay_within_max_buffered(tmp_path, gateways):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192)
    if soft < want:  # the gateways inherit it: 300 local sockets each, and as many here
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    assert want >= 2 * STUCK + 200, f"RLIMIT_NOFILE hard limit {hard} is too low for {STUCK} streams"

    stuck_target, sink = _NeverReads(), _Sink()
    stuck = None
    try:
        pair = make_pair(tmp_path, a_target=stuck_target.port, b_target=sink.port)
        (c_port,) = free_ports(1)
        pair.cloud_services.append(service("serviceC", accept=c_port))
        pair.onprem_services.append(service("serviceC", connect=sink.port))
        onprem_text = pair.onprem_config().replace(
            'route_wait = "2s"\n', f'route_wait = "2s"\nmax_buffered = "{BUDGET // MiB}MiB"\n', 1)
        assert "max_buffered" in onprem_text
        cloud = gateways("cloud1", pair.cloud_config())
        onprem = gateways("onprem1", onprem_text)
        wait_until(lambda: len(cloud.status()["tunnels"]) >= 1, 15, what="the tunnel to come up")
        st = onprem.status()
        assert st["buffers"]["budget"] == BUDGET
        baseline = _rss(onprem.pid)
        bound = baseline + BUDGET + SLACK
        peak = [baseline]
        sampling = threading.Event()

        def sample():
            while not sampling.is_set() and onprem.running:
                try:
                    peak[0] = max(peak[0], _rss(onprem.pid))
                except (OSError, AssertionError):  # it exited: the test fails on that elsewhere
                    return
                sampling.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        first_stuck = time.monotonic()
        stuck = _StuckClients(pair.a_port, STUCK, STUCK_BYTES)

        wait_until(lambda: len(stuck_target.conns) >= STUCK, 60, what=f"{STUCK} streams to reach the target")

        # the stuck streams stop moving: what they hold then is what they keep holding
        sent_seen = [-1]

        def settled() -> bool:
            now = sum(stuck.sent.values())
            same, sent_seen[0] = now == sent_seen[0], now
            return same or peak[0] > bound
        wait_until(settled, 120, interval=1.0, what="the stuck streams to stop taking bytes")
        b = onprem.status()["buffers"]
        assert peak[0] <= bound and b["committed"] <= BUDGET, (
            f"with {STUCK} stuck streams the on-prem RSS peaked at {peak[0] / MiB:.1f} MiB, bound "
            f"{bound / MiB:.1f} MiB (baseline {baseline / MiB:.1f} MiB); budget {b}")

        # one more stream on the same tunnel, into a reader that reads
        started = time.monotonic()
        want_sha = hashlib.sha256()
        with socket.create_connection(("127.0.0.1", c_port)) as c:
            for _ in range(HEALTHY_BYTES // MiB):
                c.sendall(BLOCK)
                want_sha.update(BLOCK)
            c.shutdown(socket.SHUT_WR)
            assert sink.done.wait(scaled(180)), f"256 MiB stream stuck at {sink.count} bytes"
        took = time.monotonic() - started
        sampling.set()
        sampler.join(5)
        assert sink.count == HEALTHY_BYTES and sink.sha.hexdigest() == want_sha.hexdigest()

        b = onprem.status()["buffers"]
        print(f"\nRSS baseline {baseline / MiB:.1f} MiB, peak {peak[0] / MiB:.1f} MiB "
              f"(bound {bound / MiB:.1f} MiB); 256 MiB moved in {took:.1f} s; "
              f"stuck clients sent {sum(stuck.sent.values()) / MiB:.0f} MiB; budget {b}")
        assert peak[0] <= bound, (
            f"on-prem RSS peaked at {peak[0] / MiB:.1f} MiB > baseline {baseline / MiB:.1f} MiB "
            f"+ max_buffered {BUDGET / MiB:.0f} MiB + 50 MB")
        assert took < scaled(120)
        assert b["committed"] <= BUDGET and b["exhausted"] >= 1
        lines = [r for r in onprem.log_lines() if r.get("event") == "budget.exhausted"]
        elapsed = time.monotonic() - first_stuck
        assert 1 <= len(lines) <= 1 + elapsed / 10, f"{len(lines)} budget.exhausted lines in {elapsed:.0f} s"
        assert "max_buffered" in lines[0]["msg"]

        # Every stream gone: all credit is back, nobody waits, nothing is queued. A stream that kept
        # its grant or its place in the queue after closing would leave later streams less budget
        # (docs/performance.md 7.6 looked for that after bulk transfers).
        stuck.close()
        stuck = None
        stuck_target.close()  # the target's resets end the streams that still wait for credit

        def buffers() -> dict:
            return {g.name: {k: g.status()["buffers"][k] for k in ("committed", "holders", "waiting", "buffered")}
                    for g in (cloud, onprem)}
        try:
            wait_until(lambda: not any(v for b in buffers().values() for v in b.values()), 60, interval=0.5,
                       what="the budget to be released")
        except AssertionError:
            raise AssertionError(f"budget not released once every stream closed: {buffers()}") from None
        # the last streams may still be closing (FIN both ways) when the budget is already free
        wait_until(lambda: onprem.status()["streams_total"] == 0 and cloud.status()["streams_total"] == 0, 30,
                   interval=0.5, what="every stream to close on both gateways")
    finally:
        if stuck is not None:
            stuck.close()
        stuck_target.close()
        sink.close()
