"""``intercloud demo``: the KWIC 4-ha tutorial topology on loopback, in one command.

cloud1 and cloud2 (client ports 5551/5552), onprem1 and onprem2 (6661/6662), echo servers A and B,
every gateway a real ``intercloud run`` process with certificates generated into a temporary
directory. ``--walkthrough`` stops and restarts each gateway in turn as the tutorial does, checks
every client path that should work, measures recovery, and exits non-zero on any failure. Without it
the demo stays up for you to try ``nc 127.0.0.1 5551`` until Ctrl-C. Nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..certs import init_certs

HOST = "127.0.0.1"


@dataclass
class Proc:
    name: str
    config: Path
    log: Path
    admin: int
    client_port: int
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        logf = open(self.log, "ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "intercloud", "run", str(self.config), "--log-format", "json",
            stdout=logf, stderr=logf, start_new_session=True)
        logf.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if not self.alive:
            return
        self.proc.send_signal(sig)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class Cable:
    """A TCP relay standing in for onprem1's WAN link to one member: onprem1 dials the members through
    two of these. ``cut()`` resets every connection through it at once, as a NAT, a firewall or a
    load balancer does to long connections; the walkthrough cuts them under a running transfer to
    show that streams survive a broken tunnel (docs/protocol.md §10)."""

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self.conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, HOST, self.port)

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(HOST, self.target), 2)
        except (OSError, TimeoutError):
            w.close()  # the member is down: as if nothing listened
            return
        pair = (w, uw)
        self.conns.add(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            dst.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))
        self.conns.discard(pair)

    def cut(self) -> int:
        """Reset every connection through the cable (both sides get a TCP RST); returns how many."""
        import socket
        import struct

        n = len(self.conns)
        for pair in list(self.conns):
            for wr in pair:
                sock = wr.get_extra_info("socket")
                if sock is not None:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                wr.transport.abort()
        self.conns.clear()
        return n

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.cut()


@dataclass
class Topology:
    workdir: Path
    ports: dict[str, int]
    procs: dict[str, Proc] = field(default_factory=dict)
    echo_ports: dict[str, int] = field(default_factory=dict)
    cables: list[Cable] = field(default_factory=list)


async def _http_status(port: int, path: str) -> int:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1)
        w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        line = await asyncio.wait_for(r.readline(), 2)
        w.close()
        return int(line.split()[1])
    except (OSError, TimeoutError, ValueError, IndexError):
        return 0


async def _wait_ready(p: Proc, timeout: float = 20.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not p.alive:
            raise RuntimeError(f"{p.name} exited with {p.proc.returncode}; see {p.log}")
        if await _http_status(p.admin, "/readyz") == 200:
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{p.name} not ready after {timeout:g}s; see {p.log}")


async def _status(port: int) -> dict | None:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1)
        w.write(b"GET /api/status HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(r.read(), 3)
        w.close()
        return json.loads(data.split(b"\r\n\r\n", 1)[1])
    except (OSError, TimeoutError, ValueError, IndexError):
        return None


async def _coverage(p: Proc) -> dict[str, int]:
    st = await _status(p.admin) or {}
    cov: dict[str, int] = {}
    for t in st.get("tunnels", []):
        cov[t["peer_node"]] = cov.get(t["peer_node"], 0) + 1
    return cov


async def _wait_coverage(top: Topology, want: dict[str, int], timeout: float = 20.0, show: bool = True) -> float | None:
    """Until every on-prem gateway holds ``want`` tunnels per member; prints progress as they come in."""
    t0 = time.monotonic()
    shown: dict[str, dict] = {}
    while time.monotonic() - t0 < timeout:
        done = True
        for name in ("onprem1", "onprem2"):
            cov = await _coverage(top.procs[name])
            if show and cov != shown.get(name):
                shown[name] = cov
                parts = ", ".join(f"{m} {cov.get(m, 0)}/{n}" for m, n in want.items())
                _print(f"  {name:<8} tunnels {parts}")
            done &= all(cov.get(m, 0) >= n for m, n in want.items())
        if done:
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    return None


async def echo_once(port: int, word: bytes, timeout: float = 4.0) -> bool:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
        w.write(word)
        got = await asyncio.wait_for(r.readexactly(len(word)), timeout)
        w.close()
        return got == word
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False


async def _echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def handle(r, w):
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        w.close()

    srv = await asyncio.start_server(handle, HOST, 0)
    return srv, srv.sockets[0].getsockname()[1]


def _identity(top: Topology, name: str, role: str) -> str:
    """[gateway] and [tls] of one demo gateway."""
    certs = top.workdir / "certs"
    return f"""[gateway]
