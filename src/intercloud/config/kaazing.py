"""Import a Kaazing KWIC ``gateway-config.xml`` into intercloud's native TOML configuration.

    from intercloud.config.kaazing import ImportOptions, import_kaazing, write_import

    result = import_kaazing(Path("cloud-config.xml"), ImportOptions(out=Path("cloud.toml"),
                                                                   properties={"cloud-node-hostname": "cloud1"}))
    write_import(result, Path("cloud.toml"))
    result.findings        # everything that was not mapped one to one, each with file, line and element path
    result.exit_code       # 0: nothing dropped; 1: something that carries traffic could not be mapped

KWIC describes each half of a tunnel as ``<service>`` elements of a Kaazing gateway; intercloud
describes a gateway by its role. The importer works out the role from the services:

* cloud half: a ``proxy`` service that accepts TCP clients and connects to ``pipe://NAME`` with
  ``socks.mode reverse`` (KWIC "service A": the cloud accepts, the on-prem side connects), a
  ``proxy`` service that accepts ``ws(s)://HOST/PATH`` and connects to ``tcp://`` (KWIC "service B"),
  ``balancer`` services and the Hazelcast ``<cluster>``. The reverse SOCKS transport
  (``socks.transport wss://HOST/PATH``) is where the cloud listens: ``tunnel.listen``.
* on-prem half: ``accept pipe://NAME`` with ``socks.mode reverse`` in ``accept-options`` (it dials
  ``socks.transport`` out: ``tunnel.connect``) and ``connect tcp://`` (an intercloud ``connect``
  service), and ``accept tcp://`` with ``connect ws(s)://HOST/PATH`` (an intercloud ``accept`` service).

The two halves must agree on service names without seeing each other, so names come from what
links the halves in KWIC: the pipe name (``pipe://serviceA`` -> ``serviceA``, with a trailing
``-HOST`` of the cloud member removed, as the 4-ha tutorial used one pipe per member) and the last
segment of service B's WebSocket path (``/serviceB`` -> ``serviceB``).

Every element is either mapped (and the TOML says where each value came from), or reported as a
:class:`Finding`: ``note`` (mapped, but read this), ``superseded`` (intercloud does it differently
and needs no setting), ``ignored`` (no effect on traffic: JMX, SNMP, log settings, unknown
options) or ``dropped`` (carries traffic but has no intercloud equivalent: exit status 1).
Bad input (malformed XML, an unknown ``${property}``, a missing keystore, a wrong password) raises
:class:`KaazingImportError` (exit status 2) with the file, the element and the fix.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from xml.parsers import expat

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..certs import _atomic_write, public_key_matches
from .model import NAME_PATTERN, is_ip_literal
from .units import format_duration

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_DROPPED",
    "EXIT_OK",
    "Finding",
    "ImportOptions",
    "ImportResult",
    "KaazingImportError",
    "import_kaazing",
    "parse_gateway_opts",
    "parse_kwic_duration",
    "write_import",
]

EXIT_OK = 0
EXIT_DROPPED = 1
EXIT_BAD_INPUT = 2

Level = Literal["note", "superseded", "ignored", "dropped"]

#: Namespaces of Kaazing gateway configurations (the tutorials use 2016/06).
_KAAZING_NS = re.compile(r"^https?://xmlns\.kaazing\.(org|com)/")
#: KWIC's Hazelcast cluster port, used when --peer is given without --cluster-listen.
HAZELCAST_PORT = 5941


class KaazingImportError(Exception):
    """The input cannot be imported: bad XML, unknown property, missing keystore, wrong password...

    ``problems`` are complete lines (file, element, what is wrong and the fix); ``str()`` joins them.
    """

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Finding:
    """Something in the KWIC file that was not mapped one to one."""

    level: Level
    file: str
    line: int
    path: str
    message: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.path}" if self.line else f"{self.file}: {self.path}"

    def __str__(self) -> str:
        return f"{self.where}: {self.level}: {self.message}"


@dataclass
class ImportOptions:
    """Everything the importer needs besides the XML file (the command-line options)."""

    #: ``-D name=value``: set or override ``<properties>`` (as GATEWAY_OPTS did).
    properties: dict[str, str] = field(default_factory=dict)
    #: Where the TOML will be written; converted PEM files go next to it. None: stdout (no keystores).
    out: Path | None = None
    keystore: Path | None = None
    truststore: Path | None = None
    keystore_password_file: Path | None = None
    truststore_password_file: Path | None = None
    #: Password of the private key entry when it differs from the keystore password.
    key_password_file: Path | None = None
    #: Which private key entry of the keystore to use when it holds several.
    key_alias: str | None = None
    #: Import only this half of a file that has services of both.
    role: Literal["cloud", "onprem"] | None = None
    node_id: str | None = None
    #: Directory (relative to the output) of the PEM files to create when the XML has no keystore.
    pki: str = "pki"
    #: Keep plain ws:// tunnels (tls.insecure = true) instead of upgrading them to wss://.
    insecure_ws: bool = False
    #: Replace a host (or ``@eth0`` interface) everywhere, e.g. {"example.com": "127.0.0.1"}.
    rewrite_hosts: dict[str, str] = field(default_factory=dict)
    #: Replace a port everywhere, e.g. {5551: 15551} (docker-compose ``ports:`` remappings).
    rewrite_ports: dict[int, int] = field(default_factory=dict)
    #: ``HOST:PORT`` of the admin endpoint to write into ``[gateway]``.
    admin: str | None = None
    #: Extra cluster members (``HOST[:PORT]`` or ``tcp://HOST:PORT``), as if listed in <cluster><connect>.
    peers: list[str] = field(default_factory=list)
    #: Where this member accepts peer links (``HOST:PORT``), as <cluster><accept>.
    cluster_listen: str | None = None
    #: ``NAME=SERVICE[,SERVICE...]``: cloud tenants and the services they own.
    tenants: dict[str, list[str]] = field(default_factory=dict)
    #: Bind ``tcp://@eth0:PORT`` to eth0's address on this machine instead of 0.0.0.0.
    resolve_interfaces: bool = False


@dataclass
class ImportResult:
    """What :func:`import_kaazing` produced; nothing is written until :func:`write_import`."""

    source: Path
    role: str | None
    #: The TOML text, or None when the file holds nothing intercloud can run (e.g. an echo server).
    toml: str | None
    findings: list[Finding]
    #: PEM files converted from keystores: file name (next to the output) -> (bytes, mode).
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    #: PEM files the TOML references that the operator must create, and the command that does it.
    to_create: list[tuple[str, str]] = field(default_factory=list)
    #: ``-D`` names that no ``${...}`` used.
    unused_properties: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "dropped"]

    @property
    def exit_code(self) -> int:
        return EXIT_DROPPED if self.dropped or self.toml is None else EXIT_OK


# ---------------------------------------------------------------------------------------------
# XML: a small tree with line numbers and element paths
# ---------------------------------------------------------------------------------------------

#: Elements whose position is always shown in paths (there are usually several).
_INDEXED = {"service", "property"}


@dataclass(eq=False)
class Node:
    tag: str
    line: int
    path: str
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    raw: str = ""  # direct text as written
    text: str = ""  # direct text after ${property} substitution, stripped
    namespace: str = ""

    def child(self, tag: str) -> Node | None:
        return next((c for c in self.children if c.tag == tag), None)

    def all(self, tag: str) -> list[Node]:
        return [c for c in self.children if c.tag == tag]

    def value(self, tag: str) -> str | None:
        c = self.child(tag)
        return c.text if c is not None else None

    def walk(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            yield from c.walk()

    def shown(self) -> str:
        """``<tag>text</tag>`` as the operator wrote it (for comments), shortened."""
        raw = " ".join(self.raw.split())
        if len(raw) > 80:
            raw = raw[:77] + "..."
        return f"<{self.tag}>{raw}</{self.tag}>" if raw else f"<{self.tag}>"


def parse_xml(path: Path, data: bytes) -> Node:
    """Parse ``data`` into a :class:`Node` tree; comments are dropped, entities refused."""
    parser = expat.ParserCreate(namespace_separator="}")
    stack: list[Node] = []
    root: list[Node] = []

    def start(name: str, _attrs: dict[str, str]) -> None:
        ns, _, local = name.rpartition("}")
        parent = stack[-1] if stack else None
        siblings = sum(1 for c in parent.children if c.tag == local) + 1 if parent else 1
        step = f"{local}[{siblings}]" if local in _INDEXED or siblings > 1 else local
        node = Node(local, parser.CurrentLineNumber, f"{parent.path if parent else ''}/{step}", parent,
                    namespace=ns)
        if parent is not None:
            parent.children.append(node)
        else:
            root.append(node)
        stack.append(node)

    def end(_name: str) -> None:
        stack.pop()

    def chars(text: str) -> None:
        if stack:
            stack[-1].raw += text

    def no_entities(name: str, *_rest: object) -> None:
        raise KaazingImportError(
            f"{path}:{parser.CurrentLineNumber}: XML entity declaration <!ENTITY {name} ...> is not supported "
            "(it could expand without bound); write the value out in the element instead")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.EntityDeclHandler = no_entities
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        reason = expat.ErrorString(exc.code) if exc.code else str(exc)
        inside = f" inside <{stack[-1].tag}> ({stack[-1].path}, opened at line {stack[-1].line})" if stack else ""
        raise KaazingImportError(
            f"{path}:{exc.lineno}:{exc.offset + 1}: malformed XML: {reason}{inside}; fix the XML "
            "(usually a tag that is not closed or is misspelt) and import again") from None
    if not root:
        raise KaazingImportError(f"{path}: no XML element found; is this a gateway-config.xml?")
    return root[0]


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

_PROPERTY_REF = re.compile(r"\$\{([^}]*)\}")
#: Java system properties that configure KWIC's outbound HTTP proxy (GATEWAY_OPTS -D...).
_JAVA_PROXY_PROPS = {"http.proxyhost", "http.proxyport", "https.proxyhost", "https.proxyport",
                     "http.nonproxyhosts"}


def parse_gateway_opts(text: str) -> tuple[dict[str, str], list[str]]:
    """``-Da=b -Dc=d -Xmx1g`` (GATEWAY_OPTS) -> ({"a": "b", "c": "d"}, ["-Xmx1g"])."""
    props: dict[str, str] = {}
    other: list[str] = []
    for word in shlex.split(text):
        if word.startswith("-D") and len(word) > 2:
            name, _, value = word[2:].partition("=")
            props[name] = value
        else:
            other.append(word)
    return props, other


def _resolve_properties(root: Node, source: Path, overrides: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """Substitute ``${name}`` in every element's text; returns (properties, names used).

    Raises :class:`KaazingImportError` listing every unknown property with its element.
    """
    defined: dict[str, tuple[str, Node]] = {}
    props_node = root.child("properties")
    for prop in props_node.all("property") if props_node is not None else []:
        name_node = prop.child("name")
        name = name_node.raw.strip() if name_node is not None else ""
        value_node = prop.child("value")
        if name:
            defined[name] = ((value_node.raw.strip() if value_node is not None else ""), prop)
    values = {name: v for name, (v, _) in defined.items()}
    values.update(overrides)
    used: set[str] = set()
    problems: list[str] = []

    def expand(text: str, node: Node, depth: int = 0) -> str:
        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            used.add(name)
            if name not in values:
                problems.append(
                    f"{source}:{node.line}: {node.path}: unknown property ${{{name}}}; define it with "
                    f"-D {name}=VALUE (KWIC took it from GATEWAY_OPTS=\"-D{name}=...\") or in <properties>")
                return m.group(0)
            if depth > 10:
                problems.append(f"{source}:{node.line}: {node.path}: property ${{{name}}} refers to itself "
                                "(directly or through other properties); give it a plain value with -D")
                return m.group(0)
            return expand(values[name], node, depth + 1)

        return _PROPERTY_REF.sub(repl, text)

    for node in root.walk():
        node.text = expand(node.raw, node).strip() if "${" in node.raw else node.raw.strip()
    if problems:
        raise KaazingImportError(list(dict.fromkeys(problems)))
    return values, used


# ---------------------------------------------------------------------------------------------
# Values: URIs, binds, durations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Uri:
    """A KWIC URI: ``scheme://host:port/path``, ``tcp://@eth0:5551``, ``pipe://name``."""

    scheme: str
    host: str  # "" for an interface bind
    port: int | None
    path: str
    iface: str | None = None

    @property
    def secure(self) -> bool | None:
        """True for wss/wsn+ssl/https..., False for ws/wsn/http..., None for other schemes."""
        s = self.scheme
        if s in ("wss", "https") or s.endswith(("+ssl", "+tls")):
            return True
        if s in ("ws", "wsn", "wsx", "wse", "wsr", "http"):
            return False
        return None

    @property
    def is_ws(self) -> bool:
        return self.secure is not None


