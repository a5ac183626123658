"""Mapping that both roles share: ``[gateway]``, --node-id, tunnel liveness (ws.inactivity.timeout
-> tunnel.ping_*), and whether the tunnels stay plain ws:// or become wss://."""

from __future__ import annotations

from ..config.model import NAME_PATTERN
from ..config.units import format_duration
from .classify import Kwic
from .context import Context
from .report import KaazingImportError
from .values import Uri, parse_kwic_duration, parse_uri, parses
from .writer import Toml
from .xmltree import Node


def gateway_table(ctx: Context, out: Toml, role: str, node_id: str | None, node_id_comment: str) -> None:
    out.table("gateway")
    out.key("role", role, "the " + ("cloud half: it accepts the tunnels" if role == "cloud" else
                                    "on-prem half: it dials the tunnels out"))
    if node_id is not None:
        out.key("node_id", node_id, node_id_comment)
    if ctx.opts.admin:
        out.key("admin", ctx.opts.admin, "--admin; replaces KWIC's JMX/SNMP management: /healthz /readyz "
                "/api/status /metrics")
    else:
        out.comment('admin = "127.0.0.1:9101"   # health, status and Prometheus metrics (replaces JMX/SNMP)')


def tunnel_common(ctx: Context, out: Toml) -> None:
    if ctx.ping is not None:
        interval, timeout, node = ctx.ping
        out.key("ping_interval", format_duration(interval),
                f"a third of ws.inactivity.timeout ({node.text}) at {ctx.file}:{node.line}")
        out.key("ping_timeout", format_duration(timeout),
                f"ws.inactivity.timeout ({node.text}): a silent tunnel is closed and redialed; intercloud's "
                "default 15s fails over faster")


def find_ping(ctx: Context, services: list[Kwic]) -> None:
    """ws.inactivity.timeout -> ctx.ping (tunnel.ping_interval and ping_timeout)."""
    found: list[tuple[float, Node]] = []
    for s in services:
        for opts in (s.accept_opts, s.connect_opts):
            n = opts.get("ws.inactivity.timeout")
            if n is None:
                continue
            try:
                found.append((parse_kwic_duration(n.text), n))
            except ValueError as exc:
                raise ctx.bad(n, f"{exc}; write it like '55 seconds'") from None
    ctx.ping = None
    if not found:
        return
    seconds, node = min(found, key=lambda t: t[0])
    if len({t for t, _ in found}) > 1:
        ctx.report("note", node, "services had different ws.inactivity.timeout values; intercloud has one "
                   f"per gateway, the shortest ({format_duration(seconds)}) is used")
    if seconds <= 0:
        ctx.report("note", node, "ws.inactivity.timeout 0 disabled KWIC's check; intercloud always checks "
                   "tunnel liveness, the defaults (ping every 5s, dead after 15s) are used")
        return
    if seconds > 3600:
        ctx.report("note", node, f"ws.inactivity.timeout {node.text} is longer than intercloud's limit for "
                   "tunnel.ping_timeout; 1h is used (a dead tunnel would go unnoticed that long)")
        seconds = 3600.0
    interval = max(seconds / 3, 0.1)
    interval = float(int(interval)) if interval >= 1 else round(interval, 3)
    ctx.ping = (interval, seconds, node)


def tls_mode(ctx: Context, role: str, services: list[Kwic]) -> bool:
    """True when the tunnels stay plain ws:// (KWIC used ws:// and --insecure-ws was given)."""
    secure = []
    for s in services:
        for u in _tunnel_uris(ctx, s):
            if u[0].secure is not None:
                secure.append((u[0].secure, u[1]))
    plain = [n for ok, n in secure if not ok]
    if not plain or any(ok for ok, _ in secure):
        return False
    node = plain[0]
    if ctx.opts.insecure_ws:
        ctx.report("note", node, "KWIC used plain ws:// (no TLS); kept as ws:// with tls.insecure = true "
                   "because of --insecure-ws: tunnel traffic is NOT encrypted. For production drop "
                   "--insecure-ws to import it as wss://")
        return True
    ctx.report("note", node, "KWIC used plain ws:// (no TLS); imported as wss:// with mutual TLS, "
               "intercloud's default. Create the certificates named in [tls] (see below), or import with "
               "--insecure-ws to keep unencrypted ws:// for experiments")
    return False


def _tunnel_uris(ctx: Context, s: Kwic) -> list[tuple[Uri, Node]]:
    out = []
    if s.kind == "cloud-a":
        n = s.connect_opts.get("socks.transport")
        if n is not None:
            out.append((ctx.uri(n), n))
    elif s.kind == "onprem-a":
        n = s.accept_opts.get("socks.transport")
        if n is not None:
            out.append((ctx.uri(n), n))
    elif s.kind in ("cloud-b", "balancer"):
        out += [(ctx.uri(n), n) for n in s.accepts if parses(n.text) and parse_uri(n.text).is_ws]
    elif s.kind == "onprem-b":
        out += [(ctx.uri(n), n) for n in s.connects]
    return out


def given_node_id(ctx: Context) -> tuple[str | None, str]:
    """(--node-id, its comment) once checked; (None, "") without it."""
    if ctx.opts.node_id is not None:
        if not NAME_PATTERN.fullmatch(ctx.opts.node_id):
            raise KaazingImportError(f"--node-id {ctx.opts.node_id!r}: use 1-64 characters from "
                                     "A-Z a-z 0-9 . _ -")
        return ctx.opts.node_id, "--node-id"
    return None, ""
