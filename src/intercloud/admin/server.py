"""A small HTTP/1.1 server for the admin endpoint (issue 2; the operator issue extends it).

Hand-written on asyncio streams: it serves a handful of GETs, so a web framework would only add
dependencies. It runs on the gateway's event loop, next to the data path, so (issue 12):

* a request is bounded: 4 KiB request line (414 beyond), 8 KiB head (431 beyond), 5 s to send it,
  at most ``_MAX_CONNECTIONS`` at once; malformed requests get 400, never 500, and no log line
  (anyone who can reach the port could otherwise fill the log);
* ``/api/status`` and ``/metrics`` bodies are cached: all scrapers within a short window share one
  rendering, and the window grows with the rendering's cost (``_Cache``), so however many scrapers
  there are, rendering takes at most ~2 % of the loop. The streams list is paged (status.py).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import re
import time
from urllib.parse import parse_qs

from ..errors import StartupError
from .. import logs
from .status import MAX_STREAMS_LIMIT, STREAMS_LIMIT, status

log = logging.getLogger("intercloud.admin")
_MAX_LINE = 4096  # request line: method, target, version
_MAX_HEAD = 8192  # request line and headers
_MAX_CONNECTIONS = 128  # admin connections open at once; more are closed at accept
_HEAD_TIMEOUT = 5.0  # to send the request head
_SEND_TIMEOUT = 10.0  # for a scraper to take the answer

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            414: "URI Too Long", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}
_METHOD = re.compile(r"[A-Z]{1,16}")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header name (RFC 9110 token)


class BadRequest(Exception):
    """A request this server cannot parse; ``code`` is the HTTP status that says why."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


class _Cache:
    """Rendered bodies shared by all scrapers for a while.

    A body is reused while it is younger than ``_COST_FACTOR`` times what rendering it cost (at most
    ``_MAX_AGE``): a render that took 5 ms is served for 250 ms, so rendering takes at most ~2 % of
    the event loop whatever the number of scrapers, while on a small gateway (renders of 0.2 ms)
    answers are at most 10 ms old. A change of topology (a tunnel or peer link up or down, a reload,
    readiness) ends the reuse at once: those are what an operator watches for, and they cannot churn
    fast. Stream counts and byte counters may lag by that window. Renders run on the loop one at a
    time, so concurrent scrapers simply find the body the first one rendered."""

    _COST_FACTOR = 50
    _MAX_AGE = 1.0
    _KEYS = 16  # distinct pages kept (?limit=/&offset=); the oldest goes first

    def __init__(self) -> None:
        # key -> (rendered at, cost, topology version, body)
        self._bodies: dict[tuple, tuple[float, float, tuple, bytes]] = {}

    def get(self, key: tuple, version: tuple, render) -> bytes:
        now = time.monotonic()
        hit = self._bodies.get(key)
        if hit is not None and hit[2] == version and now - hit[0] < min(self._MAX_AGE, hit[1] * self._COST_FACTOR):
            return hit[3]
        body = render()
        done = time.monotonic()
        self._bodies.pop(key, None)
        self._bodies[key] = (done, done - now, version, body)
        while len(self._bodies) > self._KEYS:
            del self._bodies[next(iter(self._bodies))]
        return body


