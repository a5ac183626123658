"""The intercloud ``[[service]]`` tables: their names (from the pipe or the WebSocket path that
links the two halves), merging the per-member copies, the options of each KWIC service that are
not mapped, and writing the tables."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ..config.model import NAME_PATTERN
from .classify import BIND_OPTIONS, PREPARED, SUPERSEDED_OPTIONS, TUNNEL_OPTIONS, Kwic, norm_option
from .context import Context
from .values import Uri, fmt_host, safe_name
from .writer import Toml
from .xmltree import Node


@dataclass
class Svc:
    """One intercloud [[service]] being built."""

    name: str
    direction: Literal["accept", "connect"]
    host: str
    port: int
    comments: list[str]
    keys: set[str] = field(default_factory=set)  # KWIC names, pipe names, paths: for --tenant matching
    targets: set[tuple[str, int]] = field(default_factory=set)
    tenant: str | None = None


def pipe_name(ctx: Context, pipe: Uri, transport_hosts: Iterable[str], node: Node) -> str:
    name = pipe.host + pipe.path.rstrip("/")
    for host in transport_hosts:
        for sep in ("-", "."):
            if host and name.lower().endswith(sep + host.lower()) and len(name) > len(host) + 1:
                name = name[: -len(host) - 1]
                break
    safe = safe_name(name)
    if not safe or not NAME_PATTERN.fullmatch(safe):
        raise ctx.bad(node, f"cannot make a service name from {node.text!r}; rename the pipe")
    return safe


def path_name(ctx: Context, uri: Uri, kwic: Kwic, node: Node) -> str:
    last = uri.path.rstrip("/").rpartition("/")[2]
    safe = safe_name(last) or safe_name(kwic.name)
    if not safe:
        raise ctx.bad(node, "cannot make a service name from this URI or the service <name>; add a path "
                      "like /serviceB")
    return safe


def add_service(ctx: Context, svcs: list[Svc], svc: Svc, kwic: Kwic) -> None:
    for other in svcs:
        if other.name != svc.name:
            continue
        if other.direction == svc.direction and (other.host, other.port) == (svc.host, svc.port):
            other.comments.append(f"also KWIC service \"{kwic.name}\" ({kwic.node.path}, line {kwic.node.line})")
            other.keys |= svc.keys
            ctx.report("note", kwic.node, f"service \"{kwic.name}\" merged into intercloud service "
                       f"{svc.name!r}: KWIC needed one service per cloud member, intercloud offers one service "
                       "over tunnels to every member")
            return
        ctx.report("dropped", kwic.node, f"service \"{kwic.name}\" maps to the name {svc.name!r} of another "
                   f"service with a different {'target' if svc.direction == 'connect' else 'address'} "
                   f"({other.host}:{other.port} vs {svc.host}:{svc.port}); rename one pipe/path in both halves")
        return
    svcs.append(svc)


def _prepared(ctx: Context, node: Node) -> None:
    ctx.report("superseded", node, f"prepared.connection.count {node.text}: intercloud multiplexes every "
               "stream over long-lived tunnels, so nothing is prepared per connection; the nearest knob is "
               "tunnel.per_member (tunnels kept to EVERY cloud member, default 2), which also ends KWIC's "
               "starvation of a restarted member behind a load balancer")


def other_options(ctx: Context, s: Kwic) -> None:
    handled = TUNNEL_OPTIONS | BIND_OPTIONS | {"ws.inactivity.timeout", "ssl.verify-client"}
    for opts in (s.accept_opts, s.connect_opts):
        for name, node in opts.nodes.items():
            if name in handled:
                continue
            if name == PREPARED:
                _prepared(ctx, node)
            elif name in SUPERSEDED_OPTIONS:
                ctx.report("superseded", node, f"{node.tag}: {SUPERSEDED_OPTIONS[name]}")
            else:
                ctx.report("ignored", node, f"option <{node.tag}> is not known to the importer and was "
                           "skipped; check whether it matters for your deployment")
    for child in s.node.children:
        if child.tag in ("name", "description", "accept", "connect", "type", "accept-options",
                         "connect-options", "balance", "properties"):
            continue
        if child.tag in ("realm-name", "authorization-constraint"):
            ctx.report("ignored", child, f"<{child.tag}>: intercloud does not authenticate the clients of a "
                       "service; rely on the application's authentication (gateways authenticate each other "
                       "with TLS client certificates)")
        elif child.tag in ("cross-site-constraint", "mime-mapping"):
            ctx.report("ignored", child, f"<{child.tag}> concerns browsers and HTTP; intercloud carries TCP only")
        else:
            ctx.report("ignored", child, f"<{child.tag}> is not known to the importer and was skipped")
    props = s.node.child("properties")
    if props is not None:
        for p in props.children:
            if norm_option(p.tag) == PREPARED:
                _prepared(ctx, p)
            else:
                ctx.report("ignored", p, f"service property <{p.tag}> has no intercloud equivalent")


def emit_services(ctx: Context, out: Toml, svcs: list[Svc]) -> None:
    if not svcs:
        ctx.report("dropped", None, "no service was imported: the gateway would carry nothing")
    for s in svcs:
        out.blank()
        for c in s.comments:
            out.comment(c)
        out.table("service", array=True)
        out.key("name", s.name)
        if s.tenant is not None:
            out.key("tenant", s.tenant)
        out.key(s.direction, f"tcp://{fmt_host(s.host)}:{s.port}")
