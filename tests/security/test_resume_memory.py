"""Parked streams hold bounded memory (protocol §6.4, §10.3, §10.4).

1,000 clients of service A each push 320 KiB (cloud accepts, on-prem connects) into a target that
accepts and reads nothing yet, so every stream fills its window: the on-prem gateway holds what its
grants allow queued toward the target, the cloud keeps for resume what it sent and the on-prem gateway
has not ACKed. Then every tunnel is cut (``ss -K``) while an iptables rule keeps the on-prem gateway
from redialing: all 1,000 streams park on both gateways with their bytes. The rule goes, the tunnel
comes back, every stream resumes, the target reads, and each stream must arrive byte-exact.

The RSS of both gateways is sampled throughout. Bounds, from the configuration (printed):
- what a gateway holds for received bytes: the sum of the grants, N x 64 KiB (initial windows) +
  ``max_buffered`` (protocol §6.4): the on-prem gateway here;
- what the sending end (the cloud here) keeps for resume: what the far end has not ACKed. The far end
  holds at most its grants and ACKs whenever it returns credit (protocol §10.3), so this is at most the
  far end's grants and the quarter of them it may have delivered since its last ACK; and what the
  sender queues toward its tunnel: the buffer limit plus one turn per stream (protocol §6.3; when the
  1,000 streams resume, all their clients are readable at once);
plus a per-stream allowance for the stream's own objects (sockets, transports, protocol state) and
the same 50 MB slack as tests/security/test_buffer_budget.py. After the streams finish, each RSS must
come back to within 50 MB of its baseline.

Both bugs this test found are fixed (tunnel/stream.py): bytes queued toward the target when the stream
parked were overtaken by bytes written after the resume (462-466 of 1,000 streams corrupted), and the
cloud kept every byte of a stream until the on-prem gateway had received 512 KiB (peak 436 MiB).
"""

from __future__ import annotations

import random
import resource
import selectors
import socket
import subprocess
import threading
import time

import pytest

from tests.e2e.topology import make_pair
from tests.support.netns import lab_fixture
from tests.support.servers import EchoServer
from tests.support.timeouts import scaled, wait_until

from .conftest import rss_mb

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_binary("ip", "iptables", "ss")]

KiB, MiB = 1024, 1 << 20
N = 1000
SIZE = 320 * KiB  # per stream: more than a window plus what the target's kernel takes
STREAM_WINDOW = 256 * KiB
MAX_BUFFERED = 16 * MiB
INITIAL_WINDOW = 64 * KiB  # protocol §6.4
PER_STREAM = 32 * KiB  # a stream's own objects on one gateway: two sockets' transports, protocol state
TURN = 64 * KiB  # a sending stream may queue a turn toward a congested tunnel before it waits (protocol §6.3)
MAX_TUNNEL_BUFFER = 256 * KiB
SLACK = 50 * 1000 * 1000
BLOCK = random.Random(1015).randbytes(2 * MiB)
HEADER = 8  # each stream starts with its index, so the target knows what to expect


def _offset(i: int) -> int:
    return (i * 7919) % (len(BLOCK) - SIZE)


class _GatedSink:
    """Accepts at once, reads nothing until ``release()``; then reads every connection to its end and
    checks it byte for byte against what its client sent. It listens in a network namespace of its own
    (a lab host, 1500-byte MTU) with small receive buffers, so that the kernel takes little of each
    stream and the windows in the gateways fill: over loopback (64 KiB MSS) the on-prem gateway's socket
    buffers grow to take a whole 320 KiB stream, and nothing would be left in the windows."""

    def __init__(self, host):
        self.sock = host.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)  # inherited by accepted sockets
        self.sock.bind((host.ip, 0))
        self.sock.listen(2048)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.results: dict[int, str] = {}  # stream index -> "ok" or what was wrong
        self.released = threading.Event()
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def release(self):
        self.released.set()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        sel = selectors.DefaultSelector()
        block = memoryview(BLOCK)
        state: dict[socket.socket, list] = {}  # header bytes so far, stream index, payload bytes checked
        for c in list(self.conns):
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
            state[c] = [b"", None, 0]
        while not self.stop.is_set() and sel.get_map():
            for key, _ in sel.select(0.2):
                c = key.fileobj
                head, i, pos = state[c]
                err = None
                try:
                    chunk = c.recv(256 * KiB)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    chunk, err = b"", f"error {exc}"
                if not chunk:
                    sel.unregister(c)
                    c.close()
                    ok = i is not None and pos == SIZE - HEADER and err is None
                    self.results[i if i is not None else -1 - len(self.results)] = (
                        "ok" if ok else f"{err or 'EOF'} after {pos} bytes")
                    continue
                if i is None:
                    need = HEADER - len(head)
                    head, chunk = head + chunk[:need], chunk[need:]
                    state[c][0] = head
                    if len(head) == HEADER:
                        i = state[c][1] = int.from_bytes(head, "big")
                if i is not None and chunk:
                    start = _offset(i) + pos
                    if pos + len(chunk) > SIZE - HEADER or block[start:start + len(chunk)] != chunk:
                        self.results[i] = f"bytes differ at or after {pos}"
                        sel.unregister(c)
                        c.close()
                        continue
                    state[c][2] = pos + len(chunk)
        sel.close()

    def close(self):
        self.stop.set()
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


