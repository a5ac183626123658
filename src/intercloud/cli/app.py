"""The ``intercloud`` argument parser: one subcommand per module, dispatched through ``args.func``."""

from __future__ import annotations

import argparse

from .. import __version__
from . import certs, check, demo, import_kaazing, run, status

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="intercloud", description=(
        "Reach TCP services between a cloud and private data centers over outbound TLS WebSocket tunnels."))
    p.add_argument("--version", action="version", version=f"intercloud {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (run, demo, check, import_kaazing, certs, status):  # the order `intercloud --help` lists
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
