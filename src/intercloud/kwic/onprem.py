"""The on-prem half: ``tunnel.connect`` from the reverse SOCKS transport it dialed (or service B's
WebSocket URL), the Java proxy settings (``tunnel.proxy``), the connect services (KWIC service A)
and the accept services (service B)."""

from __future__ import annotations

from .classify import Kwic
from .common import gateway_table, given_node_id, tunnel_common
from .context import Context
from .endpoints import endpoint, find_bind
from .report import KaazingImportError
from .security import check_identity, map_tls
from .services import Svc, add_service, emit_services, other_options, path_name, pipe_name
from .values import Uri, fmt_host, parse_uri, stem_name
from .writer import Toml
from .xmltree import Node


def map_onprem(ctx: Context, root: Node, mine: list[Kwic], out: Toml, plain: bool) -> None:
    """Write the on-prem half's tables into ``out``; ``mine`` are the on-prem services."""
    urls: list[tuple[str, Node, str]] = []  # (url, node, comment)
    transport_hosts: set[str] = set()
    for s in mine:
        if s.kind != "onprem-a":
            continue
        n = s.accept_opts.get("socks.transport")
        pt = s.accept_opts.get("pipe.transport")
        if n is None and pt is None:
            ctx.report("dropped", s.node, f"service \"{s.name}\": no socks.transport in accept-options, so "
                       "there is no tunnel to map")
            continue
        src = n if n is not None else pt
        uri = ctx.uri(src)
        path = uri.path if n is not None else "/intercloud"
        if n is None:
            ctx.report("note", pt, "no socks.transport: KWIC spoke SOCKS over plain TCP here; intercloud "
                       "tunnels are WebSocket")
        transport_hosts.add(uri.host)
        urls.append(_dial_url(ctx, uri, src, plain, path))
    b_targets: list[tuple[Uri, Node]] = []
    for s in mine:
        if s.kind == "onprem-b":
            b_targets += [(ctx.uri(c), c) for c in s.connects]
    if not urls:
        for uri, node in b_targets:
            urls.append(_dial_url(ctx, uri, node, plain, "/intercloud"))
        if urls:
            ctx.report("note", b_targets[0][1], "no reverse (pipe://) service: the tunnel URL is made from "
                       "service B's WebSocket URL with the path /intercloud; the cloud half's import makes "
                       "the same listener from its ws(s):// accept")
    seen: dict[str, int] = {}
    unique = []
    for url, node, comment in urls:
        if url in seen:
            continue
        seen[url] = len(unique)
        unique.append((url, node, comment))
    node_id, node_comment = given_node_id(ctx)
    gateway_table(ctx, out, "onprem", node_id, node_comment)
    if node_id is None:
        out.comment("node_id defaults to the first name (CN) of tls.cert, or the host name without one: give "
                    "every on-prem gateway a certificate of its own")
    tls = map_tls(ctx, root, "onprem", out, node_id or stem_name(ctx.source), plain, None)
    check_identity(ctx, "onprem", node_id, node_comment, tls)
    out.table("tunnel")
    if not unique:
        raise KaazingImportError(f"{ctx.source}: no tunnel found (no socks.transport and no ws(s):// connect); "
                                 "nothing to dial")
    out.key("connect", [u for u, _, _ in unique], [f"{u}: {c}" for u, _, c in unique])
    if len(unique) > 1:
        out.comment("intercloud keeps per_member tunnels to every cloud member (and the members they advertise)")
    dial_hosts = {(ctx.map_host(parse_uri(n.text).host), parse_uri(n.text).port) for _, n, _ in unique}
    for uri, node in b_targets:
        host = ctx.map_host(uri.host)
        if urls and not any(h == host for h, _ in dial_hosts):
            ctx.report("note", node, f"service B was reached through {uri.host}; in intercloud its streams "
                       "ride the tunnels in tunnel.connect (to every member), so that URL is not dialed")
    _proxy(ctx, out)
    tunnel_common(ctx, out)
    svcs: list[Svc] = []
    for s in mine:
        if s.kind == "onprem-a":
            _onprem_a(ctx, s, svcs, transport_hosts)
        elif s.kind == "onprem-b":
            _onprem_b(ctx, s, svcs)
        other_options(ctx, s)
    if root.child("cluster") is not None:
        ctx.report("ignored", root.child("cluster"), "<cluster> on an on-prem gateway: only cloud members "
                   "form a cluster; on-prem gateways are independent (each keeps tunnels to every member)")
    if ctx.opts.tenants:
        ctx.report("ignored", None, "--tenant is for the cloud half; the cloud derives an on-prem gateway's "
                   "tenant from its client certificate")
    emit_services(ctx, out, svcs)


