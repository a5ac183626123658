"""The Hazelcast ``<cluster>`` (and --peer/--cluster-listen) -> ``[cluster]``: peer links between cloud
members, their CA and the certificate names accepted on them."""

from __future__ import annotations

from cryptography.x509.oid import ExtendedKeyUsageOID

from ..config.model import NAME_PATTERN, is_ip_literal
from ..config.units import format_duration
from .context import Context
from .endpoints import endpoint
from .keystores import cert_names
from .report import KaazingImportError
from .security import TlsFiles
from .values import fmt_host, parse_uri, split_authority
from .writer import Toml
from .xmltree import Node

#: KWIC's Hazelcast cluster port, used when --peer is given without --cluster-listen.
HAZELCAST_PORT = 5941


def map_cluster(ctx: Context, root: Node, out: Toml, tls: TlsFiles | None, node_id: str | None, plain: bool) -> None:
    cluster = root.child("cluster")
    listen: tuple[str, int, str] | None = None
    peers: list[tuple[str, int, str]] = []
    if cluster is not None:
        name = cluster.child("name")
        if name is not None:
            ctx.report("superseded", name, f"cluster name {name.text!r}: members recognise each other by "
                       "cluster.ca and cluster.peer_names, not by a name")
        for a in cluster.all("accept"):
            uri = ctx.uri(a)
            if uri.scheme != "tcp":
                ctx.report("dropped", a, f"{uri.scheme}:// cluster discovery (multicast) is not supported; "
                           "list the members in cluster.peers (--peer HOST:PORT)")
                continue
            if listen is None:
                host, port, note = endpoint(ctx, uri, a, listen=True, what="the cluster")
                listen = (host, port, ctx.origin(a, f" ({note})" if note else ""))
        for c in cluster.all("connect"):
            uri = ctx.uri(c)
            if uri.scheme != "tcp":
                ctx.report("dropped", c, f"{uri.scheme}:// cluster discovery is not supported; list the "
                           "members in cluster.peers (--peer HOST:PORT)")
                continue
            host, port, note = endpoint(ctx, uri, c, listen=False)
            peers.append((host, port, ctx.origin(c, f" ({note})" if note else "")))
        for child in cluster.children:
            if child.tag not in ("name", "accept", "connect"):
                ctx.report("ignored", child, f"<cluster><{child.tag}> is not imported (Hazelcast setting)")
    for p in ctx.opts.peers:
        host, port = _peer_address(p)
        peers.append((ctx.map_host(host), ctx.map_port(port), f"--peer {p}"))
    if ctx.opts.cluster_listen:
        host, port = _peer_address(ctx.opts.cluster_listen)
        listen = (host, ctx.map_port(port), f"--cluster-listen {ctx.opts.cluster_listen}")
    if not peers and listen is None:
        if ctx.opts.tenants or cluster is not None:
            return
        out.comment_block(["", "No <cluster>: this member stands alone. If several cloud gateways run this "
                           "file (e.g. behind a load", "balancer, as in KWIC's 4-ha-lb), import it once per "
                           "member with --node-id and --peer so that", "on-prem gateways reach every member "
                           "(see docs/kwic-migration.md)."])
        return
    if not peers:
        ctx.report("note", cluster, "the cluster has no <connect> member: it stays alone until peers are "
                   "listed in cluster.peers")
    if listen is None:
        listen = ("0.0.0.0", ctx.map_port(HAZELCAST_PORT), f"--peer given: KWIC's cluster port {HAZELCAST_PORT}")
    scheme = "ws" if plain else "wss"
    out.table("cluster")
    out.key("listen", f"{scheme}://{fmt_host(listen[0])}:{listen[1]}/cluster",
            f"peer links between members (was Hazelcast): {listen[2]}")
    out.key("peers", [f"{scheme}://{fmt_host(h)}:{p}/cluster" for h, p, _ in peers],
            [f"{h}:{p}: {c}" for h, p, c in peers])
    if plain:
        return
    peer_hosts = [h for h, _, _ in peers]
    names: list[str] = []
    if tls is not None and tls.converted and tls.leaf is not None:
        out.key("ca", tls.ca, "the tunnel CA: KWIC had one truststore. Better: a separate CA for peer links")
        ctx.report("note", cluster, "peer links use the same CA as the tunnels (KWIC had one truststore); "
                   "cluster.peer_names keeps tenant certificates out, but a separate cluster CA "
                   "(`intercloud certs init pki/cluster --cloud MEMBERS`) is safer")
        names = [n for n in cert_names(tls.leaf)
                 if NAME_PATTERN.fullmatch(n) and not is_ip_literal(n) and n.lower() != "localhost"]
        usages = ctx.leaf_usages
        if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            ctx.report("note", cluster, "the member certificate is not allowed as a TLS client (clientAuth); "
                       "members dial each other, so peer links will fail: issue member certificates for "
                       "serverAuth and clientAuth, or set cluster.cert/cluster.key")
    else:
        pki = (ctx.opts.pki.rstrip("/") or ".") + "/cluster"
        member = node_id or "cloud"
        members = ",".join(dict.fromkeys([member] + [h for h in peer_hosts if NAME_PATTERN.fullmatch(h)
                                                     and not is_ip_literal(h)]))
        cmd = f"intercloud certs init {ctx.cmd_dir(pki)} --cloud {members}"
        out.key("ca", f"{pki}/ca.pem", f"the members' own CA (not the tenants'): {cmd}")
        out.key("cert", f"{pki}/{member}.pem")
        out.key("key", f"{pki}/{member}.key")
        ctx.to_create += [(f"{pki}/ca.pem", cmd), (f"{pki}/{member}.pem", cmd), (f"{pki}/{member}.key", cmd)]
    if node_id:
        names.append(node_id)
    names += [h for h in peer_hosts if NAME_PATTERN.fullmatch(h) and not is_ip_literal(h)]
    names = list(dict.fromkeys(names))
    if not names:
        raise KaazingImportError(f"{ctx.source}: cannot tell which certificate names the cluster members have "
                                 "(peers are IP addresses); give --node-id and peers by name")
    out.key("peer_names", names, "certificate names (CN or DNS SAN) accepted on peer links")
    interval, timeout = (ctx.ping[0], ctx.ping[1]) if ctx.ping is not None else (5.0, 15.0)
    out.key("member_ttl", format_duration(timeout + 2 * interval),
            "a member unheard of this long is forgotten; must exceed tunnel.ping_timeout")


def _peer_address(text: str) -> tuple[str, int]:
    t = text.strip()
    if "://" in t:
        try:
            uri = parse_uri(t)
        except ValueError as exc:
            raise KaazingImportError(f"--peer/--cluster-listen {text!r}: {exc}") from None
        host, port = uri.host, uri.port
    else:
        try:
            host, port = split_authority(t, t)
        except ValueError as exc:
            raise KaazingImportError(f"--peer/--cluster-listen {text!r}: {exc}") from None
    if not host:
        raise KaazingImportError(f"--peer/--cluster-listen {text!r}: missing host; write HOST[:PORT]")
    return host, port if port is not None else HAZELCAST_PORT
