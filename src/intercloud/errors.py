"""Exceptions that cross layers."""

from __future__ import annotations


class StartupError(Exception):
    """The gateway cannot start (a port in use, an unreadable file): the message says what, where
    (config file and key) and what to do. Raised from inside task groups; ``intercloud run`` finds it
    in the exception group, logs it as ``gateway.failed`` and exits 1, without a traceback."""
