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

import atexit
import itertools
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .timeouts import scaled, wait_until

__all__ = ["Tracked", "spawn", "stop", "kill", "mark", "leftovers", "started_since", "tail"]

_seq = itertools.count(1)


@dataclass(eq=False)
class Tracked:
    """One started process: what it is, where its logs are."""

    seq: int
    title: str
    popen: subprocess.Popen
    argv: list[str]
    log_paths: list[Path] = field(default_factory=list)
    gone: bool = False  # main process reaped and its group seen empty: final

    @property
    def pid(self) -> int:
        return self.popen.pid

    def group_pids(self, groups: dict[int, list[int]] | None = None) -> list[int]:
        """Live (non-zombie) processes whose process group is this process's group."""
        if self.gone:
            return []
        exited = self.popen.poll() is not None  # also reaps our direct child
        pids = (_live_groups() if groups is None else groups).get(self.popen.pid, [])
        if exited and not pids:
            self.gone = True  # an empty group cannot gain members again
        return pids

    def alive(self) -> bool:
        return bool(self.group_pids())


_registry: list[Tracked] = []


def _live_groups() -> dict[int, list[int]]:
    """One scan of /proc: process group id -> live (non-zombie) member pids."""
    groups: dict[int, list[int]] = {}
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
        if state not in (b"Z", b"X"):
            groups.setdefault(pgrp, []).append(int(entry))
    return groups


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
        kill(tracked)
    return p.poll()


def kill(tracked: Tracked) -> None:
    """SIGKILL the process and its whole group at once and reap it."""
    _killpg(tracked.popen.pid, signal.SIGKILL)
    try:
        tracked.popen.wait(scaled(5.0))
    except subprocess.TimeoutExpired:
        pass
    # Grandchildren are not ours to wait for; SIGKILL is delivered asynchronously, so poll
    # until the kernel has them gone (or zombies, awaiting whoever reaps orphans).
    wait_until(lambda: not tracked.group_pids(), 5.0, interval=0.005,
               what=f"process group {tracked.popen.pid} ({tracked.title}) to die after SIGKILL")


def mark() -> int:
    """A position in the registry; pass it to :func:`leftovers` / :func:`started_since`."""
    return _registry[-1].seq if _registry else 0


def started_since(position: int = 0) -> list[Tracked]:
    return [t for t in _registry if t.seq > position]


def leftovers(position: int = 0) -> list[Tracked]:
    """Processes started after ``position`` that (or whose group) are still alive."""
    candidates = [t for t in started_since(position) if not t.gone]
    groups = _live_groups() if candidates else {}
    return [t for t in candidates if t.group_pids(groups)]


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


def _kill_everything_at_exit() -> None:
    """Safety net for interrupted runs (Ctrl-C, internal errors): leave nothing behind."""
    for tracked in leftovers(0):
        _killpg(tracked.popen.pid, signal.SIGKILL)


atexit.register(_kill_everything_at_exit)
