"""Admin scrapers in a loop, as a separate process: ``python -m tests.security.scrapers PORT N SECONDS``.

N asyncio tasks each GET /api/status and /metrics in turn, back to back, for SECONDS (one request
per connection, as the admin endpoint serves them). Prints a JSON summary: requests per path,
status codes, bytes, and the worst answer time. A process of its own, so that its work does not
steal the test process's GIL from the data-path probe.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def _get(port: int, path: str) -> tuple[int, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()  # the server closes after one answer
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1]), len(data)


async def main(port: int, n: int, seconds: float) -> dict:
    summary = {"requests": {}, "codes": {}, "bytes": 0, "max_s": 0.0}
    stop_at = time.monotonic() + seconds

    async def scraper(i: int) -> None:
        paths = ["/api/status", "/metrics"] if i % 2 else ["/metrics", "/api/status"]
        k = 0
        while time.monotonic() < stop_at:
            path = paths[k % 2]
            k += 1
            started = time.monotonic()
            code, size = await _get(port, path)
            summary["max_s"] = max(summary["max_s"], time.monotonic() - started)
            summary["requests"][path] = summary["requests"].get(path, 0) + 1
            summary["codes"][str(code)] = summary["codes"].get(str(code), 0) + 1
            summary["bytes"] += size

    await asyncio.gather(*(scraper(i) for i in range(n)))
    return summary


if __name__ == "__main__":
    port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    print(json.dumps(asyncio.run(main(port, n, seconds))))
