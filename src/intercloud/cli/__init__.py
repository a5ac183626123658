"""Command line: ``intercloud run|demo|check|import-kaazing|certs|status``. ``main(argv)`` returns the exit code.

One module per command, each with ``add_parser(subparsers)`` (which sets ``func``) and ``run(args)``;
``app`` builds the parser and dispatches. The gateway itself never imports this package.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """The ``intercloud`` console script and ``python -m intercloud``."""
    # Imported here so that ``from intercloud.cli.status import render`` does not load every command.
    from .app import main as app_main

    return app_main(argv)
