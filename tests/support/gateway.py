"""Drive one real ``intercloud`` gateway process from a test.

Why: end-to-end tests must exercise the product exactly as operators run it (``python -m
intercloud run CONFIG``), observe it only through its public surfaces (the admin HTTP endpoint
and its JSON log), and kill it for real. This class is that harness; it never imports
``intercloud``.

Admin endpoint contract the product implements (tests always configure
``[gateway] admin = "127.0.0.1:PORT"``)::

    GET /healthz     200 while the process runs
    GET /readyz      200 when ready, else 503
    GET /api/status  {"node_id", "role", "tunnels": [...], "services": [...], "streams": [...]}
"""

from __future__ import annotations

import json
import os
import re
import signal as _signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

from . import procs
from .timeouts import scaled, wait_until

__all__ = ["Gateway", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]

# Env vars that would silently route the product's (or urllib's) traffic through a proxy.
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

# urllib without any proxy handler: the admin endpoint is always on loopback.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Exited(AssertionError):
    """The gateway process ended while we were waiting for something else."""


def _admin_from_config(text: str) -> str | None:
    try:
        value = tomllib.loads(text).get("gateway", {}).get("admin")
    except tomllib.TOMLDecodeError:
        # Tests may feed deliberately broken configs; still find the admin address if present.
        m = re.search(r'^\s*admin\s*=\s*"([^"]+)"', text, re.M)
        value = m.group(1) if m else None
    return value if isinstance(value, str) else None


