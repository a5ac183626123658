"""Target servers that run inside the test process, on loopback.

Why: end-to-end tests need something behind a gateway's ``connect`` service whose behaviour
is exact and observable: an echo (round-trips, half-close), a sink (proves every byte arrived,
in order, via SHA-256) and a source (server-speaks-first, large downloads). They run on an
asyncio loop in a background thread so they work from plain synchronous tests and from
pytest-asyncio tests alike, without sharing the test's event loop.

Every server binds port 0 on ``host`` and exposes ``.port``, ``.connections`` (accepted so
far), ``.active`` (open now), ``.stop()`` and context-manager support. ``ssl=`` takes a server
``ssl.SSLContext`` to speak TLS instead (then half-close is replaced by a full close, since TLS
has no half-close).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl as _ssl
import threading
from dataclasses import dataclass
from typing import Callable

from .timeouts import scaled, wait_until

__all__ = ["EchoServer", "SinkServer", "SourceServer", "SinkResult", "RefusingPort"]

_CHUNK = 256 * 1024
_QUIET_ERRORS = (ConnectionError, asyncio.IncompleteReadError, _ssl.SSLError, TimeoutError)


class _LoopServer:
    """Base: an asyncio server on its own loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", *, ssl: _ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port: int = 0
        self.connections = 0
        self.active = 0
        self.peak = 0  # most connections open at once
        self.errors: list[BaseException] = []  # unexpected exceptions from handlers
        self._ssl = ssl
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, name=f"{type(self).__name__}-thread", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(scaled(10)):
            raise AssertionError(f"{type(self).__name__} did not start listening")
        if self._startup_error:
            raise self._startup_error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._accepted, self.host, 0, ssl=self._ssl, backlog=512)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # surfaced to the constructor
            self._startup_error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self.handle(index, reader, writer)
        except asyncio.CancelledError:
            pass
        except _QUIET_ERRORS:
            pass  # peers that reset are part of what tests do
        except Exception as exc:  # a bug in the server: keep it for the test to see
            self.errors.append(exc)
        finally:
            self.active -= 1
            self._tasks.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (Exception, asyncio.CancelledError):
                pass

    async def handle(self, index: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _half_close(self, writer: asyncio.StreamWriter) -> None:
        """Send FIN after everything written, if the transport can (plain TCP)."""
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    def wait_connections(self, n: int, timeout: float = 10.0) -> None:
        """Wait until at least ``n`` connections have been accepted in total."""
        wait_until(lambda: self.connections >= n and self.connections, timeout,
                   what=f"{type(self).__name__} on port {self.port} to accept {n} connections")

    def stop(self) -> None:
        """Close the listener and every open connection; join the thread."""
        if self._stopped:
            return
        self._stopped = True

        async def shutdown() -> None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
            await self._server.wait_closed()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(scaled(10))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(scaled(10))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} connections={self.connections}>"


class EchoServer(_LoopServer):
    """Echoes every byte back. On the client's EOF it finishes echoing, then sends FIN and closes.

    That makes ``nc -N`` style exchanges (send all, half-close, read until EOF) deterministic
    and proves half-close travels end to end. ``bytes_echoed`` counts across connections.
    """

    def __init__(self, host: str = "127.0.0.1", *, ssl: _ssl.SSLContext | None = None) -> None:
        self.bytes_echoed = 0
        super().__init__(host, ssl=ssl)

    async def handle(self, index, reader, writer) -> None:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
            self.bytes_echoed += len(data)
        await self._half_close(writer)


@dataclass(frozen=True)
class SinkResult:
    index: int      # connection number, 0-based, in accept order
    nbytes: int
    sha256: str     # hex digest of everything received


class SinkServer(_LoopServer):
    """Reads until EOF, then replies ``<sha256 hex>\\n`` and closes.

    ``results`` holds one :class:`SinkResult` per finished connection (completion order), so a
    test can check both sides agree on the bytes even when the client cannot read the reply.
    """

    def __init__(self, host: str = "127.0.0.1", *, ssl: _ssl.SSLContext | None = None) -> None:
        self.results: list[SinkResult] = []
        super().__init__(host, ssl=ssl)

    async def handle(self, index, reader, writer) -> None:
        digest = hashlib.sha256()
        n = 0
        while data := await reader.read(_CHUNK):
            digest.update(data)
            n += len(data)
        hexdigest = digest.hexdigest()
        self.results.append(SinkResult(index, n, hexdigest))
        writer.write(hexdigest.encode() + b"\n")
        await self._half_close(writer)

    def wait_results(self, n: int, timeout: float = 10.0) -> list[SinkResult]:
        """Wait until ``n`` connections have finished; return all results."""
        wait_until(lambda: len(self.results) >= n, timeout,
                   what=f"SinkServer on port {self.port} to finish {n} connections")
        return list(self.results)


class SourceServer(_LoopServer):
    """Speaks first: sends ``payload_for_conn(index)`` (or fixed bytes), then half-closes.

    It then discards whatever the client sends until the client's EOF, and closes; waiting
    for the client avoids an RST that could destroy data still in flight to the client.
    """

    def __init__(
        self,
        payload_for_conn: bytes | Callable[[int], bytes],
        host: str = "127.0.0.1",
        *,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self._payload = payload_for_conn
        self.bytes_received = 0
        super().__init__(host, ssl=ssl)

    async def handle(self, index, reader, writer) -> None:
        payload = self._payload(index) if callable(self._payload) else self._payload
        view = memoryview(payload)
        for off in range(0, len(view), _CHUNK):
            writer.write(view[off : off + _CHUNK])
            await writer.drain()
        await self._half_close(writer)
        if writer.can_write_eof():
            while data := await reader.read(_CHUNK):
                self.bytes_received += len(data)


class RefusingPort:
    """A loopback port where connecting is refused (RST), held so nobody else takes it.

    Why: "target refused" paths must be tested against a port that is guaranteed closed; a
    port number that was free a moment ago may not stay free. The port is bound but never
    listened on, which makes the kernel refuse connections while reserving the number.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.bind((host, 0))
        self.port: int = self._sock.getsockname()[1]

    def close(self) -> None:
        self._sock.close()

    stop = close

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RefusingPort {self.host}:{self.port}>"
