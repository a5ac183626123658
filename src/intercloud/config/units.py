"""Parsing and formatting of durations and sizes in configuration files.

Pure functions, no I/O. Both parsers accept a TOML number (seconds / bytes) or a string with a
unit, and raise :class:`ValueError` with a message that shows what was expected and what was
found; the configuration loader adds the key path.

Durations::

    "500ms"  "5s"  "1.5s"  "2m"  "1h"  "1d"  "1m30s"  "5"  5  0.25      (bare numbers are seconds)

Sizes (binary units are powers of 1024, decimal units powers of 1000; units are case-insensitive)::

    "1024"  1024  "64KiB"  "4MiB"  "1GiB"  "64KB"  "1.5MiB"  "512B"
"""

from __future__ import annotations

import math
import re

__all__ = [
    "DURATION_UNITS",
    "SIZE_UNITS",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]

#: Seconds per duration unit.
DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

#: Bytes per size unit, keyed by the lower-case spelling.
SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
# One "<number><unit>" term of a duration; several may follow each other ("1m30s").
_DURATION_TERM = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h|d)", re.IGNORECASE)
_BARE_NUMBER = re.compile(rf"\s*({_NUMBER})\s*")
_SIZE = re.compile(rf"\s*({_NUMBER})\s*([A-Za-z]*)\s*")

_DURATION_HINT = "expected a duration like '5s' or '500ms'"
_SIZE_HINT = "expected a size like '4MiB', '256KiB' or a number of bytes"


def parse_duration(value: object) -> float:
    """Return ``value`` as seconds (float).

    Accepts a non-negative int/float (seconds) or a string of one or more ``<number><unit>`` terms
    with units ms, s, m, h, d (e.g. ``"1m30s"``); a string without a unit is seconds.

    >>> parse_duration("500ms"), parse_duration("1m30s"), parse_duration(2)
    (0.5, 90.0, 2.0)
    """
    if isinstance(value, bool):  # bool is an int subclass; `true` is no duration
        raise ValueError(f"{_DURATION_HINT}, got {str(value).lower()}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value)
    else:
        raise ValueError(f"{_DURATION_HINT}, got a {_kind(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"{_DURATION_HINT}, got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def _parse_duration_text(text: str) -> float:
    bare = _BARE_NUMBER.fullmatch(text)
    if bare:
        return float(bare.group(1))
    total = 0.0
    pos = 0
    seen_units: set[str] = set()
    while pos < len(text):
        m = _DURATION_TERM.match(text, pos)
        if not m:
            break
        unit = m.group(2).lower()
        if unit in seen_units:
            raise ValueError(f"{_DURATION_HINT}, got {text!r} (unit '{unit}' appears twice)")
        seen_units.add(unit)
        total += float(m.group(1)) * DURATION_UNITS[unit]
        pos = m.end()
    if pos == 0 or text[pos:].strip():
        raise ValueError(f"{_DURATION_HINT}, got {text!r}")
    return total


def parse_size(value: object) -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts a non-negative int (bytes) or a string ``<number>[unit]`` with units B, KB, MB, GB,
    TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), case-insensitive. Fractions are
    allowed when the result is a whole number of bytes (``"1.5KiB"`` is 1536).

    >>> parse_size("4MiB"), parse_size("64KB"), parse_size(1024)
    (4194304, 64000, 1024)
    """
    if isinstance(value, bool):
        raise ValueError(f"{_SIZE_HINT}, got {str(value).lower()}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{_SIZE_HINT}, got {value!r} (not a whole number of bytes)")
        size = int(value)
    elif isinstance(value, str):
        size = _parse_size_text(value)
    else:
        raise ValueError(f"{_SIZE_HINT}, got a {_kind(value)}")
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return size


def _parse_size_text(text: str) -> int:
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"{_SIZE_HINT}, got {text!r}")
    number, unit = m.group(1), m.group(2).lower() or "b"
    if unit not in SIZE_UNITS:
        raise ValueError(
            f"{_SIZE_HINT}, got {text!r} (unknown unit {m.group(2)!r}; use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB)"
        )
    multiplier = SIZE_UNITS[unit]
    # Exact arithmetic: split "1.5" into integer and fraction instead of trusting floats.
    whole, _, frac = number.partition(".")
    scaled = int(whole or "0") * multiplier
    if frac.rstrip("0"):
        frac = frac.rstrip("0")
        num = int(frac) * multiplier
        den = 10 ** len(frac)
        if num % den:
            raise ValueError(f"{_SIZE_HINT}, got {text!r} (not a whole number of bytes)")
        scaled += num // den
    return scaled


def _kind(value: object) -> str:
    """Name a TOML value's type the way a config author thinks of it."""
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _plain_number(x: float, decimals: int) -> str:
    """Fixed-point without trailing zeros (never exponent notation, which the parser rejects)."""
    text = f"{x:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_duration(seconds: float) -> str:
    """Format seconds compactly for messages: 0.5 -> '500ms', 90 -> '90s', 7200 -> '2h'.

    The result parses back with :func:`parse_duration` (to the microsecond).
    """
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{_plain_number(seconds * 1000, 3)}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    return f"{_plain_number(seconds, 6)}s"


def format_size(size: int) -> str:
    """Format bytes for messages using the largest binary unit that divides evenly: 65536 -> '64KiB'."""
    for unit, mult in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= mult and size % mult == 0:
            return f"{size // mult}{unit}"
    return f"{size} bytes"
