"""``intercloud certs init DIR``: create a private CA and gateway certificates for a deployment.

    intercloud certs init ./pki --cloud cloud1,cloud2 --onprem dc1 --san gw.example.com

writes ``ca.pem``/``ca.key`` (unless DIR already has a CA, which is then reused) and
``NAME.pem``/``NAME.key`` per gateway, and prints each file written, one per line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..certs import DEFAULT_LEAF_DAYS, CertError, init_certs

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``certs`` subcommand (with ``init``) to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "certs",
        help="create certificates for gateways",
        description="Create and manage the certificates that gateways use for mutual TLS.",
    )
    commands = parser.add_subparsers(dest="certs_command", metavar="COMMAND", required=True)
    init = commands.add_parser(
        "init",
        help="create a CA and certificates for cloud and on-prem gateways",
        description=(
            "Create DIR/ca.pem and DIR/ca.key (or reuse the CA already in DIR) and a certificate "
            "and key per gateway: DIR/NAME.pem, DIR/NAME.key. Cloud certificates name NAME, every "
            "--san, localhost, 127.0.0.1 and ::1 and serve as TLS server and client; on-prem "
            "certificates name NAME and are TLS client only. Keys are ECDSA P-256, written with "
            "mode 0600. Existing NAME files are replaced. NAME is the gateway's identity: use its "
            "gateway.node_id (an on-prem gateway without node_id takes its certificate's NAME)."
        ),
    )
    init.add_argument("directory", metavar="DIR", type=Path, help="directory for the files (created if missing)")
    init.add_argument(
        "--cloud",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help="cloud gateway (member) names, their node ids; repeat or separate with commas",
    )
    init.add_argument(
        "--onprem",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help="on-prem gateway names, their node ids; repeat or separate with commas",
    )
    init.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name or IP address for every cloud certificate (e.g. the load balancer's name); repeatable",
    )
    init.add_argument(
        "--days",
        type=int,
        default=DEFAULT_LEAF_DAYS,
        metavar="N",
        help=f"validity of the gateway certificates in days (default {DEFAULT_LEAF_DAYS})",
    )
    init.add_argument("--tenant", metavar="NAME", help="tenant of the on-prem certificates: written as O=NAME and as the URI SAN "
                      "urn:intercloud:tenant:NAME, which a cloud [[tenant]] maps with client_san")
    parser.set_defaults(func=run)
    return parser


def _split(values: Iterable[str]) -> list[str]:
    """['a,b', 'c'] -> ['a', 'b', 'c'], dropping empty entries from stray commas."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    """Run ``intercloud certs COMMAND``; return the exit status (0 ok, 1 failed)."""
    if args.certs_command != "init":  # pragma: no cover - argparse only offers "init"
        print(f"intercloud certs: unknown command {args.certs_command!r}", file=sys.stderr)
        return 2
    try:
        written = init_certs(
            args.directory,
            cloud=_split(args.cloud),
            onprem=_split(args.onprem),
            sans=_split(args.san),
            days=args.days,
            tenant=args.tenant,
        )
    except CertError as exc:
        print(f"intercloud certs init: {exc}", file=sys.stderr)
        return 1
    if not written:
        print(f"{args.directory}: CA already present and no --cloud/--onprem given; nothing written", file=sys.stderr)
    for path in written:
        print(path)
    return 0
