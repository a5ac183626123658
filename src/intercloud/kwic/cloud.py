"""The cloud half: ``tunnel.listen`` from the reverse SOCKS transport (or service B's WebSocket
accept), ``tls.verify_client``, the accept services (KWIC service A) and connect services (service
B), the cluster and the tenants."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.model import NAME_PATTERN, is_ip_literal
from .classify import Kwic, Options
from .cluster import map_cluster
from .common import gateway_table, given_node_id, tunnel_common
from .context import Context
from .endpoints import endpoint, find_bind, listen_host
from .report import KaazingImportError
from .security import TlsFiles, check_identity, map_tls
from .services import Svc, add_service, emit_services, other_options, path_name, pipe_name
from .values import Uri, fmt_host, parse_uri, stem_name
from .writer import Toml
from .xmltree import JAVA_PROXY_PROPS, Node


@dataclass
class Listen:
    """A WebSocket endpoint KWIC accepted on: a candidate for tunnel.listen."""

    secure: bool
    host: str
    port: int
    path: str
    comment: str
    kind: str  # socks, b, balancer
    node: Node | None = None


def map_cloud(ctx: Context, root: Node, mine: list[Kwic], out: Toml, plain: bool) -> None:
    """Write the cloud half's tables into ``out``; ``mine`` are the cloud services."""
    listens: list[Listen] = []
    transport_hosts: set[str] = set()
    for s in mine:
        if s.kind == "cloud-a":
            n = s.connect_opts.get("socks.transport")
            pt = s.connect_opts.get("pipe.transport")
            if n is None and pt is None:
                ctx.report("dropped", s.node, f"service \"{s.name}\": no socks.transport in connect-options, "
                           "so there is no tunnel to map")
                continue
            src = n if n is not None else pt
            uri = ctx.uri(src)
            if n is None:
                ctx.report("note", pt, "no socks.transport: KWIC spoke SOCKS over plain TCP here; intercloud "
                           "tunnels are WebSocket, both halves use "
                           f"wss://{uri.host}:{uri.port or 443}/intercloud")
                uri = Uri("wss", uri.host, uri.port, "/intercloud")
            transport_hosts.add(uri.host)
            listens.append(_listen_candidate(ctx, uri, src, s.connect_opts, "socks"))
        elif s.kind in ("cloud-b", "balancer"):
            for a in s.accepts:
                uri = ctx.uri(a)
                if uri.is_ws:
                    cand = _listen_candidate(ctx, uri, a, s.accept_opts, "b" if s.kind == "cloud-b" else "balancer")
                    cand.path = "/intercloud"
                    listens.append(cand)
    node_id, node_comment = _node_id(ctx, [c for c in listens if c.kind == "socks"] or listens)
    tunnel_host = next((h for h in transport_hosts), None)
    gateway_table(ctx, out, "cloud", node_id, node_comment)
    tls = map_tls(ctx, root, "cloud", out, node_id, plain, tunnel_host)
    check_identity(ctx, "cloud", node_id, node_comment, tls)
    _verify_client(ctx, mine, out, tls)
    # tunnel.listen
    out.table("tunnel")
    if not listens:
        raise KaazingImportError(f"{ctx.source}: no tunnel endpoint found (no socks.transport and no ws(s):// "
                                 "accept); nothing for on-prem gateways to dial")
    primary = next((c for c in listens if c.kind == "socks"), listens[0])
    scheme = "ws" if plain else "wss"
    url = f"{scheme}://{fmt_host(primary.host)}:{primary.port}{primary.path}"
    out.key("listen", url, primary.comment)
    for c in listens:
        if c is not primary and c.kind != "balancer" and c.port != primary.port:
            ctx.report("note", c.node, f"this WebSocket endpoint (port {c.port}) is not a listener of its "
                       f"own: intercloud carries the service inside the tunnels on tunnel.listen (port "
                       f"{primary.port}); on-prem gateways dial only that")
    tunnel_common(ctx, out)
    # services (collected first: cluster keys come before [[service]] tables)
    svcs: list[Svc] = []
    for s in mine:
        if s.kind == "balancer":
            ctx.report("superseded", s.node, f"balancer service \"{s.name}\": on-prem gateways keep tunnels to "
                       "every cluster member and any member relays to any other, so no balancer service is "
                       "needed ([cluster] below)")
            continue
        if s.kind == "cloud-a":
            _cloud_a(ctx, s, svcs, transport_hosts)
        elif s.kind == "cloud-b":
            _cloud_b(ctx, s, svcs)
        other_options(ctx, s)
    map_cluster(ctx, root, out, tls, node_id, plain)
    _tenants(ctx, out, svcs)
    if any(k.lower() in JAVA_PROXY_PROPS for k in ctx.opts.properties):
        ctx.report("ignored", None, "-D http(s).proxyHost/proxyPort: a cloud gateway dials no tunnels; the "
                   "proxy belongs in the on-prem half (tunnel.proxy)")
    emit_services(ctx, out, svcs)


