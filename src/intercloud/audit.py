"""The audit log (``[gateway] audit_log``, docs/operations.md §10.3): one JSON line per stream at its
end, per tunnel and peer link up or down, and per refused connection, in the versioned schema of
``audit_schema.json`` (shipped in the package).

Writing never blocks the data path. The event loop only copies a record's plain values into a
bounded queue (``put``: no formatting, no I/O); a writer thread turns them into JSON lines and writes
them in batches. A thread rather than non-blocking writes from the loop: O_NONBLOCK means nothing to
a regular file, so a write to a full or slow disk (or a hung network file system) blocks whoever
makes it, and on the loop that would stall every tunnel's pings. When the queue is full a record is
dropped and counted (``intercloud_audit_dropped_total{reason="queue_full"}``, a rate-limited warning);
a write that fails (disk full) drops its batch, counted (``reason="write_failed"``), with one error
line until writes succeed again. Nothing here raises into the gateway.

SIGHUP reopens the file (logrotate: ``mv`` then HUP): the writer opens the path anew before its next
batch, so records written after the signal land in the new file and nothing queued is lost.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from . import logs

log = logging.getLogger("intercloud.audit")

#: The schema version every record carries as ``"v"``; raise it when a field changes meaning or goes.
#: Adding an optional field does not change it (consumers must ignore fields they do not know).
SCHEMA_VERSION = 1
#: Records waiting for the writer at most; more are dropped and counted.
MAX_QUEUE = 10_000
#: Lines written with one write() at most.
BATCH = 512
# O_NONBLOCK only for open(): a FIFO put at the path (after the config check) fails at once (ENXIO)
# instead of blocking until a reader comes; _open_file refuses anything but a regular file anyway
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
_MODE = 0o640  # client addresses and certificate subjects: not for every local user
_NODE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_STOP = object()
_WAKE = object()


def _open_file(path: Path) -> int:
    """A descriptor to append to ``path``, a regular file (created 0640 if need be); OSError otherwise."""
    fd = os.open(path, _FLAGS, _MODE)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)")
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return fd


def schema() -> dict:
    """The JSON Schema of a record (``audit_schema.json`` in this package)."""
    return json.loads(resources.files(__package__).joinpath("audit_schema.json").read_text())


_second: tuple[int, str] = (-1, "")  # (whole second, its "YYYY-mm-ddTHH:MM:SS"), swapped as one tuple


def rfc3339(t: float) -> str:
    """``t`` (seconds since the epoch) as RFC 3339 UTC with microseconds: 2026-12-04T15:01:02.123456Z.
    The date part is formatted once per second (strftime costs ~4 us; two per stream record)."""
    global _second
    us = round(t * 1_000_000)
    sec, frac = divmod(us, 1_000_000)
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, _dt.datetime.fromtimestamp(sec, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{frac:06d}Z"


# --- identities --------------------------------------------------------------------------------------
# A peer as the loop captures it: (node id, DER certificate or None, address, "tunnel" or "link").
Peer = tuple[str, bytes | None, str, str]
_certs: dict[bytes, tuple[str, str]] = {}  # DER -> (subject, sha256): the writer thread's own cache


def _cert(der: bytes) -> tuple[str | None, str | None]:
    hit = _certs.get(der)
    if hit is None:
        import hashlib

        from cryptography import x509

        try:
            subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        except ValueError:  # verified by TLS, so not expected; still never a crash
            subject = None
        hit = (subject, hashlib.sha256(der).hexdigest())
        if len(_certs) >= 4096:
            _certs.clear()
        _certs[der] = hit
    return hit


def peer_info(peer: Peer | None) -> dict | None:
    """The ``peer`` object of a record: node id, certificate subject (RFC 4514) and SHA-256
    fingerprint (hex of the DER; null without a verified certificate), address, tunnel or link."""
    if peer is None:
        return None
    node, der, addr, kind = peer
    subject, sha256 = _cert(der) if der else (None, None)
    return {"node": node, "subject": subject, "sha256": sha256, "addr": addr or None, "kind": kind}


def capture(tunnel) -> Peer | None:
    """On the loop: the plain values of ``tunnel``'s far end (a Tunnel, or None)."""
    if tunnel is None:
        return None
    return (tunnel.peer_node, tunnel.peer_der, tunnel.peer_addr, "link" if tunnel.kind == "peer" else "tunnel")


