"""Suite-wide fixtures and hooks for intercloud tests.

Why these exist:
* ``_no_leftover_processes`` (autouse) and ``pytest_sessionfinish``: every process the support
  library starts must be gone at teardown; a leftover is killed and fails the test (and the
  session), because leaked gateways make later tests flaky in ways that are hard to trace.
* ``pytest_runtest_makereport``: when a test fails, the logs of the processes it started (and
  of any still running) are attached to the report; end-to-end failures are undiagnosable
  without the gateways' own account of what happened.
* ``gateways`` / ``squids``: factories that own what they start, so tests cannot forget to stop.
* markers ``needs_root`` and ``needs_binary(*names)``: skip with a reason instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pytest

from tests.support import procs
from tests.support.gateway import Gateway
from tests.support.markers import find_binary, is_root
from tests.support.timeouts import FACTOR

if TYPE_CHECKING:
    from tests.support.squid import Squid

_SETUP_MARK = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_root: skip unless running as root (euid 0)")
    config.addinivalue_line(
        "markers", "needs_binary(*names): skip unless every named executable is installed")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_SETUP_MARK] = procs.mark()
    if item.get_closest_marker("needs_root") and not is_root():
        pytest.skip("needs root (run as root or in CI)")
    for marker in item.iter_markers("needs_binary"):
        missing = [n for n in marker.args if not find_binary(n)]
        if missing:
            pytest.skip(f"needs executables not installed: {', '.join(missing)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    position = item.stash.get(_SETUP_MARK, None)
    mine = procs.started_since(position) if position is not None else []
    others = [t for t in procs.leftovers(0) if t not in mine]
    for tracked in mine + others:
        state = "running" if tracked.popen.poll() is None else f"exit {tracked.popen.returncode}"
        for path in tracked.log_paths:
            report.sections.append(
                (f"{tracked.title} (pid {tracked.pid}, {state}): {path}", procs.tail(path, 150)))


def _describe(left: list[procs.Tracked]) -> str:
    return "; ".join(f"{t.title} pid {t.pid} group {t.group_pids()} argv {t.argv}" for t in left)


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """Fail the test if a process it started (incl. via function fixtures) is still alive."""
    position = procs.mark()
    yield
    left = procs.leftovers(position)
    if left:
        desc = _describe(left)
        for tracked in left:
            procs.kill(tracked)
        pytest.fail(f"processes left running after the test (now killed): {desc}", pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = procs.leftovers(0)
    if not left:
        return
    desc = _describe(left)
    for tracked in left:
        try:
            procs.kill(tracked)
        except AssertionError as exc:  # unkillable (D state): still report the leak
            desc += f" [{exc}]"
    msg = f"processes left running at the end of the session (now killed): {desc}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write("\n")
        reporter.write_sep("=", "leftover processes", red=True, bold=True)
        reporter.write_line(msg, red=True, bold=True)
    else:
        print(msg)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def timeout_factor() -> float:
    """The suite-wide timeout factor (env INTERCLOUD_TEST_TIMEOUT_FACTOR, default 1.0)."""
    return FACTOR


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Factory ``gateways(name, config_text, *, start=True, ready=True, **kw) -> Gateway``.

    Started gateways are waited ready unless ``ready=False``. At teardown each one gets
    SIGTERM, then SIGKILL after 5 s (scaled). Logs land in ``tmp_path/NAME.log`` and are
    attached to the report of a failing test.
    """
    made: list[Gateway] = []

    def factory(name: str, config_text: str, *, start: bool = True, ready: bool = True,
                **kwargs) -> Gateway:
        if any(g.name == name for g in made):
            raise ValueError(f"a gateway named {name!r} already exists in this test")
        gw = Gateway(tmp_path, name, config_text, **kwargs)
        made.append(gw)
        if start:
            gw.start()
            if ready:
                gw.wait_ready()
        return gw

    yield factory
    for gw in reversed(made):
        gw.stop(grace=5.0)


@pytest.fixture
def squids(tmp_path: Path) -> Iterator[Callable[[str], "Squid"]]:
    """Factory ``squids(mode) -> Squid`` (started and ready); stopped at teardown.

    Modes: connect, auth, deny, bump, splice (see ``tests/support/squid.py``).
    """
    from tests.support.squid import Squid  # lazy: only squid tests need cryptography & squid

    made: list[Squid] = []

    def factory(mode: str = "connect") -> Squid:
        sq = Squid(tmp_path, mode, name=f"squid-{mode}-{len(made)}")
        made.append(sq)
        return sq.start()

    yield factory
    for sq in reversed(made):
        sq.stop()
