"""A small HTTP/1.1 server for the admin endpoint (issue 2; the operator issue extends it).

Hand-written on asyncio streams: it serves a handful of GETs to one scraper or operator at a time,
so a web framework would only add dependencies. Requests are bounded (8 KiB head, 5 s to send it).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from .status import status

log = logging.getLogger("intercloud.admin")
_MAX_HEAD = 8192


class AdminServer:
    def __init__(self, gateway):
        self.gw = gateway
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        addr = self.gw.config.gateway.admin
        try:
            self.server = await asyncio.start_server(self._handle, addr.host, addr.port, reuse_address=True)
        except OSError as exc:
            raise SystemExit(f"{self.gw.config.source}: gateway.admin {addr.host}:{addr.port}: cannot listen: "
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
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        try:
            lines = head[:_MAX_HEAD].decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            code, ctype, body = self._route(method, target.split("?", 1)[0], headers)
        except Exception as exc:  # noqa: BLE001 - an admin request must never take the gateway down
            log.warning("admin request failed: %r", exc)
            code, ctype, body = 500, "text/plain", b"internal error\n"
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error", 503: "Service Unavailable"}.get(code, "")
        writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                     f"Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode() + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    def _route(self, method: str, path: str, headers: dict) -> tuple[int, str, bytes]:
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
            return 200, "application/json", json.dumps(status(self.gw), indent=1).encode()
        if path == "/metrics":
            from .metrics import render

            return 200, "text/plain; version=0.0.4", render(self.gw)
        return 404, "text/plain", b"not found: try / /healthz /readyz /api/status /metrics\n"


def _dashboard() -> bytes:
    from importlib.resources import files

    return files("intercloud.admin").joinpath("static/dashboard.html").read_bytes()
