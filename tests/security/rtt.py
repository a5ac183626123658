"""A data-path probe: one client connection through the tunnel, an echo round trip every 10 ms.

Why: an event loop that stalls (a blocking file read on SIGHUP, an expensive admin render) shows up
as a round trip that takes as long as the stall, on the one thing operators care about, client
traffic. The connection stays open so that each sample is a pure round trip through both gateways
(no connect, no OPEN), and samples carry their send time so a test can look at a window of them.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

from tests.support.timeouts import scaled


class RttProbe:
    def __init__(self, port: int, every: float = 0.01, payload: bytes = b"rtt-probe-0123456789abcdef") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=scaled(10))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.every = every
        self.payload = payload
        self.samples: list[tuple[float, float]] = []  # (monotonic send time, round trip seconds)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtt-probe", daemon=True)

    def _round_trip(self) -> float:
        started = time.monotonic()
        self.sock.sendall(self.payload)
        got = b""
        while len(got) < len(self.payload):
            chunk = self.sock.recv(len(self.payload) - len(got))
            if not chunk:
                raise ConnectionError(f"the tunnel closed the probe connection after {len(got)} echoed bytes")
            got += chunk
        if got != self.payload:
            raise AssertionError(f"echo mismatch: {got!r}")
        return time.monotonic() - started

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                sent = time.monotonic()
                self.samples.append((sent, self._round_trip()))
            except (OSError, AssertionError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            next_at = max(next_at + self.every, time.monotonic())
            self._stop.wait(next_at - time.monotonic())

    def start(self) -> "RttProbe":
        self._round_trip()  # the stream is open end to end before sampling starts
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(scaled(15))
        self.sock.close()

    def window(self, since: float, until: float = float("inf")) -> list[float]:
        return [rtt for sent, rtt in self.samples if since <= sent < until]

    def max_since(self, since: float, until: float = float("inf")) -> float:
        rtts = self.window(since, until)
        assert rtts, f"no probe samples between {since:.3f} and {until:.3f}; errors: {self.errors}"
        return max(rtts)

    def p50(self, since: float, until: float = float("inf")) -> float:
        rtts = self.window(since, until)
        assert rtts, f"no probe samples between {since:.3f} and {until:.3f}; errors: {self.errors}"
        return statistics.median(rtts)

    def wait_samples(self, n: int, since: float, timeout: float = 10.0) -> None:
        """Until ``n`` samples were sent after ``since`` (waits on the probe's progress, not a fixed time)."""
        deadline = time.monotonic() + scaled(timeout)
        while len(self.window(since)) < n:
            assert not self.errors, f"probe failed: {self.errors}"
            assert time.monotonic() < deadline, f"probe took only {len(self.window(since))} of {n} samples"
            time.sleep(0.01)