class Gateway:
    """One gateway process with its config in ``tmpdir/NAME.toml`` and log in ``tmpdir/NAME.log``.

    ``argv_prefix`` is prepended to the command (e.g. ``["ip", "netns", "exec", "ns1"]``);
    note the admin endpoint must then still be reachable from the test process.
    ``env`` adds/overrides environment variables; proxy variables are removed by default so
    the gateway only uses a proxy its config names.
    """

    def __init__(
        self,
        tmpdir: str | os.PathLike,
        name: str,
        config_text: str,
        *,
        argv_prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmpdir = Path(tmpdir)
        self.name = name
        self.config_path = self.tmpdir / f"{name}.toml"
        self.log_path = self.tmpdir / f"{name}.log"
        self.argv_prefix = list(argv_prefix)
        self.extra_env = dict(env or {})
        self._tracked: procs.Tracked | None = None
        self.config_text = config_text

    # -- configuration -------------------------------------------------------------------

    @property
    def config_text(self) -> str:
        return self._config_text

    @config_text.setter
    def config_text(self, text: str) -> None:
        """Rewrite the config file; takes effect on the next start/restart (or SIGHUP)."""
        self._config_text = text
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(text)
        admin = _admin_from_config(text)
        self.admin_url = f"http://{admin}" if admin else None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def argv(self) -> list[str]:
        return [
            *self.argv_prefix,
            sys.executable, "-m", "intercloud", "run", str(self.config_path),
            "--log-format", "json",
        ]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
        src = str(REPO_ROOT / "src")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self) -> "Gateway":
        """Start the process (does not wait for readiness; see :meth:`wait_ready`)."""
        if self.running:
            raise RuntimeError(f"gateway {self.name} is already running (pid {self.pid})")
        with open(self.log_path, "ab") as log:
            if log.tell():
                log.write(f"=== intercloud-test: restarting {self.name} ===\n".encode())
                log.flush()
            self._tracked = procs.spawn(
                self.argv,
                title=f"gateway {self.name}",
                log_paths=[self.log_path],
                cwd=self.tmpdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
            )
        return self

    @property
    def pid(self) -> int | None:
        return self._tracked.pid if self._tracked else None

    @property
    def running(self) -> bool:
        return self._tracked is not None and self._tracked.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._tracked.popen.poll() if self._tracked else None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the gateway process (not its group)."""
        if not self._tracked:
            raise RuntimeError(f"gateway {self.name} was never started")
        self._tracked.popen.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM (graceful drain). Pair with :meth:`wait_exit`."""
        self.signal(_signal.SIGTERM)

    def kill(self) -> int | None:
        """SIGKILL the gateway (and anything in its process group) and reap it."""
        if self._tracked:
            procs.kill(self._tracked)
        return self.returncode

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait (nominal ``timeout``) for the process to exit and return its exit code."""
        if not self._tracked:
            raise RuntimeError(f"gateway {self.name} was never started")
        try:
            return self._tracked.popen.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"gateway {self.name} (pid {self.pid}) did not exit within "
                f"{scaled(timeout):.1f}s\n{self.log_tail()}"
            ) from None

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait ``grace``, then SIGKILL. Safe to call at any time (teardown)."""
        if self._tracked:
            return procs.stop(self._tracked, grace)
        return None

    def restart(self, config_text: str | None = None, *, graceful: bool = True,
                ready: bool = True) -> "Gateway":
        """Stop (SIGTERM, or SIGKILL if not ``graceful``), optionally swap config, start."""
        if graceful:
            self.stop()
        else:
            self.kill()
        if config_text is not None:
            self.config_text = config_text
        self.start()
        if ready:
            self.wait_ready()
        return self

    # -- admin endpoint ------------------------------------------------------------------

    def _require_admin(self) -> str:
        if not self.admin_url:
            raise AssertionError(
                f"gateway {self.name}: config has no [gateway] admin = \"127.0.0.1:PORT\""
            )
        return self.admin_url

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        """GET ``path`` on the admin endpoint; returns (status, body), HTTP errors included."""
        url = self._require_admin() + path
        try:
            with _opener.open(url, timeout=scaled(timeout)) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, timeout: float = 10.0) -> "Gateway":
        """Poll ``GET /readyz`` until 200; fail fast with the log tail if the process exits."""
        self._require_admin()
        last: list[Any] = [None]

        def ready() -> bool:
            if not self.running:
                raise _Exited(
                    f"gateway {self.name} exited with code {self.returncode} before it "
                    f"became ready\n{self.log_tail()}"
                )
            try:
                status, body = self.http_get("/readyz", timeout=0.5)
            except OSError as exc:  # refused / reset / timeout while starting up
                last[0] = exc
                return False
            last[0] = (status, body[:200])
            return status == 200

        try:
            wait_until(ready, timeout, interval=0.05, what=f"gateway {self.name} GET /readyz == 200")
        except _Exited:
            raise
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast /readyz result: {last[0]!r}\n{self.log_tail()}") from None
        return self

    def status(self) -> dict[str, Any]:
        """JSON of ``GET /api/status``."""
        code, body = self.http_get("/api/status")
        if code != 200:
            raise AssertionError(f"gateway {self.name}: GET /api/status -> {code}: {body[:500]!r}")
        return json.loads(body)

    def metric(self, line_start: str) -> float:
        """The value of the first /metrics line that starts with ``line_start`` (a name with its
        labels, e.g. ``intercloud_connections_refused_by_total{kind="acl",service="db"}``); 0 if none."""
        code, body = self.http_get("/metrics")
        if code != 200:
            raise AssertionError(f"gateway {self.name}: GET /metrics -> {code}: {body[:300]!r}")
        for line in body.decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    # -- logs ----------------------------------------------------------------------------

    def log_text(self, since: int = 0) -> str:
        """The raw log (stdout+stderr), from byte offset ``since``."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """Current end of the log; pass to ``since=`` to look only at what comes next."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_lines(self, since: int = 0) -> list[dict[str, Any]]:
        """Parsed JSON log records; non-JSON lines are skipped (see :meth:`log_text`)."""
        records = []
        for line in self.log_text(since).splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
        return records

    def log_tail(self, lines: int = 80) -> str:
        return f"--- last lines of {self.log_path} ---\n{procs.tail(self.log_path, lines)}"

    def wait_log(
        self,
        match: str | Callable[[dict[str, Any]], Any],
        timeout: float = 10.0,
        since: int = 0,
    ) -> dict[str, Any] | str:
        """Wait for a log entry and return it.

        ``match`` is either a substring searched in raw lines (returns the line) or a
        predicate over parsed JSON records (returns the record; KeyError/TypeError inside the
        predicate count as no match). Fails early if the process has exited and the entry is
        not in its log.
        """
        def find() -> Any:
            exited = not self.running
            if isinstance(match, str):
                hit = next((l for l in self.log_text(since).splitlines() if match in l), None)
            else:
                hit = None
                for rec in self.log_lines(since):
                    try:
                        ok = match(rec)
                    except (KeyError, TypeError, IndexError):
                        ok = False
                    if ok:
                        hit = rec
                        break
            if hit is None and exited:
                raise _Exited(
                    f"gateway {self.name} exited (code {self.returncode}) without logging "
                    f"{match!r}\n{self.log_tail()}"
                )
            return hit

        try:
            return wait_until(find, timeout, interval=0.05, what=f"gateway {self.name} log entry {match!r}")
        except _Exited:
            raise
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else f"exit {self.returncode}"
        return f"<Gateway {self.name} {state} admin={self.admin_url}>"