def _dial_url(ctx: Context, uri: Uri, node: Node, plain: bool, path: str) -> tuple[str, Node, str]:
    if uri.secure is None:
        raise ctx.bad(node, f"{uri.scheme}:// is not a WebSocket transport; use wss://HOST/PATH")
    if uri.iface is not None or not uri.host:
        raise ctx.bad(node, "a tunnel URL needs a host name to dial")
    port = uri.port if uri.port is not None else (443 if uri.secure else 80)
    host = ctx.map_host(uri.host)
    notes = []
    if host != uri.host:
        notes.append(f"{uri.host} rewritten by --rewrite-host")
    mapped = ctx.map_port(port)
    if mapped != port:
        notes.append(f"port {port} rewritten by --rewrite-port")
    scheme = "ws" if plain else "wss"
    url = f"{scheme}://{fmt_host(host)}:{mapped}{path or '/'}"
    return url, node, ctx.origin(node, f" ({'; '.join(notes)})" if notes else "")


def _proxy(ctx: Context, out: Toml) -> None:
    props = {k.lower(): v for k, v in ctx.opts.properties.items()}
    for scheme in ("https", "http"):
        host = props.get(f"{scheme}.proxyhost")
        if host:
            port_text = props.get(f"{scheme}.proxyport") or "80"
            try:
                port = int(port_text)
            except ValueError:
                raise KaazingImportError(f"-D {scheme}.proxyPort={port_text}: not a port number") from None
            mapped_host, mapped_port = ctx.map_host(host), ctx.map_port(port)
            out.key("proxy", f"http://{fmt_host(mapped_host)}:{mapped_port}",
                    f"-D {scheme}.proxyHost={host} -D {scheme}.proxyPort={port} (KWIC's Java proxy settings)")
            if props.get("http.nonproxyhosts"):
                ctx.report("note", None, "-D http.nonProxyHosts is not imported; intercloud uses the proxy "
                           "for every tunnel URL (NO_PROXY applies only when tunnel.proxy is not set)")
            return


def _onprem_a(ctx: Context, s: Kwic, svcs: list[Svc], transport_hosts: set[str]) -> None:
    pipe_node = s.accepts[0]
    pipe = ctx.uri(pipe_node)
    name = pipe_name(ctx, pipe, transport_hosts, pipe_node)
    if len(s.connects) > 1:
        for n in s.connects[1:]:
            ctx.report("dropped", n, f"service \"{s.name}\": only the first <connect> is imported")
    cnode = s.connects[0]
    host, port, note = endpoint(ctx, ctx.uri(cnode), cnode, listen=False)
    comments = [f"KWIC service \"{s.name}\" ({s.node.path}, line {s.node.line}): cloud clients connect on the "
                f"cloud side, this gateway dials the target ({pipe_node.shown()})",
                ctx.origin(cnode, f" ({note})" if note else "")]
    add_service(ctx, svcs, Svc(name, "connect", host, port, comments, {s.name, pipe.host, name}, {(host, port)}), s)


def _onprem_b(ctx: Context, s: Kwic, svcs: list[Svc]) -> None:
    ws_node = next(c for c in s.connects if ctx.uri(c).is_ws)
    uri = ctx.uri(ws_node)
    name = path_name(ctx, uri, s, ws_node)
    anode = s.accepts[0]
    if len(s.accepts) > 1:
        for n in s.accepts[1:]:
            ctx.report("dropped", n, f"service \"{s.name}\": an intercloud service listens on one address; "
                       "this extra <accept> was not imported")
    bind = find_bind(ctx, s.accept_opts)
    host, port, note = endpoint(ctx, ctx.uri(anode), anode, listen=True, bind=bind,
                                what=f"service \"{s.name}\"")
    comments = [f"KWIC service \"{s.name}\" ({s.node.path}, line {s.node.line}): on-prem clients connect "
                f"here, the cloud side dials the target ({ws_node.shown()})",
                ctx.origin(anode, f" ({note})" if note else "")]
    add_service(ctx, svcs, Svc(name, "accept", host, port, comments, {s.name, name, uri.path}), s)
