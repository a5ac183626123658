"""Reconnect pacing (docs/ha.md §3): one generator decides how long to wait before the next dial."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff(minimum: float, maximum: float, factor: float = 2.0, rng: random.Random | None = None) -> Iterator[float]:
    """Full-jitter exponential backoff: delay n is uniform in [minimum/2, min(maximum, minimum*factor**n)].

    Jitter spreads the redials of many gateways after a member restarts, so they do not arrive as one
    handshake storm. The caller makes a fresh generator once a tunnel has stayed up for a while.
    """
    r = rng or random.Random()
    ceiling = minimum
    while True:
        yield r.uniform(minimum / 2, ceiling)
        ceiling = min(maximum, ceiling * factor)
