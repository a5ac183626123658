"""Sorting the ``<service>`` elements: which half of a KWIC tunnel each one is (cloud A/B, on-prem
A/B, balancer, management, unsupported), their options, and the role of the whole file."""

from __future__ import annotations

from dataclasses import dataclass, field

from .context import Context
from .report import KaazingImportError
from .values import parse_uri, parses
from .xmltree import Node

#: Option names that decide the tunnel (used by the mapper, so never reported as unknown).
TUNNEL_OPTIONS = {"pipe.transport", "socks.mode", "socks.transport"}
BIND_OPTIONS = {"tcp.bind", "ssl.bind", "http.bind", "https.bind", "ws.bind", "wss.bind", "wsn.bind",
                "socks.bind", "socks.tcp.bind"}
#: Options that intercloud replaces: name -> explanation.
SUPERSEDED_OPTIONS = {
    "ssl.protocols": "intercloud negotiates TLS 1.2 or 1.3 only (1.3 preferred); there is nothing to set",
    "ssl.ciphers": "intercloud uses OpenSSL's secure default cipher suites for TLS 1.2/1.3; there is nothing to set",
    "ssl.encryption": "tunnels are always TLS unless tls.insecure = true with ws:// URLs",
    "http.maximum.redirects": "intercloud does not follow HTTP redirects; it dials every URL in tunnel.connect "
                              "and the members the cluster advertises",
    "ws.maximum.message.size": "frames are bounded by tunnel.max_frame (default 256KiB)",
    "ws.version": "intercloud speaks RFC 6455 WebSocket only",
    "ws.extensions": "intercloud uses no WebSocket extensions",
    "http.keepalive.timeout": "tunnel liveness is tunnel.ping_interval / tunnel.ping_timeout",
    "http.keepalive": "tunnel liveness is tunnel.ping_interval / tunnel.ping_timeout",
    "socks.timeout": "dialing a target is bounded by tunnel.connect_timeout (default 10s)",
    "tcp.maximum.outbound.rate": "intercloud has no rate limit; per-stream flow control (tunnel.stream_window) "
                                 "keeps a slow reader from stalling others",
    "ssl.wantclientauth": "use tls.verify_client",
    "ssl.needclientauth": "use tls.verify_client",
}
PREPARED = "prepared.connection.count"


def norm_option(name: str) -> str:
    """Option name in canonical form: lower case, ``tls.`` -> ``ssl.``, ``socks.ssl.x`` -> ``ssl.x``."""
    name = name.lower()
    if name.startswith("socks.") and name not in TUNNEL_OPTIONS and name not in BIND_OPTIONS \
            and name != "socks.prepared.connection.count":
        name = name[len("socks."):]
    if name.startswith("tls."):
        name = "ssl." + name[len("tls."):]
    if name == "socks.prepared.connection.count":
        name = PREPARED
    return name


@dataclass
class Options:
    """accept-options or connect-options of one service, merged with <service-defaults>."""

    nodes: dict[str, Node] = field(default_factory=dict)  # canonical name -> element

    def get(self, name: str) -> Node | None:
        return self.nodes.get(name)

    def text(self, name: str) -> str | None:
        n = self.nodes.get(name)
        return n.text if n is not None else None


@dataclass
class Kwic:
    """One <service>, classified."""

    node: Node
    name: str
    type: str
    kind: str  # cloud-a, cloud-b, onprem-a, onprem-b, balancer, management, other, unsupported
    accepts: list[Node]
    connects: list[Node]
    accept_opts: Options
    connect_opts: Options
    reason: str = ""  # why unsupported

    @property
    def label(self) -> str:
        return f'{self.node.path} "{self.name}"' if self.name else self.node.path


def _options(service: Node, tag: str, defaults: Node | None) -> Options:
    opts = Options()
    sources = []
    if defaults is not None and defaults.child(tag) is not None:
        sources.append(defaults.child(tag))
    if service.child(tag) is not None:
        sources.append(service.child(tag))
    for src in sources:
        for child in src.children:
            opts.nodes[norm_option(child.tag)] = child
    return opts


