"""Talk to a gateway's listener with the real ``nc`` (netcat-openbsd) binary.

Why: the point of intercloud is that unmodified TCP clients work through it. Using a real
client binary, in its own process, catches things an in-process asyncio client hides
(half-close handling, RST vs FIN, a client that never reads). ``nc -N`` shuts down its sending
side when stdin ends, which is how half-close is exercised end to end.
"""

from __future__ import annotations

import math
import subprocess
import threading
import time

from . import procs
from .markers import find_binary
from .timeouts import FACTOR, scaled

__all__ = ["NC", "NetcatError", "nc_exchange", "nc_interactive", "NcSession"]

NC = find_binary("nc") or "/usr/bin/nc"


class NetcatError(AssertionError):
    """nc failed or timed out; carries what it printed so far."""

    def __init__(self, message: str, returncode: int | None, stdout: bytes, stderr: bytes):
        super().__init__(
            f"{message} (rc={returncode}); stdout[:300]={stdout[:300]!r} "
            f"stderr={stderr.decode(errors='replace').strip()!r}"
        )
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def _argv(host: str, port: int, timeout: float, half_close: bool) -> list[str]:
    argv = [NC]
    if host.replace(".", "").isdigit() or ":" in host:
        argv.append("-n")  # numeric address: no DNS lookup
    if half_close:
        argv.append("-N")
    # -w: connect timeout and idle timeout; whole seconds.
    argv += ["-w", str(max(1, math.ceil(scaled(timeout)))), host, str(port)]
    return argv


def nc_exchange(
    host: str,
    port: int,
    data: bytes,
    timeout: float = 10.0,
    half_close: bool = True,
    check: bool = True,
) -> bytes:
    """Connect with ``nc``, send ``data``, end stdin, return everything received until EOF.

    With ``half_close`` (``nc -N``) the client sends FIN after ``data``; without it the
    client keeps its side open and waits for the server to close. ``timeout`` is nominal
    and bounds the whole exchange. With ``check`` a non-zero exit raises :class:`NetcatError`.
    """
    tracked = procs.spawn(
        _argv(host, port, timeout, half_close),
        title=f"nc {host}:{port}",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = tracked.popen.communicate(data, timeout=scaled(timeout))
    except subprocess.TimeoutExpired:
        procs.kill(tracked)
        out, err = tracked.popen.communicate()
        raise NetcatError(
            f"nc {host}:{port} did not finish within {scaled(timeout):.1f}s",
            None, out or b"", err or b"",
        ) from None
    if check and tracked.popen.returncode != 0:
        raise NetcatError(f"nc {host}:{port} failed", tracked.popen.returncode, out, err)
    return out


class NcSession:
    """A long-lived ``nc`` connection: send, read with deadlines, half-close, watch it end.

    Why: HA tests keep a stream open across a gateway restart and check it survives (or is
    reset cleanly); that needs a client that stays connected between test steps.
    """

    def __init__(self, host: str, port: int, *, half_close: bool = True, timeout: float = 60.0):
        self._tracked = procs.spawn(
            _argv(host, port, timeout, half_close),
            title=f"nc session {host}:{port}",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.popen = self._tracked.popen
        self._buf = bytearray()
        self._eof = False
        self._cond = threading.Condition()
        self._stderr = bytearray()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, pipe, is_stdout: bool) -> None:
        while chunk := pipe.read1(65536):
            with self._cond:
                (self._buf if is_stdout else self._stderr).extend(chunk)
                self._cond.notify_all()
        if is_stdout:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    @property
    def stderr(self) -> bytes:
        with self._cond:
            return bytes(self._stderr)

    def send(self, data: bytes) -> None:
        self.popen.stdin.write(data)
        self.popen.stdin.flush()

    def shutdown_write(self) -> None:
        """Close nc's stdin; with ``half_close`` nc then sends FIN to the server."""
        if not self.popen.stdin.closed:
            self.popen.stdin.close()

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + scaled(timeout)
        with self._cond:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NetcatError(
                        f"timed out after {scaled(timeout):.1f}s (factor {FACTOR}) waiting for {what}",
                        self.popen.poll(), bytes(self._buf), bytes(self._stderr),
                    )
                self._cond.wait(left)

    def read_exactly(self, n: int, timeout: float = 10.0) -> bytes:
        """Return the next ``n`` received bytes; fails on timeout or early EOF."""
        self._wait_for(lambda: len(self._buf) >= n or self._eof, timeout, f"{n} bytes from nc")
        with self._cond:
            if len(self._buf) < n:
                raise NetcatError(f"EOF after {len(self._buf)} of {n} bytes",
                                  self.popen.poll(), bytes(self._buf), bytes(self._stderr))
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out

    def read_until_eof(self, timeout: float = 10.0) -> bytes:
        """Return everything still to come until the server side closes."""
        self._wait_for(lambda: self._eof, timeout, "EOF from nc")
        with self._cond:
            out = bytes(self._buf)
            self._buf.clear()
            return out

    def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            return self.popen.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"nc (pid {self.popen.pid}) still running after {scaled(timeout):.1f}s") from None

    def close(self) -> None:
        """Kill nc if still running and release its pipes."""
        procs.kill(self._tracked)
        for t in self._threads:  # they end at EOF, which the kill guarantees
            t.join(scaled(5))
        for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            try:
                pipe.close()
            except (OSError, ValueError):
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def nc_interactive(host: str, port: int, *, half_close: bool = True, timeout: float = 60.0) -> NcSession:
    """Open a long-lived :class:`NcSession` (``timeout`` is nc's idle/connect limit)."""
    return NcSession(host, port, half_close=half_close, timeout=timeout)
