"""The driver: read and check the XML, resolve properties, classify the services, choose the role,
run that role's mapper and put the report at the head of the TOML."""

from __future__ import annotations

import os
from pathlib import Path

from .classify import Kwic, choose_role, classify
from .cloud import map_cloud
from .common import find_ping, tls_mode
from .context import Context
from .onprem import map_onprem
from .report import ImportOptions, ImportResult, KaazingImportError
from .writer import Toml, wrap
from .xmltree import JAVA_PROXY_PROPS, KAAZING_NS, Node, parse_xml, resolve_properties


def import_kaazing(source: str | os.PathLike[str], options: ImportOptions | None = None) -> ImportResult:
    """Convert the KWIC gateway configuration at ``source``; see :mod:`intercloud.kwic`.

    Reads the XML and any keystore it names; writes nothing. Raises :class:`KaazingImportError`
    for bad input.
    """
    return _run(Context(Path(source), options or ImportOptions()))


def _run(ctx: Context) -> ImportResult:
    try:
        data = ctx.source.read_bytes()
    except FileNotFoundError:
        raise KaazingImportError(f"{ctx.source}: file not found; give the path of the KWIC "
                                 "gateway-config.xml") from None
    except IsADirectoryError:
        raise KaazingImportError(f"{ctx.source}: is a directory; give the path of gateway-config.xml") from None
    except OSError as exc:
        raise KaazingImportError(f"{ctx.source}: cannot read: {exc.strerror or exc}") from None
    root = parse_xml(ctx.source, data)
    ctx.root = root
    _check_root(ctx, root)
    _, used = resolve_properties(root, ctx.source, ctx.opts.properties)
    unused = sorted(n for n in ctx.opts.properties if n not in used and n.lower() not in JAVA_PROXY_PROPS)

    defaults = root.child("service-defaults")
    services = [classify(ctx, s, defaults) for s in root.all("service")]
    _report_top_level(ctx, root)
    role = choose_role(ctx, services, root)
    if role is None:
        ctx.report("dropped", root, "nothing to import: this file has no KWIC tunnel service (no reverse "
                   "proxy service with pipe:// and socks.mode reverse, no proxy service to or from ws(s)://); "
                   "no intercloud configuration was written")
        return ImportResult(ctx.source, None, None, ctx.findings, unused_properties=unused)
    ctx.role = role
    toml = _build(ctx, role, root, services)
    for name in unused:
        ctx.report("note", None, f"-D {name} was not used by any ${{{name}}} in the file")
    for key in ctx.opts.rewrite_hosts:
        if key not in ctx.used_rewrites:
            ctx.report("note", None, f"--rewrite-host {key}=... matched no host in the file")
    for port in ctx.opts.rewrite_ports:
        if str(port) not in ctx.used_rewrites:
            ctx.report("note", None, f"--rewrite-port {port}=... matched no port in the file")
    return ImportResult(ctx.source, role, toml, ctx.findings, ctx.files, ctx.to_create, unused)


def _check_root(ctx: Context, root: Node) -> None:
    if "log4j" in root.namespace or root.tag in ("log4j:configuration", "log4j", "configuration"):
        tag = root.tag if ":" in root.tag else f"log4j:{root.tag}"
        raise KaazingImportError(
            f"{ctx.source}:{root.line}: <{tag}> is a log4j configuration, not a KWIC gateway-config.xml; "
            "intercloud has no log4j file: choose the log format and level with `intercloud run CONFIG "
            "--log-format text|json --log-level debug|info|warning|error`")
    if root.tag != "gateway-config":
        raise KaazingImportError(
            f"{ctx.source}:{root.line}: the root element is <{root.tag}>, expected <gateway-config>; "
            "give the KWIC gateway configuration (conf/gateway-config.xml)")
    if root.namespace and not KAAZING_NS.match(root.namespace):
        ctx.report("note", root, f"namespace {root.namespace!r} is not a Kaazing gateway namespace; "
                   "imported as if it were http://xmlns.kaazing.org/2016/06/gateway")


def _report_top_level(ctx: Context, root: Node) -> None:
    for child in root.children:
        if child.tag in ("properties", "service", "service-defaults", "security", "cluster"):
            continue
        if child.tag == "network":
            ctx.report("ignored", child, "<network> address mappings are not imported; intercloud listens "
                       "on the addresses in the TOML and on-prem gateways dial the URLs in tunnel.connect, so "
                       "write the public names there (or use --rewrite-host)")
        elif child.tag in ("management", "jmx", "snmp"):
            ctx.report("ignored", child, "management settings are not imported; use the admin endpoint "
                       "(gateway.admin): /healthz, /readyz, /api/status and Prometheus /metrics")
        else:
            ctx.report("ignored", child, f"<{child.tag}> is not known to the importer and was skipped; "
                       "check whether it matters for your deployment")
    defaults = root.child("service-defaults")
    if defaults is not None:
        for child in defaults.children:
            if child.tag not in ("accept-options", "connect-options"):
                ctx.report("ignored", child, f"<service-defaults><{child.tag}> has no intercloud equivalent "
                           "(intercloud carries TCP only)")
    security = root.child("security")
    if security is not None:
        for child in security.children:
            if child.tag == "realm":
                ctx.report("ignored", child, "authentication realms are not imported: on-prem gateways "
                           "authenticate with TLS client certificates, and clients of a service are not "
                           "authenticated by intercloud (use the application's own authentication)")
            elif child.tag not in ("keystore", "truststore"):
                ctx.report("ignored", child, f"<security><{child.tag}> is not known to the importer")


def _build(ctx: Context, role: str, root: Node, services: list[Kwic]) -> str:
    mine = [s for s in services if s.kind.startswith(role if role == "cloud" else "onprem")
            or (role == "cloud" and s.kind == "balancer")]
    find_ping(ctx, mine)
    tls_plain = tls_mode(ctx, role, mine)
    out = Toml()
    if role == "cloud":
        map_cloud(ctx, root, mine, out, tls_plain)
    else:
        map_onprem(ctx, root, mine, out, tls_plain)
    return _render(ctx, out)


def _render(ctx: Context, out: Toml) -> str:
    head = [
        f"intercloud configuration imported from the KWIC file {ctx.file} by `intercloud import-kaazing`.",
        f"Role: {ctx.role}. Comments name the XML line and element each value came from.",
        "Validate with `intercloud check FILE`; see docs/kwic-migration.md.",
    ]
    if ctx.findings:
        head.append("")
        head.append("Import report (also printed by the importer):")
        for f in ctx.findings:
            head.append(f"  {f.level}: {f.file}:{f.line} {f.path}: {f.message}" if f.line
                        else f"  {f.level}: {f.path}: {f.message}")
    if ctx.to_create:
        head.append("")
        head.append("Files to create before starting:")
        grouped: dict[str, list[str]] = {}
        for path, cmd in ctx.to_create:
            if path not in grouped.setdefault(cmd, []):
                grouped[cmd].append(path)
        for cmd, paths in grouped.items():
            head.append(f"  {cmd}   (creates {', '.join(paths)})")
    lines = []
    for h in head:
        for part in wrap(h, 110):
            lines.append(f"# {part}".rstrip())
    return "\n".join(lines) + "\n" + out.text()
