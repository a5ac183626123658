"""Values in a KWIC file: URIs, ``*.bind`` options, time intervals, and the names made from them."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Uri:
    """A KWIC URI: ``scheme://host:port/path``, ``tcp://@eth0:5551``, ``pipe://name``."""

    scheme: str
    host: str  # "" for an interface bind
    port: int | None
    path: str
    iface: str | None = None

    @property
    def secure(self) -> bool | None:
        """True for wss/wsn+ssl/https..., False for ws/wsn/http..., None for other schemes."""
        s = self.scheme
        if s in ("wss", "https") or s.endswith(("+ssl", "+tls")):
            return True
        if s in ("ws", "wsn", "wsx", "wse", "wsr", "http"):
            return False
        return None

    @property
    def is_ws(self) -> bool:
        return self.secure is not None


_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)")


def parse_uri(text: str) -> Uri:
    """Parse a KWIC URI; raises ValueError with the reason."""
    m = _URI.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a URI like tcp://HOST:PORT or wss://HOST/PATH")
    scheme, authority, path = m.group(1).lower(), m.group(2), m.group(3)
    iface = None
    host, port = split_authority(authority, text)
    if host.startswith("@"):
        iface, host = host[1:], ""
        if not iface:
            raise ValueError(f"missing interface name after '@' in {text!r}")
    return Uri(scheme, host, port, path, iface)


def split_authority(authority: str, text: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = authority[1:end], authority[end + 1:]
        port_text = rest[1:] if rest.startswith(":") else None
    elif authority.count(":") == 1:
        host, _, port_text = authority.partition(":")
    else:
        host, port_text = authority, None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"invalid port {port_text!r} in {text!r}")
        port = int(port_text)
    return host, port


def parse_bind(text: str) -> tuple[str | None, str | None, int]:
    """``tcp.bind`` values: ``443``, ``0.0.0.0:443``, ``[::]:443``, ``@eth0:443`` -> (host, iface, port)."""
    text = text.strip()
    if text.isdigit():
        return None, None, _port(text, text)
    host, port = split_authority(text, text)
    if port is None:
        raise ValueError(f"{text!r} has no port; write PORT or HOST:PORT")
    if host.startswith("@"):
        return None, host[1:], port
    return host or None, None, port


def _port(text: str, whole: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"port {value} out of range in {whole!r}")
    return value


_KWIC_UNITS = {
    "ms": 0.001, "msec": 0.001, "msecs": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}


def parse_kwic_duration(text: str) -> float:
    """KWIC time intervals: ``"55 seconds"``, ``"55s"``, ``"500 milliseconds"``, ``"2min"``.

    Bare numbers are seconds.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a time interval like '55 seconds'")
    unit = m.group(2).lower() or "s"
    if unit not in _KWIC_UNITS:
        raise ValueError(f"unknown time unit {m.group(2)!r} in {text!r}; use milliseconds, seconds, minutes or hours")
    return float(m.group(1)) * _KWIC_UNITS[unit]


def interface_address(name: str) -> str | None:
    """IPv4 address of network interface ``name`` on this machine (Linux), or None."""
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        return socket.inet_ntoa(packed[20:24])
    except (OSError, ImportError):
        return None


def fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def safe_name(text: str) -> str:
    """Make ``text`` a valid intercloud name (1-64 of A-Z a-z 0-9 . _ -)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name[:64].rstrip("-.")


def parses(text: str) -> bool:
    try:
        parse_uri(text)
    except ValueError:
        return False
    return True


def stem_name(path: Path) -> str:
    stem = path.stem
    for suffix in ("-gateway-config", "-config", "_config", ".config"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return safe_name(stem)
