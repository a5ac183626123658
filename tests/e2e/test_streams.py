"""Many streams, byte-exact; flow control keeps a stalled reader from stalling its tunnel."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import socket
import threading

import pytest

from tests.support.timeouts import scaled, wait_until

from .conftest import wait_tunnels
from .topology import make_pair

MiB = 1 << 20


def _sizes(n: int, seed: int) -> list[int]:
    """Log-uniform between 1 KiB and 4 MiB: many small streams, some big ones."""
    rng = random.Random(seed)
    return [int(math.exp(rng.uniform(math.log(1024), math.log(4 * MiB)))) for _ in range(n)]


async def _echo_many(port: int, sizes: list[int], seed: int) -> list[tuple[str, str]]:
    sem = asyncio.Semaphore(len(sizes))

    async def one(i: int, size: int) -> tuple[str, str]:
        payload = random.Random(seed * 100_003 + i).randbytes(size)
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            async def send():
                for off in range(0, size, 256 * 1024):
                    writer.write(payload[off:off + 256 * 1024])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            got = hashlib.sha256()
            while chunk := await reader.read(1 << 18):
                got.update(chunk)
            await sender
            writer.close()
        return hashlib.sha256(payload).hexdigest(), got.hexdigest()

    return await asyncio.wait_for(asyncio.gather(*(one(i, s) for i, s in enumerate(sizes))), scaled(240))


@pytest.mark.parametrize("direction", ["serviceA cloud->onprem", "serviceB onprem->cloud"])
def test_1000_concurrent_streams_byte_exact(started_pair, direction):
    pair, cloud, onprem = started_pair
    port = pair.a_port if direction.startswith("serviceA") else pair.b_port
    sizes = _sizes(1000, seed=7)
    results = asyncio.run(_echo_many(port, sizes, seed=7))
    bad = [i for i, (want, got) in enumerate(results) if want != got]
    assert not bad, f"{len(bad)} of 1000 streams corrupted, e.g. #{bad[0]} size {sizes[bad[0]]}"
    # The last streams' close lines follow their echo by a moment: wait for them, do not race them.
    wait_until(lambda: sum(1 for r in cloud.log_lines()
                           if r.get("event") == "stream.closed" and r["reason"] == "closed") >= 1000,
               30, what="1000 stream.closed lines with reason closed on the cloud")


class _PatternServer:
    """Per connection: reads a decimal byte count and a newline, sends that many bytes of a fixed
    pseudo-random pattern, then closes. Lets one test run a stalled and a fast stream at once."""

    BLOCK = random.Random(3).randbytes(MiB)

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.threads = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn):
        with conn:
            head = b""
            while not head.endswith(b"\n"):
                c = conn.recv(1)
                if not c:
                    return
                head += c
            left = int(head)
            try:
                while left > 0 and not self.stop.is_set():
                    n = min(left, MiB)
                    conn.sendall(self.BLOCK[:n])
                    left -= n
            except OSError:
                return

    def close(self):
        self.stop.set()
        self.sock.close()

    @classmethod
    def expected_sha(cls, n: int) -> str:
        h = hashlib.sha256()
        while n > 0:
            h.update(cls.BLOCK[:min(n, MiB)])
            n -= MiB
        return h.hexdigest()


def test_stalled_reader_does_not_stall_the_tunnel(tmp_path, gateways):
    server = _PatternServer()
    try:
        pair = make_pair(tmp_path, a_target=server.port, b_target=server.port)  # one tunnel (per_member 1)
        cloud = gateways("cloud1", pair.cloud_config())
        onprem = gateways("onprem1", pair.onprem_config())
        wait_tunnels(cloud, 1)
        window = 4 * MiB  # tunnel.stream_window default
        max_frame = 256 * 1024  # tunnel.max_frame default

        stalled = socket.create_connection(("127.0.0.1", pair.a_port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        stalled.sendall(b"%d\n" % (512 * MiB))  # far more than any buffer on the way

        def stalled_stream():
            st = [s for s in cloud.status()["streams"] if s["side"] == "accept"]
            return st[0] if st else None

        # The cloud gateway fills the stalled client's socket, then holds bytes for it.
        wait_until(lambda: (stalled_stream() or {}).get("buffered", 0) > 0, 20,
                   what="the stalled stream to have bytes buffered in the cloud gateway")

        total = 256 * MiB
        fast = socket.create_connection(("127.0.0.1", pair.a_port))
        fast.settimeout(scaled(60))
        fast.sendall(b"%d\n" % total)
        h, got = hashlib.sha256(), 0
        peak = 0
        while got < total:
            chunk = fast.recv(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
            if got % (32 * MiB) < len(chunk):
                peak = max(peak, stalled_stream()["buffered"])
        fast.close()
        assert got == total, f"fast stream got {got} of {total} bytes"
        assert h.hexdigest() == _PatternServer.expected_sha(total)

        final = stalled_stream()
        peak = max(peak, final["buffered"])
        assert 0 < peak <= window + max_frame, f"stalled stream buffered {peak} bytes in the gateway"
        # Back-pressure reached the source: the on-prem gateway stopped reading it.
        op = [s for s in onprem.status()["streams"] if s["side"] == "connect"]
        assert len(op) == 1 and op[0]["bytes_out"] < 64 * MiB
        stalled.close()
    finally:
        server.close()