role = "{role}"
node_id = "{name}"
admin = "{HOST}:{top.ports[f'admin_{name}']}"
route_wait = "3s"
drain_timeout = "5s"

[tls]
cert = "{certs}/{name}.pem"
key = "{certs}/{name}.key"
ca = "{certs}/ca.pem"
"""


def _onprem_text(top: Topology, name: str, urls: str) -> str:
    p = top.ports
    return f"""# {name}: an on-prem gateway. It only dials out; clients of service B connect to port {p[name]}.
{_identity(top, name, "onprem")}
[tunnel]
connect = [{urls}]
per_member = 2
ping_interval = "1s"
ping_timeout = "3s"
reconnect_min = "100ms"
reconnect_max = "1s"

[[service]]
name = "serviceA"
connect = "tcp://{HOST}:{top.echo_ports['A']}"

[[service]]
name = "serviceB"
accept = "tcp://{HOST}:{p[name]}"
"""


def _write_configs(top: Topology) -> None:
    d = top.workdir
    certs = d / "certs"
    init_certs(certs, cloud=["cloud1", "cloud2"], onprem=["onprem1", "onprem2"])
    init_certs(certs / "cluster", cloud=["cloud1", "cloud2"], onprem=[])  # members' own CA (docs/ha.md §4)
    p = top.ports
    peers = ", ".join(f'"wss://{HOST}:{p[f"peer_{c}"]}/cluster"' for c in ("cloud1", "cloud2"))
    urls = ", ".join(f'"wss://localhost:{p[f"tunnel_{c}"]}/intercloud"' for c in ("cloud1", "cloud2"))
    common_tunnel = 'ping_interval = "1s"\nping_timeout = "3s"\nreconnect_min = "100ms"\nreconnect_max = "1s"\n'
    for name in ("cloud1", "cloud2"):
        text = f"""# {name}: a cloud member. Clients of service A connect to port {p[name]}.
{_identity(top, name, "cloud")}
[tunnel]
listen = "wss://{HOST}:{p[f'tunnel_{name}']}/intercloud"
{common_tunnel}
[cluster]
listen = "wss://{HOST}:{p[f'peer_{name}']}/cluster"
peers = [{peers}]
ca = "{certs}/cluster/ca.pem"
cert = "{certs}/cluster/{name}.pem"
key = "{certs}/cluster/{name}.key"
peer_names = ["cloud1", "cloud2"]
member_ttl = "6s"

[[service]]
name = "serviceA"
accept = "tcp://{HOST}:{p[name]}"