def _path(*nodes: str | None) -> list[str]:
    """Node ids in order, without unknowns, repeats of the previous one, or anything not a node id."""
    out: list[str] = []
    for n in nodes:
        if n and _NODE.fullmatch(n) and (not out or out[-1] != n):
            out.append(n)
    return out


# --- records (pure: plain values in, a dict out; the writer thread calls them) --------------------------
def _base(kind: str, node: str, ts: float) -> dict:
    return {"v": SCHEMA_VERSION, "type": kind, "ts": rfc3339(ts), "node": node}


def stream_record(node: str, ts: float, *, start: float, service: str, tenant: str, side: str, client: str,
                  target: str | None, peer: Peer | None, onward: Peer | None = None, far: str | None = None,
                  opened: bool = True, bytes_to_target: int = 0, bytes_to_client: int = 0, end: str = "closed",
                  reason: str = "closed") -> dict:
    """A stream's end. ``side``: "accept" (the client came to us), "connect" (we dialed the target),
    "relay" (we carried a stream another member relayed to us: ``peer`` is that member's link,
    ``onward`` our tunnel toward the target). ``far``: the node id the far end named in its OPEN_OK
    (only when it is not ``peer``: a relayed stream's on-prem gateway, as seen by the relaying member)."""
    peer_node = peer[0] if peer else None
    if side == "accept":
        path = _path(node, peer_node, far)
    elif side == "connect":
        path = _path(peer_node, node)
    else:
        path = _path(peer_node, node, onward[0] if onward else None)
    rec = _base("stream", node, ts)
    rec.update({
        "start": rfc3339(start), "duration": round(max(ts - start, 0.0), 6), "service": service, "tenant": tenant,
        "side": side, "client": client or None, "target": target or None, "peer": peer_info(peer),
        "onward": peer_info(onward), "path": path,
        "relayed": side == "relay" or (peer is not None and peer[3] == "link"),
        "opened": opened, "bytes_to_target": bytes_to_target, "bytes_to_client": bytes_to_client, "end": end,
        "reason": reason})
    return rec


def tunnel_record(node: str, ts: float, *, kind: str, event: str, peer: Peer, tunnel_id: int, tenant: str,
                  dialed: bool, opened_at: float | None = None, streams: int | None = None,
                  reason: str | None = None) -> dict:
    """A tunnel (``kind`` "tunnel") or peer link ("link") up or down."""
    rec = _base(kind, node, ts)
    rec.update({"event": event, "id": tunnel_id, "peer": peer_info(peer), "tenant": tenant, "dialed": dialed})
    if event == "down":
        rec["duration"] = round(max(ts - opened_at, 0.0), 6) if opened_at is not None else None
        rec["streams"] = streams
        rec["reason"] = reason
    return rec


def refused_record(node: str, ts: float, *, kind: str, why: str, client: str | None = None,
                   service: str | None = None, tenant: str | None = None, peer: str | None = None,
                   rule: str | None = None) -> dict:
    """A connection, OPEN, handshake or tunnel refused before it carried anything (stats.REFUSAL_KINDS)."""
    rec = _base("refused", node, ts)
    rec.update({"kind": kind, "client": client or None, "service": service, "tenant": tenant,
                "peer_node": peer, "rule": rule, "reason": why})
    return rec


def end_of(reason: str) -> str:
    """The ``end`` of a stream that opened, from its close reason: both sides finished, or not."""
    return "closed" if reason == "closed" else "reset"


