"""``intercloud import-kaazing FILE.xml``: convert a KWIC gateway-config.xml into intercloud's TOML.

    intercloud import-kaazing cloud-config.xml -o cloud1.toml -D cloud-node-hostname=cloud1.example.com

Writes the TOML (with comments naming the XML line each value came from) and, when the XML has a
``<security>`` keystore/truststore, the converted PEM files next to it; prints one line per element
that was not mapped one to one, then validates the result as ``intercloud check`` would.

Exit status:

* 0: imported; every element was mapped, or superseded/ignored with a reason printed (notes and
  warnings do not change the status);
* 1: imported, but something that carries traffic could not be mapped (lines marked ``dropped``),
  or the file holds nothing intercloud can run (an echo server), or the result does not validate;
* 2: bad input, nothing written: malformed XML, an unknown ``${property}``, a missing keystore or
  password file, a wrong password, bad options, or an output file that already exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_config
from ..kwic import (
    EXIT_BAD_INPUT,
    EXIT_DROPPED,
    EXIT_OK,
    ImportOptions,
    KaazingImportError,
    import_kaazing,
    parse_gateway_opts,
    write_import,
)

__all__ = ["add_parser", "run"]


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def _port_pair(text: str) -> tuple[int, int]:
    old, sep, new = text.partition("=")
    if not sep or not old.strip().isdigit() or not new.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected OLD=NEW port numbers, got {text!r}")
    a, b = int(old), int(new)
    if not (0 < a <= 65535 and 0 <= b <= 65535):
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return a, b


def _tenant(text: str) -> tuple[str, list[str]]:
    name, value = _name_value(text)
    services = [s.strip() for s in value.split(",") if s.strip()]
    if not services:
        raise argparse.ArgumentTypeError(f"expected NAME=SERVICE[,SERVICE...], got {text!r}")
    return name, services


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``import-kaazing`` subcommand to an ``argparse`` subparsers object and return its parser."""
    parser = subparsers.add_parser(
        "import-kaazing",
        help="convert a Kaazing KWIC gateway-config.xml into an intercloud TOML config",
        description=(
            "Convert one half of a KWIC tunnel (the cloud or the on-prem gateway-config.xml) into an "
            "intercloud configuration. ${property} references are resolved from <properties> and -D; "
            "JKS, JCEKS and PKCS12 keystores are converted to PEM files next to the output. Every "
            "element that is not mapped one to one is reported with its line and element path. "
            "Exit status: 0 imported (notes may be printed), 1 something that carries traffic could "
            "not be mapped (lines marked 'dropped'), 2 bad input (nothing written). "
            "See docs/kwic-migration.md."
        ),
    )
    parser.add_argument("xml", metavar="FILE.xml", type=Path, help="the KWIC gateway configuration")
    parser.add_argument("-o", "--output", metavar="OUT.toml", type=Path,
                        help="write the TOML here (and converted PEM files next to it); default: standard output")
    parser.add_argument("-D", dest="define", action="append", default=[], type=_name_value, metavar="NAME=VALUE",
                        help="set a property, as GATEWAY_OPTS=-DNAME=VALUE did for KWIC; repeatable. "
                             "-D http.proxyHost=H -D http.proxyPort=P become tunnel.proxy")
    parser.add_argument("--gateway-opts", metavar="STRING",
                        help="a GATEWAY_OPTS value copied from docker-compose.yml; its -D options are used")
    parser.add_argument("--role", choices=("cloud", "onprem"),
                        help="import only this half of a file that has services of both")
    parser.add_argument("--node-id", metavar="ID",
                        help="gateway.node_id, a name of the gateway's certificate (default: cloud: the host of the "
                             "tunnel URL; on-prem: none, so it is the certificate's first name, its CN)")
    parser.add_argument("--keystore", type=Path, metavar="FILE", help="use this keystore instead of <keystore><file>")
    parser.add_argument("--truststore", type=Path, metavar="FILE",
                        help="use this truststore instead of <truststore><file>")
    parser.add_argument("--keystore-password-file", type=Path, metavar="FILE",
                        help="file holding the keystore password (default: <keystore><password-file>)")
    parser.add_argument("--truststore-password-file", type=Path, metavar="FILE",
                        help="file holding the truststore password (default: <truststore><password-file>)")
    parser.add_argument("--key-password-file", type=Path, metavar="FILE",
                        help="file holding the private key entry's password if it differs from the keystore's")
    parser.add_argument("--key-alias", metavar="ALIAS", help="private key entry to use when the keystore has several")
    parser.add_argument("--pki", metavar="DIR", default="pki",
                        help="directory (relative to the output) of the PEM files to create when the XML has no "
                             "keystore (default: pki)")
    parser.add_argument("--insecure-ws", action="store_true",
                        help="keep KWIC's plain ws:// tunnels (tls.insecure = true) instead of importing them "
                             "as wss://")
    parser.add_argument("--rewrite-host", action="append", default=[], type=_name_value, metavar="NAME=HOST",
                        help="replace host NAME (or interface @eth0) by HOST everywhere; repeatable")
    parser.add_argument("--rewrite-port", action="append", default=[], type=_port_pair, metavar="OLD=NEW",
                        help="replace port OLD by NEW everywhere (like docker-compose ports:); repeatable")
    parser.add_argument("--admin", metavar="HOST:PORT", help="gateway.admin: health, status and metrics endpoint")
    parser.add_argument("--peer", action="append", default=[], metavar="HOST[:PORT]",
                        help="another cloud member (its cluster address, default port 5941), as "
                             "<cluster><connect>; repeatable")
    parser.add_argument("--cluster-listen", metavar="HOST:PORT",
                        help="where this member accepts peer links, as <cluster><accept>")
    parser.add_argument("--tenant", action="append", default=[], type=_tenant, metavar="NAME=SERVICE[,SERVICE]",
                        help="cloud: a tenant and the services it owns (intercloud or KWIC names); repeatable")
    parser.add_argument("--resolve-interfaces", action="store_true",
                        help="bind tcp://@eth0:PORT to eth0's address on this machine instead of 0.0.0.0")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.set_defaults(func=run)
    return parser


