"""``intercloud certs init DIR``: create a private CA and gateway certificates for a deployment.

    intercloud certs init ./pki --cloud cloud1,cloud2 --onprem dc1 --san gw.example.com

writes ``ca.pem``/``ca.key`` (unless DIR already has a CA, which is then reused), an empty ``crl.pem``
and ``NAME.pem``/``NAME.key`` per gateway, and prints each file written, one per line.

    intercloud certs revoke ./pki dc2     # adds dc2.pem to pki/crl.pem; SIGHUP the gateways then
    intercloud certs crl ./pki            # re-signs pki/crl.pem before its nextUpdate
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..certs import DEFAULT_CRL_DAYS, DEFAULT_LEAF_DAYS, CertError, init_certs, load_ca, revoke, write_crl

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
    rev = commands.add_parser(
        "revoke",
        help="revoke a certificate that certs init made: add it to DIR/crl.pem",
        description=(
            "Revoke DIR/NAME.pem: add its serial to DIR/crl.pem (earlier entries are kept, the CRL number "
            "goes up) and sign the CRL with the CA key in DIR. Gateways whose tls.crl or cluster.crl names "
            "that file refuse the certificate once they re-read it (SIGHUP), and close its live tunnels. "
            "Revoking a certificate twice changes nothing but the CRL's dates."
        ),
    )
    rev.add_argument("directory", metavar="DIR", type=Path, help="the directory of certs init (with ca.key)")
    rev.add_argument("name", metavar="NAME", help="the certificate's name: DIR/NAME.pem")
    crl = commands.add_parser(
        "crl",
        help="re-sign DIR/crl.pem with a fresh nextUpdate (no new entries)",
        description="Sign DIR/crl.pem anew with the same entries, so that gateways do not warn about a stale "
                    "CRL; run it (or certs revoke) before the CRL's nextUpdate, then SIGHUP the gateways.",
    )
    crl.add_argument("directory", metavar="DIR", type=Path, help="the directory of certs init (with ca.key)")
    for sub in (rev, crl):
        sub.add_argument("--days", type=int, default=DEFAULT_CRL_DAYS, metavar="N",
                         help=f"the CRL's nextUpdate, in days from now (default {DEFAULT_CRL_DAYS})")
    parser.set_defaults(func=run)
    return parser


def _split(values: Iterable[str]) -> list[str]:
    """['a,b', 'c'] -> ['a', 'b', 'c'], dropping empty entries from stray commas."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    """Run ``intercloud certs COMMAND``; return the exit status (0 ok, 1 failed)."""
    if args.certs_command == "revoke":
        return _revoke(args)
    if args.certs_command == "crl":
        return _crl(args)
    if args.certs_command != "init":  # pragma: no cover - argparse only offers these
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


def _revoke(args: argparse.Namespace) -> int:
    try:
        done = revoke(args.directory, args.name, days=args.days)
    except CertError as exc:
        print(f"intercloud certs revoke: {exc}", file=sys.stderr)
        return 1
    if done.already:
        print(f"{done.subject} (serial {done.serial:#x}) was already revoked on {done.revoked_at:%Y-%m-%d %H:%M} UTC; "
              f"{done.crl} re-signed", file=sys.stderr)
    else:
        print(f"{done.subject} (serial {done.serial:#x}) revoked; send SIGHUP to the gateways that use {done.crl}",
              file=sys.stderr)
    print(done.crl)
    return 0


def _crl(args: argparse.Namespace) -> int:
    try:
        ca = load_ca(args.directory)
        if ca is None:
            raise CertError(f"{args.directory} has no CA (ca.pem and ca.key); give the directory of certs init")
        path = write_crl(args.directory, ca, days=args.days)
    except CertError as exc:
        print(f"intercloud certs crl: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
