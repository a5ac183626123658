"""TCP options of a tunnel's socket, and what the kernel knows about its connection (TCP_INFO).

Every tunnel and peer link, dialed or accepted, gets two options when its WebSocket is up
(``Tunnel.on_ws_connected``; docs/configuration.md ``[tunnel]``):

* ``TCP_CONGESTION`` = ``tunnel.congestion`` (default ``bbr``): BBR keeps its rate under random loss,
  where loss-based cubic halves its window at every drop. Where the kernel refuses the algorithm (not
  loaded: ENOENT; not permitted: EPERM, a process without CAP_NET_ADMIN may only pick one of
  ``net.ipv4.tcp_allowed_congestion_control``) the socket keeps the kernel's default, and one warning
  per process and (algorithm, reason) says so, not one per tunnel. ``"system"`` leaves it alone.
* ``TCP_NOTSENT_LOWAT`` = 128 KiB at first, then sized to the rate up to ``tunnel.notsent_lowat`` (default
  1 MiB; tunnel/turns.py): the kernel takes no more than this
  many bytes that are not yet sent, so what waits to go out waits in the gateway, where a frame sent
  later (an interactive stream's) is not queued behind megabytes of bulk data already in the socket.
  Bytes in flight (sent, not yet acknowledged) are not limited: throughput is not. 0 leaves it alone.

:func:`tcp_info` reads the connection's state for the status page and the metrics: one getsockopt of
``struct tcp_info`` (linux/tcp.h; the fields below exist since Linux 4.19, older kernels return a
shorter struct and the later fields are left out), the algorithm in use and the send queue. Cheap:
three system calls, no allocation beyond the result. Sockets that are not TCP (a Unix socket in tests)
are skipped silently.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from pathlib import Path

log = logging.getLogger("intercloud.tunnel")

__all__ = ["SYSTEM", "allowed", "apply", "available", "in_use_for", "is_tcp", "kernel_default", "pacing_rate",
           "set_notsent_lowat", "tcp_info"]

#: ``tunnel.congestion`` value that leaves the kernel's default algorithm alone.
SYSTEM = "system"

# Linux values; the socket module lacks some on some builds (TCP_NOTSENT_LOWAT before Python 3.12).
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
TCP_INFO = getattr(socket, "TCP_INFO", 11)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
SIOCOUTQ = 0x5411  # ioctl: bytes in the send queue, unsent and unacknowledged (linux/sockios.h)
_CA_NAME_MAX = 16  # TCP_CA_NAME_MAX, with the NUL

_SYSCTL = Path("/proc/sys/net/ipv4")
AVAILABLE = _SYSCTL / "tcp_available_congestion_control"  # registered (loaded) algorithms
ALLOWED = _SYSCTL / "tcp_allowed_congestion_control"  # what a process without CAP_NET_ADMIN may pick
DEFAULT = _SYSCTL / "tcp_congestion_control"  # this network namespace's default

#: ``struct tcp_info`` fields read (name, struct format, byte offset), checked against linux/tcp.h by
#: tests/unit/test_sockopts.py. Times are in microseconds, rates in bytes per second.
TCP_INFO_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("state", "B", 0),
    ("ca_state", "B", 1),
    ("retransmits", "B", 2),  # consecutive retransmissions of the oldest unacked segment (RTO backoff)
    ("rto", "I", 8),
    ("snd_mss", "I", 16),
    ("rcv_mss", "I", 20),
    ("unacked", "I", 24),
    ("lost", "I", 32),
    ("retrans", "I", 36),  # segments retransmitted and not yet acknowledged
    ("rtt", "I", 68),  # smoothed RTT
    ("rttvar", "I", 72),
    ("snd_ssthresh", "I", 76),
    ("snd_cwnd", "I", 80),  # congestion window, in segments
    ("total_retrans", "I", 100),  # segments retransmitted over the connection's life
    ("pacing_rate", "Q", 104),
    ("bytes_acked", "Q", 120),
    ("notsent_bytes", "I", 144),
    ("min_rtt", "I", 148),
    ("delivery_rate", "Q", 160),
    ("busy_time", "Q", 168),
    ("rwnd_limited", "Q", 176),
    ("sndbuf_limited", "Q", 184),
    ("bytes_sent", "Q", 200),
    ("bytes_retrans", "Q", 208),
)
_TCP_INFO_MIN = 104  # through total_retrans (Linux 2.6): less than this is not a tcp_info
_READERS = tuple((name, struct.Struct("=" + fmt), off) for name, fmt, off in TCP_INFO_FIELDS)
_INT = struct.Struct("=i")

# (what, algorithm, errno) already warned about in this process: one line each, not one per tunnel
_warned: set[tuple[str, str, int]] = set()
# configured algorithm -> what the last socket we set got (the configured one or the kernel's default)
_in_use: dict[str, str] = {}


def is_tcp(sock) -> bool:
    """True for a TCP socket (IPv4 or IPv6), the ones these options mean something on."""
    try:
        return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
    except AttributeError:
        return False


def _get_congestion(sock) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, _CA_NAME_MAX).split(b"\0", 1)[0].decode("ascii",
                                                                                                       "replace")


def _read(path: Path) -> list[str] | None:
    try:
        return path.read_text().split()
    except OSError:
        return None


def available() -> list[str] | None:
    """The algorithms this kernel has loaded (None where /proc does not say)."""
    return _read(AVAILABLE)


def allowed() -> list[str] | None:
    """The algorithms a process without CAP_NET_ADMIN may pick (None where /proc does not say)."""
    return _read(ALLOWED)


def kernel_default() -> str | None:
    """This network namespace's default algorithm (None where /proc does not say)."""
    found = _read(DEFAULT)
    return found[0] if found else None


