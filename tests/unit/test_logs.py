"""logs.emit writes the very line the formatters write; the writer batches per loop iteration."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest

from intercloud import logs

FIELDS = {"event": "stream.closed", "service": "svc", "stream": 5, "bytes_out": 12, "duration": 0.25,
          "relayed": False}


class Captured:
    def __init__(self, path):
        self.path = path
        self.file = open(path, "w")  # noqa: SIM115 - closed by the fixture

    def setup(self, fmt: str, level: str) -> None:
        logs.setup(fmt, level, stream=self.file)

    def __call__(self) -> str:
        logs.flush()
        return self.path.read_text()


@pytest.fixture
def captured(tmp_path):
    """logs.setup() onto a file; calling it flushes and returns what was written."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    cap = Captured(tmp_path / "err.log")
    yield cap
    logs.flush()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logs._out.update(writer=None, json=False)
    cap.file.close()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_emit_writes_what_the_formatter_writes(captured, fmt) -> None:
    captured.setup(fmt, "info")
    log = logging.getLogger("intercloud.stream")
    logs.emit(log, logging.INFO, "[svc] CLOSED: stream 5", FIELDS)
    log.info("[svc] CLOSED: stream %d", 5, extra=FIELDS)
    a, b = captured().splitlines()
    if fmt == "json":
        ja, jb = json.loads(a), json.loads(b)
        assert abs(ja.pop("ts") - jb.pop("ts")) < 1
        assert ja == jb == {"level": "INFO", "logger": "intercloud.stream", "msg": "[svc] CLOSED: stream 5",
                            **FIELDS}
    else:
        assert a.split(" ", 1)[1] == b.split(" ", 1)[1] == "INFO  intercloud.stream [svc] CLOSED: stream 5"
        assert a[:19] == b[:19] and a[19] == "." and a[23] == "Z"  # 2026-11-25T13:15:10.092Z


def test_emit_respects_the_level(captured) -> None:
    captured.setup("text", "warning")
    logs.emit(logging.getLogger("intercloud.stream"), logging.INFO, "not shown", FIELDS)
    assert captured() == ""


def test_emit_before_setup_goes_through_logging(caplog) -> None:
    logs._out.update(writer=None)
    with caplog.at_level(logging.INFO, logger="intercloud.stream"):
        logs.emit(logging.getLogger("intercloud.stream"), logging.INFO, "plain", FIELDS)
    assert [r.getMessage() for r in caplog.records] == ["plain"]
    assert caplog.records[0].service == "svc"


def test_one_write_per_loop_iteration(captured, monkeypatch) -> None:
    captured.setup("text", "info")
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(bytes(data)) or real_write(fd, data))
    log = logging.getLogger("intercloud.stream")

    async def burst() -> str:
        for i in range(50):
            logs.emit(log, logging.INFO, f"line {i}", FIELDS)
            log.warning("warning %d", i)
        assert writes == []  # nothing written yet
        await asyncio.sleep(0)  # the writer's flush runs in this iteration's ready callbacks
        return ""

    asyncio.run(burst())
    assert len(writes) == 1
    lines = writes[0].decode().splitlines()
    assert len(lines) == 100 and lines[0].endswith("line 0") and lines[-1].endswith("warning 49")