[[service]]
name = "serviceB"
connect = "tcp://{HOST}:{top.echo_ports['B']}"
"""
        (d / f"{name}.toml").write_text(text)
        top.procs[name] = Proc(name, d / f"{name}.toml", d / f"{name}.log", p[f"admin_{name}"], p[name])
    # onprem1 reaches the members through the demo's cables (Cable), which the walkthrough cuts
    cabled = ", ".join(f'"wss://localhost:{p[f"cable_{c}"]}/intercloud"' for c in ("cloud1", "cloud2"))
    top.cables = [Cable(p[f"cable_{c}"], p[f"tunnel_{c}"]) for c in ("cloud1", "cloud2")]
    for name in ("onprem1", "onprem2"):
        text = _onprem_text(top, name, cabled if name == "onprem1" else urls)
        (d / f"{name}.toml").write_text(text)
        top.procs[name] = Proc(name, d / f"{name}.toml", d / f"{name}.log", p[f"admin_{name}"], p[name])


CLIENTS = {  # client path -> (port key, service)
    "A via cloud1": ("cloud1", "serviceA"), "A via cloud2": ("cloud2", "serviceA"),
    "B via onprem1": ("onprem1", "serviceB"), "B via onprem2": ("onprem2", "serviceB"),
}


def _print(line: str) -> None:
    print(line, flush=True)


async def _check_paths(top: Topology, down: set[str]) -> list[tuple[str, bool]]:
    out = []
    for label, (gw, _svc) in CLIENTS.items():
        if gw in down:
            continue
        ok = await echo_once(top.ports[gw], f"{label}\n".encode())
        out.append((label, ok))
    return out


async def _until_serves(top: Topology, gw: str, timeout: float = 20.0) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await echo_once(top.ports[gw], b"ping\n", timeout=2.0):
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    return None


async def walkthrough(top: Topology) -> bool:
    """The tutorial's steps; returns True when every expected path worked."""
    all_ok = True
    _print(f"\n{'step':<44} {'client path':<16} {'result':<6} {'time':>8}")
    _print("-" * 78)

    async def report(step: str, down: set[str]) -> None:
        nonlocal all_ok
        for label, ok in await _check_paths(top, down):
            all_ok &= ok
            _print(f"{step:<44} {label:<16} {'PASS' if ok else 'FAIL':<6}")
            step = ""

    await report("all gateways up", set())
    scenarios = [("cloud1",), ("cloud2",), ("onprem1",), ("onprem2",), ("cloud1", "onprem2")]
    for names in scenarios:
        for how, sig in (("SIGKILL", signal.SIGKILL), ("SIGTERM", signal.SIGTERM)):
            if len(names) > 1 and how == "SIGTERM":
                continue
            for n in names:
                await top.procs[n].stop(sig)
            await report(f"{' + '.join(names)} stopped ({how})", set(names))
            for n in names:
                t0 = time.monotonic()
                await top.procs[n].start()
                await _wait_ready(top.procs[n])
                took = await _until_serves(top, n)
                ok = took is not None
                all_ok &= ok
                shown = f"{time.monotonic() - t0:6.2f}s" if ok else "   never"
                _print(f"{n + ' restarted, serves its own port':<44} {n + ' port':<16} "
                       f"{'PASS' if ok else 'FAIL':<6} {shown:>8}")
    all_ok &= await _cut_phase(top)
    if _nginx_stream_module():
        all_ok &= await _lb_phase(top)
    else:
        _print("(nginx with the stream module is not installed: skipping the load-balancer steps)")
    return all_ok


async def _cut_phase(top: Topology, size: int = 24 << 20) -> bool:
    """Cut every tunnel of onprem1 (both cables) under a running service-B transfer through it: the
    stream parks, resumes once onprem1 has redialed, and every byte comes back intact (protocol §10)."""
    import hashlib

    payload = os.urandom(size)
    got = hashlib.sha256()
    received = 0
    log = top.procs["onprem1"].log
    mark = log.stat().st_size if log.exists() else 0
    ok, cut = False, 0
    t0 = time.monotonic()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(HOST, top.ports["onprem1"]), 4)

        async def send() -> None:
            nonlocal cut
            step = 64 << 10
            for i in range(0, size, step):
                w.write(payload[i:i + step])
                await w.drain()
                if i == size // 4:  # a quarter is through: cut the WAN under it
                    cut = sum(c.cut() for c in top.cables)
                await asyncio.sleep(0.002)
            w.write_eof()

        sender = asyncio.create_task(send())
        while chunk := await asyncio.wait_for(r.read(1 << 16), 20):
            got.update(chunk)
            received += len(chunk)
        await sender
        w.close()
        ok = received == size and got.digest() == hashlib.sha256(payload).digest() and cut > 0
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        ok = False
    gap = ""
    try:
        with open(log, "rb") as f:
            f.seek(mark)
            for line in f:
                rec = json.loads(line)
                if rec.get("event") == "stream.resumed":
                    gap = f" (resumed after {rec['gap'] * 1e3:.0f} ms, {rec['bytes_replayed']} bytes replayed)"
    except (OSError, ValueError):
        pass
    _print(f"{f'tunnels cut under a {size >> 20} MiB transfer':<44} {'B via onprem1':<16} "
           f"{'PASS' if ok else 'FAIL':<6} {time.monotonic() - t0:6.2f}s")
    _print(f"  {cut} tunnel connections reset; {received} of {size} bytes back, "
           f"{'intact' if ok else 'NOT intact'}{gap}")
    return ok