class AdminServer:
    def __init__(self, gateway):
        self.gw = gateway
        self.server: asyncio.AbstractServer | None = None
        self.connections = 0
        self.cache = _Cache()

    async def start(self) -> None:
        addr = self.gw.config.gateway.admin
        try:
            self.server = await asyncio.start_server(self._handle, addr.host, addr.port, reuse_address=True,
                                                     limit=_MAX_HEAD + 4)
        except OSError as exc:
            raise StartupError(f"{self.gw.config.source}: gateway.admin {addr.host}:{addr.port}: cannot listen: "
                             f"{exc.strerror}; free the port or change gateway.admin") from None
        log.info("admin endpoint on http://%s:%s", addr.host, addr.port,
                 extra={"event": "admin.listening", "address": f"{addr.host}:{addr.port}"})

    async def stop(self) -> None:
        if self.server:
            self.server.close()

    def _authorized(self, headers: dict) -> bool:
        token = self.gw.config.gateway.admin_token
        if token is None:
            return True
        got = headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {token.reveal()}".encode())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= _MAX_CONNECTIONS:  # a connection flood: keep descriptors for tunnels
            writer.transport.abort()
            return
        self.connections += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.connections -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_HEAD_TIMEOUT):
                head = await _read_head(reader)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            writer.transport.abort()  # the client left or never finished: nobody to answer
            return
        except BadRequest as exc:
            code, ctype, body = exc.code, "text/plain", f"{exc}\n".encode()
        else:
            try:
                method, target, headers = _parse_head(head)
                code, ctype, body = self._route(method, target, headers)
            except BadRequest as exc:
                code, ctype, body = exc.code, "text/plain", f"{exc}\n".encode()
            except Exception as exc:  # noqa: BLE001 - an admin request must never take the gateway down
                logs.limited(log, logging.WARNING, "admin.error", "admin",
                             "admin request failed: %s: %s; please report this as a bug", type(exc).__name__, exc)
                code, ctype, body = 500, "text/plain", b"internal error\n"
        writer.write(f"HTTP/1.1 {code} {_REASONS.get(code, '')}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
                     + body)
        try:
            async with asyncio.timeout(_SEND_TIMEOUT):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            writer.transport.abort()
            return
        writer.close()

    def _version(self) -> tuple:
        """Changes whenever a tunnel or peer link comes or goes, the config is reloaded, or readiness
        flips: a cached body from before is not served after it (_Cache)."""
        gw = self.gw
        cluster = getattr(gw, "cluster", None)
        return (gw.counters["tunnels_opened"], gw.counters["tunnels_closed"], id(gw.config), gw.draining,
                gw.is_ready(), len(cluster.links) if cluster is not None else 0)

    def _route(self, method: str, target: str, headers: dict) -> tuple[int, str, bytes]:
        path, _, query = target.partition("?")
        if method != "GET":
            return 405, "text/plain", b"only GET\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path in ("/", "/index.html"):  # the page holds no data; it fetches /api/status with the token
            return 200, "text/html; charset=utf-8", _dashboard()
        if not self._authorized(headers):
            return 401, "text/plain", b"missing or wrong bearer token (gateway.admin_token)\n"
        if path == "/readyz":
            ok = self.gw.is_ready()
            return (200 if ok else 503), "text/plain", b"ready\n" if ok else b"not ready\n"
        if path == "/api/status":
            limit, offset = _page(query)
            body = self.cache.get(("status", limit, offset), self._version(),
                                  lambda: json.dumps(status(self.gw, limit, offset), separators=(",", ":")).encode())
            return 200, "application/json", body
        if path == "/metrics":
            from .metrics import render

            return 200, "text/plain; version=0.0.4", self.cache.get(("metrics",), self._version(),
                                                                    lambda: render(self.gw))
        return 404, "text/plain", b"not found: try / /healthz /readyz /api/status /metrics\n"


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request head up to the blank line; BadRequest 414/431 when it is too long."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        pass
    # over _MAX_HEAD without a blank line: is it the request line or the headers?
    buffered = await reader.read(_MAX_HEAD + 4)  # what the reader holds; no further wait
    end = buffered.find(b"\r\n")
    if end < 0 or end > _MAX_LINE:
        raise BadRequest(414, f"request line longer than {_MAX_LINE} bytes")
    raise BadRequest(431, f"request head longer than {_MAX_HEAD} bytes")


def _parse_head(head: bytes) -> tuple[str, str, dict]:
    """(method, target, headers with lower-case names) of a request head; BadRequest if malformed."""
    lines = head[:-4].decode("latin-1").split("\r\n")
    request_line = lines[0]
    if len(request_line) > _MAX_LINE:
        raise BadRequest(414, f"request line longer than {_MAX_LINE} bytes")
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise BadRequest(400, "malformed request line; expected: METHOD /path HTTP/1.1")
    method, target, version = parts
    if not _METHOD.fullmatch(method):
        raise BadRequest(400, "malformed method in the request line")
    m = _VERSION.fullmatch(version)
    if m is None:
        raise BadRequest(400, "malformed HTTP version in the request line; expected HTTP/1.1")
    if m.group(1) != "1":
        raise BadRequest(505, "only HTTP/1.x is served here")
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise BadRequest(400, "malformed request target; expected a path such as /api/status")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):  # also obsolete line folding (leading space)
            raise BadRequest(400, "malformed header line; expected Name: value")
        headers[name.lower()] = value.strip(" \t")
    return method, target, headers


def _page(query: str) -> tuple[int, int]:
    """``limit`` and ``offset`` of /api/status?limit=N&offset=M (streams list paging)."""
    try:
        args = parse_qs(query, max_num_fields=8, strict_parsing=False)
    except ValueError:
        raise BadRequest(400, "too many query parameters; /api/status takes limit and offset") from None

    def number(name: str, default: int, top: int) -> int:
        raw = args.get(name, [str(default)])[-1]
        if not re.fullmatch(r"[0-9]{1,10}", raw) or int(raw) > top:
            raise BadRequest(400, f"{name} must be a whole number from 0 to {top}")
        return int(raw)

    return number("limit", STREAMS_LIMIT, MAX_STREAMS_LIMIT), number("offset", 0, 10**9)


@functools.cache
def _dashboard() -> bytes:
    from importlib.resources import files

    return files("intercloud.admin").joinpath("static/dashboard.html").read_bytes()
