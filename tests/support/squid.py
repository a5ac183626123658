"""A real squid forward proxy on loopback, in one of the modes operators meet.

Why: on-prem gateways usually reach the internet only through a corporate proxy. The tunnel
must work through a plain CONNECT proxy, with proxy authentication, and must fail clearly
(not hang) when the proxy refuses or when it intercepts TLS (ssl-bump) and presents its own
certificate. Faking a proxy would test our assumptions; this starts the real squid.

Modes:
    connect  CONNECT allowed to any port from 127.0.0.1
    auth     like connect, but needs Basic credentials (``.username``/``.password``)
    deny     every request refused with 403
    bump     ssl-bump: squid terminates TLS with a certificate issued by its own CA
             (``.ca_cert_path``) and re-originates TLS to the target (accepting any cert)
    splice   ssl-bump port that only peeks at the ClientHello then splices: TLS passes untouched

Squid drops root to user ``proxy`` for its own files and helpers, and pytest's tmp dirs are
0700 root, so squid's working dir is a private dir under /tmp owned by ``proxy``; its logs are
copied into ``tmpdir`` on :meth:`stop`.
"""

from __future__ import annotations

import base64
import functools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from . import pki, procs
from .markers import find_binary
from .ports import free_port
from .timeouts import scaled, wait_until

__all__ = ["Squid", "SQUID", "MODES", "connect_via_proxy", "ProxyResponse", "has_ssl_bump"]

SQUID = find_binary("squid") or "/usr/sbin/squid"
HELPERS = Path("/usr/lib/squid")
MODES = ("connect", "auth", "deny", "bump", "splice")


@functools.cache
def has_ssl_bump() -> bool:
    """True if the installed squid is built with OpenSSL (Debian: squid-openssl), which
    bump and splice modes need; the plain Debian ``squid`` package is GnuTLS-only."""
    try:
        out = subprocess.run([SQUID, "-v"], capture_output=True, text=True, timeout=scaled(10)).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--with-openssl" in out


class ProxyResponse:
    """Result of :func:`connect_via_proxy`: the status and headers; ``sock`` is the tunnel."""

    def __init__(self, sock: socket.socket, status: int, head: bytes) -> None:
        self.sock = sock
        self.status = status
        self.head = head

    def __repr__(self) -> str:
        return f"<ProxyResponse {self.status} {self.head.splitlines()[0]!r}>"


def connect_via_proxy(
    proxy_host: str,
    proxy_port: int,
    target_host: str,
    target_port: int,
    *,
    auth: tuple[str, str] | None = None,
    timeout: float = 10.0,
) -> ProxyResponse:
    """Send an HTTP CONNECT and read the response head (not one byte beyond it).

    On 200, ``.sock`` is the raw tunnel to the target (wrap it in TLS, etc). The caller owns
    and closes ``.sock`` in every case.
    """
    sock = socket.create_connection((proxy_host, proxy_port), timeout=scaled(timeout))
    try:
        authority = f"[{target_host}]" if ":" in target_host else target_host
        req = f"CONNECT {authority}:{target_port} HTTP/1.1\r\nHost: {authority}:{target_port}\r\n"
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req += f"Proxy-Authorization: Basic {token}\r\n"
        sock.sendall((req + "\r\n").encode())
        head = bytearray()
        while not head.endswith(b"\r\n\r\n"):
            b = sock.recv(1)  # byte-wise so tunnel data after the head stays in the socket
            if not b:
                raise ConnectionError(f"proxy closed the connection; got {bytes(head)!r}")
            head += b
            if len(head) > 65536:
                raise ConnectionError("proxy response head too large")
        status = int(head.split(b" ", 2)[1])
        return ProxyResponse(sock, status, bytes(head))
    except BaseException:
        sock.close()
        raise


def _proxy_ids() -> tuple[int, int] | None:
    """uid/gid squid will switch to when started as root; None when not root."""
    if os.geteuid() != 0:
        return None
    pw = pwd.getpwnam("proxy")
    return pw.pw_uid, pw.pw_gid


def _htpasswd_line(user: str, password: str) -> str:
    out = subprocess.run(
        ["openssl", "passwd", "-apr1", password], check=True, capture_output=True, text=True,
        timeout=scaled(10),
    ).stdout.strip()
    return f"{user}:{out}\n"


