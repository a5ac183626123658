"""``intercloud run CONFIG``: run a gateway (cloud or on-prem, as the config says) until it stops."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from ..errors import StartupError
from .. import __version__, logs

log = logging.getLogger("intercloud")

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand to an ``argparse`` subparsers object and return its parser."""
    parser = subparsers.add_parser("run", help="run a gateway from its TOML config")
    parser.add_argument("config")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.set_defaults(func=run)
    return parser


def _tune_malloc() -> None:
    """uvloop's SSL transport allocates a ~256 KiB bytes per frame (the ciphertext it reads from the
    outgoing BIO). With glibc's dynamic thresholds the heap top can be trimmed (brk) after each free
    and faulted back in for the next frame, doubling the CPU per GB (docs/performance.md, P1)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD: frame-sized buffers come from the heap
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: keep up to 64 MiB of free heap
    except (OSError, AttributeError):  # not glibc
        pass


def _raise_nofile(role: str) -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every tunnel, stream and handshake is a descriptor, and
    the soft default (1024 on most systems) is what an idle flood exhausts first (issue 12). The tunnel
    listeners keep a reserve of it for established tunnels (transport/tls_server.py)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("open-files limit stays at %d (cannot raise it to the hard limit %d: %s)", soft, hard, exc,
                        extra={"event": "gateway.nofile", "soft": soft, "hard": hard})
            return
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    shown = "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
    if role == "cloud" and limit != resource.RLIM_INFINITY:
        from ..transport.tls_server import fd_reserve

        shown += f", of which the tunnel listeners leave {fd_reserve(limit)} to established tunnels"
    log.info("open-files limit %s (soft limit was %s)", shown, soft,
             extra={"event": "gateway.nofile", "limit": limit, "was": soft})


def run(args: argparse.Namespace) -> int:
    """Load ``args.config`` and run its gateway; return the exit status (2 bad config, 1 failed, 130 Ctrl-C)."""
    _tune_malloc()
    from ..config import ConfigError, load_config

    import signal

    # Until the gateway installs its own handler, a SIGHUP (e.g. an early `systemctl reload`) must not
    # kill the process; there is nothing to reload yet.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logs.setup(args.log_format, args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if config.gateway.role == "cloud":
        from ..cloud.server import CloudGateway as cls
    else:
        from ..onprem.dialer import OnpremGateway as cls
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    else:
        runner = uvloop.run
    log.info("intercloud %s starting: role %s, node %s, config %s", __version__, config.gateway.role,
             config.gateway.node_id, config.source, extra={"event": "gateway.starting"})
    _raise_nofile(config.gateway.role)

    async def go() -> int:
        asyncio.get_running_loop().set_exception_handler(_loop_exception)
        return await cls(config).run()

    try:
        return runner(go())
    except (StartupError, BaseExceptionGroup) as exc:
        fatal = _first_startup_error(exc)
        if fatal is not None:
            log.error("%s", fatal, extra={"event": "gateway.failed"})
            return 1
        raise
    except KeyboardInterrupt:
        return 130
    finally:
        logs.limited_summaries()  # how many rate-limited lines the last windows left out
        logs.flush()  # lines the loop had not written yet (logs.py writes once per iteration)


def _first_startup_error(exc: BaseException) -> StartupError | None:
    """Startup failures are raised as StartupError(message), possibly wrapped by a TaskGroup."""
    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _first_startup_error(sub)
            if found is not None:
                return found
    return None


def _loop_exception(loop, context) -> None:
    """One log line per failed TLS handshake or connection error, never a traceback."""
    exc = context.get("exception")
    if isinstance(exc, type) and issubclass(exc, BaseException):  # aiofastnet passes some as a class
        exc = exc()
    msg = context.get("message", "")
    transport = context.get("transport") or context.get("protocol")
    peer = None
    try:
        peer = transport.get_extra_info("peername") if transport is not None else None
    except Exception:  # noqa: BLE001
        pass
    where = f" from {peer[0]}:{peer[1]}" if peer else ""
    import ssl

    if isinstance(exc, (ConnectionError, TimeoutError)):
        # A peer that went away: whoever owns the connection (tunnel, dialer, TLS listener) logs it
        # with its context; uvloop does not report these at all, aiofastnet does.
        log.debug("connection%s failed: %s", where, exc, extra={"event": "connection.failed"})
        return
    if isinstance(exc, ssl.SSLError) or "SSL" in msg or "handshake" in msg.lower():
        reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc or msg
        log.warning("TLS handshake%s failed: %s; a client must present a certificate signed by tls.ca "
                    "and speak TLS 1.2+", where, reason,
                    extra={"event": "tunnel.tls_failed", "peer_addr": f"{peer[0]}:{peer[1]}" if peer else None,
                           "reason": str(reason)})
        return
    log.error("unexpected error%s: %s", where, msg, exc_info=exc, extra={"event": "internal.error"})
