"""Durations and sizes as written in configuration files (intercloud.config.units)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from intercloud.config.units import format_duration, format_size, parse_duration, parse_size

KiB, MiB, GiB = 1024, 1024**2, 1024**3


# ---------------------------------------------------------------------------------------------
# parse_duration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("1m30s", 90.0),
        ("1h2m3s", 3723.0),
        ("1s500ms", 1.5),
        (" 5 s ", 5.0),
        ("5S", 5.0),
        ("10MS", 0.01),
        ("0s", 0.0),
        ("5", 5.0),
        ("0.25", 0.25),
        (5, 5.0),
        (0, 0.0),
        (0.2, 0.2),
    ],
)
def test_parse_duration_accepts(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    "text", ["fast", "", "   ", "s", "5x", "5 sec", "5s extra", "1m1m", "-5s", "5s-", "1e3s", "五s"]
)
def test_parse_duration_rejects_garbage_with_example(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    message = str(info.value)
    assert "expected a duration like '5s' or '500ms'" in message or "cannot be negative" in message
    assert repr(text) in message


def test_parse_duration_message_quotes_the_input() -> None:
    with pytest.raises(ValueError, match=r"expected a duration like '5s' or '500ms', got 'fast'"):
        parse_duration("fast")


def test_parse_duration_repeated_unit_is_named() -> None:
    with pytest.raises(ValueError, match="unit 'm' appears twice"):
        parse_duration("1m2m")


@pytest.mark.parametrize("value", [-1, -0.5, float("nan"), float("inf"), True, False, None, [], {}])
def test_parse_duration_rejects_bad_types_and_values(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_duration_names_the_type() -> None:
    with pytest.raises(ValueError, match="got a table"):
        parse_duration({"a": 1})
    with pytest.raises(ValueError, match="got true"):
        parse_duration(True)


# ---------------------------------------------------------------------------------------------
# parse_size
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4MiB", 4 * MiB),
        ("256KiB", 256 * KiB),
        ("1GiB", GiB),
        ("1TiB", 1024**4),
        ("64KB", 64_000),
        ("1MB", 1_000_000),
        ("2GB", 2_000_000_000),
        ("1024", 1024),
        ("512B", 512),
        ("0", 0),
        ("4mib", 4 * MiB),
        ("4 MiB", 4 * MiB),
        ("1.5KiB", 1536),
        ("1.5MiB", 3 * 512 * KiB),
        ("0.5KB", 500),
        ("1.50KiB", 1536),
        (1024, 1024),
        (0, 0),
        (4096.0, 4096),
    ],
)
def test_parse_size_accepts(text: object, size: int) -> None:
    assert parse_size(text) == size
    assert type(parse_size(text)) is int


@pytest.mark.parametrize("text", ["big", "", "4M", "4 megabytes", "4MiB extra", "-1", "1.2.3KiB", "KiB"])
def test_parse_size_rejects_garbage_with_example(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected a size like '4MiB'"):
        parse_size(text)


def test_parse_size_unknown_unit_lists_units() -> None:
    with pytest.raises(ValueError, match=r"unknown unit 'M'; use B, KiB, MiB"):
        parse_size("4M")


@pytest.mark.parametrize("text", ["0.1KiB", "1.0001KB", "0.5B"])
def test_parse_size_rejects_fractional_bytes(text: str) -> None:
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        parse_size(text)


@pytest.mark.parametrize("value", [-1, 1.5, True, None, ["4MiB"]])
def test_parse_size_rejects_bad_types_and_values(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


# ---------------------------------------------------------------------------------------------
# Formatting, and round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (0.2, "200ms"),
        (0.0015, "1.5ms"),
        (5, "5s"),
        (1.5, "1.5s"),
        (60, "1m"),
        (90, "90s"),
        (3600, "1h"),
        (86400, "1d"),
        (1e6 + 0.5, "1000000.5s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [(64 * KiB, "64KiB"), (4 * MiB, "4MiB"), (GiB, "1GiB"), (1000, "1000 bytes"), (1536, "1536 bytes"), (0, "0 bytes")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=2**50))
def test_size_round_trip(size: int) -> None:
    text = format_size(size).replace(" bytes", "")
    assert parse_size(text) == size


@given(st.floats(min_value=0, max_value=10**7, allow_nan=False, allow_infinity=False))
def test_duration_round_trip(seconds: float) -> None:
    # format_duration rounds to the microsecond: the round trip is close, not exact.
    back = parse_duration(format_duration(seconds))
    assert math.isclose(back, seconds, rel_tol=1e-9, abs_tol=1e-6)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_duration_integer_units(n: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert parse_duration(f"{n}{unit}") == pytest.approx(n * factor)
