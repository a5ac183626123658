"""Annotated scalar types for the keys of the section models: names, durations, sizes, bounded
integers and file paths, each with a message in readable units when a value is out of bounds.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import PlainValidator, ValidationInfo

from .units import format_duration, format_size, parse_duration, parse_size
from .values import _check_host, _kind, invalid

__all__ = [
    "NAME_PATTERN",
    "BoundedInt",
    "Cidr",
    "Congestion",
    "ConfigPath",
    "Duration",
    "GiB",
    "KiB",
    "MiB",
    "Name",
    "ServerName",
    "Size",
    "default_node_id",
]

#: Names of nodes and services: safe as file names, DNS labels, metric label values and log words.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ -"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


# ---------------------------------------------------------------------------------------------
# Scalar validators: names, durations, sizes, bounded integers, paths
# ---------------------------------------------------------------------------------------------


def _validate_name(value: object) -> str:
    if not isinstance(value, str):
        raise invalid(f"expected a string, got a {_kind(value)}")
    if not NAME_PATTERN.fullmatch(value):
        raise invalid(f"invalid name {value!r}: use {_NAME_RULE}")
    return value


Name = Annotated[str, PlainValidator(_validate_name)]


def _validate_server_name(value: object) -> str:
    if not isinstance(value, str):
        raise invalid(f"expected a host name string, got a {_kind(value)}")
    try:
        return _check_host(value.strip(), value)
    except ValueError as exc:
        raise invalid(str(exc)) from None


ServerName = Annotated[str, PlainValidator(_validate_server_name)]


def Duration(*, gt: float | None = None, ge: float | None = None, le: float | None = None) -> Any:
    """Annotated float (seconds) parsed by :func:`parse_duration`, with bounds in readable units."""

    def validate(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if gt is not None and not seconds > gt:
            raise invalid(f"must be longer than {format_duration(gt)}, got {format_duration(seconds)}")
        if ge is not None and seconds < ge:
            raise invalid(f"must be at least {format_duration(ge)}, got {format_duration(seconds)}")
        if le is not None and seconds > le:
            raise invalid(f"must be at most {format_duration(le)}, got {format_duration(seconds)}")
        return seconds

    return Annotated[float, PlainValidator(validate)]


def Size(*, ge: int, le: int, zero: str | None = None) -> Any:
    """Annotated int (bytes) parsed by :func:`parse_size`, bounded to ``ge..le``; with ``zero`` (what 0
    means, for the message), 0 is accepted too."""

    def validate(value: object) -> int:
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if zero is not None and size == 0:
            return 0
        if not ge <= size <= le:
            also = f" (or 0 to {zero})" if zero is not None else ""
            raise invalid(f"must be between {format_size(ge)} and {format_size(le)}{also}, got {format_size(size)}")
        return size

    return Annotated[int, PlainValidator(validate)]


#: TCP congestion control algorithm names: TCP_CA_NAME_MAX is 16 bytes with the NUL; the kernel's
#: algorithms are named in lower case letters, digits and underscores (bbr, cubic, htcp, highspeed, ...).
_CONGESTION = re.compile(r"[a-z0-9_]{1,15}")


def _validate_congestion(value: object) -> str:
    if not isinstance(value, str):
        raise invalid(f"expected a string, got a {_kind(value)}")
    name = value.strip()
    if name in ("", "system"):
        return "system"
    if not _CONGESTION.fullmatch(name):
        raise invalid(f"invalid congestion control algorithm {value!r}: use the kernel's name of one, 1-15 "
                      'characters from a-z 0-9 _ (e.g. "bbr", "cubic"; see '
                      '/proc/sys/net/ipv4/tcp_available_congestion_control), or "system" to keep the '
                      "kernel's default")
    return name


#: ``tunnel.congestion``: an algorithm name, or "system" ("" is taken as "system").
Congestion = Annotated[str, PlainValidator(_validate_congestion)]


def BoundedInt(ge: int, le: int) -> Any:
    """Annotated int that accepts only TOML integers (not floats, strings or booleans)."""

    def validate(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                value = int(value)
            else:
                raise invalid(
                    f"expected an integer, got {value!r}"
                    if isinstance(value, (int, float))
                    else f"expected an integer, got a {_kind(value)}"
                )
        if not ge <= value <= le:
            raise invalid(f"must be between {ge} and {le}, got {value}")
        return value

    return Annotated[int, PlainValidator(validate)]


def _validate_cidr(value: object) -> str:
    """An IPv4 or IPv6 network in CIDR notation; a bare address is that one host (/32, /128). Kept as
    its canonical text (``ipaddress`` form) so that log lines name the rule as the operator can find it."""
    if not isinstance(value, str):
        raise invalid(f"expected a network string such as \"10.0.0.0/8\" or \"2001:db8::/32\", got a {_kind(value)}")
    text = value.strip()
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise invalid(f"invalid network {value!r} ({exc}): use an address or address/prefix, "
                          'e.g. "10.0.0.0/8", "192.0.2.7", "2001:db8::/32"') from None
        raise invalid(f"network {value!r} has bits set beyond its /{loose.prefixlen} prefix: "
                      f"write {str(loose)!r} (the network) or the address alone (one host)") from None
    return str(net)


#: An IPv4 or IPv6 network (``allow``, ``deny``, ``trusted_proxies``).
Cidr = Annotated[str, PlainValidator(_validate_cidr)]


def _resolve_path(value: object, info: ValidationInfo) -> Path:
    """A file path; relative paths are resolved against ``context['base_dir']`` (the config's directory)."""
    if isinstance(value, Path):
        path = value
    elif isinstance(value, str):
        if not value.strip():
            raise invalid("must not be empty; remove the key or give a file path")
        path = Path(value)
    else:
        raise invalid(f"expected a file path string, got a {_kind(value)}")
    path = path.expanduser()
    if not path.is_absolute():
        base = (info.context or {}).get("base_dir")
        path = Path(base) / path if base is not None else Path.cwd() / path
    return Path(os.path.normpath(path))


ConfigPath = Annotated[Path, PlainValidator(_resolve_path)]


def default_node_id(cert_names: list[str] | None = None) -> str | None:
    """The on-prem default node id, or None if there is no valid one.

    With a certificate (``cert_names``: its CN, then its DNS SANs) it is the first of those names that
    is a valid node id: the cloud admits only a node id that its certificate names (protocol §5.4), and
    cloned VMs, which share a host name, do not share a certificate. Without one (plain ws://), the
    host name."""
    if cert_names is not None:
        return next((n for n in cert_names if NAME_PATTERN.fullmatch(n)), None)
    name = socket.gethostname()
    return name if NAME_PATTERN.fullmatch(name) else None