class _Clients:
    """N clients, each sending its stream (index, then SIZE - 8 bytes of BLOCK) as fast as the service
    takes it, then EOF; then each reads until the service closes."""

    def __init__(self, port: int):
        self.socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(N)]
        self.index = {s: i for i, s in enumerate(self.socks)}
        self.sent = {s: 0 for s in self.socks}
        self.closed: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        sel = selectors.DefaultSelector()
        block = memoryview(BLOCK)
        for s in self.socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_WRITE)
        while not self.stop.is_set() and sel.get_map():
            for key, events in sel.select(0.2):
                s = key.fileobj
                i = self.index[s]
                if events & selectors.EVENT_READ:
                    try:
                        if s.recv(4096):
                            continue
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    sel.unregister(s)
                    self.closed.add(i)
                    continue
                pos = self.sent[s]
                try:
                    if pos < HEADER:
                        n = s.send(i.to_bytes(HEADER, "big")[pos:])
                    else:
                        start = _offset(i) + pos - HEADER
                        n = s.send(block[start:min(start + 256 * KiB, _offset(i) + SIZE - HEADER)])
                except BlockingIOError:
                    continue
                except OSError:
                    sel.unregister(s)
                    self.closed.add(i)
                    continue
                self.sent[s] = pos + n
                if self.sent[s] == SIZE:
                    s.shutdown(socket.SHUT_WR)
                    sel.modify(s, selectors.EVENT_READ)
        sel.close()

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for s in self.socks:
            s.close()


class _Sampler:
    """Peak RSS of each gateway, sampled every 50 ms on a thread."""

    def __init__(self, gws):
        self.gws = gws
        self.peak = {g.name: 0.0 for g in gws}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            for g in self.gws:
                try:
                    self.peak[g.name] = max(self.peak[g.name], rss_mb(g.pid))
                except (OSError, AssertionError, TypeError):
                    pass
            self.stop.wait(0.05)

    def close(self):
        self.stop.set()
        self.thread.join(5)


def _iptables(op: str, port: int) -> None:
    """Refuse (RST) new connections to the tunnel port: the on-prem gateway's redials fail at once."""
    subprocess.run(["iptables", "-w", "5", op, "OUTPUT", "-o", "lo", "-p", "tcp", "--dport", str(port), "--syn",
                    "-j", "REJECT", "--reject-with", "tcp-reset"], check=True, capture_output=True,
                   timeout=scaled(10))


def _config(text: str) -> str:
    """Small windows and budget (the bound is computed from them); a cut tunnel's streams stay parked
    for min(ping_timeout, resume_timeout) = 30 s (protocol §10.4): longer than this test keeps them."""
    text = text.replace('route_wait = "2s"\n', f'route_wait = "2s"\nmax_buffered = "{MAX_BUFFERED // MiB}MiB"\n', 1)
    text = text.replace('ping_timeout = "4s"\n', f'ping_timeout = "30s"\nresume_timeout = "60s"\n'
                                                 f'stream_window = "{STREAM_WINDOW // KiB}KiB"\n', 1)
    assert "max_buffered" in text and "stream_window" in text, text
    return text


@pytest.fixture
def lab():
    yield from lab_fixture()