def _nginx_stream_module() -> str | None:
    for path in ("/usr/lib/nginx/modules/ngx_stream_module.so", "/usr/share/nginx/modules/ngx_stream_module.so"):
        if os.path.exists(path) and shutil.which("nginx"):
            return path
    return None


async def _lb_phase(top: Topology) -> bool:
    """The KWIC discussion notes' setup: on-prem gateways reach the members only through an nginx stream
    load balancer (least_conn). Kill cloud1, restart it, and measure how soon it serves its own port and
    how soon every on-prem gateway holds its tunnels to it again, with no client traffic to help."""
    d, p = top.workdir / "nginx", top.ports
    d.mkdir(exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(f"""load_module {_nginx_stream_module()};
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
stream {{
    upstream members {{
        least_conn;
        server {HOST}:{p['tunnel_cloud1']} max_fails=1 fail_timeout=2s;
        server {HOST}:{p['tunnel_cloud2']} max_fails=1 fail_timeout=2s;
    }}
    server {{
        listen {HOST}:{p['lb']};
        proxy_pass members;
        proxy_connect_timeout 1s;
    }}
}}
""")
    nginx = await asyncio.create_subprocess_exec("nginx", "-p", f"{d}/", "-c", str(conf), "-e", f"{d}/error.log",
                                                  stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                                                  start_new_session=True)
    ok = True
    try:
        t0 = time.monotonic()
        while not await echo_probe(p["lb"]) and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.05)
        _print(f"\nload balancer: nginx least_conn on {HOST}:{p['lb']}; on-prem gateways now know only its URL")
        lb_url = f'"wss://localhost:{p["lb"]}/intercloud"'
        for name in ("onprem1", "onprem2"):
            top.procs[name].config.write_text(_onprem_text(top, name, lb_url))
            await top.procs[name].stop(signal.SIGTERM)
            await top.procs[name].start()
            await _wait_ready(top.procs[name])
        took = await _wait_coverage(top, {"cloud1": 2, "cloud2": 2}, show=False)
        ok &= took is not None
        _print(f"{'through the LB: every member covered':<44} {'2+2 per onprem':<16} "
               f"{'PASS' if took is not None else 'FAIL':<6} {took or 0:6.2f}s")
        await top.procs["cloud1"].stop(signal.SIGKILL)
        alive = await echo_once(p["cloud2"], b"A via cloud2\n")
        ok &= alive
        _print(f"{'cloud1 killed (LB)':<44} {'A via cloud2':<16} {'PASS' if alive else 'FAIL':<6}")
        t0 = time.monotonic()
        await top.procs["cloud1"].start()
        await _wait_ready(top.procs["cloud1"])
        t_ready = time.monotonic() - t0
        served = await _until_serves(top, "cloud1")
        t_serve = time.monotonic() - t0 if served is not None else None
        covered = await _wait_coverage(top, {"cloud1": 2}, timeout=20, show=False)
        t_cover = time.monotonic() - t0 if covered is not None else None
        ok &= t_serve is not None and t_cover is not None
        _print(f"{'cloud1 restarted (LB): ready':<44} {'/readyz':<16} {'PASS':<6} {t_ready:6.2f}s")
        _print(f"{'cloud1 restarted (LB): serves its own port':<44} {'A via cloud1':<16} "
               f"{'PASS' if t_serve else 'FAIL':<6} {t_serve or 0:6.2f}s")
        _print(f"{'cloud1 restarted (LB): on-prem tunnels back':<44} {'2 per onprem':<16} "
               f"{'PASS' if t_cover else 'FAIL':<6} {t_cover or 0:6.2f}s")
    finally:
        nginx.terminate()
        try:
            await asyncio.wait_for(nginx.wait(), 5)
        except TimeoutError:
            nginx.kill()
            await nginx.wait()
    return ok