class Squid:
    """One squid process. ``Squid(tmpdir, mode).start()``; then ``.url`` / ``.port``."""

    username = "tunnel-user"
    password = "s3cret-pw"

    def __init__(self, tmpdir: str | os.PathLike, mode: str = "connect", name: str | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if mode in ("bump", "splice") and not has_ssl_bump():
            raise RuntimeError(f"squid mode {mode!r} needs squid built with OpenSSL "
                               "(apt-get install squid-openssl)")
        self.mode = mode
        self.name = name or f"squid-{mode}"
        self.tmpdir = Path(tmpdir)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = 0
        self.ca_cert_path: Path | None = None
        self._tracked: procs.Tracked | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"intercloud-{self.name}-", dir="/tmp"))
        self.out_path = self.tmpdir / f"{self.name}.out"  # squid's stdout/stderr (-d 1)
        self.cache_log = self.workdir / "cache.log"
        self.access_log = self.workdir / "access.log"
        self.conf_path = self.workdir / "squid.conf"
        self._prepare()

    # -- setup ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.mode == "auth":
            return f"http://{self.username}:{self.password}@{self.host}:{self.port}"
        return f"http://{self.host}:{self.port}"

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.username, self.password) if self.mode == "auth" else None

    def _prepare(self) -> None:
        w = self.workdir
        if self.mode == "auth":
            (w / "passwd").write_text(_htpasswd_line(self.username, self.password))
        if self.mode in ("bump", "splice"):
            # squid signs the certificates it forges with this CA (RSA: widest squid support).
            ca = pki.make_ca(w, f"{self.name} bump CA", key_type="rsa")
            self.ca_cert_path = self.tmpdir / f"{self.name}-ca.pem"
            shutil.copyfile(ca.cert_path, self.ca_cert_path)
            self._ca = ca
            subprocess.run(
                [str(HELPERS / "security_file_certgen"), "-c", "-s", str(w / "ssl_db"), "-M", "4MB"],
                check=True, capture_output=True, timeout=scaled(30),
            )
        ids = _proxy_ids()
        if ids:
            for root, dirs, files in os.walk(w):
                for p in [root, *(os.path.join(root, x) for x in dirs + files)]:
                    os.chown(p, *ids)

    def _config(self) -> str:
        w = self.workdir
        lines = [
            "# generated by tests/support/squid.py",
            f"pid_filename {w / 'squid.pid'}",
            f"cache_log {self.cache_log}",
            f"access_log stdio:{self.access_log}",
            "cache_store_log none",
            "logfile_rotate 0",
            f"coredump_dir {w}",
            "netdb_filename none",
            "pinger_enable off",
            "cache deny all",
            "cache_mem 8 MB",
            "visible_hostname test",
            "shutdown_lifetime 0 seconds",
            "forwarded_for delete",
            "dns_nameservers 127.0.0.1",
            # Own ACL names: squid's built-ins and default Safe_ports/SSL_ports rules would
            # block CONNECT to the high ports tests use.
            "acl from_test src 127.0.0.1/32 ::1",
            "acl tunnel_method method CONNECT",
        ]
        if _proxy_ids():
            lines.append("cache_effective_user proxy")
        if self.mode in ("bump", "splice"):
            lines += [
                f"http_port {self.host}:{self.port} ssl-bump tls-cert={self._ca.cert_path} "
                f"tls-key={self._ca.key_path} generate-host-certificates=on "
                "dynamic_cert_mem_cache_size=4MB",
                f"sslcrtd_program {HELPERS / 'security_file_certgen'} -s {w / 'ssl_db'} -M 4MB",
                "sslcrtd_children 2 startup=1 idle=1",
                "tls_outgoing_options flags=DONT_VERIFY_PEER",
                "sslproxy_cert_error allow all",
                "acl step1 at_step SslBump1",
                # non-HTTP inside a bumped/spliced tunnel (e.g. a raw TLS echo) is relayed
                "on_unsupported_protocol tunnel all",
                "http_upgrade_request_protocols WebSocket allow all",
            ]
            if self.mode == "bump":
                # peek at SNI, stare at the server's certificate, then bump: the client gets
                # a mimic of the server's certificate signed by squid's CA (modern bumping),
                # and squid already holds a TLS connection to the target to relay into.
                lines += ["acl step2 at_step SslBump2", "ssl_bump peek step1",
                          "ssl_bump stare step2", "ssl_bump bump all"]
            else:
                lines += ["ssl_bump peek step1", "ssl_bump splice all"]
        else:
            lines.append(f"http_port {self.host}:{self.port}")
        if self.mode == "auth":
            lines += [
                f"auth_param basic program {HELPERS / 'basic_ncsa_auth'} {w / 'passwd'}",
                "auth_param basic children 2 startup=1 idle=1",
                "auth_param basic realm intercloud-test",
                "acl authenticated proxy_auth REQUIRED",
                "http_access allow from_test authenticated",
            ]
        elif self.mode != "deny":
            lines.append("http_access allow from_test")
        lines.append("http_access deny all")
        return "\n".join(lines) + "\n"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> "Squid":
        """Start squid and wait until it answers a real CONNECT; retries on a port clash."""
        for attempt in range(3):
            self.port = free_port(self.host)
            self.conf_path.write_text(self._config())
            if _proxy_ids():
                os.chown(self.conf_path, *_proxy_ids())
            with open(self.out_path, "ab") as out:
                self._tracked = procs.spawn(
                    [SQUID, "-N", "-d", "1", "-f", str(self.conf_path)],
                    title=self.name,
                    log_paths=[self.out_path, self.access_log],  # -d 1 copies cache.log to out
                    cwd=self.workdir,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                return self.wait_ready(timeout)
            except AssertionError:
                text = self._log_text()
                procs.kill(self._tracked)
                if attempt < 2 and ("Address already in use" in text or "Cannot open" in text):
                    continue
                raise
        raise AssertionError("unreachable")

    def _log_text(self) -> str:
        return "\n".join(procs.tail(p, 60) for p in (self.out_path, self.cache_log))

    def wait_ready(self, timeout: float = 20.0) -> "Squid":
        """Poll until squid accepts TCP and answers a CONNECT to a live local port as this
        mode should (200, or 403 in deny mode)."""
        expected = 403 if self.mode == "deny" else 200
        target = socket.socket()
        target.bind((self.host, 0))
        target.listen(16)
        last: list[object] = [None]

        def answered() -> bool:
            if self._tracked.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with code {self._tracked.popen.returncode}\n{self._log_text()}")
            try:
                resp = connect_via_proxy(self.host, self.port, self.host, target.getsockname()[1],
                                         auth=self.auth, timeout=2.0)
            except OSError as exc:
                last[0] = exc
                return False
            resp.sock.close()
            last[0] = resp.head[:200]
            return resp.status == expected

        try:
            wait_until(answered, timeout, interval=0.05, what=f"{self.name} to answer CONNECT")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast: {last[0]!r}\n{self._log_text()}") from None
        finally:
            target.close()
        return self

    @property
    def running(self) -> bool:
        return self._tracked is not None and self._tracked.popen.poll() is None

    def stop(self) -> None:
        """Kill squid and its helpers, keep its logs in ``tmpdir``.

        SIGKILL, not SIGTERM: squid's graceful shutdown takes ~2 s even with
        ``shutdown_lifetime 0``, and a cache-less test proxy has nothing to save
        (its stdio access log is written unbuffered).
        """
        if self._tracked:
            procs.kill(self._tracked)
            for src in (self.access_log, self.cache_log, self.conf_path):
                try:
                    shutil.copyfile(src, self.tmpdir / f"{self.name}-{src.name}")
                except OSError:
                    pass
            self._tracked.log_paths = [self.out_path, self.tmpdir / f"{self.name}-access.log"]
        shutil.rmtree(self.workdir, ignore_errors=True)

    def access_log_text(self) -> str:
        for p in (self.access_log, self.tmpdir / f"{self.name}-access.log"):
            if p.exists():
                return p.read_text(errors="replace")
        return ""

    def __enter__(self):
        return self.start() if not self.running else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Squid {self.mode} {self.url} running={self.running}>"