def _listen_candidate(ctx: Context, uri: Uri, node: Node, opts: Options, kind: str) -> Listen:
    if uri.secure is None:
        raise ctx.bad(node, f"{uri.scheme}:// is not a WebSocket transport; use wss://HOST/PATH")
    port = uri.port if uri.port is not None else (443 if uri.secure else 80)
    bind = find_bind(ctx, opts)
    what = "the tunnel endpoint" if kind == "socks" else "this WebSocket endpoint"
    comments = [ctx.origin(node)]
    if bind is not None:
        bnode, bhost, biface, bport = bind
        host, note = listen_host(ctx, bhost or "", biface, bnode, what) if (bhost or biface) else ("0.0.0.0", "")
        port = bport
        comments.append(f"bound by {bnode.shown()}")
        if note:
            comments.append(note)
    else:
        host, note = listen_host(ctx, uri.host, uri.iface, node, what)
        if note:
            comments.append(note)
    mapped = ctx.map_port(port)
    if mapped != port:
        comments.append(f"port {port} rewritten by --rewrite-port")
    path = uri.path or "/"
    return Listen(bool(uri.secure), host, mapped, path, "; ".join(comments), kind, node)


def _node_id(ctx: Context, listens: list[Listen]) -> tuple[str | None, str]:
    """--node-id, or the host of the tunnel URL, or a name made from the file name."""
    node_id, comment = given_node_id(ctx)
    if node_id is not None:
        return node_id, comment
    for c in listens:
        node = c.node
        if node is None:
            continue
        uri = parse_uri(node.text)
        if uri.host and NAME_PATTERN.fullmatch(uri.host) and not is_ip_literal(uri.host):
            ctx.report("note", node, f"gateway.node_id = {uri.host!r} is the host of the tunnel URL; every "
                       "cloud member needs its own node_id: if several members run this file, give each "
                       "one --node-id (or -D the property that names the member)")
            return uri.host, f"host of {node.shown()}"
    name = stem_name(ctx.source) or "cloud"
    ctx.report("note", ctx.root, f"gateway.node_id = {name!r} was made from the file name; every cloud member "
               "needs its own: give --node-id")
    return name, "from the file name (give --node-id)"


def _verify_client(ctx: Context, mine: list[Kwic], out: Toml, tls: TlsFiles | None) -> None:
    if tls is None:
        return
    found = []
    for s in mine:
        for opts in (s.accept_opts, s.connect_opts):
            n = opts.get("ssl.verify-client")
            if n is not None:
                found.append(n)
    values = {n.text.lower() for n in found}
    if "none" in values and not ctx.opts.tenants:
        n = next(n for n in found if n.text.lower() == "none")
        out.key("verify_client", False, ctx.origin(n))
        ctx.report("note", n, "ssl.verify-client none: any client that reaches tunnel.listen can offer "
                   "services to this gateway. intercloud's default is to require client certificates; "
                   "remove verify_client = false once the on-prem gateways have certificates")
        return
    if found:
        n = found[0]
        extra = ""
        if "optional" in values:
            extra = " (KWIC's optional is required in intercloud: tunnels without a client certificate are refused)"
            ctx.report("note", n, "ssl.verify-client optional: intercloud requires the client certificate")
        out.key("verify_client", True, ctx.origin(n) + extra)
    else:
        out.comment("verify_client = true (the default): on-prem gateways must present a certificate signed by "
                    "tls.ca. KWIC did not check client certificates unless ssl.verify-client was set")