_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)")


def parse_uri(text: str) -> Uri:
    """Parse a KWIC URI; raises ValueError with the reason."""
    m = _URI.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a URI like tcp://HOST:PORT or wss://HOST/PATH")
    scheme, authority, path = m.group(1).lower(), m.group(2), m.group(3)
    iface = None
    host, port = _split_authority(authority, text)
    if host.startswith("@"):
        iface, host = host[1:], ""
        if not iface:
            raise ValueError(f"missing interface name after '@' in {text!r}")
    return Uri(scheme, host, port, path, iface)


def _split_authority(authority: str, text: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = authority[1:end], authority[end + 1:]
        port_text = rest[1:] if rest.startswith(":") else None
    elif authority.count(":") == 1:
        host, _, port_text = authority.partition(":")
    else:
        host, port_text = authority, None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"invalid port {port_text!r} in {text!r}")
        port = int(port_text)
    return host, port


def parse_bind(text: str) -> tuple[str | None, str | None, int]:
    """``tcp.bind`` values: ``443``, ``0.0.0.0:443``, ``[::]:443``, ``@eth0:443`` -> (host, iface, port)."""
    text = text.strip()
    if text.isdigit():
        return None, None, _port(text, text)
    host, port = _split_authority(text, text)
    if port is None:
        raise ValueError(f"{text!r} has no port; write PORT or HOST:PORT")
    if host.startswith("@"):
        return None, host[1:], port
    return host or None, None, port


def _port(text: str, whole: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"port {value} out of range in {whole!r}")
    return value


_KWIC_UNITS = {
    "ms": 0.001, "msec": 0.001, "msecs": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}


def parse_kwic_duration(text: str) -> float:
    """KWIC time intervals: ``"55 seconds"``, ``"55s"``, ``"500 milliseconds"``, ``"2min"``.

    Bare numbers are seconds.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a time interval like '55 seconds'")
    unit = m.group(2).lower() or "s"
    if unit not in _KWIC_UNITS:
        raise ValueError(f"unknown time unit {m.group(2)!r} in {text!r}; use milliseconds, seconds, minutes or hours")
    return float(m.group(1)) * _KWIC_UNITS[unit]


def _interface_address(name: str) -> str | None:
    """IPv4 address of network interface ``name`` on this machine (Linux), or None."""
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        return socket.inet_ntoa(packed[20:24])
    except (OSError, ImportError):
        return None


def _fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _safe_name(text: str) -> str:
    """Make ``text`` a valid intercloud name (1-64 of A-Z a-z 0-9 . _ -)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name[:64].rstrip("-.")


# ---------------------------------------------------------------------------------------------
# Service classification
# ---------------------------------------------------------------------------------------------

#: Option names that decide the tunnel (used by the mapper, so never reported as unknown).
_TUNNEL_OPTIONS = {"pipe.transport", "socks.mode", "socks.transport"}
_BIND_OPTIONS = {"tcp.bind", "ssl.bind", "http.bind", "https.bind", "ws.bind", "wss.bind", "wsn.bind",
                 "socks.bind", "socks.tcp.bind"}