def test_1000_parked_streams_with_full_windows_stay_within_their_windows(tmp_path, gateways, lab):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 16384)
    if soft < want:  # the gateways inherit it: 1,000 local sockets each, twice as many here
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    assert want >= 2 * N + 500, f"RLIMIT_NOFILE hard limit {hard} is too low for {N} streams"

    target = lab.host("target")
    sink = _GatedSink(target)
    clients = sampler = None
    blocked = False
    try:
        with EchoServer() as echo:
            pair = make_pair(tmp_path, a_target=sink.port, b_target=echo.port)
            pair.onprem_services[0] = f'[[service]]\nname = "serviceA"\nconnect = "tcp://{target.ip}:{sink.port}"\n'
            cloud = gateways("cloud1", _config(pair.cloud_config()))
            onprem = gateways("onprem1", _config(pair.onprem_config()))
            wait_until(lambda: len(cloud.status()["tunnels"]) == 1, 15, what="the tunnel to come up")
            base = {g.name: rss_mb(g.pid) for g in (cloud, onprem)}
            sampler = _Sampler([cloud, onprem])
            t0 = time.monotonic()

            clients = _Clients(pair.a_port)
            wait_until(lambda: len(sink.conns) >= N, 60, what=f"{N} streams to reach the target")
            seen = [-1]

            def settled() -> bool:  # every window full: nothing moves any more
                now = clients.total
                same, seen[0] = now == seen[0], now
                return same
            wait_until(settled, 60, interval=1.0, what="the streams to stop taking bytes")
            ob = onprem.status()["buffers"]
            assert ob["buffered"] >= N * INITIAL_WINDOW // 2, f"the windows did not fill: {ob}"
            loaded = {g.name: rss_mb(g.pid) for g in (cloud, onprem)}
            t_loaded = time.monotonic() - t0

            # cut every tunnel while the on-prem gateway cannot redial: everything parks, on both sides
            _iptables("-I", pair.tunnel_port)
            blocked = True
            killed = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{pair.tunnel_port}"],
                                    capture_output=True, text=True, timeout=scaled(10)).stdout
            assert "ESTAB" in killed, killed
            wait_until(lambda: cloud.status()["resume"]["parked"] == N and onprem.status()["resume"]["parked"] == N,
                       20, interval=0.5, what=f"{N} streams parked on both gateways")
            parked = {g.name: rss_mb(g.pid) for g in (cloud, onprem)}
            t_park = time.monotonic()
            _iptables("-D", pair.tunnel_port)
            blocked = False

            wait_until(lambda: cloud.status()["resume"]["parked"] == 0 and onprem.status()["resume"]["parked"] == 0,
                       25, interval=0.5, what="every parked stream to resume")
            t_resumed = time.monotonic() - t_park
            for g in (cloud, onprem):
                r = g.status()["resume"]
                assert r["resumed"] == N and r["failed"] == 0, (g.name, r)
            sink.release()
            wait_until(lambda: len(sink.results) >= N, 90, interval=0.5, what=f"{N} streams to reach their end")
            bad = {i: v for i, v in sink.results.items() if v != "ok"}
            assert not bad and sorted(sink.results) == list(range(N)), (
                f"{len(bad)} of {N} streams broken: {list(bad.items())[:5]}")
            wait_until(lambda: len(clients.closed) == N, 30, what="every client to see its stream close")
            wait_until(lambda: onprem.status()["streams_total"] == 0 and cloud.status()["streams_total"] == 0, 30,
                       interval=0.5, what="every stream to close on both gateways")
            sampler.close()
            after = {}

            def settled_back() -> bool:  # freed memory goes back to the kernel within a few seconds
                for g in (cloud, onprem):
                    after[g.name] = rss_mb(g.pid)
                return all(after[n] <= base[n] + SLACK / MiB for n in after)
            try:
                wait_until(settled_back, 20, interval=0.5, what="RSS back near baseline")
            except AssertionError:
                pass  # reported below with the numbers

            grants = (N * INITIAL_WINDOW + MAX_BUFFERED) / MiB  # either gateway's grants, same config
            turns = (N * TURN + MAX_TUNNEL_BUFFER) / MiB
            objects = N * PER_STREAM / MiB
            bound = {"onprem1": base["onprem1"] + grants + objects + SLACK / MiB,  # receives: queued bytes
                     "cloud1": base["cloud1"] + 1.25 * grants + turns + objects + SLACK / MiB}  # sends: kept
            print(f"\n{N} streams, stream_window {STREAM_WINDOW // KiB} KiB, max_buffered {MAX_BUFFERED // MiB} MiB: "
                  f"grants {grants:.1f} MiB (kept: x 1.25), tunnel queue {turns:.1f} MiB, objects {objects:.1f} MiB, "
                  f"slack {SLACK / MiB:.1f} MiB; loaded after {t_loaded:.1f}s, resumed {t_resumed:.1f}s after the "
                  "block was lifted")
            for n in ("cloud1", "onprem1"):
                print(f"  {n}: RSS baseline {base[n]:.1f} MiB, loaded {loaded[n]:.1f}, parked {parked[n]:.1f}, "
                      f"peak {sampler.peak[n]:.1f} (bound {bound[n]:.1f}), after {after[n]:.1f} MiB")
            for n in ("cloud1", "onprem1"):
                assert sampler.peak[n] <= bound[n], f"{n}: RSS peaked at {sampler.peak[n]:.1f} MiB > {bound[n]:.1f} MiB"
                assert after[n] <= base[n] + SLACK / MiB, (
                    f"{n}: RSS {after[n]:.1f} MiB after every stream finished, baseline {base[n]:.1f} MiB")
    finally:
        if blocked:
            _iptables("-D", pair.tunnel_port)
        if sampler is not None:
            sampler.close()
        if clients is not None:
            clients.close()
        sink.close()