def _cloud_a(ctx: Context, s: Kwic, svcs: list[Svc], transport_hosts: set[str]) -> None:
    pipe_node = s.connects[0]
    pipe = ctx.uri(pipe_node)
    name = pipe_name(ctx, pipe, transport_hosts, pipe_node)
    uris = [(ctx.uri(a), a) for a in s.accepts]
    bind = find_bind(ctx, s.accept_opts)
    keep = uris[0]
    if len(uris) > 1:
        if len({u.port for u, _ in uris}) == 1 and bind is None:
            keep = (Uri("tcp", "0.0.0.0", uris[0][0].port, ""), uris[0][1])
            ctx.report("note", uris[1][1], "several <accept> on one port: intercloud listens on all "
                       "interfaces (0.0.0.0) once")
        else:
            for _u, n in uris[1:]:
                ctx.report("dropped", n, f"service \"{s.name}\": an intercloud service listens on one address; "
                           "this extra <accept> was not imported. Listen on 0.0.0.0 or add a second service "
                           "pair (both halves) for it")
    uri, anode = keep
    host, port, note = endpoint(ctx, uri, anode, listen=True, bind=bind, what=f"service \"{s.name}\"")
    comments = [f"KWIC service \"{s.name}\" ({s.node.path}, line {s.node.line}): cloud clients connect here, "
                f"the on-prem side connects the target ({pipe_node.shown()})",
                ctx.origin(anode, f" ({note})" if note else "")]
    add_service(ctx, svcs, Svc(name, "accept", host, port, comments, {s.name, pipe.host, name}), s)


def _cloud_b(ctx: Context, s: Kwic, svcs: list[Svc]) -> None:
    ws_node = next(a for a in s.accepts if ctx.uri(a).is_ws)
    uri = ctx.uri(ws_node)
    name = path_name(ctx, uri, s, ws_node)
    if len(s.connects) > 1:
        for n in s.connects[1:]:
            ctx.report("dropped", n, f"service \"{s.name}\": only the first <connect> is imported; intercloud "
                       "services dial one target")
    cnode = s.connects[0]
    host, port, note = endpoint(ctx, ctx.uri(cnode), cnode, listen=False)
    comments = [f"KWIC service \"{s.name}\" ({s.node.path}, line {s.node.line}): on-prem clients connect on "
                f"the on-prem side ({ws_node.shown()}), this gateway dials the target",
                ctx.origin(cnode, f" ({note})" if note else "")]
    balance = s.node.child("balance")
    if balance is not None:
        ctx.report("superseded", balance, "<balance>: on-prem gateways keep tunnels to every member, so "
                   "service B reaches any member without a balancer URI")
    add_service(ctx, svcs, Svc(name, "connect", host, port, comments, {s.name, name, uri.path}, {(host, port)}), s)


def _tenants(ctx: Context, out: Toml, svcs: list[Svc]) -> None:
    if not ctx.opts.tenants:
        if len(svcs) > 2:
            ctx.report("note", ctx.root, "no --tenant given: every on-prem gateway trusted by tls.ca may offer "
                       "and use every service, as in KWIC. For KWIC's multi-tenant setup give "
                       "--tenant NAME=SERVICE,SERVICE per tenant so that intercloud enforces it")
        return
    owner: dict[str, str] = {}
    for tenant, wanted in ctx.opts.tenants.items():
        for w in wanted:
            match = [s for s in svcs if w in s.keys or w == s.name]
            if not match:
                raise KaazingImportError(f"--tenant {tenant}=...: no service {w!r} in {ctx.source} (services: "
                                         f"{', '.join(s.name for s in svcs)})")
            for s in match:
                if s.name in owner and owner[s.name] != tenant:
                    raise KaazingImportError(f"--tenant: service {s.name!r} given to both {owner[s.name]!r} "
                                             f"and {tenant!r}; a service belongs to one tenant")
                owner[s.name] = tenant
                s.tenant = tenant
    ctx.report("note", ctx.root, "tenants are enforced: a tunnel belongs to the tenant its client "
               "certificate maps to (client_cn), and it may only offer and reach that tenant's services; KWIC "
               "kept tenants apart only by the pipe names in each on-prem configuration")
    missing = [s.name for s in svcs if s.name not in owner]
    if missing:
        raise KaazingImportError(f"--tenant: service(s) {', '.join(missing)} belong to no tenant; with tenants "
                                 "every service needs one (add it to a --tenant NAME=... list)")
    for tenant in ctx.opts.tenants:
        if not NAME_PATTERN.fullmatch(tenant):
            raise KaazingImportError(f"--tenant {tenant!r}: use 1-64 characters from A-Z a-z 0-9 . _ -")
        out.table("tenant", array=True)
        out.key("name", tenant, f"--tenant {tenant}={','.join(ctx.opts.tenants[tenant])}")
        out.key("client_cn", [tenant], "the CN of this tenant's on-prem client certificates "
                f"(`intercloud certs init DIR --onprem {tenant}` issues CN={tenant}); change it to yours")