def classify(ctx: Context, node: Node, defaults: Node | None) -> Kwic:
    name = node.value("name") or ""
    stype = (node.value("type") or "").lower()
    accepts, connects = node.all("accept"), node.all("connect")
    aopts = _options(node, "accept-options", defaults)
    copts = _options(node, "connect-options", defaults)
    svc = Kwic(node, name, stype, "other", accepts, connects, aopts, copts)
    if stype == "balancer":
        svc.kind = "balancer"
        return svc
    if stype in ("management.jmx", "management.snmp"):
        svc.kind = "management"
        return svc
    if stype != "proxy":
        svc.kind = "unsupported"
        svc.reason = _other_type_reason(stype)
        return svc
    if not accepts or not connects:
        svc.kind = "unsupported"
        svc.reason = "a proxy service needs <accept> and <connect>"
        return svc
    try:
        a = [parse_uri(n.text) for n in accepts]
        c = [parse_uri(n.text) for n in connects]
    except ValueError as exc:
        bad = next(n for n in accepts + connects if not parses(n.text))
        raise ctx.bad(bad, f"{exc}; fix the URI") from None
    a0, c0 = a[0], c[0]
    if c0.scheme == "pipe":
        mode = (copts.text("socks.mode") or "").lower()
        if mode == "reverse":
            svc.kind = "cloud-a"
            if any(u.scheme != "tcp" for u in a):
                svc.kind, svc.reason = "unsupported", "clients of a tunnelled service must connect over tcp://"
        elif copts.get("socks.transport") is not None or copts.get("pipe.transport") is not None:
            svc.kind = "unsupported"
            svc.reason = (f"socks.mode {mode or 'forward'}: the cloud would dial into the on-prem network; "
                          "intercloud never accepts inbound connections on-prem. Use socks.mode reverse "
                          "(an intercloud accept service on the cloud, connect on-prem)")
        else:
            svc.kind = "unsupported"
            svc.reason = ("connect pipe:// without a SOCKS transport joins two services of the same gateway; "
                          "intercloud services always cross a tunnel")
    elif a0.scheme == "pipe":
        mode = (aopts.text("socks.mode") or "").lower()
        if mode == "reverse":
            svc.kind = "onprem-a"
            if any(u.scheme != "tcp" for u in c):
                svc.kind, svc.reason = "unsupported", "the on-prem side must connect its target over tcp://"
        else:
            svc.kind = "unsupported"
            svc.reason = (f"accept pipe:// with socks.mode {mode or 'forward'} would accept inbound tunnel "
                          "connections on-prem; intercloud on-prem gateways only dial out. Use socks.mode reverse")
    elif a0.is_ws and c0.scheme == "tcp":
        svc.kind = "cloud-b"
    elif a0.scheme == "tcp" and c0.is_ws:
        svc.kind = "onprem-b"
    elif a0.scheme == "tcp" and c0.scheme == "tcp":
        svc.kind = "unsupported"
        svc.reason = ("tcp:// to tcp:// is a local TCP proxy that crosses no tunnel; use a TCP proxy "
                      "(HAProxy, socat) for it, or carry it through intercloud as an accept/connect service pair")
    else:
        svc.kind = "unsupported"
        svc.reason = (f"{a0.scheme}:// to {c0.scheme}:// is not a KWIC tunnel; intercloud carries TCP "
                      "(tcp:// on both ends of a tunnel)")
    return svc


def choose_role(ctx: Context, services: list[Kwic], root: Node) -> str | None:
    cloud = [s for s in services if s.kind in ("cloud-a", "cloud-b", "balancer")]
    onprem = [s for s in services if s.kind in ("onprem-a", "onprem-b")]
    cloud_cluster = root.child("cluster") is not None
    role = ctx.opts.role
    if role is None:
        if (cloud or cloud_cluster) and onprem:
            c = ", ".join(s.label for s in cloud[:3]) or "<cluster>"
            o = ", ".join(s.label for s in onprem[:3])
            raise KaazingImportError(
                f"{ctx.source}: this gateway has services of both halves of a tunnel: cloud side ({c}) and "
                f"on-prem side ({o}); an intercloud gateway is one or the other. Import the file twice, "
                "with --role cloud and with --role onprem")
        if cloud:
            role = "cloud"
        elif onprem:
            role = "onprem"
    for s in services:
        if s.kind == "management":
            ctx.report("ignored", s.node, f"{s.type} service: management is not imported; use the admin "
                       "endpoint (gateway.admin): /healthz, /readyz, /api/status and Prometheus /metrics")
        elif s.kind == "unsupported":
            ctx.report("dropped", s.node, f"service \"{s.name}\" (type {s.type or '?'}) not imported: {s.reason}")
        elif role is not None and ((role == "cloud" and s in onprem) or (role == "onprem" and s in cloud)):
            other, flag = ("on-prem", "onprem") if role == "cloud" else ("cloud", "cloud")
            ctx.report("dropped", s.node, f"service \"{s.name}\" belongs to the {other} half; import this "
                       f"file again with --role {flag} for it")
    return role


def _other_type_reason(stype: str) -> str:
    reasons = {
        "echo": "an echo test server; run any echo server outside intercloud (e.g. "
                "`socat TCP-LISTEN:PORT,fork,reuseaddr EXEC:cat`)",
        "directory": "serves static files over HTTP; use a web server and carry its port as a service",
        "http.proxy": "an HTTP proxy service; intercloud carries TCP: carry the HTTP server's port as a service",
        "http.balancer": "HTTP balancing; intercloud balances streams over tunnels to every member by itself",
        "broadcast": "a broadcast service; intercloud carries point-to-point TCP streams only",
        "session": "a session service; not needed: intercloud streams are TCP",
        "kerberos5.proxy": "Kerberos proxying; carry the KDC's TCP port as an ordinary service",
        "amqp.proxy": "carry the AMQP broker's TCP port as an ordinary service",
        "jms": "a JMS service; carry the broker's TCP port as an ordinary service",
        "jms.proxy": "carry the broker's TCP port as an ordinary service",
        "stomp.jms": "carry the broker's TCP port as an ordinary service",
        "turn.proxy": "TURN relaying is not supported (intercloud carries TCP)",
        "turn.rest": "TURN credentials are not supported",
        "update.check": "no update checks in intercloud",
    }
    if stype in reasons:
        return reasons[stype]
    return f"service type {stype or '(missing <type>)'!r} has no intercloud equivalent; intercloud carries TCP " \
           "services through tunnels"
