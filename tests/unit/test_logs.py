"""logs.emit writes the very line the formatters write; the writer batches per loop iteration."""

from __future__ import annotations

import asyncio
import datetime
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
        # 2026-11-25T13:15:10.092Z; the two calls may straddle a second on a busy machine
        ta, tb = (datetime.datetime.strptime(x[:23], "%Y-%m-%dT%H:%M:%S.%f") for x in (a, b))
        assert a[23] == b[23] == "Z" and abs((tb - ta).total_seconds()) < 1


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


# --- the text format escapes control characters and caps lines ---------------------------------------
#
# Peer-supplied fields are validated where they enter (protocol/peer_input.py), but log lines also carry
# text nobody validated: client addresses, reason texts, TLS errors, upgrade paths, config strings,
# exception messages. In the text format a raw newline would forge a second line, ESC or a C1 CSI would
# drive the operator's terminal, and U+2028/U+2029 or NEL split the line for Unicode-aware readers.

HOSTILE = {
    "newline": ("evil\nINFO  intercloud.tunnel forged", "evil\\nINFO  intercloud.tunnel forged"),
    "crlf-tab": ("a\r\nb\tc", "a\\r\\nb\\tc"),
    "esc": ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    "c1-del": ("x\x9b2Jy\x85z\x7f\x00", "x\\x9b2Jy\\x85z\\x7f\\x00"),
    "u2028": ("one\u2028two\u2029three", "one\\u2028two\\u2029three"),
}


def _only_line(text: str) -> str:
    lines = text.split("\n")
    assert lines[-1] == "", f"no final newline: {text!r}"
    assert len(lines) == 2, f"{len(lines) - 1} lines: {text!r}"
    line = lines[0]
    assert line.splitlines() == [line], f"a Unicode line break in {line!r}"
    assert not any(c < " " or "\x7f" <= c <= "\x9f" for c in line), f"a control character in {line!r}"
    return line


@pytest.mark.parametrize("name", HOSTILE)
def test_text_lines_escape_control_characters(captured, name) -> None:
    raw, escaped = HOSTILE[name]
    captured.setup("text", "info")
    logging.getLogger("intercloud.tunnel").warning("reason from peer: %s", raw)
    line = _only_line(captured())
    assert line.endswith(f" WARNING intercloud.tunnel reason from peer: {escaped}")


@pytest.mark.parametrize("name", HOSTILE)
def test_emit_escapes_control_characters_too(captured, name) -> None:
    raw, escaped = HOSTILE[name]
    captured.setup("text", "info")
    logs.emit(logging.getLogger("intercloud.stream"), logging.INFO, f"[svc] OPENED: client {raw}", FIELDS)
    assert _only_line(captured()).endswith(f" INFO  intercloud.stream [svc] OPENED: client {escaped}")


def test_ordinary_text_is_left_alone(captured) -> None:
    captured.setup("text", "info")
    text = "[serviceA] CLOSED: stream 7 10.0.0.5:40000 -> db:5432 via onprem1, 12 bytes, 0.5s: peer said 'no' \\n é"
    logging.getLogger("intercloud.stream").info(text)
    assert _only_line(captured()).split(" ", 1)[1] == f"INFO  intercloud.stream {text}"


def test_a_100kb_message_is_cut_with_a_marker(captured) -> None:
    captured.setup("text", "info")
    logs.emit(logging.getLogger("intercloud.stream"), logging.INFO, "x" * 100_000, FIELDS)
    logging.getLogger("intercloud.tunnel").warning("%s", "\n" * 100_000)
    a, b = captured().splitlines()
    assert a.endswith(" intercloud.stream " + "x" * logs.MAX_LINE + f"… ({100_000 - logs.MAX_LINE} more characters)")
    # escaped first, then cut: 100,000 newlines are 200,000 characters once escaped
    assert b.endswith(" intercloud.tunnel " + "\\n" * (logs.MAX_LINE // 2) +
                      f"… ({200_000 - logs.MAX_LINE} more characters)")
    assert len(a) < logs.MAX_LINE + 100 and len(b) < logs.MAX_LINE + 100


def test_exception_text_is_escaped_on_the_same_line(captured) -> None:
    captured.setup("text", "info")
    try:
        raise ValueError("bad\nINFO  forged\x1b[2J")
    except ValueError:
        logging.getLogger("intercloud").exception("internal error: %s", "ctx\nx")
    line = _only_line(captured())
    assert " ERROR intercloud internal error: ctx\\nx\\nTraceback (most recent call last):\\n  File " in line
    assert line.endswith("\\nValueError: bad\\nINFO  forged\\x1b[2J")


def test_a_long_traceback_keeps_its_end(captured) -> None:
    captured.setup("text", "info")
    try:
        raise ValueError("y" * 100_000 + " the end")
    except ValueError:
        logging.getLogger("intercloud").exception("internal error")
    line = _only_line(captured())
    assert " ERROR intercloud internal error\\n\u2026 (" in line and " earlier characters) yyy" in line
    assert line.endswith("y" * 100 + " the end")  # the last line names the exception
    assert len(line) < logs.MAX_EXC_TEXT + 200


def test_json_lines_are_unchanged_by_the_text_rules(captured) -> None:
    captured.setup("json", "info")
    logging.getLogger("intercloud.tunnel").warning("a\nb\u2028c")
    (line,) = captured().splitlines()
    assert json.loads(line)["msg"] == "a\nb\u2028c"
