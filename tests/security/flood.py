"""An attacker in a separate process: rounds of raw TCP or TLS connections to one port.

Why a process of its own: the test process runs the legitimate client probe and the echo server;
a flood on the same interpreter would steal the GIL from them and measure itself, not the gateway.

    python -m tests.security.flood raw|tls HOST PORT --rounds 20 --per-round 2000 [--sources 127.0.0.2,...]
                                   [--ca CA.pem] [--server-name NAME]

Prints one JSON object: connections attempted, how they ended, seconds taken.
raw: every round opens ``per-round`` TCP connections (at most 256 connecting at once), holds them until
all are open, then closes them. tls: every round runs ``per-round`` TLS handshakes without a client
certificate (at most 256 at once) and closes each when it has ended.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import ssl
import time

_IN_FLIGHT = 256
_TIMEOUT = 15.0


async def _connect(host: str, port: int, source: str | None) -> socket.socket:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        if source:
            s.bind((source, 0))
        await asyncio.wait_for(loop.sock_connect(s, (host, port)), _TIMEOUT)
    except BaseException:
        s.close()
        raise
    return s


async def raw_round(host, port, n, sources, outcomes) -> None:
    gate = asyncio.Semaphore(_IN_FLIGHT)
    held: list[socket.socket] = []

    async def one(i: int) -> None:
        async with gate:
            try:
                held.append(await _connect(host, port, sources[i % len(sources)] if sources else None))
                outcomes["connected"] += 1
            except (OSError, asyncio.TimeoutError) as exc:
                outcomes[type(exc).__name__] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    for s in held:
        s.close()


async def tls_round(host, port, n, sources, ctx, server_name, outcomes) -> None:
    gate = asyncio.Semaphore(_IN_FLIGHT)

    async def one(i: int) -> None:
        async with gate:
            writer = None
            try:
                sock = await _connect(host, port, sources[i % len(sources)] if sources else None)
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    sock=sock, ssl=ctx, server_hostname=server_name, ssl_handshake_timeout=_TIMEOUT), _TIMEOUT)
                # TLS 1.3: the client is done before the server has looked at (the lack of) its certificate
                await asyncio.wait_for(reader.read(1), _TIMEOUT)
                outcomes["handshake_then_closed"] += 1
            except (OSError, asyncio.TimeoutError, ssl.SSLError, EOFError) as exc:
                outcomes[type(exc).__name__] += 1
            finally:
                if writer is not None:
                    writer.transport.abort()

    await asyncio.gather(*(one(i) for i in range(n)))


async def main(args) -> dict:
    sources = [s for s in (args.sources or "").split(",") if s]
    outcomes: collections.Counter = collections.Counter()
    ctx = None
    if args.mode == "tls":
        ctx = ssl.create_default_context(cafile=args.ca)
    started = time.monotonic()
    for _ in range(args.rounds):
        if args.mode == "raw":
            await raw_round(args.host, args.port, args.per_round, sources, outcomes)
        else:
            await tls_round(args.host, args.port, args.per_round, sources, ctx, args.server_name, outcomes)
    return {"mode": args.mode, "port": args.port, "connections": args.rounds * args.per_round,
            "outcomes": dict(outcomes), "seconds": round(time.monotonic() - started, 2)}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("raw", "tls"))
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--per-round", type=int, default=2000)
    p.add_argument("--sources", default="")
    p.add_argument("--ca")
    p.add_argument("--server-name", default="localhost")
    # not uvloop: it refuses to watch a descriptor number that an aborted transport held in the same
    # iteration ("File descriptor N is used by transport"), which a flood client hits at once
    print(json.dumps(asyncio.run(main(p.parse_args()))), flush=True)