def _set_congestion(sock, name: str) -> tuple[str, int]:
    """Set ``name`` on ``sock``: (the algorithm the socket has now, 0 or the errno that refused it)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, name.encode("ascii"))
        code = 0
    except OSError as exc:
        code = exc.errno or errno.EINVAL
    try:
        now = _get_congestion(sock)
    except OSError:
        now = name if code == 0 else "?"
    _in_use[name] = now
    return now, code


def _advice(name: str, code: int) -> tuple[str, str]:
    """(what happened, what to do) when the kernel refused algorithm ``name`` with ``code``."""
    keep = f'or set congestion = "{SYSTEM}" to keep the kernel\'s default and silence this warning'
    if code == errno.ENOENT:
        return ("this kernel has no such algorithm loaded (net.ipv4.tcp_available_congestion_control: "
                f"{' '.join(available() or ['?'])})",
                f"load its module (modprobe tcp_{name}; a gateway with CAP_NET_ADMIN loads it itself), {keep}")
    if code == errno.EPERM:
        names = " ".join(allowed() or ["?"])
        return ("this process may not use it: without CAP_NET_ADMIN a process may only pick an algorithm of "
                f"net.ipv4.tcp_allowed_congestion_control ({names})",
                f'add it there (sysctl -w net.ipv4.tcp_allowed_congestion_control="{names} {name}", in the '
                f"host's initial network namespace), or give the gateway CAP_NET_ADMIN, {keep}")
    return (f"the kernel refused it ({errno.errorcode.get(code, code)}: {os.strerror(code)})", keep.removeprefix("or "))


def _warn_once(what: str, name: str, code: int, msg: str, *args, **fields) -> None:
    key = (what, name, code)
    if key in _warned:
        return
    _warned.add(key)
    log.warning(msg, *args, extra={"event": f"tunnel.{what}_fallback", "errno": errno.errorcode.get(code, code),
                                   **fields})


def apply(sock, congestion: str, notsent_lowat: int, *, source: object = None) -> list[str]:
    """Set ``tunnel.congestion`` and ``tunnel.notsent_lowat`` on a connected tunnel socket.

    ``congestion``: an algorithm name, or ``"system"``/``""`` to leave the kernel's default;
    ``notsent_lowat``: bytes, 0 to leave the kernel's setting. A refusal leaves the socket as the kernel
    made it and is logged once per process (per algorithm and reason); ``source`` (the config file) is
    named in that line. Returns the problems met on this socket (empty when all went as configured);
    ``sock`` may be None or not a TCP socket: nothing is done."""
    if sock is None or not is_tcp(sock):
        return []
    problems = []
    where = f"{source}: " if source else ""
    if congestion and congestion != SYSTEM:
        now, code = _set_congestion(sock, congestion)
        if code:
            what, fix = _advice(congestion, code)
            text = (f'{where}[tunnel] congestion = "{congestion}": cannot use it on tunnel sockets: {what}; '
                    f'tunnels and peer links use the kernel\'s default "{now}" instead. Fix: {fix}')
            problems.append(text)
            _warn_once("congestion", congestion, code, "%s (logged once per process)", text,
                       configured=congestion, algorithm=now)
    if notsent_lowat:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, notsent_lowat)
        except OSError as exc:
            code = exc.errno or errno.EINVAL
            text = (f"{where}[tunnel] notsent_lowat = {notsent_lowat}: cannot set TCP_NOTSENT_LOWAT on tunnel "
                    f"sockets ({os.strerror(code)}; it needs Linux 3.12 or later); the kernel's own limit "
                    "(net.ipv4.tcp_notsent_lowat) applies. Fix: set notsent_lowat = 0 to silence this warning")
            problems.append(text)
            _warn_once("notsent_lowat", str(notsent_lowat), code, "%s (logged once per process)", text)
    return problems


def in_use_for(congestion: str) -> str | None:
    """The algorithm new tunnel sockets get with ``tunnel.congestion = congestion``: the configured one
    or, where the kernel refuses it, its default. What the last tunnel got, else found out on a fresh,
    unconnected socket (no log line: the first tunnel logs the refusal). None where it cannot be told."""
    if not congestion or congestion == SYSTEM:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                return _get_congestion(probe)
        except OSError:
            return kernel_default()
    found = _in_use.get(congestion)
    if found is not None:
        return found
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            return _set_congestion(probe, congestion)[0]
    except OSError:
        return None


def tcp_info(sock) -> dict | None:
    """The connection's ``struct tcp_info`` as a dict (fields as in TCP_INFO_FIELDS, without the
    ``tcpi_`` prefix; fields the kernel's struct is too short for are left out), plus ``congestion``
    (the algorithm in use), ``notsent_lowat`` (the socket's option; 0 means the kernel's default) and
    ``send_queue`` (bytes not yet acknowledged by the peer, unsent ones included). None for a socket that
    is closed or not TCP."""
    if sock is None or not is_tcp(sock):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 256)
    except OSError:
        return None  # closed meanwhile
    n = len(raw)
    if n < _TCP_INFO_MIN:
        return None
    info: dict = {name: reader.unpack_from(raw, off)[0] for name, reader, off in _READERS if off + reader.size <= n}
    try:
        info["congestion"] = _get_congestion(sock)
    except OSError:
        info["congestion"] = None
    try:
        lowat = sock.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT)
        info["notsent_lowat"] = 0 if lowat in (-1, 0xFFFFFFFF) else lowat  # UINT_MAX: not set
    except OSError:
        info["notsent_lowat"] = None
    try:
        info["send_queue"] = _INT.unpack(fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        info["send_queue"] = None
    return info


_PACING_RATE = struct.Struct("=Q")
_PACING_AT = dict((name, off) for name, _fmt, off in TCP_INFO_FIELDS)["pacing_rate"]


def pacing_rate(sock) -> int:
    """The rate the kernel sends this connection at, bytes per second (``tcpi_pacing_rate``: BBR's
    bandwidth estimate times its gain; for cubic about cwnd / RTT), or 0 when unknown. One system
    call (the tunnel sizes its queues from it, Tunnel.size_queues)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _PACING_AT + 8)
    except (OSError, AttributeError):
        return 0
    if len(raw) < _PACING_AT + 8:
        return 0
    rate = _PACING_RATE.unpack_from(raw, _PACING_AT)[0]
    return 0 if rate == (1 << 64) - 1 else rate  # ~0: not computed yet


def set_notsent_lowat(sock, n: int) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, n)
    except OSError:
        pass  # closed meanwhile