#: Options that intercloud replaces: name -> explanation.
_SUPERSEDED_OPTIONS = {
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
_PREPARED = "prepared.connection.count"


def _norm_option(name: str) -> str:
    """Option name in canonical form: lower case, ``tls.`` -> ``ssl.``, ``socks.ssl.x`` -> ``ssl.x``."""
    name = name.lower()
    if name.startswith("socks.") and name not in _TUNNEL_OPTIONS and name not in _BIND_OPTIONS \
            and name != "socks.prepared.connection.count":
        name = name[len("socks."):]
    if name.startswith("tls."):
        name = "ssl." + name[len("tls."):]
    if name == "socks.prepared.connection.count":
        name = _PREPARED
    return name


@dataclass
class _Options:
    """accept-options or connect-options of one service, merged with <service-defaults>."""

    nodes: dict[str, Node] = field(default_factory=dict)  # canonical name -> element

    def get(self, name: str) -> Node | None:
        return self.nodes.get(name)

    def text(self, name: str) -> str | None:
        n = self.nodes.get(name)
        return n.text if n is not None else None


@dataclass
class _Kwic:
    """One <service>, classified."""

    node: Node
    name: str
    type: str
    kind: str  # cloud-a, cloud-b, onprem-a, onprem-b, balancer, management, other, unsupported
    accepts: list[Node]
    connects: list[Node]
    accept_opts: _Options
    connect_opts: _Options
    reason: str = ""  # why unsupported

    @property
    def label(self) -> str:
        return f'{self.node.path} "{self.name}"' if self.name else self.node.path


@dataclass
class _Svc:
    """One intercloud [[service]] being built."""

    name: str
    direction: Literal["accept", "connect"]
    host: str
    port: int
    comments: list[str]
    keys: set[str] = field(default_factory=set)  # KWIC names, pipe names, paths: for --tenant matching
    targets: set[tuple[str, int]] = field(default_factory=set)
    tenant: str | None = None


@dataclass
class _Listen:
    secure: bool
    host: str
    port: int
    path: str
    comment: str
    kind: str  # socks, b, balancer
    node: Node | None = None


# ---------------------------------------------------------------------------------------------
# The importer
# ---------------------------------------------------------------------------------------------


def import_kaazing(source: str | os.PathLike[str], options: ImportOptions | None = None) -> ImportResult:
    """Convert the KWIC gateway configuration at ``source``; see the module docstring.

    Reads the XML and any keystore it names; writes nothing. Raises :class:`KaazingImportError`
    for bad input.
    """
    return _Importer(Path(source), options or ImportOptions()).run()


class _Importer:
    def __init__(self, source: Path, opts: ImportOptions) -> None:
        self.source = source
        self.file = source.name
        self.opts = opts
        self.findings: list[Finding] = []
        self.files: dict[str, tuple[bytes, int]] = {}
        self.to_create: list[tuple[str, str]] = []
        self.header: list[str] = []
        self.used_rewrites: set[str] = set()

    # -- bookkeeping -------------------------------------------------------------------------

    def report(self, level: Level, node: Node | None, message: str) -> None:
        # The same message for several elements (e.g. every service bound to @eth0) is reported once.
        if any(f.level == level and f.message == message for f in self.findings):
            return
        self.findings.append(Finding(level, self.file, node.line if node is not None else 0,
                                     node.path if node is not None else "(command line)", message))

    def origin(self, node: Node, extra: str = "") -> str:
        """A comment saying where a value came from."""
        return f"{self.file}:{node.line} {node.path} {node.shown()}{extra}"

    def bad(self, node: Node, message: str) -> KaazingImportError:
        return KaazingImportError(f"{self.source}:{node.line}: {node.path}: {message}")

    # -- driver ------------------------------------------------------------------------------

    def run(self) -> ImportResult:
        try:
            data = self.source.read_bytes()
        except FileNotFoundError:
            raise KaazingImportError(f"{self.source}: file not found; give the path of the KWIC "
                                     "gateway-config.xml") from None
        except IsADirectoryError:
            raise KaazingImportError(f"{self.source}: is a directory; give the path of gateway-config.xml") from None
        except OSError as exc:
            raise KaazingImportError(f"{self.source}: cannot read: {exc.strerror or exc}") from None
        root = parse_xml(self.source, data)
        self.root = root
        self._check_root(root)
        props, used = _resolve_properties(root, self.source, self.opts.properties)
        unused = sorted(n for n in self.opts.properties if n not in used and n.lower() not in _JAVA_PROXY_PROPS)
        self.props = props

        defaults = root.child("service-defaults")
        services = [self._classify(s, defaults) for s in root.all("service")]
        self._report_top_level(root)
        role = self._role(services, root)
        if role is None:
            self.report("dropped", root, "nothing to import: this file has no KWIC tunnel service (no reverse "
                        "proxy service with pipe:// and socks.mode reverse, no proxy service to or from ws(s)://); "
                        "no intercloud configuration was written")
            return ImportResult(self.source, None, None, self.findings, unused_properties=unused)
        self.role = role
        toml = self._build(role, root, services)
        for name in unused:
            self.report("note", None, f"-D {name} was not used by any ${{{name}}} in the file")
        for key in self.opts.rewrite_hosts:
            if key not in self.used_rewrites:
                self.report("note", None, f"--rewrite-host {key}=... matched no host in the file")
        for port in self.opts.rewrite_ports:
            if str(port) not in self.used_rewrites:
                self.report("note", None, f"--rewrite-port {port}=... matched no port in the file")
        return ImportResult(self.source, role, toml, self.findings, self.files, self.to_create, unused)

    def _check_root(self, root: Node) -> None:
        if "log4j" in root.namespace or root.tag in ("log4j:configuration", "log4j", "configuration"):
            tag = root.tag if ":" in root.tag else f"log4j:{root.tag}"
            raise KaazingImportError(
                f"{self.source}:{root.line}: <{tag}> is a log4j configuration, not a KWIC gateway-config.xml; "
                "intercloud has no log4j file: choose the log format and level with `intercloud run CONFIG "
                "--log-format text|json --log-level debug|info|warning|error`")
        if root.tag != "gateway-config":
            raise KaazingImportError(
                f"{self.source}:{root.line}: the root element is <{root.tag}>, expected <gateway-config>; "
                "give the KWIC gateway configuration (conf/gateway-config.xml)")
        if root.namespace and not _KAAZING_NS.match(root.namespace):
            self.report("note", root, f"namespace {root.namespace!r} is not a Kaazing gateway namespace; "
                        "imported as if it were http://xmlns.kaazing.org/2016/06/gateway")

    def _report_top_level(self, root: Node) -> None:
        for child in root.children:
            if child.tag in ("properties", "service", "service-defaults", "security", "cluster"):
                continue
            if child.tag == "network":
                self.report("ignored", child, "<network> address mappings are not imported; intercloud listens "
                            "on the addresses in the TOML and on-prem gateways dial the URLs in tunnel.connect, so "
                            "write the public names there (or use --rewrite-host)")
            elif child.tag in ("management", "jmx", "snmp"):
                self.report("ignored", child, "management settings are not imported; use the admin endpoint "
                            "(gateway.admin): /healthz, /readyz, /api/status and Prometheus /metrics")
            else:
                self.report("ignored", child, f"<{child.tag}> is not known to the importer and was skipped; "
                            "check whether it matters for your deployment")
        defaults = root.child("service-defaults")
        if defaults is not None:
            for child in defaults.children:
                if child.tag not in ("accept-options", "connect-options"):
                    self.report("ignored", child, f"<service-defaults><{child.tag}> has no intercloud equivalent "
                                "(intercloud carries TCP only)")
        security = root.child("security")
        if security is not None:
            for child in security.children:
                if child.tag == "realm":
                    self.report("ignored", child, "authentication realms are not imported: on-prem gateways "
                                "authenticate with TLS client certificates, and clients of a service are not "
                                "authenticated by intercloud (use the application's own authentication)")
                elif child.tag not in ("keystore", "truststore"):
                    self.report("ignored", child, f"<security><{child.tag}> is not known to the importer")

    # -- classification ----------------------------------------------------------------------

    def _options(self, service: Node, tag: str, defaults: Node | None) -> _Options:
        opts = _Options()
        sources = []
        if defaults is not None and defaults.child(tag) is not None:
            sources.append(defaults.child(tag))
        if service.child(tag) is not None:
            sources.append(service.child(tag))
        for src in sources:
            for child in src.children:
                opts.nodes[_norm_option(child.tag)] = child
        return opts

    def _classify(self, node: Node, defaults: Node | None) -> _Kwic:
        name = node.value("name") or ""
        stype = (node.value("type") or "").lower()
        accepts, connects = node.all("accept"), node.all("connect")
        aopts = self._options(node, "accept-options", defaults)
        copts = self._options(node, "connect-options", defaults)
        svc = _Kwic(node, name, stype, "other", accepts, connects, aopts, copts)
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
            bad = next(n for n in accepts + connects if not _parses(n.text))
            raise self.bad(bad, f"{exc}; fix the URI") from None
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

    def _role(self, services: list[_Kwic], root: Node) -> str | None:
        cloud = [s for s in services if s.kind in ("cloud-a", "cloud-b", "balancer")]
        onprem = [s for s in services if s.kind in ("onprem-a", "onprem-b")]
        cloud_cluster = root.child("cluster") is not None
        role = self.opts.role
        if role is None:
            if (cloud or cloud_cluster) and onprem:
                c = ", ".join(s.label for s in cloud[:3]) or "<cluster>"
                o = ", ".join(s.label for s in onprem[:3])
                raise KaazingImportError(
                    f"{self.source}: this gateway has services of both halves of a tunnel: cloud side ({c}) and "
                    f"on-prem side ({o}); an intercloud gateway is one or the other. Import the file twice, "
                    "with --role cloud and with --role onprem")
            if cloud:
                role = "cloud"
            elif onprem:
                role = "onprem"
        for s in services:
            if s.kind == "management":
                self.report("ignored", s.node, f"{s.type} service: management is not imported; use the admin "
                            "endpoint (gateway.admin): /healthz, /readyz, /api/status and Prometheus /metrics")
            elif s.kind == "unsupported":
                self.report("dropped", s.node, f"service \"{s.name}\" (type {s.type or '?'}) not imported: {s.reason}")
            elif role is not None and ((role == "cloud" and s in onprem) or (role == "onprem" and s in cloud)):
                other, flag = ("on-prem", "onprem") if role == "cloud" else ("cloud", "cloud")
                self.report("dropped", s.node, f"service \"{s.name}\" belongs to the {other} half; import this "
                            f"file again with --role {flag} for it")
        return role

    # -- building the configuration -----------------------------------------------------------

    def _build(self, role: str, root: Node, services: list[_Kwic]) -> str:
        mine = [s for s in services if s.kind.startswith(role if role == "cloud" else "onprem")
                or (role == "cloud" and s.kind == "balancer")]
        self._ping(mine)
        tls_plain = self._tls_mode(role, mine)
        out = _Toml()
        if role == "cloud":
            self._cloud(root, mine, out, tls_plain)
        else:
            self._onprem(root, mine, out, tls_plain)
        return self._render(out)

    # ws.inactivity.timeout -> ping
    def _ping(self, services: list[_Kwic]) -> None:
        found: list[tuple[float, Node]] = []
        for s in services:
            for opts in (s.accept_opts, s.connect_opts):
                n = opts.get("ws.inactivity.timeout")
                if n is None:
                    continue
                try:
                    found.append((parse_kwic_duration(n.text), n))
                except ValueError as exc:
                    raise self.bad(n, f"{exc}; write it like '55 seconds'") from None
        self.ping: tuple[float, float, Node] | None = None
        if not found:
            return
        seconds, node = min(found, key=lambda t: t[0])
        if len({t for t, _ in found}) > 1:
            self.report("note", node, "services had different ws.inactivity.timeout values; intercloud has one "
                        f"per gateway, the shortest ({format_duration(seconds)}) is used")
        if seconds <= 0:
            self.report("note", node, "ws.inactivity.timeout 0 disabled KWIC's check; intercloud always checks "
                        "tunnel liveness, the defaults (ping every 5s, dead after 15s) are used")
            return
        if seconds > 3600:
            self.report("note", node, f"ws.inactivity.timeout {node.text} is longer than intercloud's limit for "
                        "tunnel.ping_timeout; 1h is used (a dead tunnel would go unnoticed that long)")
            seconds = 3600.0
        interval = max(seconds / 3, 0.1)
        interval = float(int(interval)) if interval >= 1 else round(interval, 3)
        self.ping = (interval, seconds, node)

    def _tls_mode(self, role: str, services: list[_Kwic]) -> bool:
        """True when the tunnels stay plain ws:// (KWIC used ws:// and --insecure-ws was given)."""
        secure = []
        for s in services:
            for u in self._tunnel_uris(s):
                if u[0].secure is not None:
                    secure.append((u[0].secure, u[1]))
        plain = [n for ok, n in secure if not ok]
        if not plain or any(ok for ok, _ in secure):
            return False
        node = plain[0]
        if self.opts.insecure_ws:
            self.report("note", node, "KWIC used plain ws:// (no TLS); kept as ws:// with tls.insecure = true "
                        "because of --insecure-ws: tunnel traffic is NOT encrypted. For production drop "
                        "--insecure-ws to import it as wss://")
            return True
        self.report("note", node, "KWIC used plain ws:// (no TLS); imported as wss:// with mutual TLS, "
                    "intercloud's default. Create the certificates named in [tls] (see below), or import with "
                    "--insecure-ws to keep unencrypted ws:// for experiments")
        return False

    def _tunnel_uris(self, s: _Kwic) -> list[tuple[Uri, Node]]:
        out = []
        if s.kind == "cloud-a":
            n = s.connect_opts.get("socks.transport")
            if n is not None:
                out.append((self._uri(n), n))
        elif s.kind == "onprem-a":
            n = s.accept_opts.get("socks.transport")
            if n is not None:
                out.append((self._uri(n), n))
        elif s.kind in ("cloud-b", "balancer"):
            out += [(self._uri(n), n) for n in s.accepts if _parses(n.text) and parse_uri(n.text).is_ws]
        elif s.kind == "onprem-b":
            out += [(self._uri(n), n) for n in s.connects]
        return out

    def _uri(self, node: Node) -> Uri:
        try:
            return parse_uri(node.text)
        except ValueError as exc:
            raise self.bad(node, f"{exc}; fix the URI") from None

    # -- hosts and ports ----------------------------------------------------------------------

    def _map_port(self, port: int) -> int:
        if port in self.opts.rewrite_ports:
            self.used_rewrites.add(str(port))
            return self.opts.rewrite_ports[port]
        return port

    def _map_host(self, host: str) -> str:
        """A host we dial (or a peer's host): rewritten if asked."""
        for key in (host, host.lower()):
            if key in self.opts.rewrite_hosts:
                self.used_rewrites.add(key)
                return self.opts.rewrite_hosts[key]
        return host

    def _listen_host(self, uri_host: str, iface: str | None, node: Node, what: str) -> tuple[str, str]:
        """The address to listen on for a KWIC accept host; returns (host, comment)."""
        if iface is not None:
            key = f"@{iface}"
            if key in self.opts.rewrite_hosts:
                self.used_rewrites.add(key)
                return self.opts.rewrite_hosts[key], f"@{iface} rewritten by --rewrite-host"
            addr = _interface_address(iface)
            if self.opts.resolve_interfaces:
                if addr is None:
                    raise self.bad(node, f"interface {iface} has no IPv4 address on this machine "
                                   f"(--resolve-interfaces); run the import where {iface} exists, or drop "
                                   f"--resolve-interfaces to listen on 0.0.0.0, or use --rewrite-host @{iface}=ADDRESS")
                return addr, f"address of {iface} on this machine (--resolve-interfaces)"
            here = f" (here {iface} is {addr}: --resolve-interfaces would use it)" if addr else ""
            self.report("note", node, f"KWIC bound interface {iface} (@{iface}); intercloud binds addresses, so it "
                        f"listens on all interfaces (0.0.0.0){here}. Write the interface's address to restrict it")
            return "0.0.0.0", f"@{iface} -> all interfaces"
        mapped = self._map_host(uri_host) if uri_host else uri_host
        if mapped != uri_host:
            return mapped, f"{uri_host} rewritten by --rewrite-host"
        if not uri_host:
            return "0.0.0.0", "no host given"
        if is_ip_literal(uri_host):
            return uri_host, ""
        if uri_host.lower() == "localhost":
            return "127.0.0.1", ""
        self.report("note", node, f"KWIC listened on the address that {uri_host} resolved to; intercloud "
                    "listens on all interfaces (0.0.0.0). Write that address instead to restrict it")
        return "0.0.0.0", f"{uri_host} -> all interfaces"

    def _bind(self, opts: _Options) -> tuple[Node, str | None, str | None, int] | None:
        for name in ("tcp.bind", "ssl.bind", "http.bind", "https.bind", "ws.bind", "wss.bind", "wsn.bind",
                     "socks.bind", "socks.tcp.bind"):
            n = opts.get(name)
            if n is not None:
                try:
                    host, iface, port = parse_bind(n.text)
                except ValueError as exc:
                    raise self.bad(n, f"{exc}") from None
                return n, host, iface, port
        return None

    def _endpoint(self, uri: Uri, node: Node, *, listen: bool, bind=None, what: str = "") -> tuple[str, int, str]:
        """(host, port, comment) of a tcp:// accept or connect URI."""
        if uri.port is None:
            raise self.bad(node, f"{uri.scheme}:// URI without a port: {node.text!r}; add :PORT")
        notes = []
        if listen and bind is not None:
            bnode, bhost, biface, bport = bind
            host, note = self._listen_host(bhost or "", biface, bnode, what) if (bhost or biface) else ("0.0.0.0", "")
            port = bport
            notes.append(f"bound by {bnode.shown()}")
            if note:
                notes.append(note)
        elif listen:
            host, note = self._listen_host(uri.host, uri.iface, node, what)
            port = uri.port
            if note:
                notes.append(note)
        else:
            if uri.iface is not None:
                raise self.bad(node, f"cannot dial an interface ({node.text!r}); give a host name or address")
            host = self._map_host(uri.host)
            if host != uri.host:
                notes.append(f"{uri.host} rewritten by --rewrite-host")
            port = uri.port
        mapped = self._map_port(port)
        if mapped != port:
            notes.append(f"port {port} rewritten by --rewrite-port")
        return host, mapped, "; ".join(notes)

    # -- service names ------------------------------------------------------------------------

    def _pipe_name(self, pipe: Uri, transport_hosts: Iterable[str], node: Node) -> str:
        name = pipe.host + pipe.path.rstrip("/")
        for host in transport_hosts:
            for sep in ("-", "."):
                if host and name.lower().endswith(sep + host.lower()) and len(name) > len(host) + 1:
                    name = name[: -len(host) - 1]
                    break
        safe = _safe_name(name)
        if not safe or not NAME_PATTERN.fullmatch(safe):
            raise self.bad(node, f"cannot make a service name from {node.text!r}; rename the pipe")
        return safe

    def _path_name(self, uri: Uri, kwic: _Kwic, node: Node) -> str:
        last = uri.path.rstrip("/").rpartition("/")[2]
        safe = _safe_name(last) or _safe_name(kwic.name)
        if not safe:
            raise self.bad(node, "cannot make a service name from this URI or the service <name>; add a path "
                           "like /serviceB")
        return safe

    # -- TLS -----------------------------------------------------------------------------------

    def _tls(self, root: Node, role: str, out: _Toml, node_id: str | None, plain: bool,
             tunnel_host: str | None) -> _TlsFiles | None:
        security = root.child("security")
        keystore = security.child("keystore") if security is not None else None
        truststore = security.child("truststore") if security is not None else None
        out.table("tls")
        if plain:
            out.key("insecure", True, "KWIC tunnels were plain ws:// (kept because of --insecure-ws)")
            if keystore is not None or self.opts.keystore is not None:
                self.report("ignored", keystore, "keystore not converted: the tunnels stay plain ws://")
            return None
        if keystore is None and self.opts.keystore is None:
            name = node_id or _stem_name(self.source) or role
            pki = self.opts.pki.rstrip("/") or "."
            cert, key, ca = f"{pki}/{name}.pem", f"{pki}/{name}.key", f"{pki}/ca.pem"
            flag = "--cloud" if role == "cloud" else "--onprem"
            cmd = f"intercloud certs init {self._cmd_dir(pki)} {flag} {name}"
            if role == "cloud" and tunnel_host and tunnel_host != name and not is_ip_literal(tunnel_host):
                cmd += f" --san {tunnel_host}"
            self.to_create += [(cert, cmd), (key, cmd), (ca, cmd)]
            src = security if security is not None else root
            self.report("note", src, f"the XML has no <keystore>; [tls] names PEM files to create with `{cmd}` "
                        "(one CA for both halves: run it once with every --cloud and --onprem name)")
            out.key("cert", cert, f"create with: {cmd}")
            out.key("key", key)
            out.key("ca", ca, "the CA that signed the " + ("on-prem client" if role == "cloud" else "cloud server")
                    + " certificates")
            return _TlsFiles(cert, key, ca, None, converted=False)
        return self._convert_stores(keystore, truststore, role, out, node_id, tunnel_host)

    def _password(self, store: Node | None, kind: str, override: Path | None, store_file: Path) -> tuple[str, str]:
        """(password, where it came from) for a keystore or truststore."""
        option = f"--{kind}-password-file"
        if override is not None:
            return _read_password(override, f"{option} {override}"), f"{option} {override}"
        if store is not None:
            pf = store.child("password-file")
            if pf is not None:
                path = self._xml_path(pf.text)
                try:
                    return _read_password(path, str(path)), f"{pf.path} {path}"
                except KaazingImportError:
                    raise self.bad(pf, f"{kind} password file {path} not found or unreadable; copy it there or "
                                   f"give it with {option} FILE") from None
            pw = store.child("password")
            if pw is not None:
                self.report("note", pw, f"the {kind} password was written in the XML in clear; keep the "
                            "converted private key file readable only by the gateway's user (it is written mode 0600)")
                return pw.text, pw.path
        where = f"{self.source}:{store.line}: {store.path}" if store is not None else str(self.source)
        raise KaazingImportError(f"{where}: no password for the {kind} {store_file}; give it with {option} FILE "
                                 "(a file holding the password, like KWIC's keystore.pw)")

    def _cmd_dir(self, rel: str) -> str:
        """``rel`` (relative to the output file) as a shell argument for a command run in the current directory."""
        out_dir = self.opts.out.parent if self.opts.out is not None else Path(".")
        if out_dir.resolve() == Path.cwd().resolve():
            return shlex.quote(rel)
        return shlex.quote(str(out_dir / rel))

    def _xml_path(self, text: str) -> Path:
        p = Path(text).expanduser()
        return p if p.is_absolute() else self.source.parent / p

    def _store_file(self, store: Node | None, kind: str, override: Path | None) -> tuple[Path, str | None]:
        if override is not None:
            if not override.is_file():
                raise KaazingImportError(f"--{kind} {override}: file not found; give the path of the {kind} file")
            return override, None
        assert store is not None
        fnode = store.child("file")
        if fnode is None or not fnode.text:
            raise self.bad(store, f"<{kind}> has no <file>; add it or give the file with --{kind} PATH")
        path = self._xml_path(fnode.text)
        if not path.is_file():
            raise self.bad(fnode, f"{kind} {path} not found; copy it there or give its location with "
                           f"--{kind} PATH")
        declared = store.value("type")
        return path, declared

    def _convert_stores(self, keystore: Node | None, truststore: Node | None, role: str, out: _Toml,
                        node_id: str | None, tunnel_host: str | None) -> _TlsFiles:
        if self.opts.out is None:
            raise KaazingImportError(f"{self.source}: the keystore is converted to PEM files written next to the "
                                     "output; give the output file with -o OUT.toml")
        stem = self.opts.out.stem
        ks_path, ks_type = self._store_file(keystore, "keystore", self.opts.keystore)
        ks_pw, ks_pw_src = self._password(keystore, "keystore", self.opts.keystore_password_file, ks_path)
        ks = _load_store(ks_path, ks_type, ks_pw, "keystore", ks_pw_src, keystore, self)
        key_pw = ks_pw
        key_pw_src = ks_pw_src
        if self.opts.key_password_file is not None:
            key_pw = _read_password(self.opts.key_password_file, f"--key-password-file {self.opts.key_password_file}")
            key_pw_src = f"--key-password-file {self.opts.key_password_file}"
        if not ks.keys:
            raise KaazingImportError(f"{ks_path}: the keystore holds no private key entry (only "
                                     f"{len(ks.trusted)} trusted certificate(s)); the gateway's certificate and key "
                                     "must be in <keystore> (trusted CAs go in <truststore>)")
        alias = self._pick_alias(ks, ks_path, role, node_id, tunnel_host)
        key, chain = ks.decrypt(alias, key_pw, key_pw_src)
        leaf = chain[0]
        if not public_key_matches(leaf, key):
            raise KaazingImportError(f"{ks_path}: entry {alias!r}: the private key does not match its certificate; "
                                     "re-create the keystore entry")
        intermediates = [c for c in chain[1:] if not _self_signed(c)]
        cert_file, key_file, ca_file = f"{stem}.pem", f"{stem}.key", f"{stem}-ca.pem"
        self.files[cert_file] = (_pem(leaf, *intermediates), 0o644)
        self.files[key_file] = (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), 0o600)
        ks_src = f"{ks_path} ({ks.type.upper()}) entry {alias!r}"
        out.key("cert", cert_file, f"converted from {ks_src}: {_subject(leaf)}"
                + (f" + {len(intermediates)} intermediate(s)" if intermediates else ""))
        out.key("key", key_file, f"converted from {ks_src} (unencrypted PEM, mode 0600)")
        # trust
        cas: list[x509.Certificate] = []
        ca_src = ""
        if truststore is not None or self.opts.truststore is not None:
            ts_path, ts_type = self._store_file(truststore, "truststore", self.opts.truststore)
            ts_pw, ts_pw_src = self._password(truststore, "truststore", self.opts.truststore_password_file, ts_path)
            ts = _load_store(ts_path, ts_type, ts_pw, "truststore", ts_pw_src, truststore, self)
            cas = [c for _, c in ts.trusted]
            for a in ts.keys:
                self.report("note", truststore, f"truststore entry {a!r} is a private key; only its certificates "
                            "are trusted (a truststore should hold CA certificates only)")
                cas += ts.chains.get(a, [])
            ca_src = f"{ts_path} ({ts.type.upper()}), {len(cas)} certificate(s)"
            if not cas:
                raise KaazingImportError(f"{ts_path}: the truststore holds no certificate; add the CA that signed "
                                         "the other half's certificates")
        else:
            cas = [c for c in chain[1:] if _self_signed(c)] + [c for _, c in ks.trusted]
            if cas:
                ca_src = f"no <truststore>: the CA certificate(s) found in {ks_path}"
                self.report("note", keystore, "no <truststore>: tls.ca holds the CA certificates found in the "
                            "keystore; check that it is the CA of the other half's certificates")
            else:
                pki = self.opts.pki.rstrip("/") or "."
                ca_file = f"{pki}/ca.pem"
                self.to_create.append((ca_file, "copy the CA certificate (PEM) of the other half here"))
                self.report("note", keystore, "no <truststore> and no CA certificate in the keystore (KWIC then "
                            f"trusted the JVM's default CAs); put the CA that signed the other half's certificates "
                            f"in {ca_file}")
                out.key("ca", ca_file, "create: the CA (PEM) that signed the other half's certificates")
                self._check_usage(leaf, role, keystore)
                return _TlsFiles(cert_file, key_file, ca_file, leaf, converted=True, source=ks_src)
        seen: set[bytes] = set()
        unique = []
        for c in cas:
            fp = c.fingerprint(_sha256())
            if fp not in seen:
                seen.add(fp)
                unique.append(c)
        self.files[ca_file] = (_pem(*unique), 0o644)
        out.key("ca", ca_file, f"converted from {ca_src}")
        self._check_usage(leaf, role, keystore)
        return _TlsFiles(cert_file, key_file, ca_file, leaf, converted=True, source=ks_src)

    def _pick_alias(self, ks: _Store, path: Path, role: str, node_id: str | None, host: str | None) -> str:
        aliases = list(ks.keys)
        if self.opts.key_alias is not None:
            if self.opts.key_alias not in ks.keys:
                raise KaazingImportError(f"{path}: no private key entry {self.opts.key_alias!r} (--key-alias); "
                                         f"the keystore has {', '.join(map(repr, aliases))}")
            return self.opts.key_alias
        if len(aliases) == 1:
            return aliases[0]
        for want in (host, node_id):
            if want and want.lower() in (a.lower() for a in aliases):
                return next(a for a in aliases if a.lower() == want.lower())
        raise KaazingImportError(f"{path}: the keystore has several private key entries "
                                 f"({', '.join(map(repr, aliases))}) and none is named after this gateway's host; "
                                 "choose one with --key-alias ALIAS")

    def _check_usage(self, cert: x509.Certificate, role: str, where: Node | None) -> None:
        try:
            usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            return
        need = ExtendedKeyUsageOID.SERVER_AUTH if role == "cloud" else ExtendedKeyUsageOID.CLIENT_AUTH
        if need not in usages:
            what = "TLS server (serverAuth)" if role == "cloud" else "TLS client (clientAuth)"
            self.report("note", where, f"the keystore certificate {_subject(cert)} is not allowed as a {what}; "
                        "the other half will reject it: issue one with that extended key usage")
        self.leaf_usages = usages

    # -- the two roles ------------------------------------------------------------------------

    def _gateway(self, out: _Toml, role: str, node_id: str | None, node_id_comment: str) -> None:
        out.table("gateway")
        out.key("role", role, "the " + ("cloud half: it accepts the tunnels" if role == "cloud" else
                                        "on-prem half: it dials the tunnels out"))
        if node_id is not None:
            out.key("node_id", node_id, node_id_comment)
        if self.opts.admin:
            out.key("admin", self.opts.admin, "--admin; replaces KWIC's JMX/SNMP management: /healthz /readyz "
                    "/api/status /metrics")
        else:
            out.comment('admin = "127.0.0.1:9101"   # health, status and Prometheus metrics (replaces JMX/SNMP)')

    def _tunnel_common(self, out: _Toml) -> None:
        if self.ping is not None:
            interval, timeout, node = self.ping
            out.key("ping_interval", format_duration(interval),
                    f"a third of ws.inactivity.timeout ({node.text}) at {self.file}:{node.line}")
            out.key("ping_timeout", format_duration(timeout),
                    f"ws.inactivity.timeout ({node.text}): a silent tunnel is closed and redialed; intercloud's "
                    "default 15s fails over faster")

    def _cloud(self, root: Node, mine: list[_Kwic], out: _Toml, plain: bool) -> None:
        listens: list[_Listen] = []
        transport_hosts: set[str] = set()
        for s in mine:
            if s.kind == "cloud-a":
                n = s.connect_opts.get("socks.transport")
                pt = s.connect_opts.get("pipe.transport")
                if n is None and pt is None:
                    self.report("dropped", s.node, f"service \"{s.name}\": no socks.transport in connect-options, "
                                "so there is no tunnel to map")
                    continue
                src = n if n is not None else pt
                uri = self._uri(src)
                if n is None:
                    self.report("note", pt, "no socks.transport: KWIC spoke SOCKS over plain TCP here; intercloud "
                                "tunnels are WebSocket, both halves use "
                                f"wss://{uri.host}:{uri.port or 443}/intercloud")
                    uri = Uri("wss", uri.host, uri.port, "/intercloud")
                transport_hosts.add(uri.host)
                listens.append(self._listen_candidate(uri, src, s.connect_opts, "socks"))
            elif s.kind in ("cloud-b", "balancer"):
                for a in s.accepts:
                    uri = self._uri(a)
                    if uri.is_ws:
                        cand = self._listen_candidate(uri, a, s.accept_opts, "b" if s.kind == "cloud-b" else "balancer")
                        cand.path = "/intercloud"
                        listens.append(cand)
        node_id, node_comment = self._node_id("cloud", [c for c in listens if c.kind == "socks"] or listens)
        tunnel_host = next((h for h in transport_hosts), None)
        self._gateway(out, "cloud", node_id, node_comment)
        tls = self._tls(root, "cloud", out, node_id, plain, tunnel_host)
        self._identity("cloud", node_id, node_comment, tls)
        self._verify_client(mine, out, tls)
        # tunnel.listen
        out.table("tunnel")
        if not listens:
            raise KaazingImportError(f"{self.source}: no tunnel endpoint found (no socks.transport and no ws(s):// "
                                     "accept); nothing for on-prem gateways to dial")
        primary = next((c for c in listens if c.kind == "socks"), listens[0])
        scheme = "ws" if plain else "wss"
        url = f"{scheme}://{_fmt_host(primary.host)}:{primary.port}{primary.path}"
        out.key("listen", url, primary.comment)
        for c in listens:
            if c is not primary and c.kind != "balancer" and c.port != primary.port:
                self.report("note", c.node, f"this WebSocket endpoint (port {c.port}) is not a listener of its "
                            f"own: intercloud carries the service inside the tunnels on tunnel.listen (port "
                            f"{primary.port}); on-prem gateways dial only that")
        self._tunnel_common(out)
        # services (collected first: cluster keys come before [[service]] tables)
        svcs: list[_Svc] = []
        for s in mine:
            if s.kind == "balancer":
                self.report("superseded", s.node, f"balancer service \"{s.name}\": on-prem gateways keep tunnels to "
                            "every cluster member and any member relays to any other, so no balancer service is "
                            "needed ([cluster] below)")
                continue
            if s.kind == "cloud-a":
                self._cloud_a(s, svcs, transport_hosts)
            elif s.kind == "cloud-b":
                self._cloud_b(s, svcs)
            self._other_options(s)
        self._cluster(root, out, tls, node_id, plain)
        self._tenants(out, svcs)
        if any(k.lower() in _JAVA_PROXY_PROPS for k in self.opts.properties):
            self.report("ignored", None, "-D http(s).proxyHost/proxyPort: a cloud gateway dials no tunnels; the "
                        "proxy belongs in the on-prem half (tunnel.proxy)")
        self._emit_services(out, svcs)

    def _listen_candidate(self, uri: Uri, node: Node, opts: _Options, kind: str) -> _Listen:
        if uri.secure is None:
            raise self.bad(node, f"{uri.scheme}:// is not a WebSocket transport; use wss://HOST/PATH")
        port = uri.port if uri.port is not None else (443 if uri.secure else 80)
        bind = self._bind(opts)
        what = "the tunnel endpoint" if kind == "socks" else "this WebSocket endpoint"
        comments = [self.origin(node)]
        if bind is not None:
            bnode, bhost, biface, bport = bind
            host, note = self._listen_host(bhost or "", biface, bnode, what) if (bhost or biface) else ("0.0.0.0", "")
            port = bport
            comments.append(f"bound by {bnode.shown()}")
            if note:
                comments.append(note)
        else:
            host, note = self._listen_host(uri.host, uri.iface, node, what)
            if note:
                comments.append(note)
        mapped = self._map_port(port)
        if mapped != port:
            comments.append(f"port {port} rewritten by --rewrite-port")
        path = uri.path or "/"
        return _Listen(bool(uri.secure), host, mapped, path, "; ".join(comments), kind, node)

    def _node_id(self, role: str, listens: list[_Listen]) -> tuple[str | None, str]:
        if self.opts.node_id is not None:
            if not NAME_PATTERN.fullmatch(self.opts.node_id):
                raise KaazingImportError(f"--node-id {self.opts.node_id!r}: use 1-64 characters from "
                                         "A-Z a-z 0-9 . _ -")
            return self.opts.node_id, "--node-id"
        if role == "onprem":
            return None, ""
        for c in listens:
            node = c.node
            if node is None:
                continue
            uri = parse_uri(node.text)
            if uri.host and NAME_PATTERN.fullmatch(uri.host) and not is_ip_literal(uri.host):
                self.report("note", node, f"gateway.node_id = {uri.host!r} is the host of the tunnel URL; every "
                            "cloud member needs its own node_id: if several members run this file, give each "
                            "one --node-id (or -D the property that names the member)")
                return uri.host, f"host of {node.shown()}"
        name = _stem_name(self.source) or "cloud"
        self.report("note", self.root, f"gateway.node_id = {name!r} was made from the file name; every cloud member "
                    "needs its own: give --node-id")
        return name, "from the file name (give --node-id)"

    def _identity(self, role: str, node_id: str | None, node_comment: str, tls: _TlsFiles | None) -> None:
        """A gateway's node id must be a name (CN or DNS SAN) of its certificate, or the other half refuses
        it (protocol §5.4). The PEM files to create are named after the node id, so that holds for them;
        a certificate converted from a keystore may name something else, which is said here."""
        if tls is None or tls.leaf is None:
            return
        names = _cert_names(tls.leaf)
        usable = [n for n in names if NAME_PATTERN.fullmatch(n)]
        shown = ", ".join(repr(n) for n in names[:8]) or "none"
        if node_id is None:  # on-prem: config.load takes the certificate's first usable name
            if not usable:
                self.report("note", None, f"the certificate converted from {tls.source} ({_subject(tls.leaf)}) has "
                            f"no name that can be a node id (names: {shown}); set gateway.node_id (--node-id) and "
                            "issue a certificate that names it, or the cloud refuses this gateway")
            return
        if node_id in names:
            return
        refuses = ("on-prem gateways refuse this cloud gateway (and cluster members refuse it as a member)"
                   if role == "cloud" else "the cloud refuses this gateway (when it verifies client certificates)")
        instead = f"give --node-id {usable[0]}" if usable else "give --node-id a name of the certificate"
        flag = "--cloud" if role == "cloud" else "--onprem"
        self.report("note", None, f"gateway.node_id {node_id!r} ({node_comment}) is not a name of the certificate "
                    f"converted from {tls.source} ({_subject(tls.leaf)}; names: {shown}): {refuses}, since a "
                    f"gateway's node id must be a name of its certificate. Either {instead}, or put a certificate "
                    f"for {node_id!r} in the keystore (`intercloud certs init pki {flag} {node_id}` makes one)")

    def _verify_client(self, mine: list[_Kwic], out: _Toml, tls: _TlsFiles | None) -> None:
        if tls is None:
            return
        found = []
        for s in mine:
            for opts in (s.accept_opts, s.connect_opts):
                n = opts.get("ssl.verify-client")
                if n is not None:
                    found.append(n)
        values = {n.text.lower() for n in found}
        if "none" in values and not self.opts.tenants:
            n = next(n for n in found if n.text.lower() == "none")
            out.key("verify_client", False, self.origin(n))
            self.report("note", n, "ssl.verify-client none: any client that reaches tunnel.listen can offer "
                        "services to this gateway. intercloud's default is to require client certificates; "
                        "remove verify_client = false once the on-prem gateways have certificates")
            return
        if found:
            n = found[0]
            extra = ""
            if "optional" in values:
                extra = " (KWIC's optional is required in intercloud: tunnels without a client certificate are refused)"
                self.report("note", n, "ssl.verify-client optional: intercloud requires the client certificate")
            out.key("verify_client", True, self.origin(n) + extra)
        else:
            out.comment("verify_client = true (the default): on-prem gateways must present a certificate signed by "
                        "tls.ca. KWIC did not check client certificates unless ssl.verify-client was set")

    def _cloud_a(self, s: _Kwic, svcs: list[_Svc], transport_hosts: set[str]) -> None:
        pipe_node = s.connects[0]
        pipe = self._uri(pipe_node)
        name = self._pipe_name(pipe, transport_hosts, pipe_node)
        uris = [(self._uri(a), a) for a in s.accepts]
        bind = self._bind(s.accept_opts)
        keep = uris[0]
        if len(uris) > 1:
            if len({u.port for u, _ in uris}) == 1 and bind is None:
                keep = (Uri("tcp", "0.0.0.0", uris[0][0].port, ""), uris[0][1])
                self.report("note", uris[1][1], "several <accept> on one port: intercloud listens on all "
                            "interfaces (0.0.0.0) once")
            else:
                for _u, n in uris[1:]:
                    self.report("dropped", n, f"service \"{s.name}\": an intercloud service listens on one address; "
                                "this extra <accept> was not imported. Listen on 0.0.0.0 or add a second service "
                                "pair (both halves) for it")
        uri, anode = keep
        host, port, note = self._endpoint(uri, anode, listen=True, bind=bind, what=f"service \"{s.name}\"")
        comments = [f"KWIC service \"{s.name}\" ({s.node.path}, line {s.node.line}): cloud clients connect here, "
                    f"the on-prem side connects the target ({pipe_node.shown()})",
                    self.origin(anode, f" ({note})" if note else "")]
        self._add(svcs, _Svc(name, "accept", host, port, comments, {s.name, pipe.host, name}), s)

    def _cloud_b(self, s: _Kwic, svcs: list[_Svc]) -> None:
        ws_node = next(a for a in s.accepts if self._uri(a).is_ws)
        uri = self._uri(ws_node)
        name = self._path_name(uri, s, ws_node)
        if len(s.connects) > 1:
            for n in s.connects[1:]:
                self.report("dropped", n, f"service \"{s.name}\": only the first <connect> is imported; intercloud "
                            "services dial one target")
        cnode = s.connects[0]
        host, port, note = self._endpoint(self._uri(cnode), cnode, listen=False)
        comments = [f"KWIC service \"{s.name}\" ({s.node.path}, line {s.node.line}): on-prem clients connect on "
                    f"the on-prem side ({ws_node.shown()}), this gateway dials the target",
                    self.origin(cnode, f" ({note})" if note else "")]
        balance = s.node.child("balance")
        if balance is not None:
            self.report("superseded", balance, "<balance>: on-prem gateways keep tunnels to every member, so "
                        "service B reaches any member without a balancer URI")
        self._add(svcs, _Svc(name, "connect", host, port, comments, {s.name, name, uri.path}, {(host, port)}), s)

    def _onprem(self, root: Node, mine: list[_Kwic], out: _Toml, plain: bool) -> None:
        urls: list[tuple[str, Node, str]] = []  # (url, node, comment)
        transport_hosts: set[str] = set()
        for s in mine:
            if s.kind != "onprem-a":
                continue
            n = s.accept_opts.get("socks.transport")
            pt = s.accept_opts.get("pipe.transport")
            if n is None and pt is None:
                self.report("dropped", s.node, f"service \"{s.name}\": no socks.transport in accept-options, so "
                            "there is no tunnel to map")
                continue
            src = n if n is not None else pt
            uri = self._uri(src)
            path = uri.path if n is not None else "/intercloud"
            if n is None:
                self.report("note", pt, "no socks.transport: KWIC spoke SOCKS over plain TCP here; intercloud "
                            "tunnels are WebSocket")
            transport_hosts.add(uri.host)
            urls.append(self._dial_url(uri, src, plain, path))
        b_targets: list[tuple[Uri, Node]] = []
        for s in mine:
            if s.kind == "onprem-b":
                b_targets += [(self._uri(c), c) for c in s.connects]
        if not urls:
            for uri, node in b_targets:
                urls.append(self._dial_url(uri, node, plain, "/intercloud"))
            if urls:
                self.report("note", b_targets[0][1], "no reverse (pipe://) service: the tunnel URL is made from "
                            "service B's WebSocket URL with the path /intercloud; the cloud half's import makes "
                            "the same listener from its ws(s):// accept")
        seen: dict[str, int] = {}
        unique = []
        for url, node, comment in urls:
            if url in seen:
                continue
            seen[url] = len(unique)
            unique.append((url, node, comment))
        node_id, node_comment = self._node_id("onprem", [])
        self._gateway(out, "onprem", node_id, node_comment)
        if node_id is None:
            out.comment("node_id defaults to the first name (CN) of tls.cert, or the host name without one: give "
                        "every on-prem gateway a certificate of its own")
        tls = self._tls(root, "onprem", out, node_id or _stem_name(self.source), plain, None)
        self._identity("onprem", node_id, node_comment, tls)
        out.table("tunnel")
        if not unique:
            raise KaazingImportError(f"{self.source}: no tunnel found (no socks.transport and no ws(s):// connect); "
                                     "nothing to dial")
        out.key("connect", [u for u, _, _ in unique], [f"{u}: {c}" for u, _, c in unique])
        if len(unique) > 1:
            out.comment("intercloud keeps per_member tunnels to every cloud member (and the members they advertise)")
        dial_hosts = {(self._map_host(parse_uri(n.text).host), parse_uri(n.text).port) for _, n, _ in unique}
        for uri, node in b_targets:
            host = self._map_host(uri.host)
            if urls and not any(h == host for h, _ in dial_hosts):
                self.report("note", node, f"service B was reached through {uri.host}; in intercloud its streams "
                            "ride the tunnels in tunnel.connect (to every member), so that URL is not dialed")
        self._proxy(out)
        self._tunnel_common(out)
        svcs: list[_Svc] = []
        for s in mine:
            if s.kind == "onprem-a":
                self._onprem_a(s, svcs, transport_hosts)
            elif s.kind == "onprem-b":
                self._onprem_b(s, svcs)
            self._other_options(s)
        if root.child("cluster") is not None:
            self.report("ignored", root.child("cluster"), "<cluster> on an on-prem gateway: only cloud members "
                        "form a cluster; on-prem gateways are independent (each keeps tunnels to every member)")
        if self.opts.tenants:
            self.report("ignored", None, "--tenant is for the cloud half; the cloud derives an on-prem gateway's "
                        "tenant from its client certificate")
        self._emit_services(out, svcs)

    def _dial_url(self, uri: Uri, node: Node, plain: bool, path: str) -> tuple[str, Node, str]:
        if uri.secure is None:
            raise self.bad(node, f"{uri.scheme}:// is not a WebSocket transport; use wss://HOST/PATH")
        if uri.iface is not None or not uri.host:
            raise self.bad(node, "a tunnel URL needs a host name to dial")
        port = uri.port if uri.port is not None else (443 if uri.secure else 80)
        host = self._map_host(uri.host)
        notes = []
        if host != uri.host:
            notes.append(f"{uri.host} rewritten by --rewrite-host")
        mapped = self._map_port(port)
        if mapped != port:
            notes.append(f"port {port} rewritten by --rewrite-port")
        scheme = "ws" if plain else "wss"
        url = f"{scheme}://{_fmt_host(host)}:{mapped}{path or '/'}"
        return url, node, self.origin(node, f" ({'; '.join(notes)})" if notes else "")

    def _proxy(self, out: _Toml) -> None:
        props = {k.lower(): v for k, v in self.opts.properties.items()}
        for scheme in ("https", "http"):
            host = props.get(f"{scheme}.proxyhost")
            if host:
                port_text = props.get(f"{scheme}.proxyport") or "80"
                try:
                    port = int(port_text)
                except ValueError:
                    raise KaazingImportError(f"-D {scheme}.proxyPort={port_text}: not a port number") from None
                mapped_host, mapped_port = self._map_host(host), self._map_port(port)
                out.key("proxy", f"http://{_fmt_host(mapped_host)}:{mapped_port}",
                        f"-D {scheme}.proxyHost={host} -D {scheme}.proxyPort={port} (KWIC's Java proxy settings)")
                if props.get("http.nonproxyhosts"):
                    self.report("note", None, "-D http.nonProxyHosts is not imported; intercloud uses the proxy "
                                "for every tunnel URL (NO_PROXY applies only when tunnel.proxy is not set)")
                return

    def _onprem_a(self, s: _Kwic, svcs: list[_Svc], transport_hosts: set[str]) -> None:
        pipe_node = s.accepts[0]
        pipe = self._uri(pipe_node)
        name = self._pipe_name(pipe, transport_hosts, pipe_node)
        if len(s.connects) > 1:
            for n in s.connects[1:]:
                self.report("dropped", n, f"service \"{s.name}\": only the first <connect> is imported")
        cnode = s.connects[0]
        host, port, note = self._endpoint(self._uri(cnode), cnode, listen=False)
        comments = [f"KWIC service \"{s.name}\" ({s.node.path}, line {s.node.line}): cloud clients connect on the "
                    f"cloud side, this gateway dials the target ({pipe_node.shown()})",
                    self.origin(cnode, f" ({note})" if note else "")]
        self._add(svcs, _Svc(name, "connect", host, port, comments, {s.name, pipe.host, name}, {(host, port)}), s)

    def _onprem_b(self, s: _Kwic, svcs: list[_Svc]) -> None:
        ws_node = next(c for c in s.connects if self._uri(c).is_ws)
        uri = self._uri(ws_node)
        name = self._path_name(uri, s, ws_node)
        anode = s.accepts[0]
        if len(s.accepts) > 1:
            for n in s.accepts[1:]:
                self.report("dropped", n, f"service \"{s.name}\": an intercloud service listens on one address; "
                            "this extra <accept> was not imported")
        bind = self._bind(s.accept_opts)
        host, port, note = self._endpoint(self._uri(anode), anode, listen=True, bind=bind,
                                          what=f"service \"{s.name}\"")
        comments = [f"KWIC service \"{s.name}\" ({s.node.path}, line {s.node.line}): on-prem clients connect "
                    f"here, the cloud side dials the target ({ws_node.shown()})",
                    self.origin(anode, f" ({note})" if note else "")]
        self._add(svcs, _Svc(name, "accept", host, port, comments, {s.name, name, uri.path}), s)

    def _prepared(self, node: Node) -> None:
        self.report("superseded", node, f"prepared.connection.count {node.text}: intercloud multiplexes every "
                    "stream over long-lived tunnels, so nothing is prepared per connection; the nearest knob is "
                    "tunnel.per_member (tunnels kept to EVERY cloud member, default 2), which also ends KWIC's "
                    "starvation of a restarted member behind a load balancer")

    def _other_options(self, s: _Kwic) -> None:
        handled = _TUNNEL_OPTIONS | _BIND_OPTIONS | {"ws.inactivity.timeout", "ssl.verify-client"}
        for opts in (s.accept_opts, s.connect_opts):
            for name, node in opts.nodes.items():
                if name in handled:
                    continue
                if name == _PREPARED:
                    self._prepared(node)
                elif name in _SUPERSEDED_OPTIONS:
                    self.report("superseded", node, f"{node.tag}: {_SUPERSEDED_OPTIONS[name]}")
                else:
                    self.report("ignored", node, f"option <{node.tag}> is not known to the importer and was "
                                "skipped; check whether it matters for your deployment")
        for child in s.node.children:
            if child.tag in ("name", "description", "accept", "connect", "type", "accept-options",
                             "connect-options", "balance", "properties"):
                continue
            if child.tag in ("realm-name", "authorization-constraint"):
                self.report("ignored", child, f"<{child.tag}>: intercloud does not authenticate the clients of a "
                            "service; rely on the application's authentication (gateways authenticate each other "
                            "with TLS client certificates)")
            elif child.tag in ("cross-site-constraint", "mime-mapping"):
                self.report("ignored", child, f"<{child.tag}> concerns browsers and HTTP; intercloud carries TCP only")
            else:
                self.report("ignored", child, f"<{child.tag}> is not known to the importer and was skipped")
        props = s.node.child("properties")
        if props is not None:
            for p in props.children:
                if _norm_option(p.tag) == _PREPARED:
                    self._prepared(p)
                else:
                    self.report("ignored", p, f"service property <{p.tag}> has no intercloud equivalent")

    def _add(self, svcs: list[_Svc], svc: _Svc, kwic: _Kwic) -> None:
        for other in svcs:
            if other.name != svc.name:
                continue
            if other.direction == svc.direction and (other.host, other.port) == (svc.host, svc.port):
                other.comments.append(f"also KWIC service \"{kwic.name}\" ({kwic.node.path}, line {kwic.node.line})")
                other.keys |= svc.keys
                self.report("note", kwic.node, f"service \"{kwic.name}\" merged into intercloud service "
                            f"{svc.name!r}: KWIC needed one service per cloud member, intercloud offers one service "
                            "over tunnels to every member")
                return
            self.report("dropped", kwic.node, f"service \"{kwic.name}\" maps to the name {svc.name!r} of another "
                        f"service with a different {'target' if svc.direction == 'connect' else 'address'} "
                        f"({other.host}:{other.port} vs {svc.host}:{svc.port}); rename one pipe/path in both halves")
            return
        svcs.append(svc)

    # -- cluster ------------------------------------------------------------------------------

    def _cluster(self, root: Node, out: _Toml, tls: _TlsFiles | None, node_id: str | None, plain: bool) -> None:
        cluster = root.child("cluster")
        listen: tuple[str, int, str] | None = None
        peers: list[tuple[str, int, str]] = []
        if cluster is not None:
            name = cluster.child("name")
            if name is not None:
                self.report("superseded", name, f"cluster name {name.text!r}: members recognise each other by "
                            "cluster.ca and cluster.peer_names, not by a name")
            for a in cluster.all("accept"):
                uri = self._uri(a)
                if uri.scheme != "tcp":
                    self.report("dropped", a, f"{uri.scheme}:// cluster discovery (multicast) is not supported; "
                                "list the members in cluster.peers (--peer HOST:PORT)")
                    continue
                if listen is None:
                    host, port, note = self._endpoint(uri, a, listen=True, what="the cluster")
                    listen = (host, port, self.origin(a, f" ({note})" if note else ""))
            for c in cluster.all("connect"):
                uri = self._uri(c)
                if uri.scheme != "tcp":
                    self.report("dropped", c, f"{uri.scheme}:// cluster discovery is not supported; list the "
                                "members in cluster.peers (--peer HOST:PORT)")
                    continue
                host, port, note = self._endpoint(uri, c, listen=False)
                peers.append((host, port, self.origin(c, f" ({note})" if note else "")))
            for child in cluster.children:
                if child.tag not in ("name", "accept", "connect"):
                    self.report("ignored", child, f"<cluster><{child.tag}> is not imported (Hazelcast setting)")
        for p in self.opts.peers:
            host, port = _peer_address(p)
            peers.append((self._map_host(host), self._map_port(port), f"--peer {p}"))
        if self.opts.cluster_listen:
            host, port = _peer_address(self.opts.cluster_listen)
            listen = (host, self._map_port(port), f"--cluster-listen {self.opts.cluster_listen}")
        if not peers and listen is None:
            if self.opts.tenants or cluster is not None:
                return
            out.comment_block(["", "No <cluster>: this member stands alone. If several cloud gateways run this "
                               "file (e.g. behind a load", "balancer, as in KWIC's 4-ha-lb), import it once per "
                               "member with --node-id and --peer so that", "on-prem gateways reach every member "
                               "(see docs/kwic-migration.md)."])
            return
        if not peers:
            self.report("note", cluster, "the cluster has no <connect> member: it stays alone until peers are "
                        "listed in cluster.peers")
        if listen is None:
            listen = ("0.0.0.0", self._map_port(HAZELCAST_PORT), f"--peer given: KWIC's cluster port {HAZELCAST_PORT}")
        scheme = "ws" if plain else "wss"
        out.table("cluster")
        out.key("listen", f"{scheme}://{_fmt_host(listen[0])}:{listen[1]}/cluster",
                f"peer links between members (was Hazelcast): {listen[2]}")
        out.key("peers", [f"{scheme}://{_fmt_host(h)}:{p}/cluster" for h, p, _ in peers],
                [f"{h}:{p}: {c}" for h, p, c in peers])
        if plain:
            return
        peer_hosts = [h for h, _, _ in peers]
        names: list[str] = []
        if tls is not None and tls.converted and tls.leaf is not None:
            out.key("ca", tls.ca, "the tunnel CA: KWIC had one truststore. Better: a separate CA for peer links")
            self.report("note", cluster, "peer links use the same CA as the tunnels (KWIC had one truststore); "
                        "cluster.peer_names keeps tenant certificates out, but a separate cluster CA "
                        "(`intercloud certs init pki/cluster --cloud MEMBERS`) is safer")
            names = [n for n in _cert_names(tls.leaf)
                     if NAME_PATTERN.fullmatch(n) and not is_ip_literal(n) and n.lower() != "localhost"]
            usages = getattr(self, "leaf_usages", None)
            if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
                self.report("note", cluster, "the member certificate is not allowed as a TLS client (clientAuth); "
                            "members dial each other, so peer links will fail: issue member certificates for "
                            "serverAuth and clientAuth, or set cluster.cert/cluster.key")
        else:
            pki = (self.opts.pki.rstrip("/") or ".") + "/cluster"
            member = node_id or "cloud"
            members = ",".join(dict.fromkeys([member] + [h for h in peer_hosts if NAME_PATTERN.fullmatch(h)
                                                         and not is_ip_literal(h)]))
            cmd = f"intercloud certs init {self._cmd_dir(pki)} --cloud {members}"
            out.key("ca", f"{pki}/ca.pem", f"the members' own CA (not the tenants'): {cmd}")
            out.key("cert", f"{pki}/{member}.pem")
            out.key("key", f"{pki}/{member}.key")
            self.to_create += [(f"{pki}/ca.pem", cmd), (f"{pki}/{member}.pem", cmd), (f"{pki}/{member}.key", cmd)]
        if node_id:
            names.append(node_id)
        names += [h for h in peer_hosts if NAME_PATTERN.fullmatch(h) and not is_ip_literal(h)]
        names = list(dict.fromkeys(names))
        if not names:
            raise KaazingImportError(f"{self.source}: cannot tell which certificate names the cluster members have "
                                     "(peers are IP addresses); give --node-id and peers by name")
        out.key("peer_names", names, "certificate names (CN or DNS SAN) accepted on peer links")
        interval, timeout = (self.ping[0], self.ping[1]) if self.ping is not None else (5.0, 15.0)
        out.key("member_ttl", format_duration(timeout + 2 * interval),
                "a member unheard of this long is forgotten; must exceed tunnel.ping_timeout")

    # -- tenants ------------------------------------------------------------------------------

    def _tenants(self, out: _Toml, svcs: list[_Svc]) -> None:
        if not self.opts.tenants:
            if len(svcs) > 2:
                self.report("note", self.root, "no --tenant given: every on-prem gateway trusted by tls.ca may offer "
                            "and use every service, as in KWIC. For KWIC's multi-tenant setup give "
                            "--tenant NAME=SERVICE,SERVICE per tenant so that intercloud enforces it")
            return
        if self.role != "cloud":
            return
        owner: dict[str, str] = {}
        for tenant, wanted in self.opts.tenants.items():
            for w in wanted:
                match = [s for s in svcs if w in s.keys or w == s.name]
                if not match:
                    raise KaazingImportError(f"--tenant {tenant}=...: no service {w!r} in {self.source} (services: "
                                             f"{', '.join(s.name for s in svcs)})")
                for s in match:
                    if s.name in owner and owner[s.name] != tenant:
                        raise KaazingImportError(f"--tenant: service {s.name!r} given to both {owner[s.name]!r} "
                                                 f"and {tenant!r}; a service belongs to one tenant")
                    owner[s.name] = tenant
                    s.tenant = tenant
        self.report("note", self.root, "tenants are enforced: a tunnel belongs to the tenant its client "
                    "certificate maps to (client_cn), and it may only offer and reach that tenant's services; KWIC "
                    "kept tenants apart only by the pipe names in each on-prem configuration")
        missing = [s.name for s in svcs if s.name not in owner]
        if missing:
            raise KaazingImportError(f"--tenant: service(s) {', '.join(missing)} belong to no tenant; with tenants "
                                     "every service needs one (add it to a --tenant NAME=... list)")
        for tenant in self.opts.tenants:
            if not NAME_PATTERN.fullmatch(tenant):
                raise KaazingImportError(f"--tenant {tenant!r}: use 1-64 characters from A-Z a-z 0-9 . _ -")
            out.table("tenant", array=True)
            out.key("name", tenant, f"--tenant {tenant}={','.join(self.opts.tenants[tenant])}")
            out.key("client_cn", [tenant], "the CN of this tenant's on-prem client certificates "
                    f"(`intercloud certs init DIR --onprem {tenant}` issues CN={tenant}); change it to yours")

    # -- output -------------------------------------------------------------------------------

    def _emit_services(self, out: _Toml, svcs: list[_Svc]) -> None:
        if not svcs:
            self.report("dropped", None, "no service was imported: the gateway would carry nothing")
        for s in svcs:
            out.blank()
            for c in s.comments:
                out.comment(c)
            out.table("service", array=True)
            out.key("name", s.name)
            if s.tenant is not None:
                out.key("tenant", s.tenant)
            out.key(s.direction, f"tcp://{_fmt_host(s.host)}:{s.port}")

    def _render(self, out: _Toml) -> str:
        head = [
            f"intercloud configuration imported from the KWIC file {self.file} by `intercloud import-kaazing`.",
            f"Role: {self.role}. Comments name the XML line and element each value came from.",
            "Validate with `intercloud check FILE`; see docs/kwic-migration.md.",
        ]
        if self.findings:
            head.append("")
            head.append("Import report (also printed by the importer):")
            for f in self.findings:
                head.append(f"  {f.level}: {f.file}:{f.line} {f.path}: {f.message}" if f.line
                            else f"  {f.level}: {f.path}: {f.message}")
        if self.to_create:
            head.append("")
            head.append("Files to create before starting:")
            grouped: dict[str, list[str]] = {}
            for path, cmd in self.to_create:
                if path not in grouped.setdefault(cmd, []):
                    grouped[cmd].append(path)
            for cmd, paths in grouped.items():
                head.append(f"  {cmd}   (creates {', '.join(paths)})")
        lines = []
        for h in head:
            for part in _wrap(h, 110):
                lines.append(f"# {part}".rstrip())
        return "\n".join(lines) + "\n" + out.text()


