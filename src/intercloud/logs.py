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


# --- text lines: one event, one line, nothing for a terminal to obey --------------------------------------
#
# Peer fields are checked where they enter (protocol/peer_input.py), but a line also carries text nobody
# checked: client addresses, reason texts, TLS errors, upgrade paths, config strings, exception messages.
# In the text format a raw newline would forge a line, ESC (or the C1 CSI, 0x9b) would drive the operator's
# terminal, and NEL, U+2028 and U+2029 break the line for Unicode-aware readers. So the message and any
# exception text are escaped: C0 (\n \r \t as such, the rest as \xNN), DEL and C1 as \xNN, U+2028/U+2029 as
# \uNNNN. A backslash stays as it is: ordinary lines (Windows paths, regexes in config errors) must not
# change, and an escape a peer wrote itself forges nothing. The JSON format escapes all of it already.
MAX_LINE = 4096  # characters of message kept per line (after escaping): a 100 KB reason stays one screen
MAX_EXC_TEXT = 8192  # characters of traceback kept, from its end: the last line names the exception

# Why str.isprintable and str.translate: the formatter runs for every line, the per-stream OPENED/CLOSED
# ones included (emit below), and almost no line has anything to escape. isprintable() is one C-level scan
# that allocates nothing and is False for every character escaped here (categories Cc, Zl, Zp), so a clean
# line costs ~0.5 us (a precompiled regex search measured ~1.2 us); only a line that fails it is copied,
# once, by translate with a prebuilt table (no Python-level loop over characters either way). Other
# non-printable characters (a no-break space, a lone surrogate) take that path too and come out unchanged.
_ESCAPES = str.maketrans(
    {chr(c): f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}
    | {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def escape_line(text: str, cap: int = MAX_LINE) -> str:
    """``text`` for a text log line: control characters escaped, cut after ``cap`` characters with a
    marker saying how many more there were."""
    if not text.isprintable():
        text = text.translate(_ESCAPES)
    if len(text) > cap:
        text = f"{text[:cap]}\u2026 ({len(text) - cap} more characters)"
    return text


def _escape_tail(text: str, cap: int = MAX_EXC_TEXT) -> str:
    """Like escape_line, but a traceback keeps its end (the exception) and loses its start."""
    if not text.isprintable():
        text = text.translate(_ESCAPES)
    if len(text) > cap:
        text = f"\u2026 ({len(text) - cap} earlier characters) {text[-cap:]}"
    return text


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER MESSAGE`` on one line; an exception's traceback follows on the same line,
    escaped like the message (see escape_line)."""

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{_timestamp(record.created)} {record.levelname:<5} {record.name} "
                f"{escape_line(record.getMessage())}")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\\n" + _escape_tail(record.exc_text)
        if record.stack_info:
            line += "\\n" + _escape_tail(self.formatStack(record.stack_info))
        return line


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
        line = f"{_timestamp(now)} {logging.getLevelName(level):<5} {logger.name} {escape_line(msg)}"
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


# --- rate-limited warnings ------------------------------------------------------------------------
#
# Anyone who can reach a listening port can make the gateway log: every refused connection, failed TLS
# handshake or late HELLO is worth a line when it is rare and worthless by the thousand (40,000
# connections of a flood would be 40,000 lines, ~10 MB, and hide everything else). So such lines go
# through a :class:`Limiter`: per (event, source) the first ``burst`` lines of a ``window`` are written,
# the rest only counted, and one summary line per window says how many were left out. A second cap per
# event (``event_burst``) bounds a flood from many sources the same way, so that a window holds at most
# about ``event_burst + 2`` lines per event whatever the attacker does.


class Limiter:
    """Rate-limits log lines per (event, source) and per event, with a summary line per window.

    ``clock`` is injectable for tests; summaries are written when the window of a suppressed key ends
    (a timer on the running event loop, else at the next :meth:`log` or :meth:`flush`)."""

    def __init__(self, window: float = 10.0, burst: int = 2, event_burst: int = 6, max_keys: int = 1024,
                 clock=time.monotonic):
        self.window = window
        self.burst = burst
        self.event_burst = event_burst
        self.max_keys = max_keys  # distinct sources tracked per window; more are counted per event only
        self.clock = clock
        # (event, source) -> [window start, lines written, lines suppressed, logger, level]
        self._keys: dict[tuple[str, str], list] = {}
        # event -> [window start, lines written, suppressed, sources suppressed, logger, level]
        self._events: dict[str, list] = {}
        self._timer = None

    def log(self, logger: logging.Logger, level: int, event: str, source: str, msg: str, *args,
            extra: dict | None = None) -> bool:
        """Log ``msg % args`` unless (event, source) or event is over its budget; True if written."""
        if not logger.isEnabledFor(level):
            return False
        now = self.clock()
        self.flush(now)
        ev = self._events.get(event)
        if ev is None:
            ev = self._events[event] = [now, 0, 0, set(), logger, level]
        key = (event, source)
        k = self._keys.get(key)
        if k is None and len(self._keys) < self.max_keys:
            k = self._keys[key] = [now, 0, 0, logger, level]
        if k is not None and k[1] < self.burst and ev[1] < self.event_burst:
            k[1] += 1
            ev[1] += 1
            fields = {"event": event, "source": source}
            fields.update(extra or {})
            logger.log(level, msg, *args, extra=fields)
            return True
        if k is not None and k[1] < self.burst:  # the per-event cap held it back: summarized per event
            k = None
        if k is not None:
            k[2] += 1
            k[4] = max(k[4], level)
        else:
            ev[2] += 1
            ev[3].add(source)
            ev[5] = max(ev[5], level)
        self._arm()
        return False

    def flush(self, now: float | None = None) -> None:
        """Write the summary of every window that has ended (all of them if ``now`` is inf)."""
        now = self.clock() if now is None else now
        w = self.window
        for key, k in list(self._keys.items()):
            if now - k[0] >= w:
                del self._keys[key]
                if k[2]:
                    event, source = key
                    k[3].log(k[4], "%d more %s from %s in the last %gs (rate-limited: %d lines per %gs and "
                             "source)", k[2], event, source, w, self.burst, w,
                             extra={"event": event, "source": source, "suppressed": k[2], "summary": True})
        for event, ev in list(self._events.items()):
            if now - ev[0] >= w:
                del self._events[event]
                if ev[2]:
                    sources = sorted(ev[3])
                    shown = ", ".join(sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
                    ev[4].log(ev[5], "%d more %s from %d sources (%s) in the last %gs (rate-limited: %d lines "
                              "per %gs and event)", ev[2], event, len(sources), shown, w, self.event_burst, w,
                              extra={"event": event, "suppressed": ev[2], "sources": len(sources),
                                     "summary": True})

    def _arm(self) -> None:
        """Make sure the summaries come out even if no further line is logged."""
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self.window / 2, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush()
        if any(k[2] for k in self._keys.values()) or any(ev[2] for ev in self._events.values()):
            self._arm()


_limiter = Limiter()
# Refusals (ACL, service limits, PROXY headers, revoked certificates: stats.refused) are worth a line
# each on a normal day and the same flood when a stranger hammers a service port: their own limiter,
# keyed per refusal kind, with a burst large enough that an operator sees every refusal of a normal
# day and a flood writes at most ~10 lines a second per kind (metrics and the audit log count them all).
_refusals = Limiter(burst=20, event_burst=100)


def limited(logger: logging.Logger, level: int, event: str, source: str, msg: str, *args,
            extra: dict | None = None) -> bool:
    """``logger.log(level, msg, *args)`` rate-limited per (``event``, ``source``) and per ``event``
    (see :class:`Limiter`); ``event`` and ``source`` are added to the line's fields."""
    return _limiter.log(logger, level, event, source, msg, *args, extra=extra)


def limited_refusal(logger: logging.Logger, kind: str, source: str, msg: str, fields: dict) -> bool:
    """One WARNING ``conn.refused`` line (``fields`` its extras), rate-limited per refusal ``kind`` and
    ``source`` (the client's or peer's host); a summary line's event is ``conn.refused.KIND``."""
    return _refusals.log(logger, logging.WARNING, f"conn.refused.{kind}", source, "%s", msg, extra=fields)


def limited_summaries() -> None:
    """Write the summary lines of every window still open (at exit: nothing suppressed goes unsaid)."""
    _limiter.flush(float("inf"))
    _refusals.flush(float("inf"))