# --- the log ------------------------------------------------------------------------------------------
class AuditLog:
    """The audit log of one gateway: ``put`` on the loop, a writer thread behind a bounded queue."""

    def __init__(self, path: Path, node: str, *, max_queue: int = MAX_QUEUE) -> None:
        self.path = Path(path)
        self.node = node
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.dropped_full = 0  # the loop's count: queue full
        self.dropped_failed = 0  # the writer's count: writes that failed, records that failed to build
        self.written = 0  # records written (the writer's count)
        self._fd = -1
        self._lock = threading.Lock()
        self._reopen: Path | None = None  # a reopen the writer has still to do
        self._failing = False  # the writer logged a write error and has not written since
        self._thread: threading.Thread | None = None

    # -- on the loop -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Open the file at startup; OSError goes to the caller (a startup error naming the key)."""
        self._fd = _open_file(self.path)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="intercloud-audit", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_failed

    def put(self, build: Callable[..., dict], **fields: Any) -> None:
        """Queue a record: ``build(node, ts, **fields)`` runs in the writer thread. Never blocks."""
        try:
            self._q.put_nowait((build, time.time(), fields))
        except queue.Full:
            self.dropped_full += 1
            logs.limited(log, logging.WARNING, "audit.dropped", "queue_full",
                         "audit log: record dropped, %d records wait for the writer (%s is slow or stuck); "
                         "%d dropped so far (intercloud_audit_dropped_total)", self._q.maxsize, self.path,
                         self.dropped_full, extra={"path": str(self.path), "dropped": self.dropped_full})

    def reopen(self, path: Path | None = None) -> None:
        """SIGHUP: open ``path`` (default: the current one) before the next batch (logrotate)."""
        with self._lock:
            self._reopen = Path(path) if path is not None else self.path
        try:
            self._q.put_nowait((_WAKE, 0.0, None))
        except queue.Full:
            pass  # the writer is busy and sees the request before its next batch

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout`` seconds: a stuck disk must not hold the exit), stop."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            try:
                self._q.put((_STOP, 0.0, None), timeout=timeout)
            except queue.Full:
                pass
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._close_fd()

    # -- stream, tunnel and link records, called from GatewayStats and the gateway ---------------------
    def stream_closed(self, tunnel, stream, reason: str) -> None:
        """A stream that opened ended (GatewayStats.stream_closed)."""
        side = stream.side
        onward = far = None
        if side == "relay-in":
            other = stream.other
            onward = capture(other.tunnel if other is not None else None)
        elif side == "accept" and tunnel.kind == "peer":
            inst = getattr(stream, "far", None)  # the OPEN_OK's identity, passed on by the carrying member
            far = inst[0] if inst else None
        self._stream(stream, tunnel, opened=True, end=end_of(reason), reason=reason, onward=onward, far=far)

    def stream_failed(self, stream, end: str, reason: str, tunnel=None, peer_node: str | None = None) -> None:
        """A stream that never opened: the far side or target refused it, the client left meanwhile.
        ``tunnel``: the tunnel or link it was on, if any; else ``peer_node``, the gateway that refused it
        (a relay: the one behind our own tunnel)."""
        named = (peer_node, None, "", "tunnel") if peer_node else None
        if stream.side == "relay-in":
            peer, onward = capture(stream.tunnel), named
        else:
            peer, onward = (capture(tunnel) if tunnel is not None else named), None
        self._stream(stream, None, opened=False, end=end, reason=reason, peer=peer, onward=onward)

    def _stream(self, stream, tunnel, *, opened: bool, end: str, reason: str, peer=None, onward=None,
                far=None) -> None:
        side = stream.side
        up, down = stream.bytes_up, stream.bytes_down
        # bytes_up: from our local socket (or, relayed, from the other end) into the tunnel
        if side == "accept":
            to_target, to_client = up, down
        else:  # connect: the local socket is the target; relay-in: its tunnel leads to the client
            to_target, to_client = down, up
        self.put(stream_record, start=time.time() - (time.monotonic() - stream.started), service=stream.service,
                 tenant=stream.tenant, side="relay" if side.startswith("relay") else side, client=stream.client,
                 target=stream.target if side == "connect" else None,
                 peer=capture(tunnel) if tunnel is not None else peer, onward=onward, far=far, opened=opened,
                 bytes_to_target=to_target, bytes_to_client=to_client, end=end, reason=reason)

    def tunnel_up(self, tunnel) -> None:
        self.put(tunnel_record, kind="link" if tunnel.kind == "peer" else "tunnel", event="up",
                 peer=capture(tunnel), tunnel_id=tunnel.id, tenant=tunnel.tenant, dialed=bool(tunnel.client))

    def tunnel_down(self, tunnel, reason: str) -> None:
        self.put(tunnel_record, kind="link" if tunnel.kind == "peer" else "tunnel", event="down",
                 peer=capture(tunnel), tunnel_id=tunnel.id, tenant=tunnel.tenant, dialed=bool(tunnel.client),
                 opened_at=tunnel.opened_at, streams=tunnel.streams_total, reason=reason)

    def refused(self, kind: str, why: str, *, client: str = "", service: str | None = None,
                tenant: str | None = None, peer: str | None = None, rule: str | None = None) -> None:
        self.put(refused_record, kind=kind, why=why, client=client, service=service, tenant=tenant, peer=peer,
                 rule=rule)

    # -- the writer thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                stop = self._step()
            except Exception as exc:  # noqa: BLE001 - the writer must outlive a bug, or the queue only fills
                log.error("audit log: unexpected error in the writer (%s: %s); it goes on (a bug: please report "
                          "it)", type(exc).__name__, exc, extra={"event": "audit.internal_error"})
        self._close_fd()

    def _step(self) -> bool:
        """Take a batch off the queue, reopen if asked, write it; True once told to stop."""
        q = self._q
        stop = False
        batch = [q.get()]
        while len(batch) < BATCH:
            try:
                batch.append(q.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            target, self._reopen = self._reopen, None
        if target is not None:
            self._do_reopen(target)
        lines = []
        for build, ts, fields in batch:
            if build is _STOP:
                stop = True
            elif build is not _WAKE:
                try:
                    # ASCII only: a peer's text with U+2028 or a lone surrogate stays one valid line
                    lines.append(json.dumps(build(self.node, ts, **fields), separators=(",", ":"),
                                            default=str))
                except Exception as exc:  # noqa: BLE001 - a bug must cost one record, not the log
                    self.dropped_failed += 1
                    log.error("audit log: a %s record could not be built (%s: %s); dropped (a bug: please "
                              "report it)", getattr(build, "__name__", "?"), type(exc).__name__, exc,
                              extra={"event": "audit.internal_error"})
        if lines:
            self._write(lines)
        return stop

    def _write(self, lines: list[str]) -> None:
        data = ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")
        fd = self._fd
        start = -1
        try:
            if fd < 0:
                raise OSError(f"not open (the last open of {self.path} failed)")
            start = os.lseek(fd, 0, os.SEEK_END)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError as exc:
            self.dropped_failed += len(lines)
            if start >= 0:  # no torn line: cut what part of the batch made it (best effort)
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
            if not self._failing:
                self._failing = True
                log.error("audit log: cannot write %s (%s); records are dropped and counted in "
                          "intercloud_audit_dropped_total until writes succeed again. Free space on that file "
                          "system or fix the path, then send SIGHUP to reopen it",
                          self.path, getattr(exc, "strerror", None) or exc,
                          extra={"event": "audit.write_failed", "path": str(self.path), "error": str(exc)})
            return
        self.written += len(lines)
        if self._failing:
            self._failing = False
            log.warning("audit log: writing %s again; %d records were dropped in all", self.path, self.dropped,
                        extra={"event": "audit.write_resumed", "path": str(self.path), "dropped": self.dropped})

    def _do_reopen(self, path: Path) -> None:
        try:
            fd = _open_file(path)
        except OSError as exc:
            where = f"still writing to the old file {self.path}" if self._fd >= 0 else "records are dropped"
            log.error("audit log: cannot open %s on SIGHUP (%s); %s. Fix the path or its directory, then send "
                      "SIGHUP again", path, exc.strerror or exc, where,
                      extra={"event": "audit.reopen_failed", "path": str(path), "error": str(exc)})
            return
        self._close_fd()
        self._fd, self.path = fd, path
        log.info("audit log: (re)opened %s", path, extra={"event": "audit.reopened", "path": str(path)})

    def _close_fd(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
