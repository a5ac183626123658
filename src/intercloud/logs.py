"""Logging setup: one line per event, human text (KWIC style) or JSON (``--log-format json``).

Callers log with ``log.info("OPENED: ...", extra={"event": "tunnel.opened", **fields})``; the JSON
formatter emits every extra field, the text formatter only the message.

Two things keep logging off the connection path (docs/performance.md, P5):
- every line goes through one writer that writes once per event-loop iteration, not once per line
  (a line can be lost only if the process is killed with SIGKILL in the same iteration);
- the per-stream lines (OPENED, CLOSED: two per stream and gateway) skip the LogRecord machinery via
  :func:`emit`, which writes the very line the formatters would (~25 us -> ~4 us per line).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import sys
import threading
import time

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.levelno >= logging.ERROR:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_second = [-1, ""]  # (whole second, its "YYYY-mm-ddTHH:MM:SS"): strftime once per second


def _timestamp(created: float) -> str:
    sec = int(created)
    if sec != _second[0]:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int((created - sec) * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s %(message)s")

    def formatTime(self, record, datefmt=None):  # noqa: N802 (logging API)
        return _timestamp(record.created)


class _Writer:
    """Collects lines and writes them with one os.write per event-loop iteration (or at once when
    no loop runs in this thread). Thread-safe; flushed at exit."""

    def __init__(self, stream):
        try:
            self.fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (e.g. captured in tests)
            self.fd = -1
        self.stream = stream
        self.parts: list[str] = []
        self.scheduled = False
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        with self.lock:
            self.parts.append(line)
            if self.scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self.scheduled = True
                loop.call_soon(self.flush)
                return
        self.flush()

    def flush(self) -> None:
        with self.lock:
            self.scheduled = False
            if not self.parts:
                return
            text = "".join(self.parts)
            self.parts.clear()
            if self.fd < 0:
                self.stream.write(text)
                self.stream.flush()
                return
            view = memoryview(text.encode("utf-8", "backslashreplace"))
            while view:
                try:
                    view = view[os.write(self.fd, view):]
                except BlockingIOError:  # stderr is a non-blocking pipe: wait for the reader
                    import select

                    select.select([], [self.fd], [], 1.0)
                except OSError:  # stderr gone: nothing sensible to do with log lines
                    return


class _Handler(logging.Handler):
    def __init__(self, writer: _Writer):
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


_out: dict = {"writer": None, "json": False}


def emit(logger: logging.Logger, level: int, msg: str, fields: dict) -> None:
    """Log one line with ``fields`` as its extras, without building a LogRecord: the same line
    the configured formatter would write. Falls back to ``logger.log`` before :func:`setup`."""
    if not logger.isEnabledFor(level):
        return
    writer = _out["writer"]
    if writer is None:
        logger.log(level, "%s", msg, extra=fields)
        return
    now = time.time()
    if _out["json"]:
        line = json.dumps({"ts": round(now, 6), "level": logging.getLevelName(level), "logger": logger.name,
                           "msg": msg, **fields}, default=str)
    else:
        line = f"{_timestamp(now)} {logging.getLevelName(level):<5} {logger.name} {msg}"
    writer.write(line + "\n")


def flush() -> None:
    writer = _out["writer"]
    if writer is not None:
        writer.flush()


def setup(fmt: str = "text", level: str = "info", stream=None) -> None:
    """Log to ``stream`` (default: stderr) in ``fmt`` ("text" or "json") from ``level`` up."""
    # Neither formatter prints the caller, thread or process: don't compute them for every record
    # (findCaller walks the stack; the per-stream OPENED/CLOSED lines are on the connection path).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    stream = stream if stream is not None else sys.stderr
    stream.flush()
    writer = _Writer(stream)
    if _out["writer"] is None:
        atexit.register(flush)
    _out.update(writer=writer, json=fmt == "json")
    handler = _Handler(writer)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # picows logs every handshake problem with a traceback at ERROR; we log our own one-liners.
    logging.getLogger("picows").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
