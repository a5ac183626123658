"""Registry of every child process the support library starts.

Why: a test that leaves a gateway, squid or nc running poisons every later test (ports stay
taken, tunnels stay connected, CPU is stolen) and hides real shutdown bugs. So every process is
started through :func:`spawn`, in its own session (process group), and recorded here. The
conftest checks after each test and once at the end of the session that nothing recorded is
still alive, kills what is, and fails loudly.

A process counts as alive while it, or any process left in its process group (helpers that a
squid started, say), still exists and is not a zombie.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .timeouts import scaled

__all__ = ["Tracked", "spawn", "stop", "kill", "mark", "leftovers", "started_since", "tail"]

_seq = itertools.count(1)


@dataclass
class Tracked:
    """One started process: what it is, where its logs are."""

    seq: int
    title: str
    popen: subprocess.Popen
    argv: list[str]
    log_paths: list[Path] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def group_pids(self) -> list[int]:
        """Live (non-zombie) processes whose process group is this process's group."""
        self.popen.poll()  # reap our direct child if it has exited
        return _pids_in_group(self.popen.pid)

    def alive(self) -> bool:
        return bool(self.group_pids())


_registry: list[Tracked] = []


def _pids_in_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces and parens.
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) < 3:
            continue
        state, pgrp = rest[0], int(rest[2])
        if pgrp == pgid and state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def spawn(
    argv: Sequence[str],
    *,
    title: str,
    log_paths: Sequence[Path] = (),
    **popen_kwargs,
) -> Tracked:
    """Start ``argv`` in a new session and record it. ``popen_kwargs`` go to Popen."""
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    popen = subprocess.Popen(list(argv), start_new_session=True, **popen_kwargs)
    tracked = Tracked(next(_seq), title, popen, list(argv), [Path(p) for p in log_paths])
    _registry.append(tracked)
    return tracked


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(tracked: Tracked, grace: float = 5.0) -> int | None:
    """SIGTERM the process, wait ``grace`` (nominal) seconds, then SIGKILL its whole group.

    Returns the main process's exit code (negative signal number if killed by a signal).
    """
    p = tracked.popen
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(scaled(grace))
        except subprocess.TimeoutExpired:
            pass
    if p.poll() is None or tracked.group_pids():
        _killpg(p.pid, signal.SIGKILL)
        try:
            p.wait(scaled(5.0))
        except subprocess.TimeoutExpired:
            pass
    return p.poll()


def kill(tracked: Tracked) -> None:
    """SIGKILL the process and its whole group at once and reap it."""
    _killpg(tracked.popen.pid, signal.SIGKILL)
    try:
        tracked.popen.wait(scaled(5.0))
    except subprocess.TimeoutExpired:
        pass


def mark() -> int:
    """A position in the registry; pass it to :func:`leftovers` / :func:`started_since`."""
    return _registry[-1].seq if _registry else 0


def started_since(position: int = 0) -> list[Tracked]:
    return [t for t in _registry if t.seq > position]


def leftovers(position: int = 0) -> list[Tracked]:
    """Processes started after ``position`` that (or whose group) are still alive."""
    return [t for t in started_since(position) if t.alive()]


def tail(path: Path, lines: int = 200) -> str:
    """Last ``lines`` lines of a text file, or a note why there is nothing."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    text = data.decode("utf-8", "replace").splitlines()
    skipped = len(text) - lines
    head = [f"... ({skipped} earlier lines in {path})"] if skipped > 0 else []
    return "\n".join(head + text[-lines:])
