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


def test_a_refusal_flood_on_a_service_port_writes_a_bounded_number_of_lines(monkeypatch):
    """stats.refused (ACL, limits, PROXY headers) goes through logs.limited_refusal: a stranger's
    flood is counted in full but written as at most the burst per source and kind, plus one summary;
    another kind from the same source still gets its lines."""
    from intercloud import logs
    from intercloud.stats import GatewayStats

    clock = Clock()
    real = logs._refusals
    monkeypatch.setattr(logs, "_refusals", Limiter(window=real.window, burst=real.burst,
                                                   event_burst=real.event_burst, clock=clock))
    logger = logging.getLogger("intercloud.stream")
    handler = Lines()
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.DEBUG)
    try:
        stats = GatewayStats()
        for i in range(5000):
            stats.refused("acl", "source not allowed", client=f"203.0.113.9:{1024 + i}", service="db",
                          rule="deny 203.0.113.0/24")
        stats.refused("max_rate", "over max_rate", client="203.0.113.9:9", service="db", rule="max_rate 5")
        many = [f"198.51.100.{i % 250}:{i}" for i in range(5000)]
        for c in many:
            stats.refused("proxy_protocol", "bad header", client=c, service="db", rule="accept_proxy_protocol")
        assert stats.counters["connections_refused"] == 10001  # every refusal counted
        acl = [r for r in handler.records if getattr(r, "kind", None) == "acl"]
        assert len(acl) == real.burst and all(r.event == "conn.refused" and r.rule == "deny 203.0.113.0/24"
                                              and r.source == "203.0.113.9" for r in acl)
        assert [r.kind for r in handler.records if getattr(r, "kind", None) == "max_rate"] == ["max_rate"]
        pp = [r for r in handler.records if getattr(r, "kind", None) == "proxy_protocol"]
        assert len(pp) == real.event_burst  # many sources: capped per kind
        clock.now += real.window
        logs._refusals.flush()
        summaries = [r.getMessage() for r in handler.records if getattr(r, "summary", False)]
        assert f"{5000 - real.burst} more conn.refused.acl from 203.0.113.9" in summaries[0], summaries
        assert any("more conn.refused.proxy_protocol from 250 sources" in s for s in summaries), summaries
        assert len(handler.records) <= real.burst + 1 + real.event_burst + 3
    finally:
        logger.removeHandler(handler)