def _options(args: argparse.Namespace) -> ImportOptions:
    props: dict[str, str] = {}
    if args.gateway_opts:
        gw_props, other = parse_gateway_opts(args.gateway_opts)
        props.update(gw_props)
        if other:
            print(f"intercloud import-kaazing: note: --gateway-opts: ignored {' '.join(other)} (JVM options)",
                  file=sys.stderr)
    props.update(dict(args.define))
    tenants: dict[str, list[str]] = {}
    for name, services in args.tenant:
        tenants.setdefault(name, []).extend(services)
    return ImportOptions(
        properties=props,
        out=args.output,
        keystore=args.keystore,
        truststore=args.truststore,
        keystore_password_file=args.keystore_password_file,
        truststore_password_file=args.truststore_password_file,
        key_password_file=args.key_password_file,
        key_alias=args.key_alias,
        role=args.role,
        node_id=args.node_id,
        pki=args.pki,
        insecure_ws=args.insecure_ws,
        rewrite_hosts=dict(args.rewrite_host),
        rewrite_ports=dict(args.rewrite_port),
        admin=args.admin,
        peers=list(args.peer),
        cluster_listen=args.cluster_listen,
        tenants=tenants,
        resolve_interfaces=args.resolve_interfaces,
    )


def run(args: argparse.Namespace) -> int:
    """Import ``args.xml``; print the report to stderr; return the exit status (see module docstring)."""
    err = sys.stderr
    try:
        result = import_kaazing(args.xml, _options(args))
        written = write_import(result, args.output, force=args.force) if args.output is not None else []
    except KaazingImportError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=err)
        print("intercloud import-kaazing: nothing written", file=err)
        return EXIT_BAD_INPUT
    for finding in result.findings:
        print(str(finding), file=err)
    if result.toml is None:
        print(f"{args.xml}: nothing to import, nothing written", file=err)
        return EXIT_DROPPED
    if args.output is None:
        sys.stdout.write(result.toml)
    else:
        for path in written:
            print(f"wrote {path}", file=err)
    status = result.exit_code
    if result.to_create:
        print("before starting, create the files the configuration names:", file=err)
        for cmd, paths in _by_command(result.to_create).items():
            print(f"  {cmd}   # {', '.join(paths)}", file=err)
    if args.output is not None:
        status = max(status, _validate(args.output, {p for p, _ in result.to_create}))
    dropped = len(result.dropped)
    if dropped:
        print(f"{args.xml}: {dropped} element(s) that carry traffic could not be mapped (marked 'dropped'); "
              "see docs/kwic-migration.md", file=err)
    elif status == EXIT_OK:
        role = "a cloud" if result.role == "cloud" else "an on-prem"
        print(f"{args.xml}: imported as {role} gateway; check it with: intercloud check {args.output or 'OUT.toml'}",
              file=err)
    return status


def _by_command(to_create: list[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for path, cmd in to_create:
        if path not in grouped.setdefault(cmd, []):
            grouped[cmd].append(path)
    return grouped


def _validate(out: Path, to_create: set[str]) -> int:
    """Load the written TOML as the gateway would; files still to be created are not problems."""
    try:
        load_config(out)
    except ConfigError as exc:
        base = out.absolute().parent
        pending = {str((base / p).resolve()) for p in to_create}
        real = [(k, m) for k, m in exc.problems
                if not (m.startswith("file not found:") and str(Path(m.split(":", 1)[1].strip()).resolve()) in pending)]
        if real:
            print(f"{out}: the imported configuration does not validate:", file=sys.stderr)
            for key, message in real:
                print(f"  {key}: {message}" if key else f"  {message}", file=sys.stderr)
            return EXIT_DROPPED
    return EXIT_OK
