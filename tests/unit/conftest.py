"""Fixtures of the in-process tests over the fake wire (tests/support/fake_wire.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.fake_wire import World


@pytest.fixture
async def world():
    """A World, and every error the event loop reports meanwhile (an exception in a tunnel's frame
    handler or a protocol callback only gets logged there) fails the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    w = World()
    try:
        yield w
    finally:
        await w.aclose()
        loop.set_exception_handler(None)
    assert not errors, f"the event loop reported errors: {errors}"
    failed = [(o.node_id, e) for o in w.owners for e in o.errors]
    assert not failed, f"tasks answering OPENs raised: {failed}"
