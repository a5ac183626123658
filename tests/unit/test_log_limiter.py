"""logs.Limiter: repeated lines are rate-limited per (event, source) and per event, with one summary
line per window that says how many were left out. Driven by an injected clock, no sleeps."""

from __future__ import annotations

import logging

import pytest

from intercloud.logs import Limiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def texts(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def lines():
    logger = logging.getLogger("test.limiter")
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, handler
    logger.removeHandler(handler)


def test_burst_then_one_summary_per_window(lines):
    logger, out = lines
    clock = Clock()
    lim = Limiter(window=10, burst=3, event_burst=100, clock=clock)
    for i in range(50):
        lim.log(logger, logging.WARNING, "tunnel.tls_failed", "10.0.0.1", "TLS handshake %d failed", i)
        clock.now += 0.01
    assert out.texts == [f"TLS handshake {i} failed" for i in range(3)]
    assert all(r.event == "tunnel.tls_failed" and r.source == "10.0.0.1" for r in out.records)
    lim.flush()  # the window has not ended yet: no summary
    assert len(out.records) == 3
    clock.now += 10
    lim.flush()
    assert out.texts[3] == ("47 more tunnel.tls_failed from 10.0.0.1 in the last 10s "
                            "(rate-limited: 3 lines per 10s and source)")
    assert out.records[3].suppressed == 47 and out.records[3].summary is True
    # a new window: lines pass again
    assert lim.log(logger, logging.WARNING, "tunnel.tls_failed", "10.0.0.1", "again")
    assert out.texts[4] == "again"


def test_sources_and_events_are_limited_separately(lines):
    logger, out = lines
    clock = Clock()
    lim = Limiter(window=10, burst=2, event_burst=100, clock=clock)
    for _ in range(5):
        lim.log(logger, logging.WARNING, "a", "s1", "a from s1")
        lim.log(logger, logging.WARNING, "a", "s2", "a from s2")
        lim.log(logger, logging.WARNING, "b", "s1", "b from s1")
    assert sorted(out.texts) == sorted(["a from s1", "a from s2", "b from s1"] * 2)
    clock.now += 10
    lim.flush()
    summaries = sorted(t for t in out.texts if "more" in t)
    assert summaries == [f"3 more {e} from {s} in the last 10s (rate-limited: 2 lines per 10s and source)"
                         for e, s in (("a", "s1"), ("a", "s2"), ("b", "s1"))]


def test_many_sources_are_capped_per_event(lines):
    """A flood from 40,000 distinct sources still writes a bounded number of lines."""
    logger, out = lines
    clock = Clock()
    lim = Limiter(window=10, burst=3, event_burst=30, clock=clock)
    for i in range(40_000):
        lim.log(logger, logging.WARNING, "tunnel.shed", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "shed %d", i)
        clock.now += 0.0005  # 20 s in all: two windows
    lim.flush(float("inf"))
    assert len(out.records) <= 2 * (30 + 1) + 1
    summaries = [r for r in out.records if getattr(r, "summary", False)]
    assert summaries and all("sources" in r.getMessage() for r in summaries)
    assert sum(r.suppressed for r in summaries) + len(out.records) - len(summaries) == 40_000


def test_summary_keeps_the_highest_level_and_disabled_levels_cost_nothing(lines):
    logger, out = lines
    clock = Clock()
    lim = Limiter(window=5, burst=1, clock=clock)
    lim.log(logger, logging.INFO, "e", "s", "first")
    lim.log(logger, logging.INFO, "e", "s", "second")
    lim.log(logger, logging.WARNING, "e", "s", "third")
    logger.setLevel(logging.ERROR)
    assert not lim.log(logger, logging.WARNING, "e", "s", "not enabled")
    logger.setLevel(logging.DEBUG)
    clock.now += 5
    lim.flush()
    assert out.texts[0] == "first"
    assert out.records[1].levelno == logging.WARNING and out.records[1].suppressed == 2


def test_summary_comes_out_at_the_next_line_without_a_loop(lines):
    logger, out = lines
    clock = Clock()
    lim = Limiter(window=10, burst=1, clock=clock)
    lim.log(logger, logging.WARNING, "e", "s", "one")
    lim.log(logger, logging.WARNING, "e", "s", "two")
    clock.now += 11
    lim.log(logger, logging.WARNING, "other", "s", "three")
    assert out.texts == ["one", "1 more e from s in the last 10s (rate-limited: 1 lines per 10s and source)", "three"]