@dataclass
class _TlsFiles:
    cert: str
    key: str
    ca: str
    leaf: x509.Certificate | None
    converted: bool
    source: str = ""  # the keystore entry the certificate was converted from


def _parses(text: str) -> bool:
    try:
        parse_uri(text)
    except ValueError:
        return False
    return True


def _stem_name(path: Path) -> str:
    stem = path.stem
    for suffix in ("-gateway-config", "-config", "_config", ".config"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return _safe_name(stem)


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
            host, port = _split_authority(t, t)
        except ValueError as exc:
            raise KaazingImportError(f"--peer/--cluster-listen {text!r}: {exc}") from None
    if not host:
        raise KaazingImportError(f"--peer/--cluster-listen {text!r}: missing host; write HOST[:PORT]")
    return host, port if port is not None else HAZELCAST_PORT


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


# ---------------------------------------------------------------------------------------------
# Keystores
# ---------------------------------------------------------------------------------------------


def _read_password(path: Path, what: str) -> str:
    try:
        data = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KaazingImportError(f"{what}: file not found; give a file holding the password") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KaazingImportError(f"{what}: cannot read the password: {getattr(exc, 'strerror', None) or exc}") from None
    return data.splitlines()[0] if data.splitlines() else ""


@dataclass
class _Store:
    type: str
    path: Path
    keys: dict[str, object]  # alias -> pyjks entry or (key, chain) for PKCS12
    chains: dict[str, list[x509.Certificate]]
    trusted: list[tuple[str, x509.Certificate]]

    def decrypt(self, alias: str, password: str, source: str) -> tuple[object, list[x509.Certificate]]:
        entry = self.keys[alias]
        chain = self.chains[alias]
        if self.type == "pkcs12":
            return entry, chain
        import jks

        if not entry.is_decrypted():  # type: ignore[attr-defined]
            try:
                entry.decrypt(password)  # type: ignore[attr-defined]
            except (jks.util.DecryptionFailureException, ValueError):
                raise KaazingImportError(
                    f"{self.path}: cannot decrypt private key entry {alias!r} with the password from {source}; "
                    "the key has its own password: give it with --key-password-file FILE") from None
            except jks.util.KeystoreException as exc:
                raise KaazingImportError(f"{self.path}: private key entry {alias!r}: {exc}") from None
        try:
            key = serialization.load_der_private_key(entry.pkey_pkcs8, None)  # type: ignore[attr-defined]
        except (ValueError, TypeError) as exc:
            raise KaazingImportError(f"{self.path}: private key entry {alias!r} cannot be read: {exc}") from None
        return key, chain


def _detect_type(data: bytes) -> str | None:
    if data[:4] == b"\xfe\xed\xfe\xed":
        return "jks"
    if data[:4] == b"\xce\xce\xce\xce":
        return "jceks"
    if data[:1] == b"\x30":
        return "pkcs12"
    return None


def _load_store(path: Path, declared: str | None, password: str, kind: str, pw_source: str,
                node: Node | None, importer: _Importer) -> _Store:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KaazingImportError(f"{path}: cannot read the {kind}: {exc.strerror or exc}") from None
    actual = _detect_type(data)
    want = (declared or "").strip().lower() or None
    if want is not None and want not in ("jks", "jceks", "pkcs12"):
        where = f"{importer.source}:{node.line}: {node.path}/type" if node is not None else f"{path}"
        raise KaazingImportError(f"{where}: {kind} type {declared!r} is not supported; convert it to PKCS12, JKS "
                                 "or JCEKS (e.g. keytool -importkeystore -deststoretype pkcs12)")
    if actual is None:
        raise KaazingImportError(f"{path}: not a JKS, JCEKS or PKCS12 {kind} (unknown file format); give the "
                                 f"right file with --{kind} PATH")
    if want is not None and want != actual and node is not None:
        importer.report("note", node, f"<type>{declared}</type> but {path} is a {actual.upper()} file; "
                        f"read it as {actual.upper()}")
    if actual == "pkcs12":
        return _load_pkcs12(path, data, password, kind, pw_source)
    import jks

    try:
        ks = jks.KeyStore.loads(data, password, try_decrypt_keys=False)
    except jks.util.KeystoreSignatureException:
        raise KaazingImportError(f"{path}: wrong {kind} password (from {pw_source}): the {actual.upper()} integrity "
                                 f"check failed; give the right password with --{kind}-password-file FILE") from None
    except (jks.util.KeystoreException, ValueError, IndexError, Exception) as exc:  # noqa: BLE001 - corrupt files
        raise KaazingImportError(f"{path}: cannot read the {actual.upper()} {kind}: {exc}") from None
    keys: dict[str, object] = {}
    chains: dict[str, list[x509.Certificate]] = {}
    trusted: list[tuple[str, x509.Certificate]] = []
    for alias, entry in ks.private_keys.items():
        keys[alias] = entry
        chains[alias] = [_der_cert(der, path, alias) for _t, der in entry.cert_chain]
    for alias, entry in ks.certs.items():
        trusted.append((alias, _der_cert(entry.cert, path, alias)))
    for alias in ks.secret_keys:
        importer.report("ignored", node, f"{kind} secret key entry {alias!r} is not used by intercloud")
    return _Store(actual, path, keys, chains, trusted)


def _load_pkcs12(path: Path, data: bytes, password: str, kind: str, pw_source: str) -> _Store:
    from cryptography.hazmat.primitives.serialization import pkcs12

    try:
        p12 = pkcs12.load_pkcs12(data, password.encode() if password else None)
    except ValueError:
        raise KaazingImportError(f"{path}: cannot open the PKCS12 {kind} with the password from {pw_source}: wrong "
                                 f"password or not a PKCS12 file; give the right password with "
                                 f"--{kind}-password-file FILE") from None
    keys: dict[str, object] = {}
    chains: dict[str, list[x509.Certificate]] = {}
    trusted: list[tuple[str, x509.Certificate]] = []
    extra = [c.certificate for c in p12.additional_certs]
    if p12.key is not None and p12.cert is not None:
        alias = (p12.cert.friendly_name or b"key").decode(errors="replace")
        keys[alias] = p12.key
        chains[alias] = [p12.cert.certificate] + extra
    else:
        for c in p12.additional_certs:
            trusted.append(((c.friendly_name or b"cert").decode(errors="replace"), c.certificate))
    return _Store("pkcs12", path, keys, chains, trusted)


def _der_cert(der: bytes, path: Path, alias: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise KaazingImportError(f"{path}: entry {alias!r} holds a certificate that cannot be read: {exc}") from None


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _sha256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _cert_names(cert: x509.Certificate) -> list[str]:
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    return list(dict.fromkeys(n for n in names if "*" not in n))


# ---------------------------------------------------------------------------------------------
# TOML writer (only what the importer needs, with comments)
# ---------------------------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _wrap(text: str, width: int) -> list[str]:
    words = text.replace("\n", " ").split(" ")
    lines, cur = [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = "    " + w if text.startswith("  ") else w
        else:
            cur = f"{cur} {w}" if cur else w
    lines.append(cur)
    return lines


class _Toml:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def table(self, name: str, array: bool = False) -> None:
        if not array or (self.lines and not self.lines[-1].startswith("#")):
            self.blank()
        self.lines.append(f"[[{name}]]" if array else f"[{name}]")

    def comment(self, text: str) -> None:
        for part in _wrap(text, 110):
            self.lines.append(f"# {part}".rstrip())

    def comment_block(self, lines: list[str]) -> None:
        for line in lines:
            self.lines.append(f"# {line}".rstrip() if line else "")

    def key(self, key: str, value: object, comment: str | list[str] | None = None) -> None:
        if isinstance(comment, list):
            for c in comment:
                self.comment(c)
        elif comment:
            self.comment(comment)
        self.lines.append(f"{key} = {_toml_value(value)}")

    def text(self) -> str:
        return "\n".join(self.lines).strip("\n") + "\n"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_import(result: ImportResult, out: Path, *, force: bool = False) -> list[Path]:
    """Write the TOML to ``out`` and the converted PEM files next to it; return the paths written.

    Refuses to replace existing files unless ``force``.
    """
    if result.toml is None:
        return []
    out = Path(out)
    targets = [out] + [out.parent / name for name in result.files]
    if not force:
        existing = [p for p in targets if p.exists()]
        if existing:
            raise KaazingImportError(f"{', '.join(map(str, existing))} already exist(s); remove them or give --force "
                                     "to replace them")
    written = []
    for name, (data, mode) in result.files.items():
        path = out.parent / name
        try:
            _atomic_write(path, data, mode)
        except OSError as exc:
            raise KaazingImportError(f"cannot write {path}: {exc.strerror or exc}") from None
        written.append(path)
    try:
        _atomic_write(out, result.toml.encode("utf-8"), 0o644)
    except OSError as exc:
        raise KaazingImportError(f"cannot write {out}: {exc.strerror or exc}") from None
    return [out, *written]
