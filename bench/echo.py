"""A small, fast TCP echo server for the benchmark (bench/run.py starts it as its own process).

    python bench/echo.py PORT [HOST]

Listens on HOST (default 127.0.0.1; bench/wan.py passes the server namespace's address). Echoes
every byte back on the same connection, closes when the client closes, and holds as many idle
connections as the file-descriptor limit allows (raised here, as in every benchmark process). It
prints "ready" on stdout once it listens. uvloop is used when installed, plain asyncio otherwise.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import sys


def raise_nofile(want: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):  # not root: the hard limit is the ceiling
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too


async def main(port: int, host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port, reuse_address=True, backlog=4096)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    print("ready", flush=True)
    async with server:
        await stop


if __name__ == "__main__":
    raise_nofile()
    args = (int(sys.argv[1]), *sys.argv[2:3])
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(*args))
    else:
        uvloop.run(main(*args))
