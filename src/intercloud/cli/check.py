"""``intercloud check CONFIG``: validate a configuration file without starting a gateway.

Exit status 0 when the file is valid (warnings may still be printed), 2 when it is not, with
every problem listed as ``key.path: message``. Secrets never appear in the output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_config

__all__ = ["EXIT_INVALID", "EXIT_OK", "add_parser", "run"]

EXIT_OK = 0
EXIT_INVALID = 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``check`` subcommand to an ``argparse`` subparsers object and return its parser."""
    parser = subparsers.add_parser(
        "check",
        help="validate a configuration file without starting the gateway",
        description=(
            "Load and validate CONFIG as the gateway would at start-up: TOML syntax, every key, "
            "certificate files and the rules between keys. Prints every problem found with its "
            "key path. Exit status: 0 valid, 2 invalid."
        ),
    )
    parser.add_argument("config", metavar="CONFIG", type=Path, help="path of the gateway's TOML file")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Validate ``args.config``; print the verdict; return the exit status."""
    path: Path = args.config
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        _print_warnings(path, exc.warnings)
        return EXIT_INVALID
    n = len(cfg.services)
    print(f"{path}: valid (role {cfg.gateway.role}, node {cfg.gateway.node_id}, {n} service{'' if n == 1 else 's'})")
    _print_warnings(path, cfg.warnings)
    return EXIT_OK


def _print_warnings(path: Path, warnings: list[tuple[str, str]]) -> None:
    for key, message in warnings:
        print(f"{path}: warning: {key}: {message}", file=sys.stderr)
