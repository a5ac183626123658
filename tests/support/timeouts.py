"""Deadlines for tests: one scale factor and polling helpers.

Why: fixed sleeps make tests both slow and flaky. Tests instead poll a condition until a
deadline. Slow machines (CI under load, sanitizer builds, emulation) get longer deadlines
through a single knob, ``INTERCLOUD_TEST_TIMEOUT_FACTOR`` (default 1.0), instead of every
test growing its own magic numbers.

Convention: every helper in ``tests.support`` takes *nominal* timeouts in seconds and scales
them itself. Use ``scaled()`` only when handing a timeout to an API outside this package
(``socket.settimeout``, ``subprocess.run(timeout=...)``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from typing import Any, Awaitable, Callable

__all__ = ["FACTOR", "scaled", "wait_until", "async_wait_until"]


def _read_factor() -> float:
    raw = os.environ.get("INTERCLOUD_TEST_TIMEOUT_FACTOR", "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        raise RuntimeError(
            f"INTERCLOUD_TEST_TIMEOUT_FACTOR={raw!r} is not a number; set it to e.g. 2.5"
        ) from None
    if value <= 0:
        raise RuntimeError(f"INTERCLOUD_TEST_TIMEOUT_FACTOR={raw!r} must be > 0")
    return value


FACTOR: float = _read_factor()


def scaled(seconds: float) -> float:
    """Return ``seconds`` multiplied by the suite-wide timeout factor."""
    return seconds * FACTOR


def _short(value: Any, limit: int = 500) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def _fail(what: str, timeout: float, last: Any) -> AssertionError:
    return AssertionError(
        f"timed out after {scaled(timeout):.2f}s (nominal {timeout}s x factor {FACTOR}) "
        f"waiting for {what}; last observed value: {_short(last)}"
    )


# An Event that is never set: waiting on it is an interruptible pause between polls.
# (Polling intervals are not "fixed sleeps" in the sense of the rules; they bound latency.)
_never = threading.Event()


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.02,
    what: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``predicate()`` until it returns a truthy value and return that value.

    ``timeout`` is nominal (scaled here). Exceptions of the types in ``ignore`` count as a
    falsy result (handy for "connection refused until the server is up"); others propagate.
    On timeout raises AssertionError naming ``what`` and the last value (or exception) seen.
    """
    deadline = time.monotonic() + scaled(timeout)
    last: Any = None
    while True:
        try:
            last = predicate()
        except ignore as exc:  # noqa: PERF203 - deliberate: polling
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise _fail(what, timeout, last)
        _never.wait(interval)


async def async_wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float,
    interval: float = 0.02,
    what: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Async twin of :func:`wait_until`; ``predicate`` may be sync or return an awaitable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(timeout)
    last: Any = None
    while True:
        try:
            last = predicate()
            if inspect.isawaitable(last):
                last = await last
        except ignore as exc:  # noqa: PERF203
            last = exc
        else:
            if last:
                return last
        if loop.time() >= deadline:
            raise _fail(what, timeout, last)
        await asyncio.sleep(interval)