async def echo_probe(port: int) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), 0.5)
        w.close()
        return True
    except (OSError, TimeoutError):
        return False


DEFAULT_PORTS = {"cloud1": 5551, "cloud2": 5552, "onprem1": 6661, "onprem2": 6662,
                 "tunnel_cloud1": 8441, "tunnel_cloud2": 8442, "peer_cloud1": 9441, "peer_cloud2": 9442,
                 "lb": 8443, "cable_cloud1": 8451, "cable_cloud2": 8452,
                 "admin_cloud1": 9101, "admin_cloud2": 9102, "admin_onprem1": 9103, "admin_onprem2": 9104}


def _check_ports_free(ports: dict[str, int]) -> None:
    import socket

    busy = []
    for key, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
            except OSError:
                busy.append(f"{port} ({key})")
    if busy:
        raise SystemExit(f"intercloud demo: ports in use on {HOST}: {', '.join(busy)}; stop what holds "
                         "them (an earlier demo?) or pass --port-offset N")


async def run_demo(walk: bool, port_offset: int = 0, keep: bool = False) -> int:
    ports = {k: v + port_offset for k, v in DEFAULT_PORTS.items()}
    _check_ports_free(ports)
    workdir = Path(tempfile.mkdtemp(prefix="intercloud-demo-"))
    top = Topology(workdir, ports)
    servers = []
    try:
        for svc in ("A", "B"):
            srv, port = await _echo_server()
            servers.append(srv)
            top.echo_ports[svc] = port
        _write_configs(top)
        for cable in top.cables:
            await cable.start()
        _print(f"intercloud demo: KWIC 4-ha topology on loopback; configs, certificates and logs in {workdir}")
        for name in ("cloud1", "cloud2", "onprem1", "onprem2"):
            await top.procs[name].start()
        for name in ("cloud1", "cloud2", "onprem1", "onprem2"):
            took = await _wait_ready(top.procs[name])
            _print(f"  {name:<8} up      ready in {took:5.2f}s  (admin http://{HOST}:{top.procs[name].admin}/api/status)")
        await _wait_coverage(top, {"cloud1": 2, "cloud2": 2})
        for name in ("cloud1", "cloud2"):
            await _until_serves(top, name)
        ok = True
        if walk:
            ok = await walkthrough(top)
            _print(f"\nwalkthrough: {'PASSED' if ok else 'FAILED'}")
            if not keep:
                return 0 if ok else 1
        _print(f"\nTry it:  nc {HOST} {ports['cloud1']}   (service A via cloud1; also {ports['cloud2']}),"
               f"  nc {HOST} {ports['onprem1']}   (service B via onprem1; also {ports['onprem2']})")
        _print("Status:  intercloud status, or curl "
               f"http://{HOST}:{ports['admin_cloud1']}/api/status.  Ctrl-C stops everything.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0 if ok else 1
    finally:
        await asyncio.gather(*(p.stop(signal.SIGTERM, 10) for p in top.procs.values()))
        for cable in top.cables:
            cable.close()
        for srv in servers:
            srv.close()
        shutil.rmtree(workdir, ignore_errors=True)
        _print("intercloud demo: stopped every process")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to an ``argparse`` subparsers object and return its parser."""
    parser = subparsers.add_parser(
        "demo", help="run the KWIC 4-ha tutorial topology on loopback (--walkthrough: test it)")
    parser.add_argument("--walkthrough", action="store_true",
                        help="stop and restart each gateway as the tutorial does, check every path, exit 0 on success")
    parser.add_argument("--port-offset", type=int, default=0, help="add N to every port the demo uses")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    os.environ.pop("HTTPS_PROXY", None)
    os.environ.pop("https_proxy", None)
    return asyncio.run(run_demo(args.walkthrough, args.port_offset))
