"""Chaos soak: the HA topology in network namespaces, under continuous load and random faults.

Run ``scripts/soak --minutes N [--seed S]`` (root; see docs/operations.md "Chaos soak").

Topology (one namespace per box, ``tests/support/netns.py``): cloud members ``cloud1``, ``cloud2``
(one cluster, peer links), on-prem gateways ``onprem1``, ``onprem2`` that dial only an nginx stream
load balancer (host ``lb``) in front of the members' tunnel ports, and two target hosts: ``servera``
(behind service A: cloud clients -> on-prem target) and ``serverb`` (behind service B: on-prem
clients -> cloud target), each with an echo, a sink (replies with the SHA-256 of what it read) and
a source (sends a seeded random payload). Certificates have CN = node_id. Clients run in the root
namespace, which reaches every host directly.

Load: two workers making short echo connections back to back through every entry point, plus
``--concurrency`` long transfers (echo, sink and source, both services, ``--size`` MiB), each
checked by SHA-256.

Faults, one at a time, drawn from a seeded shuffled deck so that every kind occurs once per round:
SIGKILL or SIGTERM of a gateway (then restarted), a partition (iptables DROP: a whole gateway
host, the balancer host, the peer link between the members, or an on-prem gateway from the
balancer; then healed), a tunnel or peer-link TCP reset (``ss -K``), an nginx restart, SIGHUP
with a valid changed config, SIGHUP with an invalid config (then the valid one again), and floods
of unauthenticated connections (raw TCP: idle, HTTP junk, garbage; TLS without a client
certificate) at a tunnel port.

Invariants (each failure is a *violation*; any violation makes the exit status 1):

* a long transfer that completes has the right length and SHA-256 (a clean EOF with missing bytes
  counts as corrupted: a cut stream must be reset, never look complete);
* a long transfer is reset only if it overlapped a disruptive fault on a gateway of its path (the
  path comes from the entry gateway's /api/status, and for a relayed stream from the carrying
  member's; unknown path = every gateway, the conservative choice);
* no transfer hangs: it makes progress at least every ``--stall`` seconds (default ping_timeout +
  ping_interval + slack) until it ends;
* a short connection fails only while a disruptive fault is in progress (from injection until
  recovery, plus a grace second);
* after every fault, a new client gets its echo through each of the four entry points within
  ``--recovery-bound`` seconds (the recovery time is reported), each on-prem gateway holds its
  ``per_member`` tunnels to each member again within the same bound, a restarted gateway becomes
  ready, a SIGTERM exits 0 within drain_timeout, no gateway exits on its own;
* SIGHUP with a valid config logs ``gateway.reloaded``; with an invalid one ``gateway.reload_failed``
  and nothing changes; a non-disruptive fault (reload, flood) resets no transfer;
* floods: no WebSocket upgrade without a client certificate; every flood connection is closed by
  the gateway within ``tunnel.handshake_timeout`` + slack; afterwards no CLOSE-WAIT socket is left
  on the member's tunnel port;
* at the end (load stopped): no stream left in any /api/status, and for every gateway never
  restarted during the run, descriptors, asyncio tasks (``tasks`` in /api/status) and RSS back
  near their values before the load started;
* no ``internal.error`` and no traceback in any gateway log.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import selectors
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

from tests.e2e.ha import HA, Addr, make_certs
from tests.support.gateway import Gateway
from tests.support.markers import find_binary
from tests.support.netns import Host, Lab, LabUnavailable
from tests.support.nginx import NginxLB
from tests.support.servers import EchoServer, SinkServer, SourceServer

CLOUDS = ("cloud1", "cloud2")
ONPREMS = ("onprem1", "onprem2")
GATEWAYS = CLOUDS + ONPREMS
TUNNEL_PORT = 8443
PEER_PORT = 8444
LB_PORT = 8443
ADMIN_PORT = 9090
A_PORTS = {"echo": 5551, "sink": 5552, "source": 5553}  # on every member (service A: cloud accepts)
B_PORTS = {"echo": 6661, "sink": 6662, "source": 6663}  # on every on-prem gateway (service B)
PER_MEMBER = 2
PING_INTERVAL, PING_TIMEOUT = 0.5, 2.0  # what tests/e2e/ha.py configures
DRAIN_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 3.0  # members' tunnel.handshake_timeout: bounds how long a flood connection may live
GRACE = 1.0  # a fault's window extends this long past its recovery
SOURCE_HEADER = 24  # "%012d%012d" % (connection index, payload size)

FAULT_KINDS = ("sigkill", "sigterm", "partition", "tunnel_reset", "nginx_restart",
               "sighup_valid", "sighup_invalid", "flood_tcp", "flood_tls")


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}s"


# --- records ---------------------------------------------------------------------------------

@dataclass
class Fault:
    kind: str
    target: str
    t_inject: float
    detail: str = ""
    disruptive: bool = True
    affects: frozenset[str] = frozenset()  # a transfer whose path meets these may be reset
    require_all: bool = False  # ... only if its path holds all of them (peer-link split)
    t_end: float | None = None  # restarted / healed / released
    t_recovered: float | None = None
    recovery_s: float | None = None
    violations: list[str] = field(default_factory=list)
    transfers: dict[str, int] = field(default_factory=lambda: {"ok": 0, "reset": 0, "truncated": 0, "corrupt": 0,
                                                               "hang": 0})

    def window(self) -> tuple[float, float]:
        end = self.t_recovered if self.t_recovered is not None else float("inf")
        return self.t_inject - 0.2, end + GRACE

    def overlaps(self, start: float, end: float) -> bool:
        lo, hi = self.window()
        return start <= hi and end >= lo

    def hits(self, path: frozenset[str] | None) -> bool:
        if not self.disruptive:
            return False
        if path is None:
            return True
        return self.affects <= path if self.require_all else bool(self.affects & path)

    def describe(self) -> str:
        return f"{self.kind} {self.target} at t={self.t_inject:.1f}s ({self.detail})"


class Transfer(threading.Thread):
    """One long transfer from the root namespace, checked by SHA-256.

    ``mode``: echo (send the payload, read it back), sink (send it, read the sink's digest),
    source (read a seeded payload the source server picks, verify it). ``outcome``: ok, reset
    (any socket error, refused connect included), corrupt (ended cleanly with wrong or missing
    bytes), hang (no progress for the stall bound; the watchdog aborts it)."""

    def __init__(self, soak: Soak, index: int, service: str, mode: str, entry: str, size: int, seed: int):
        super().__init__(daemon=True, name=f"transfer-{index}")
        self.soak = soak
        self.index = index
        self.service = service  # "A" or "B"
        self.mode = mode
        self.entry = entry
        self.size = size
        self.seed = seed
        self.label = f"#{index} {service}-{mode} via {entry}"
        self.addr = soak.entry_addr(entry, mode)
        self.t_start = soak.now()
        self.t_end: float | None = None
        self.last_progress = time.monotonic()
        self.max_pause = 0.0  # longest time without progress (the stall bound's margin)
        self.outcome: str | None = None
        self.error: str | None = None
        self.bytes = 0  # bytes verified (received, or sent for a sink)
        self.local_port: int | None = None
        self.path: frozenset[str] | None = None  # gateways the stream passes, None: unknown
        self.hung = False
        self.sock: socket.socket | None = None
        self.done = threading.Event()

    # progress + watchdog
    def progress(self) -> None:
        now = time.monotonic()
        self.max_pause = max(self.max_pause, now - self.last_progress)
        self.last_progress = now

    def abort_hung(self) -> None:
        self.hung = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            self.outcome, self.error = "reset", f"harness: {exc!r}"
            self.soak.harness_errors.append(f"{self.label}: {traceback.format_exc()}")
        finally:
            if self.hung:
                self.outcome = "hang"
            if self.sock is not None:  # the time from the last byte to the end counts too (a reset after a stall)
                self.progress()
            self.t_end = self.soak.now()
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.close()
            self.done.set()

    def _run(self) -> None:
        try:
            s = socket.create_connection(self.addr, timeout=10)
        except OSError as exc:
            self.outcome, self.error = "reset", f"connect: {exc!r}"
            return
        s.settimeout(self.soak.stall + 10)  # backstop; the watchdog acts first
        self.sock = s
        self.local_port = s.getsockname()[1]
        self.progress()
        self.soak.trace_path(self)
        try:
            getattr(self, f"_{self.mode}")(s)
        except OSError as exc:
            self.outcome, self.error = "reset", repr(exc)

    def _payload(self) -> bytes:
        return random.Random(self.seed).randbytes(self.size)

    def _pace(self, done: int, started: float) -> None:
        """Stay at or below --rate: sleep until ``done`` bytes are due."""
        if self.soak.rate:
            ahead = done / self.soak.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    def _sender(self, s: socket.socket, payload: bytes, errors: list) -> None:
        try:
            view = memoryview(payload)
            started = time.monotonic()
            for off in range(0, len(view), 256 * 1024):
                s.sendall(view[off:off + 256 * 1024])
                self.progress()
                self._pace(off + 256 * 1024, started)
            s.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(exc)

    def _echo(self, s: socket.socket) -> None:
        payload = self._payload()
        want = hashlib.sha256(payload).hexdigest()
        errors: list = []
        sender = threading.Thread(target=self._sender, args=(s, payload, errors), daemon=True)
        sender.start()
        got = hashlib.sha256()
        n = 0
        while chunk := s.recv(1 << 18):
            got.update(chunk)
            n += len(chunk)
            self.progress()
        sender.join(self.soak.stall + 10)
        self.bytes = n
        if errors:
            self.outcome, self.error = "reset", f"send: {errors[0]!r} (received {n})"
        elif n == len(payload) and got.hexdigest() == want:
            self.outcome = "ok"
        else:
            self._short_or_wrong(n, len(payload), got.hexdigest(), payload)

    def _sink(self, s: socket.socket) -> None:
        payload = self._payload()
        want = hashlib.sha256(payload).hexdigest()
        errors: list = []
        self._sender(s, payload, errors)
        if errors:
            self.outcome, self.error = "reset", f"send: {errors[0]!r}"
            return
        reply = bytearray()
        while chunk := s.recv(4096):
            reply += chunk
            self.progress()
        if reply.decode(errors="replace").strip() == want:
            self.outcome, self.bytes = "ok", len(payload)
        elif not reply:
            self.outcome, self.error = "truncated", f"clean EOF without the sink's digest (sent {len(payload)} bytes)"
        else:
            self.outcome = "corrupt"
            self.error = f"the sink answered {bytes(reply[:80])!r}, want {want}: it read other bytes than were sent"

    def _short_or_wrong(self, n: int, size: int, digest: str, expected: bytes) -> None:
        """A clean EOF with other bytes than expected: "truncated" if they are a prefix of the
        expected bytes (possible only when the process holding the client's socket died, see
        Report), else "corrupt"."""
        if n < size and hashlib.sha256(expected[:n]).hexdigest() == digest:
            self.outcome, self.error = "truncated", f"clean EOF after {n} of {size} bytes (a correct prefix)"
        else:
            self.outcome = "corrupt"
            self.error = f"clean EOF after {n} of {size} bytes, sha256 differs from the expected bytes"

    def _source(self, s: socket.socket) -> None:
        head = bytearray()
        got = hashlib.sha256()
        n = 0
        started = time.monotonic()
        while chunk := s.recv(1 << 18):
            self.progress()
            self._pace(n, started)
            if len(head) < SOURCE_HEADER:
                take = SOURCE_HEADER - len(head)
                head += chunk[:take]
                chunk = chunk[take:]
            got.update(chunk)
            n += len(chunk)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)  # the source waits for our EOF before it closes
        self.bytes = n
        if len(head) < SOURCE_HEADER:
            self.outcome, self.error = "truncated", f"clean EOF after {len(head)} header bytes"
            return
        try:
            index, size = int(head[:12]), int(head[12:])
        except ValueError:
            self.outcome, self.error = "corrupt", f"bad source header {bytes(head)!r}"
            return
        body = self.soak.source_body(self.service, index, size)
        if n == size and got.hexdigest() == hashlib.sha256(body).hexdigest():
            self.outcome = "ok"
        else:
            self._short_or_wrong(n, size, got.hexdigest(), body)
            self.error += f" (source connection {index})"


@dataclass
class ShortEcho:
    entry: str
    t_start: float
    t_end: float
    ok: bool
    error: str = ""
    local_port: int | None = None
    kind: str = "error"  # ok, error (refused, reset, timeout), truncated (clean EOF, a prefix), corrupt


@dataclass
class Sample:
    t: float
    pid: int
    rss_kib: int
    fds: int
    tasks: int | None
    streams: int | None


# --- the soak --------------------------------------------------------------------------------

class Soak:
    def __init__(self, *, minutes: float, seed: int, workdir: Path, concurrency: int = 4,
                 size_mib: tuple[int, int] = (16, 32), stall: float = PING_TIMEOUT + PING_INTERVAL + 12.5,
                 recovery_bound: float = 30.0, rate_mib: float = 8.0, out: Callable[[str], None] = print) -> None:
        self.minutes = minutes
        self.seed = seed
        self.rng = random.Random(seed)
        # One member and one on-prem gateway are never killed or stopped, so that every run has
        # gateways whose descriptors, tasks and RSS can be compared from start to end. They still
        # get every other fault (partitions, resets, reloads, floods).
        self.controls = frozenset({self.rng.choice(CLOUDS), self.rng.choice(ONPREMS)})
        self.killable = tuple(g for g in GATEWAYS if g not in self.controls)
        self.workdir = Path(workdir)
        self.concurrency = concurrency
        self.size = (size_mib[0] * 2**20, size_mib[1] * 2**20)
        self.stall = stall
        self.recovery_bound = recovery_bound
        self.rate = rate_mib * 2**20  # bytes/s per long transfer, 0: unpaced
        self.out = out
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.lab: Lab | None = None
        self.hosts: dict[str, Host] = {}
        self.gws: dict[str, Gateway] = {}
        self.valid_config: dict[str, str] = {}
        self.lb: NginxLB | None = None
        self.servers: list = []
        self.faults: list[Fault] = []
        self.transfers: list[Transfer] = []
        self.echoes: list[ShortEcho] = []
        self.samples: dict[str, list[Sample]] = {g: [] for g in GATEWAYS}
        self.baseline: dict[str, Sample] = {}
        self.final: dict[str, Sample] = {}
        self.restarted: set[str] = set()
        self.expected_down: set[str] = set()
        self.unexpected_exits: dict[str, int] = {}
        self.violations: list[str] = []  # run-wide (not tied to one fault)
        self.harness_errors: list[str] = []
        self.load_running = threading.Event()
        self.stop_all = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seq = 0
        self.load_started = 0.0
        self._lock = threading.Lock()

    # -- time & logging -------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def wall(self, t: float) -> str:
        return time.strftime("%H:%M:%S", time.localtime(self.wall0 + t)) + f".{int((self.wall0 + t) % 1 * 1000):03d}"

    def log(self, msg: str) -> None:
        self.out(f"[soak t={self.now():6.1f}s] {msg}")

    # -- topology -------------------------------------------------------------------------

    def entry_addr(self, entry: str, mode: str) -> tuple[str, int]:
        ports = A_PORTS if entry in CLOUDS else B_PORTS
        return self.hosts[entry].ip, ports[mode]

    def source_body(self, service: str, index: int, size: int) -> bytes:
        return random.Random(f"{self.seed}/{service}/{index}").randbytes(size)

    def _source_payload(self, service: str) -> Callable[[int], bytes]:
        rng = random.Random(f"{self.seed}/{service}/sizes")
        lock = threading.Lock()

        def payload(index: int) -> bytes:
            with lock:
                size = rng.randint(*self.size)
            return b"%012d%012d" % (index, size) + self.source_body(service, index, size)
        return payload

    def build(self) -> None:
        self.lab = Lab().__enter__()
        lab = self.lab
        for name in (*CLOUDS, *ONPREMS, "servera", "serverb", "lb"):
            self.hosts[name] = lab.host(name)
        targets: dict[str, dict[str, int]] = {}
        for side, svc in (("servera", "A"), ("serverb", "B")):
            with self.hosts[side].entered():
                echo = EchoServer(self.hosts[side].ip)
                sink = SinkServer(self.hosts[side].ip)
                source = SourceServer(self._source_payload(svc), self.hosts[side].ip)
            self.servers += [echo, sink, source]
            targets[svc] = {"echo": echo.port, "sink": sink.port, "source": source.port}
        cloud_ips = [self.hosts[c].ip for c in CLOUDS]
        lb_ip = self.hosts["lb"].ip
        certs = make_certs(self.workdir / "certs", list(CLOUDS), list(ONPREMS), sans=[*cloud_ips, lb_ip])
        self.lb = NginxLB(self.workdir, self.hosts["lb"], LB_PORT, [(ip, TUNNEL_PORT) for ip in cloud_ips],
                          method="least_conn", fail_timeout="2s")
        self.lb.start().wait_ready()
        clouds = {c: {"tunnel": Addr(self.hosts[c].ip, TUNNEL_PORT), "peer": Addr(self.hosts[c].ip, PEER_PORT),
                      "client": Addr(self.hosts[c].ip, A_PORTS["echo"]), "admin": Addr("127.0.0.1", ADMIN_PORT)}
                  for c in CLOUDS}
        onprems = {o: {"client": Addr(self.hosts[o].ip, B_PORTS["echo"]), "admin": Addr("127.0.0.1", ADMIN_PORT)}
                   for o in ONPREMS}
        ha = HA(certs, clouds, onprems, Addr(self.hosts["servera"].ip, targets["A"]["echo"]),
                Addr(self.hosts["serverb"].ip, targets["B"]["echo"]),
                connect_urls=[f"wss://{lb_ip}:{LB_PORT}/intercloud"], per_member=PER_MEMBER,
                drain_timeout=f"{DRAIN_TIMEOUT:g}s")
        a_ip, b_ip = self.hosts["servera"].ip, self.hosts["serverb"].ip

        def svc(name: str, key: str, addr: str) -> str:
            return f'\n[[service]]\nname = "{name}"\n{key} = "tcp://{addr}"\n'

        for c in CLOUDS:
            ip = self.hosts[c].ip
            pt = f'ping_timeout = "{PING_TIMEOUT:g}s"\n'
            text = ha.cloud_config(c).replace(pt, f'{pt}handshake_timeout = "{HANDSHAKE_TIMEOUT:g}s"\n')
            assert "handshake_timeout" in text, "tests/e2e/ha.py changed its ping_timeout line"
            text += (svc("sinkA", "accept", f"{ip}:{A_PORTS['sink']}")
                     + svc("sourceA", "accept", f"{ip}:{A_PORTS['source']}")
                     + svc("sinkB", "connect", f"{b_ip}:{targets['B']['sink']}")
                     + svc("sourceB", "connect", f"{b_ip}:{targets['B']['source']}"))
            self.valid_config[c] = text
        for o in ONPREMS:
            ip = self.hosts[o].ip
            text = ha.onprem_config(o)
            text += (svc("sinkA", "connect", f"{a_ip}:{targets['A']['sink']}")
                     + svc("sourceA", "connect", f"{a_ip}:{targets['A']['source']}")
                     + svc("sinkB", "accept", f"{ip}:{B_PORTS['sink']}")
                     + svc("sourceB", "accept", f"{ip}:{B_PORTS['source']}"))
            self.valid_config[o] = text
        for name in GATEWAYS:
            self.gws[name] = Gateway(self.workdir, name, self.valid_config[name],
                                     argv_prefix=self.hosts[name].argv_prefix)
        for c in CLOUDS:  # the cluster first, then the sites (as tests/e2e/netns_topology.py does)
            self.gws[c].start()
        for c in CLOUDS:
            self.wait_ready(c, 30)
        for o in ONPREMS:
            self.gws[o].start()
        for o in ONPREMS:
            self.wait_ready(o, 30)
        self.wait_coverage(45)

    def close(self) -> None:
        self.stop_all.set()
        self.load_running.clear()
        for t in self._threads:
            t.join(10)
        for gw in self.gws.values():
            with contextlib.suppress(Exception):
                gw.stop(grace=5)
        if self.lb is not None:
            with contextlib.suppress(Exception):
                self.lb.stop()
        for s in self.servers:
            with contextlib.suppress(Exception):
                s.stop()
        if self.lab is not None:
            self.lab.close()

    # -- observing gateways ---------------------------------------------------------------

    def status(self, name: str, timeout: float = 3.0) -> dict:
        gw = self.gws[name]
        with self.hosts[name].entered():
            code, body = gw.http_get("/api/status", timeout=timeout)
        if code != 200:
            raise OSError(f"{name}: /api/status -> {code}")
        return json.loads(body)

    def wait_ready(self, name: str, timeout: float) -> None:
        with self.hosts[name].entered():
            self.gws[name].wait_ready(timeout=timeout)

    def coverage(self, onprem: str) -> dict[str, int]:
        cov: dict[str, int] = {}
        for t in self.status(onprem)["tunnels"]:
            if not t.get("draining"):
                cov[t["peer_node"]] = cov.get(t["peer_node"], 0) + 1
        return cov

    def covered(self) -> bool:
        want = {c: PER_MEMBER for c in CLOUDS}
        try:
            return all(self.coverage(o) == want for o in ONPREMS)
        except (OSError, ValueError):
            return False

    def coverage_table(self) -> str:
        parts = []
        for o in ONPREMS:
            try:
                parts.append(f"{o}: {self.coverage(o)}")
            except (OSError, ValueError) as exc:
                parts.append(f"{o}: {exc}")
        return "; ".join(parts)

    def wait_coverage(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.covered():
                return True
            time.sleep(0.1)
        return self.covered()

    def sample(self, name: str) -> Sample | None:
        gw = self.gws[name]
        pid = gw.pid
        if pid is None or not gw.running:
            return None
        try:
            rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration):
            return None
        tasks = streams = None
        with contextlib.suppress(OSError, ValueError):
            st = self.status(name)
            tasks, streams = st.get("tasks"), len(st.get("streams", []))
        return Sample(self.now(), pid, rss, fds, tasks, streams)

    def trace_path(self, t: Transfer) -> None:
        """Find which gateways carry ``t``'s stream (from /api/status), in a helper thread."""
        threading.Thread(target=self._trace_path, args=(t,), daemon=True, name=f"path-{t.index}").start()

    def _find_path(self, t: Transfer) -> frozenset[str] | None:
        client = f"{self.lab.root_ip}:{t.local_port}"
        st = self.status(t.entry)
        tunnels = {tu["id"]: tu["peer_node"] for tu in st["tunnels"]}
        for s in st["streams"]:
            if s.get("client") != client or s.get("side") != "accept":
                continue
            peer = tunnels.get(s["tunnel"])
            if peer is not None and not s.get("relay"):
                return frozenset({t.entry, peer})
            # relayed: entry member -> peer link -> carrying member -> one of its on-prem tunnels
            others = [c for c in CLOUDS if c != t.entry]
            for other in others:
                with contextlib.suppress(OSError, ValueError):
                    ost = self.status(other)
                    otun = {tu["id"]: tu["peer_node"] for tu in ost["tunnels"]}
                    for os_ in ost["streams"]:
                        if os_.get("client") == client and os_["tunnel"] in otun:
                            return frozenset({t.entry, other, otun[os_["tunnel"]]})
            return frozenset({t.entry, *others, *ONPREMS})
        return None

    def _trace_path(self, t: Transfer) -> None:
        found: set[str] = set()
        unknown = True
        for delay in (0.3, 1.2, 3.0):
            if t.done.wait(delay):
                break
            try:
                path = self._find_path(t)
            except (OSError, ValueError):
                path = None
            if path is not None:
                found |= path
                unknown = False
        # Not seen at all (ended or failed before, admin down): unknown, i.e. every gateway.
        t.path = None if unknown else frozenset(found)

    # -- load -----------------------------------------------------------------------------

    def _short_worker(self, wid: int) -> None:
        rng = random.Random(f"{self.seed}/short/{wid}")
        while self.load_running.is_set():
            entry = rng.choice(GATEWAYS)
            msg = rng.randbytes(rng.randint(1, 4096))
            start = self.now()
            port = None
            try:
                with socket.create_connection(self.entry_addr(entry, "echo"), timeout=10) as s:
                    port = s.getsockname()[1]
                    s.sendall(msg)
                    s.shutdown(socket.SHUT_WR)
                    buf = bytearray()
                    while chunk := s.recv(65536):
                        buf += chunk
                ok, kind = bytes(buf) == msg, "ok"
                if not ok:
                    kind = "truncated" if msg.startswith(bytes(buf)) else "corrupt"
                    err = f"clean EOF after {len(buf)} of {len(msg)} bytes" + (
                        ", other bytes than were sent" if kind == "corrupt" else "")
            except OSError as exc:
                ok, kind, err = False, "error", repr(exc)
            self.echoes.append(ShortEcho(entry, start, self.now(), ok, err if not ok else "", port, kind))
            self.stop_all.wait(rng.uniform(0.02, 0.1))

    def _transfer_manager(self) -> None:
        rng = random.Random(f"{self.seed}/transfers")
        kinds = [(svc, mode) for svc in "AB" for mode in ("echo", "sink", "source")]
        live: list[Transfer] = []
        while self.load_running.is_set():
            live = [t for t in live if not t.done.is_set()]
            while len(live) < self.concurrency:
                svc, mode = rng.choice(kinds)
                entry = rng.choice(CLOUDS if svc == "A" else ONPREMS)
                self._seq += 1
                t = Transfer(self, self._seq, svc, mode, entry, rng.randint(*self.size), rng.getrandbits(32))
                self.transfers.append(t)
                live.append(t)
                t.start()
            self.stop_all.wait(0.2)

    def _monitor(self) -> None:
        last_sample = 0.0
        while not self.stop_all.wait(0.5):
            mono = time.monotonic()
            for t in list(self.transfers):
                if not t.done.is_set() and not t.hung and mono - t.last_progress > self.stall:
                    self.log(f"HANG {t.label}: no progress for {mono - t.last_progress:.1f}s; aborting it")
                    t.abort_hung()
            for name, gw in self.gws.items():
                if name in self.expected_down or gw.running or name in self.unexpected_exits:
                    continue
                self.unexpected_exits[name] = gw.returncode
                self.violations.append(f"{name} exited on its own at t={self.now():.1f}s ({self.wall(self.now())}) "
                                       f"with code {gw.returncode}; see {gw.log_path}")
                self.log(f"VIOLATION: {name} exited on its own (code {gw.returncode})")
            if mono - last_sample >= 3:
                last_sample = mono
                for name in GATEWAYS:
                    if name not in self.expected_down and (s := self.sample(name)):
                        self.samples[name].append(s)

    def _start_thread(self, target, *args, name: str) -> None:
        th = threading.Thread(target=target, args=args, daemon=True, name=name)
        th.start()
        self._threads.append(th)

    # -- recovery -------------------------------------------------------------------------

    def probe(self, entry: str, timeout: float = 8.0) -> bool:
        msg = f"probe {entry} {random.random()}\n".encode()
        try:
            with socket.create_connection(self.entry_addr(entry, "echo"), timeout=timeout) as s:
                s.sendall(msg)
                s.shutdown(socket.SHUT_WR)
                buf = bytearray()
                while chunk := s.recv(65536):
                    buf += chunk
            return bytes(buf) == msg
        except OSError:
            return False

    def recover(self, f: Fault, restarted: str | None = None) -> None:
        f.t_end = self.now()
        deadline = time.monotonic() + self.recovery_bound
        if restarted is not None:
            try:
                self.wait_ready(restarted, self.recovery_bound)
            except AssertionError as exc:
                f.violations.append(f"{restarted} not ready {self.recovery_bound:g}s after its restart: "
                                    f"{str(exc).splitlines()[0]}")
            self.expected_down.discard(restarted)
        first: dict[str, float] = {}

        def until_echo(entry: str) -> None:
            while time.monotonic() < deadline:
                if self.probe(entry):
                    first[entry] = self.now()
                    return
                time.sleep(0.05)

        probes = [threading.Thread(target=until_echo, args=(e,), daemon=True) for e in GATEWAYS]
        for p in probes:
            p.start()
        for p in probes:
            p.join(self.recovery_bound + 10)
        missing = [e for e in GATEWAYS if e not in first]
        if missing:
            f.violations.append(f"no echo through {', '.join(missing)} within {self.recovery_bound:g}s after "
                                f"the fault ended (t={f.t_end:.1f}s, {self.wall(f.t_end)}); "
                                f"coverage {self.coverage_table()}")
        else:
            f.recovery_s = max(first.values()) - f.t_end
        if not self.wait_coverage(max(1.0, deadline - time.monotonic())):
            f.violations.append(f"coverage ({PER_MEMBER} tunnels per member from each on-prem gateway) not back within "
                                f"{self.recovery_bound:g}s: {self.coverage_table()}")
        f.t_recovered = self.now()

    # -- faults ---------------------------------------------------------------------------

    def inject(self, kind: str) -> Fault:
        return getattr(self, f"_fault_{kind}")()

    def _fault_sigkill(self) -> Fault:
        name = self.rng.choice(self.killable)
        down = self.rng.uniform(0, 2)
        f = Fault("sigkill", name, self.now(), f"down {down:.1f}s", affects=frozenset({name}))
        self.expected_down.add(name)
        self.restarted.add(name)
        self.gws[name].kill()
        time.sleep(down)
        self.gws[name].config_text = self.valid_config[name]
        self.gws[name].start()
        self.recover(f, restarted=name)
        return f

    def _fault_sigterm(self) -> Fault:
        name = self.rng.choice(self.killable)
        f = Fault("sigterm", name, self.now(), "drain", affects=frozenset({name}))
        gw = self.gws[name]
        self.expected_down.add(name)
        self.restarted.add(name)
        gw.terminate()
        t = time.monotonic()
        try:
            rc = gw.wait_exit(timeout=DRAIN_TIMEOUT + 10)
            f.detail = f"drained in {time.monotonic() - t:.1f}s"
            if rc != 0:
                f.violations.append(f"{name} exited with {rc} after SIGTERM, want 0; see {gw.log_path}")
        except AssertionError:
            f.violations.append(f"{name} still running {DRAIN_TIMEOUT + 10:g}s after SIGTERM "
                                f"(drain_timeout {DRAIN_TIMEOUT:g}s); killed it")
            gw.kill()
        gw.config_text = self.valid_config[name]
        gw.start()
        self.recover(f, restarted=name)
        return f

    def _fault_partition(self) -> Fault:
        how = self.rng.choice(["host", "host", "lb", "peers", "uplink"])
        hold = self.rng.choice([self.rng.uniform(0.5, 1.5), self.rng.uniform(3, 5)])  # below/above ping_timeout
        root = self.lab.root_ip
        if how == "host":
            name = self.rng.choice(GATEWAYS)
            host, affects, target = self.hosts[name], frozenset({name}), name
            undo = host.heal
            f = Fault("partition", target, self.now(), f"whole host, {hold:.1f}s", affects=affects)
            host.partition(allow=[root])
        elif how == "lb":
            host = self.hosts["lb"]
            f = Fault("partition", "lb", self.now(), f"balancer host, {hold:.1f}s", affects=frozenset(GATEWAYS))
            undo = host.heal
            host.partition(allow=[root])
        elif how == "peers":
            a, b = self.hosts["cloud1"], self.hosts["cloud2"]
            f = Fault("partition", "cloud1|cloud2", self.now(), f"peer links, {hold:.1f}s",
                      affects=frozenset(CLOUDS), require_all=True)
            undo = lambda: a.unblock(b.ip)  # noqa: E731
            a.block(b.ip)
        else:
            name = self.rng.choice(ONPREMS)
            host, lb_ip = self.hosts[name], self.hosts["lb"].ip
            f = Fault("partition", f"{name}|lb", self.now(), f"uplink, {hold:.1f}s", affects=frozenset({name}))
            undo = lambda: host.unblock(lb_ip)  # noqa: E731
            host.block(lb_ip)
        time.sleep(hold)
        undo()
        self.recover(f)
        return f

    def _fault_tunnel_reset(self) -> Fault:
        name = self.rng.choice(GATEWAYS)
        host = self.hosts[name]
        lb_ip = self.hosts["lb"].ip
        if name in ONPREMS:
            what, filt = "tunnel", ["dst", lb_ip, "dport", "=", f":{LB_PORT}"]
        elif self.rng.random() < 0.5:
            what, filt = "tunnel", ["src", f"{host.ip}:{TUNNEL_PORT}", "dst", lb_ip]
        else:
            what, filt = "peer link", ["(", "sport", "=", f":{PEER_PORT}", "or", "dport", "=", f":{PEER_PORT}", ")"]
        f = Fault("tunnel_reset", name, self.now(), what, affects=frozenset({name}))
        conns = host.run(["ss", "-Htn", "state", "established", *filt], check=False).stdout.split("\n")
        conns = [c.split() for c in conns if c.strip()]
        if not conns:
            f.detail += ": none found"
        else:
            local, peer = self.rng.choice(conns)[-2:]
            lport = local.rsplit(":", 1)[1]
            pip, pport = peer.rsplit(":", 1)
            res = host.run(["ss", "-K", "-tn", "state", "established", "dst", f"{pip}:{pport}",
                            "sport", "=", f":{lport}"], check=False)
            f.detail += f" {local}->{peer}" + ("" if res.returncode == 0 else f" (ss -K failed: {res.stderr.strip()})")
        self.recover(f)
        return f

    def _fault_nginx_restart(self) -> Fault:
        f = Fault("nginx_restart", "lb", self.now(), "stop (closes every proxied tunnel), start",
                  affects=frozenset(GATEWAYS))
        self.lb.stop()
        time.sleep(self.rng.uniform(0, 1))
        self.lb.start().wait_ready()
        self.recover(f)
        return f

    def _fault_sighup_valid(self) -> Fault:
        name = self.rng.choice(GATEWAYS)
        gw = self.gws[name]
        text = self.valid_config[name]
        if self.rng.random() < 0.5:
            change = "route_wait 3s -> 4s" if 'route_wait = "3s"' in text else "route_wait 4s -> 3s"
            text = (text.replace('route_wait = "3s"', 'route_wait = "4s"') if "3s -> 4s" in change
                    else text.replace('route_wait = "4s"', 'route_wait = "3s"'))
        else:
            port = 5559 if name in CLOUDS else 6669
            extra = f'\n[[service]]\nname = "extra"\naccept = "tcp://{self.hosts[name].ip}:{port}"\n'
            change = "extra accept service removed" if extra in text else "extra accept service added"
            text = text.replace(extra, "") if extra in text else text + extra
        f = Fault("sighup_valid", name, self.now(), change, disruptive=False)
        self.valid_config[name] = text
        mark = gw.log_mark()
        gw.config_text = text
        gw.signal(signal.SIGHUP)
        self._expect_log(f, gw, mark, "gateway.reloaded")
        if "extra accept" in change:
            want_open = "added" in change
            port = 5559 if name in CLOUDS else 6669
            try:
                socket.create_connection((self.hosts[name].ip, port), timeout=3).close()
                is_open = True
            except OSError:
                is_open = False
            if is_open != want_open:
                f.violations.append(f"after the reload, port {port} is {'open' if is_open else 'closed'} on {name}")
        self.recover(f)
        return f

    def _fault_sighup_invalid(self) -> Fault:
        name = self.rng.choice(GATEWAYS)
        gw = self.gws[name]
        good = self.valid_config[name]
        how = self.rng.choice(["toml", "ping_timeout", "cert"])
        if how == "toml":
            bad = good[: len(good) // 2] + "\n[[[ not toml\n"
        elif how == "ping_timeout":
            bad = good.replace(f'ping_timeout = "{PING_TIMEOUT:g}s"', 'ping_timeout = "100ms"')
        else:
            bad = re.sub(r'^cert = "(.*)/([^/]+)\.pem"$', r'cert = "\1/missing.pem"', good, count=1, flags=re.M)
        assert bad != good
        f = Fault("sighup_invalid", name, self.now(), how, disruptive=False)
        mark = gw.log_mark()
        gw.config_text = bad
        gw.signal(signal.SIGHUP)
        self._expect_log(f, gw, mark, "gateway.reload_failed")
        gw.config_text = good  # and the valid file again, as an operator would
        mark = gw.log_mark()
        gw.signal(signal.SIGHUP)
        self._expect_log(f, gw, mark, "gateway.reloaded")
        self.recover(f)
        return f

    def _expect_log(self, f: Fault, gw: Gateway, mark: int, event: str, timeout: float = 10.0) -> None:
        other = {"gateway.reloaded": "gateway.reload_failed", "gateway.reload_failed": "gateway.reloaded"}[event]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = [r.get("event") for r in gw.log_lines(mark)]
            if event in events:
                return
            if other in events:
                f.violations.append(f"{gw.name} logged {other}, want {event}")
                return
            time.sleep(0.05)
        f.violations.append(f"{gw.name} logged no {event} within {timeout:g}s of SIGHUP")

    def _flood_target(self) -> tuple[str, tuple[str, int], list[str]]:
        where = self.rng.choice([*CLOUDS, "lb"])
        if where == "lb":
            return "lb", (self.hosts["lb"].ip, LB_PORT), list(CLOUDS)
        return where, (self.hosts[where].ip, TUNNEL_PORT), [where]

    def _close_wait(self, member: str) -> int:
        out = self.hosts[member].run(["ss", "-Htn", "state", "close-wait", "sport", "=", f":{TUNNEL_PORT}"],
                                     check=False).stdout
        return sum(1 for line in out.splitlines() if line.strip())

    def _after_flood(self, f: Fault, members: list[str]) -> None:
        for m in members:
            deadline = time.monotonic() + 10
            while (n := self._close_wait(m)) and time.monotonic() < deadline:
                time.sleep(0.2)
            if n:
                f.violations.append(f"{m} still holds {n} CLOSE-WAIT sockets on its tunnel port "
                                    f"10s after the flood ended")

    def _fault_flood_tcp(self) -> Fault:
        where, addr, members = self._flood_target()
        n = 150
        f = Fault("flood_tcp", where, self.now(), "", disruptive=False)
        socks: list[tuple[str, socket.socket]] = []
        refused: dict[str, int] = {}
        junk = {"idle": b"", "http": b"GET /intercloud HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
                "garbage": None}
        for i in range(n):
            kind = ("idle", "http", "garbage")[i % 3]
            try:
                s = socket.create_connection(addr, timeout=3)
                data = junk[kind] if junk[kind] is not None else random.Random(i).randbytes(512)
                if data:
                    s.sendall(data)
                socks.append((kind, s))
            except OSError as exc:
                refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1
        opened = self.now()
        # Every one of them must be closed by the far end within handshake_timeout (+ slack).
        bound = HANDSHAKE_TIMEOUT + 4.0
        still_open: dict[str, int] = {}
        closed_after: dict[str, float] = {}  # per kind, the latest close seen (s after the flood opened)
        sel = selectors.DefaultSelector()
        for kind, sk in socks:
            sk.setblocking(False)
            sel.register(sk, selectors.EVENT_READ, kind)
        while sel.get_map() and (left := opened + bound - self.now()) > 0:
            for key, _ in sel.select(timeout=min(left, 0.5)):
                try:
                    if key.fileobj.recv(65536):
                        continue  # an answer (an alert, an HTTP error): wait for the close
                except BlockingIOError:
                    continue
                except OSError:
                    pass  # reset: closed
                sel.unregister(key.fileobj)
                closed_after[key.data] = max(closed_after.get(key.data, 0.0), self.now() - opened)
        for key in list(sel.get_map().values()):
            still_open[key.data] = still_open.get(key.data, 0) + 1
        sel.close()
        for _, s in socks:
            s.close()
        f.detail = (f"{len(socks)} connections at {where}, not connected {refused or 0}; "
                    "the far end closed the last one of each kind after "
                    + ", ".join(f"{k} {v:.1f}s" for k, v in sorted(closed_after.items())))
        if still_open:
            f.violations.append(f"{sum(still_open.values())} unauthenticated connections at {where} still open "
                                f"{bound:g}s after connecting (tunnel.handshake_timeout {HANDSHAKE_TIMEOUT:g}s): "
                                f"{still_open}")
        f.t_end = self.now()
        self._after_flood(f, members)
        self.recover(f)
        return f

    def _fault_flood_tls(self) -> Fault:
        where, addr, members = self._flood_target()
        n = 40
        f = Fault("flood_tls", where, self.now(), "", disruptive=False)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        outcomes: dict[str, int] = {}
        upgraded: list[str] = []
        lock = threading.Lock()
        req = (b"GET /intercloud HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")

        def one(i: int) -> None:
            result = "?"
            try:
                with (socket.create_connection(addr, timeout=HANDSHAKE_TIMEOUT + 4) as raw,
                      ctx.wrap_socket(raw, server_hostname="cloud1") as s):
                    s.sendall(req)
                    data = s.recv(4096)
                    if data.startswith(b"HTTP/1.1 101"):
                        upgraded.append(f"connection {i}: {data[:60]!r}")
                        result = "UPGRADED"
                    else:
                        result = "closed" if not data else f"answered {data[:12]!r}"
            except ssl.SSLError as exc:
                result = f"tls: {exc.reason or type(exc).__name__}"
            except TimeoutError:
                result = "timeout"
            except OSError as exc:
                result = type(exc).__name__
            with lock:
                outcomes[result] = outcomes.get(result, 0) + 1

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
        for i in range(0, n, 8):  # 8 handshakes at a time
            batch = threads[i:i + 8]
            for th in batch:
                th.start()
            for th in batch:
                th.join(HANDSHAKE_TIMEOUT + 10)
        f.detail = f"{n} TLS handshakes without a client certificate at {where}: {outcomes}"
        if upgraded:
            f.violations.append(f"WebSocket upgrade accepted without a client certificate at {where}: {upgraded[:3]}")
        if outcomes.get("timeout"):
            f.violations.append(f"{outcomes['timeout']} certificate-less TLS connections at {where} "
                                f"neither refused nor "
                                f"closed within {HANDSHAKE_TIMEOUT + 4:g}s")
        f.t_end = self.now()
        self._after_flood(f, members)
        self.recover(f)
        return f

    # -- the run --------------------------------------------------------------------------

    def settle_samples(self) -> dict[str, Sample]:
        """Per gateway, the smallest of three samples one second apart (transient handshakes, GC)."""
        got: dict[str, list[Sample]] = {name: [] for name in GATEWAYS}
        for _ in range(3):
            for name in GATEWAYS:
                if s := self.sample(name):
                    got[name].append(s)
            time.sleep(1)
        out = {}
        for name, ss in got.items():
            ss = [s for s in ss if s.pid == ss[-1].pid] if ss else []
            if ss:
                out[name] = Sample(ss[-1].t, ss[-1].pid, min(s.rss_kib for s in ss), min(s.fds for s in ss),
                                   min((s.tasks for s in ss if s.tasks is not None), default=None),
                                   min((s.streams for s in ss if s.streams is not None), default=None))
        return out

    def run(self) -> Report:
        self.log(f"seed {self.seed}, {self.minutes:g} min of faults, workdir {self.workdir}; "
                 f"never killed (resource controls): {', '.join(sorted(self.controls))}")
        try:
            self.build()
        except LabUnavailable:
            raise
        except Exception:
            self.harness_errors.append(f"building the topology failed:\n{traceback.format_exc()}")
            return self.report()
        self.log(f"topology up: {', '.join(f'{n} {h.ip}' for n, h in self.hosts.items())}")
        self.baseline = self.settle_samples()
        self.load_started = self.now()
        self.load_running.set()
        self._start_thread(self._monitor, name="monitor")
        self._start_thread(self._transfer_manager, name="transfers")
        for w in range(2):
            self._start_thread(self._short_worker, w, name=f"short-{w}")
        time.sleep(3)  # load flowing before the first fault
        deadline = time.monotonic() + self.minutes * 60
        deck: list[str] = []
        try:
            while time.monotonic() < deadline - 5:
                if not deck:
                    deck = list(FAULT_KINDS)
                    self.rng.shuffle(deck)
                kind = deck.pop()
                f = self.inject(kind)
                self.faults.append(f)
                self.log(f"{f.kind:14} {f.target:14} {f.detail}; recovered in {_fmt_s(f.recovery_s)}"
                         + (f"; VIOLATIONS: {f.violations}" if f.violations else ""))
                self._restart_crashed()
                self.stop_all.wait(self.rng.uniform(1, 3))
        except Exception:
            self.harness_errors.append(f"fault loop: {traceback.format_exc()}")
        self.log("stopping the load")
        self.load_running.clear()
        for t in list(self.transfers):
            t.done.wait(self.stall + 30)
        self.wait_coverage(self.recovery_bound)
        self._final_checks()
        self.stop_all.set()
        return self.report()

    def _restart_crashed(self) -> None:
        for name, gw in self.gws.items():
            if not gw.running and name not in self.expected_down:
                self.restarted.add(name)
                gw.config_text = self.valid_config[name]
                gw.start()
                with contextlib.suppress(AssertionError):
                    self.wait_ready(name, 30)
                self.unexpected_exits.pop(name, None)

    def _final_checks(self) -> None:
        # No stream may outlive its clients.
        deadline = time.monotonic() + 15
        left: dict[str, int] = {}
        while time.monotonic() < deadline:
            left = {}
            for name in GATEWAYS:
                with contextlib.suppress(OSError, ValueError):
                    if n := len(self.status(name)["streams"]):
                        left[name] = n
            if not left:
                break
            time.sleep(0.5)
        if left:
            self.violations.append(f"streams still listed in /api/status 15s after every client finished: {left}")
        self.final = self.settle_samples()
        load_time = self.now() - self.load_started
        for name in GATEWAYS:
            b, e = self.baseline.get(name), self.final.get(name)
            if name in self.restarted or b is None or e is None or b.pid != e.pid:
                continue
            if e.fds > b.fds + 8:
                self.violations.append(f"{name}: {e.fds} descriptors at the end, {b.fds} before the load (leak?)")
            if b.tasks is not None and e.tasks is not None and e.tasks > b.tasks + 10:
                self.violations.append(f"{name}: {e.tasks} asyncio tasks at the end, {b.tasks} before the load (leak?)")
            # RSS under load grows to a plateau (buffers, allocator arenas) and stays there; a leak keeps
            # growing. Bound: 1.25 x the highest value seen in the first half of the load, + 16 MiB.
            early = [x.rss_kib for x in self.samples[name]
                     if x.pid == b.pid and x.t <= self.load_started + load_time / 2]
            rss_bound = int(max([b.rss_kib, *early]) * 1.25) + 16 * 1024
            if e.rss_kib > rss_bound:
                self.violations.append(f"{name}: RSS {e.rss_kib // 1024} MiB at the end, {b.rss_kib // 1024} MiB "
                                       f"before the load, at most {max([b.rss_kib, *early]) // 1024} MiB in the first "
                                       f"half of it (bound {rss_bound // 1024} MiB)")
        for name, gw in self.gws.items():
            for rec in gw.log_lines():
                if rec.get("event") == "internal.error":
                    self.violations.append(f"{name} logged internal.error: {rec.get('message', '')[:300]} "
                                           f"{(rec.get('exc') or '')[-600:]}")
            text = gw.log_text()
            if "Traceback (most recent call last)" in text:
                i = text.index("Traceback (most recent call last)")
                self.violations.append(f"{name}: traceback in its log: {text[i:i + 800]}")

    # -- analysis -------------------------------------------------------------------------

    def report(self) -> Report:
        return Report(self)


class Report:
    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.violations: list[str] = list(soak.violations)
        self.lines: list[str] = []
        self._analyse()

    @property
    def ok(self) -> bool:
        return not self.violations and not self.soak.harness_errors

    def _client_log(self, t: Transfer) -> str:
        """The gateways' log lines that name this client (to find the stream's story)."""
        if t.local_port is None or self.soak.lab is None:
            return ""
        needle = f"{self.soak.lab.root_ip}:{t.local_port}"
        out = []
        for name, gw in self.soak.gws.items():
            out += [f"    {name}: {line[:400]}" for line in gw.log_text().splitlines() if needle in line]
        return "\n".join(out[:12])

    def _analyse(self) -> None:
        s = self.soak
        faults = s.faults
        for f in faults:
            self.violations += [f"{f.describe()}: {v}" for v in f.violations]
        counts = {"ok": 0, "reset": 0, "truncated": 0, "corrupt": 0, "hang": 0, "running": 0}
        excused = 0
        verified = 0
        for t in s.transfers:
            if t.t_end is None or t.outcome is None:
                counts["running"] += 1
                self.violations.append(f"transfer {t.label} never ended (harness could not stop it)")
                continue
            counts[t.outcome] += 1
            verified += t.bytes if t.outcome == "ok" else 0
            overl = [f for f in faults if f.overlaps(t.t_start, t.t_end)]
            for f in overl:
                f.transfers[t.outcome] += 1
            path = "unknown (every gateway)" if t.path is None else "/".join(sorted(t.path))
            where = (f"{t.label}, {t.size} bytes, t={t.t_start:.1f}..{t.t_end:.1f}s "
                     f"({s.wall(t.t_start)}..{s.wall(t.t_end)}), client port {t.local_port}, path {path}")
            if t.outcome == "corrupt":
                self.violations.append(f"CORRUPTED {where}: {t.error}\n{self._client_log(t)}")
            elif t.outcome == "truncated":
                # Only the death of the process that holds the client's socket can end a stream with
                # a clean EOF: the kernel closes its sockets with FIN (RST only if unread data is
                # queued). A live gateway must reset a stream it cannot finish.
                if any(f.kind == "sigkill" and f.target == t.entry for f in overl):
                    excused += 1
                else:
                    self.violations.append(f"TRUNCATED {where}: {t.error} although {t.entry}, which holds the "
                                           f"client's connection, was not killed\n{self._client_log(t)}")
            elif t.outcome == "hang":
                self.violations.append(f"HUNG {where}: no progress for {s.stall:g}s\n{self._client_log(t)}")
            elif t.outcome == "reset":
                if any(f.hits(t.path) for f in overl):
                    excused += 1
                else:
                    near = ", ".join(f.describe() for f in overl) or "none"
                    self.violations.append(f"RESET without a fault on its path: {where}: {t.error}; "
                                           f"overlapping faults: {near}\n{self._client_log(t)}")
        self.transfer_counts, self.excused, self.verified = counts, excused, verified
        short_failed = [e for e in s.echoes if not e.ok]

        def explained(e: ShortEcho) -> bool:
            if e.kind == "corrupt":
                return False
            if e.kind == "truncated":  # as for long transfers: only a killed entry gateway may do that
                return any(f.kind == "sigkill" and f.target == e.entry and f.overlaps(e.t_start, e.t_end)
                           for f in faults)
            return any(f.disruptive and f.overlaps(e.t_start, e.t_end) for f in faults)

        unexplained = [e for e in short_failed if not explained(e)]
        self.short_total, self.short_failed, self.short_unexplained = len(s.echoes), len(short_failed), unexplained
        for e in unexplained[:10]:
            what = {"corrupt": "got other bytes back", "truncated": "was truncated (clean EOF) by a live gateway"}.get(
                e.kind, "failed outside any disruptive fault")
            self.violations.append(f"short connection via {e.entry} {what}: "
                                   f"t={e.t_start:.1f}..{e.t_end:.1f}s ({s.wall(e.t_start)}), "
                                   f"client port {e.local_port}: {e.error}")
        if len(unexplained) > 10:
            self.violations.append(f"... and {len(unexplained) - 10} more short connections failed outside faults")
        self.violations += [f"harness error: {h}" for h in s.harness_errors]

    def render(self) -> str:
        s = self.soak
        L = []
        L.append("")
        L.append(f"== intercloud chaos soak: seed {s.seed}, {s.minutes:g} min, {len(s.faults)} faults, "
                 f"workdir {s.workdir} ==")
        L.append("")
        L.append(f"{'fault':15} {'count':>5} {'recovery median':>16} {'max':>7}   "
                 f"{'transfers ok/reset/truncated/corrupt/hung':>41}  violations")
        for kind in FAULT_KINDS:
            fs = [f for f in s.faults if f.kind == kind]
            rec = [f.recovery_s for f in fs if f.recovery_s is not None]
            tot = {k: sum(f.transfers[k] for f in fs) for k in ("ok", "reset", "truncated", "corrupt", "hang")}
            L.append(f"{kind:15} {len(fs):5} {_fmt_s(statistics.median(rec)) if rec else '-':>16} "
                     f"{_fmt_s(max(rec)) if rec else '-':>7}   "
                     f"{tot['ok']:>19}/{tot['reset']}/{tot['truncated']}/{tot['corrupt']}/{tot['hang']:<8}"
                     f"        {sum(len(f.violations) for f in fs)}")
        L.append("(a transfer is counted under every fault its lifetime overlapped)")
        L.append("")
        L.append("faults in order:")
        for f in s.faults:
            L.append(f"  t={f.t_inject:6.1f}s {s.wall(f.t_inject)}  {f.kind:14} {f.target:14} "
                     f"recovery {_fmt_s(f.recovery_s):>6}  {f.detail}")
        c = self.transfer_counts
        by_kind: dict[str, int] = {}
        for t in s.transfers:
            by_kind[f"{t.service}-{t.mode}"] = by_kind.get(f"{t.service}-{t.mode}", 0) + 1
        L.append("")
        L.append(f"long transfers: {len(s.transfers)} ({', '.join(f'{k} {v}' for k, v in sorted(by_kind.items()))}); "
                 f"completed {c['ok']} ({self.verified / 2**20:.0f} MiB verified), reset {c['reset']}, "
                 f"truncated {c['truncated']} ({self.excused} of these on a faulted path), corrupted {c['corrupt']}, "
                 f"hung {c['hang']}")
        pauses = {o: max((t.max_pause for t in s.transfers if t.outcome == o), default=0.0) for o in ("ok", "reset")}
        L.append(f"longest pause in a transfer: {pauses['ok']:.1f}s in a completed one, "
                 f"{pauses['reset']:.1f}s in a reset "
                 f"one (hung beyond {s.stall:g}s)")
        known = [t for t in s.transfers if t.path is not None]
        relayed = sum(1 for t in known if t.service == "A" and CLOUDS[0] in t.path and CLOUDS[1] in t.path)
        L.append(f"paths from /api/status: known for {len(known)} of {len(s.transfers)} transfers "
                 f"({relayed} relayed between members); unknown paths count as every gateway")
        L.append(f"short connections: {self.short_total}, failed {self.short_failed} "
                 f"({self.short_failed - len(self.short_unexplained)} during disruptive faults)")
        L.append("")
        L.append("resources (before the load -> after it, settled; peak during the run):")
        for name in GATEWAYS:
            b, e = s.baseline.get(name), s.final.get(name)
            peak = max((x.rss_kib for x in s.samples[name]), default=0)
            note = "restarted during the run, not compared" if name in s.restarted else "compared"
            note += ", control" if name in s.controls else ""
            if b and e:
                L.append(f"  {name:8} rss {b.rss_kib / 1024:6.1f} -> {e.rss_kib / 1024:6.1f} MiB "
                         f"(peak {peak / 1024:.1f})"
                         f"  fds {b.fds:4} -> {e.fds:4}  tasks {b.tasks} -> {e.tasks}  [{note}]")
            else:
                L.append(f"  {name:8} no samples  [{note}]")
        L.append("")
        if self.violations:
            L.append(f"VIOLATIONS ({len(self.violations)}):")
            for v in self.violations:
                L.append(f"  - {v}")
            L.append("")
            L.append(f"FAIL (logs: {s.workdir})")
        else:
            L.append("invariant violations: none")
            L.append("PASS")
        return "\n".join(L)

    def to_json(self) -> dict:
        s = self.soak
        return {
            "seed": s.seed, "minutes": s.minutes, "ok": self.ok, "violations": self.violations,
            "faults": [{"kind": f.kind, "target": f.target, "detail": f.detail, "t_inject": round(f.t_inject, 3),
                        "recovery_s": f.recovery_s, "transfers": f.transfers, "violations": f.violations}
                       for f in s.faults],
            "transfers": self.transfer_counts, "short": {"total": self.short_total, "failed": self.short_failed},
        }


def run(minutes: float, seed: int | None = None, workdir: Path | None = None, **kwargs) -> Report:
    """Run a soak (needs root); returns the report. Tears the topology down in every case."""
    if seed is None:
        seed = random.SystemRandom().randrange(1, 2**31)
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix=f"intercloud-soak-{seed}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(minutes=minutes, seed=seed, workdir=workdir, **kwargs)
    try:
        report = soak.run()
    finally:
        soak.close()
    (workdir / "report.txt").write_text(report.render() + "\n")
    (workdir / "report.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long to inject faults (default 10)")
    p.add_argument("--seed", type=int, default=None, help="fault schedule seed (default: random, printed)")
    p.add_argument("--workdir", type=Path, default=None, help="logs, configs, report (default: a new /tmp dir)")
    p.add_argument("--concurrency", type=int, default=4, help="long transfers in flight (default 4)")
    p.add_argument("--size", type=str, default="16-32", help="long transfer size range in MiB (default 16-32)")
    p.add_argument("--rate", type=float, default=8.0,
                   help="pace of each long transfer in MiB/s, 0 for as fast as possible (default 8)")
    p.add_argument("--stall", type=float, default=PING_TIMEOUT + PING_INTERVAL + 12.5,
                   help="a transfer without progress this long (s) counts as hung (default 15)")
    p.add_argument("--recovery-bound", type=float, default=30.0,
                   help="seconds after a fault by which every entry point must serve again (default 30)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/soak: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    missing = [b for b in ("ip", "iptables", "nginx", "ss") if not find_binary(b)]
    if missing:
        print(f"scripts/soak: missing executables: {', '.join(missing)} (run scripts/setup)", file=sys.stderr)
        return 2
    lo, _, hi = args.size.partition("-")
    try:
        report = run(args.minutes, args.seed, args.workdir, concurrency=args.concurrency,
                     size_mib=(int(lo), int(hi or lo)), stall=args.stall, rate_mib=args.rate,
                     recovery_bound=args.recovery_bound)
    except LabUnavailable as exc:
        print(f"scripts/soak: {exc}", file=sys.stderr)
        return 2
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
