"""Hosts and ports of the TCP endpoints: where to listen for a KWIC accept (interfaces, ``*.bind``,
host names), what to dial for a connect, with --rewrite-host/--rewrite-port applied."""

from __future__ import annotations

from ..config.model import is_ip_literal
from .classify import Options
from .context import Context
from .values import Uri, interface_address, parse_bind
from .xmltree import Node


def listen_host(ctx: Context, uri_host: str, iface: str | None, node: Node, what: str) -> tuple[str, str]:
    """The address to listen on for a KWIC accept host; returns (host, comment)."""
    if iface is not None:
        key = f"@{iface}"
        if key in ctx.opts.rewrite_hosts:
            ctx.used_rewrites.add(key)
            return ctx.opts.rewrite_hosts[key], f"@{iface} rewritten by --rewrite-host"
        addr = interface_address(iface)
        if ctx.opts.resolve_interfaces:
            if addr is None:
                raise ctx.bad(node, f"interface {iface} has no IPv4 address on this machine "
                              f"(--resolve-interfaces); run the import where {iface} exists, or drop "
                              f"--resolve-interfaces to listen on 0.0.0.0, or use --rewrite-host @{iface}=ADDRESS")
            return addr, f"address of {iface} on this machine (--resolve-interfaces)"
        here = f" (here {iface} is {addr}: --resolve-interfaces would use it)" if addr else ""
        ctx.report("note", node, f"KWIC bound interface {iface} (@{iface}); intercloud binds addresses, so it "
                   f"listens on all interfaces (0.0.0.0){here}. Write the interface's address to restrict it")
        return "0.0.0.0", f"@{iface} -> all interfaces"
    mapped = ctx.map_host(uri_host) if uri_host else uri_host
    if mapped != uri_host:
        return mapped, f"{uri_host} rewritten by --rewrite-host"
    if not uri_host:
        return "0.0.0.0", "no host given"
    if is_ip_literal(uri_host):
        return uri_host, ""
    if uri_host.lower() == "localhost":
        return "127.0.0.1", ""
    ctx.report("note", node, f"KWIC listened on the address that {uri_host} resolved to; intercloud "
               "listens on all interfaces (0.0.0.0). Write that address instead to restrict it")
    return "0.0.0.0", f"{uri_host} -> all interfaces"


def find_bind(ctx: Context, opts: Options) -> tuple[Node, str | None, str | None, int] | None:
    for name in ("tcp.bind", "ssl.bind", "http.bind", "https.bind", "ws.bind", "wss.bind", "wsn.bind",
                 "socks.bind", "socks.tcp.bind"):
        n = opts.get(name)
        if n is not None:
            try:
                host, iface, port = parse_bind(n.text)
            except ValueError as exc:
                raise ctx.bad(n, f"{exc}") from None
            return n, host, iface, port
    return None


def endpoint(ctx: Context, uri: Uri, node: Node, *, listen: bool, bind=None, what: str = "") -> tuple[str, int, str]:
    """(host, port, comment) of a tcp:// accept or connect URI."""
    if uri.port is None:
        raise ctx.bad(node, f"{uri.scheme}:// URI without a port: {node.text!r}; add :PORT")
    notes = []
    if listen and bind is not None:
        bnode, bhost, biface, bport = bind
        host, note = listen_host(ctx, bhost or "", biface, bnode, what) if (bhost or biface) else ("0.0.0.0", "")
        port = bport
        notes.append(f"bound by {bnode.shown()}")
        if note:
            notes.append(note)
    elif listen:
        host, note = listen_host(ctx, uri.host, uri.iface, node, what)
        port = uri.port
        if note:
            notes.append(note)
    else:
        if uri.iface is not None:
            raise ctx.bad(node, f"cannot dial an interface ({node.text!r}); give a host name or address")
        host = ctx.map_host(uri.host)
        if host != uri.host:
            notes.append(f"{uri.host} rewritten by --rewrite-host")
        port = uri.port
    mapped = ctx.map_port(port)
    if mapped != port:
        notes.append(f"port {port} rewritten by --rewrite-port")
    return host, mapped, "; ".join(notes)
