"""A real nginx TCP (stream) load balancer in front of cloud members, as in KWIC's 4-ha-lb.

Why: in the field the on-prem gateways reach the cloud cluster through one load-balancer
address and TLS passes through it untouched. Whether every member still gets its tunnels
(KWIC did not: see the 4-ha-lb discussion notes) depends on how the balancer behaves:
``least_conn`` or round robin, ``max_fails``/``fail_timeout`` marking a dead member down, a
short ``proxy_connect_timeout`` for a member that vanished silently, and optionally routing by
SNI with ``ssl_preread`` so that per-member names reach their member deterministically.
This runs exactly that nginx, in a lab host (``tests/support/netns.py``) or in the root
namespace, with every file it writes inside ``tmpdir``.

The config has no ``http {}`` block, so nginx creates none of its http temp directories.
Each finished TCP session is logged as one JSON line in ``access.log``
(:meth:`NginxLB.access_log`): which upstream served it and, with ``ssl_preread``, the SNI.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from . import procs
from .markers import find_binary
from .timeouts import scaled, wait_until

if TYPE_CHECKING:
    from .netns import Host

__all__ = ["NginxLB", "NGINX", "stream_module_path", "NginxConfigError"]

NGINX = find_binary("nginx") or "/usr/sbin/nginx"
SS = find_binary("ss") or "/usr/bin/ss"
METHODS = ("least_conn", "round_robin")

_LOG_FORMAT = (
    '{"time":"$time_iso8601","client":"$remote_addr:$remote_port","server":"$server_addr:$server_port",'
    '"upstream":"$upstream_addr","status":"$status","sent":"$bytes_sent","received":"$bytes_received",'
    '"session_time":"$session_time","upstream_connect_time":"$upstream_connect_time","sni":"$SNI",'
    '"proxy_protocol_client":"$proxy_protocol_addr:$proxy_protocol_port"}'
)


class NginxConfigError(AssertionError):
    """``nginx -t`` rejected the generated config; the message has its output and the config."""


@functools.cache
def _nginx_build() -> str:
    try:
        return subprocess.run([NGINX, "-V"], capture_output=True, text=True, timeout=scaled(10)).stderr
    except OSError:
        return ""


def stream_module_path() -> str | None:
    """Path of the dynamic stream module, or None if nginx has stream built in (or lacks it)."""
    build = _nginx_build()
    if re.search(r"--with-stream(\s|$)", build):
        return None  # static
    m = re.search(r"--modules-path=(\S+)", build)
    for d in ([m.group(1)] if m else []) + ["/usr/lib/nginx/modules", "/usr/lib64/nginx/modules"]:
        p = Path(d) / "ngx_stream_module.so"
        if p.exists():
            return str(p)
    return None


def _addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class NginxLB:
    """nginx as a TCP load balancer: ``listen_ip:listen_port`` -> ``backends``.

    ``host`` is a lab :class:`~tests.support.netns.Host` to run in (None: the root
    namespace); ``listen_ip`` defaults to the host's address (or 127.0.0.1 without a host).
    ``method`` is ``least_conn`` (as in 4-ha-lb) or ``round_robin`` (nginx's default).
    ``max_fails``/``fail_timeout`` apply to every backend; a refused or timed-out
    (``connect_timeout``) upstream connect is retried on the next backend.

    With ``ssl_preread_map`` ({server name: (ip, port)}, names may use nginx ``hostnames``
    wildcards like ``*.example.com``) nginx peeks at the TLS ClientHello and routes by SNI;
    a name not in the map goes to the ``backends`` group (if any, else the connection is
    closed). TLS is never terminated by nginx.

    Use ``with NginxLB(...) as lb:`` (start + wait_ready, stop at exit), or call
    :meth:`start`, :meth:`wait_ready` and :meth:`stop` yourself.
    """

    def __init__(
        self,
        tmpdir: str | os.PathLike,
        host: "Host | None",
        listen_port: int,
        backends: Sequence[tuple[str, int]],
        method: str = "least_conn",
        fail_timeout: str = "3s",
        max_fails: int = 1,
        ssl_preread_map: dict[str, tuple[str, int]] | None = None,
        *,
        listen_ip: str | None = None,
        connect_timeout: str = "1s",
        name: str = "nginx",
        send_proxy_protocol: bool = False,
        listen_proxy_protocol: bool = False,
        proxy_bind: str | None = None,
        half_close: bool = False,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        self.host = host
        self.name = name
        self.listen_ip = listen_ip or (host.ip if host is not None else "127.0.0.1")
        self.listen_port = listen_port
        self.method = method
        # proxy_half_close: without it nginx ends the whole session when either side half-closes, so
        # a client that sends its request, shuts down its write side and reads the answer gets nothing
        self.half_close = half_close
        self.fail_timeout = fail_timeout
        self.max_fails = max_fails
        self.connect_timeout = connect_timeout
        self.backends = [tuple(b) for b in backends]
        # PROXY protocol: send a v1 header to the backends (proxy_protocol on), expect one from clients
        # (listen ... proxy_protocol; the access log's proxy_protocol_client is what it said);
        # proxy_bind: the source address of the connections to the backends
        self.send_proxy_protocol = send_proxy_protocol
        self.listen_proxy_protocol = listen_proxy_protocol
        self.proxy_bind = proxy_bind
        self.ssl_preread_map = dict(ssl_preread_map) if ssl_preread_map else None
        self.prefix = Path(tmpdir) / name
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.conf_path = self.prefix / "nginx.conf"
        self.error_log_path = self.prefix / "error.log"
        self.access_log_path = self.prefix / "access.log"
        self.stdout_path = self.prefix / "stdout.log"
        self.pid_path = self.prefix / "nginx.pid"
        self._tracked: procs.Tracked | None = None
        self._start_mark = 0
        self._write_config()

    # -- config --------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.listen_ip, self.listen_port

    def config_text(self) -> str:
        if not self.backends and not self.ssl_preread_map:
            raise ValueError("NginxLB needs backends or an ssl_preread_map")
        module = stream_module_path()
        lines = []
        if module:
            lines.append(f"load_module {module};")
        lines += [
            "daemon off;",
            "master_process on;",
            "worker_processes 1;",
            f"pid {self.pid_path};",
            f"error_log {self.error_log_path} info;",
            "events { worker_connections 1024; }",
            "stream {",
        ]
        sni = "$ssl_preread_server_name" if self.ssl_preread_map else ""
        lines.append(f"    log_format iclb escape=json '{_LOG_FORMAT.replace('$SNI', sni)}';")
        lines.append(f"    access_log {self.access_log_path} iclb;")
        if self.backends:
            lines.append("    upstream ic_backends {")
            if self.method == "least_conn":
                lines.append("        least_conn;")
            for ip, port in self.backends:
                lines.append(f"        server {_addr(ip, port)} max_fails={self.max_fails} "
                             f"fail_timeout={self.fail_timeout};")
            lines.append("    }")
        if self.ssl_preread_map:
            lines.append("    map $ssl_preread_server_name $ic_backend {")
            lines.append("        hostnames;")
            for server_name, (ip, port) in self.ssl_preread_map.items():
                lines.append(f"        {server_name} {_addr(ip, port)};")
            if self.backends:
                lines.append("        default ic_backends;")
            lines.append("    }")
        lines += [
            "    server {",
            f"        listen {_addr(self.listen_ip, self.listen_port)}"
            f"{' proxy_protocol' if self.listen_proxy_protocol else ''};",
        ]
        if self.send_proxy_protocol:
            lines.append("        proxy_protocol on;")
        if self.proxy_bind:
            lines.append(f"        proxy_bind {self.proxy_bind};")
        if self.ssl_preread_map:
            lines += ["        ssl_preread on;", "        proxy_pass $ic_backend;"]
        else:
            lines.append("        proxy_pass ic_backends;")
        lines += [
            f"        proxy_connect_timeout {self.connect_timeout};",
            "        proxy_next_upstream on;",
            *(["        proxy_half_close on;"] if self.half_close else []),
            "    }",
            "}",
        ]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        self.conf_path.write_text(self.config_text())

    def _argv(self, *extra: str) -> list[str]:
        prefix = self.host.argv_prefix if self.host is not None else []
        return [*prefix, NGINX, "-p", f"{self.prefix}/", "-c", str(self.conf_path),
                "-e", str(self.error_log_path), *extra]

    def test_config(self) -> None:
        """Run ``nginx -t`` on the current config; raise :class:`NginxConfigError` if invalid."""
        res = subprocess.run(self._argv("-t"), capture_output=True, text=True, timeout=scaled(20))
        if res.returncode != 0:
            raise NginxConfigError(
                f"nginx -t failed (rc={res.returncode}):\n{res.stderr.strip()}{res.stdout.strip()}\n"
                f"--- {self.conf_path} ---\n{self.conf_path.read_text()}")

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._tracked.pid if self._tracked else None

    @property
    def running(self) -> bool:
        return self._tracked is not None and self._tracked.popen.poll() is None

    def start(self) -> "NginxLB":
        """``nginx -t``, then start the master (foreground, tracked). See :meth:`wait_ready`."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.test_config()
        self._start_mark = self._error_log_size()
        with open(self.stdout_path, "ab") as out:
            self._tracked = procs.spawn(
                self._argv(), title=f"nginx {self.name}",
                log_paths=[self.error_log_path, self.stdout_path],
                cwd=self.prefix, stdout=out, stderr=subprocess.STDOUT)
        return self

    def _listening(self) -> bool:
        argv = [SS, "-Hltn", f"sport = :{self.listen_port}"]
        if self.host is not None:
            argv = [*self.host.argv_prefix, *argv]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(10))
        return any(_addr(self.listen_ip, self.listen_port) in line for line in res.stdout.splitlines())

    def wait_ready(self, timeout: float = 10.0) -> "NginxLB":
        """Wait until the listening socket exists and a worker process runs.

        Deliberately not a test connection: nginx would proxy it, i.e. open a real connection
        to a backend (a bogus TLS client at a cloud member, one more session in least_conn's
        count and in the access log).
        """
        def ready() -> bool:
            if not self.running:
                raise AssertionError(
                    f"{self.name} exited (rc={self._tracked.popen.returncode if self._tracked else None}) "
                    f"before listening\n{self.error_log_text()}\n{procs.tail(self.stdout_path, 40)}")
            return "start worker process" in self.error_log_text(since=self._start_mark) \
                and bool(self._workers()) \
                and self._listening()

        wait_until(ready, timeout, interval=0.02, what=f"{self.name} listening on {self.address}")
        return self

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM (fast shutdown: proxied connections are closed), SIGKILL after ``grace``."""
        if self._tracked:
            return procs.stop(self._tracked, grace)
        return None

    def _workers(self) -> set[int]:
        if not self.running:
            return set()
        master = self._tracked.pid
        found = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            rest = stat[stat.rfind(b")") + 2:].split()
            if int(rest[1]) == master and rest[0] not in (b"Z", b"X"):
                found.add(int(entry))
        return found

    def reload(
        self,
        backends: Sequence[tuple[str, int]] | None = None,
        ssl_preread_map: dict[str, tuple[str, int]] | None = None,
        timeout: float = 10.0,
    ) -> "NginxLB":
        """Optionally replace backends / SNI map, check the config, SIGHUP, and wait until a
        new worker runs and the old ones stopped accepting. Old workers keep serving the
        connections they have (graceful), exactly as a production reload."""
        if backends is not None:
            self.backends = [tuple(b) for b in backends]
        if ssl_preread_map is not None:
            self.ssl_preread_map = dict(ssl_preread_map) or None
        self._write_config()
        self.test_config()
        if not self.running:
            raise RuntimeError(f"{self.name} is not running")
        old = self._workers()
        mark = self._error_log_size()
        self._tracked.popen.send_signal(signal.SIGHUP)

        def reloaded() -> bool:
            text = self.error_log_text(since=mark)
            new = self._workers() - old
            if not new or "start worker process" not in text:
                return False
            live_old = old & self._workers()
            return all(re.search(rf"\b{pid}#\d+: gracefully shutting down", text) for pid in live_old)

        wait_until(reloaded, timeout, interval=0.02, what=f"{self.name} to reload")
        return self

    def signal(self, sig: int) -> None:
        if not self._tracked:
            raise RuntimeError(f"{self.name} was never started")
        self._tracked.popen.send_signal(sig)

    # -- logs ----------------------------------------------------------------------------

    def _error_log_size(self) -> int:
        try:
            return self.error_log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def error_log_text(self, since: int = 0) -> str:
        try:
            with open(self.error_log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def access_log(self) -> list[dict[str, str]]:
        """One dict per *finished* session: client, upstream ("ip:port", several if nginx had
        to try more than one), status ("200" ok, "502" no upstream reachable), sent,
        received, session_time, upstream_connect_time, sni."""
        try:
            text = self.access_log_path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def __enter__(self) -> "NginxLB":
        try:
            self.start().wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<NginxLB {self.name} {self.address} {self.method} backends={self.backends} {state}>"
