"""Self-tests of tests/support: the harness must be trusted before it judges the product.

The Gateway harness is exercised against a tiny fake ``intercloud`` (same CLI and admin
contract), so these tests do not depend on the product being complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import textwrap

import pytest

from tests.support import procs
from tests.support.gateway import Gateway
from tests.support.markers import needs_binary
from tests.support.netcat import NetcatError, nc_exchange, nc_interactive
from tests.support.ports import free_port, free_ports
from tests.support.servers import EchoServer, RefusingPort, SinkServer, SourceServer
from tests.support.timeouts import FACTOR, async_wait_until, scaled, wait_until

pytest_plugins = ["pytester"]

# ---------------------------------------------------------------------------- timeouts


def test_scaled_uses_the_factor(timeout_factor):
    assert timeout_factor == FACTOR
    assert scaled(2.0) == pytest.approx(2.0 * FACTOR)


def test_wait_until_returns_the_truthy_value():
    calls = iter([0, None, "", "done"])
    assert wait_until(lambda: next(calls), timeout=5, interval=0.001) == "done"


def test_wait_until_names_what_and_last_value():
    with pytest.raises(AssertionError) as info:
        wait_until(lambda: [], timeout=0.05, what="the moon to rise")
    assert "the moon to rise" in str(info.value)
    assert "last observed value: []" in str(info.value)


def test_wait_until_ignores_listed_exceptions_only():
    def refused():
        raise ConnectionRefusedError("nope")

    with pytest.raises(AssertionError, match="ConnectionRefusedError"):
        wait_until(refused, timeout=0.05, ignore=(ConnectionRefusedError,))
    with pytest.raises(ConnectionRefusedError):
        wait_until(refused, timeout=0.05)


def test_async_wait_until_accepts_sync_and_async_predicates():
    async def main():
        n = {"i": 0}

        async def coro_pred():
            n["i"] += 1
            return n["i"] >= 3

        assert await async_wait_until(coro_pred, timeout=5, interval=0.001) is True
        assert await async_wait_until(lambda: 7, timeout=5) == 7
        with pytest.raises(AssertionError, match="never"):
            await async_wait_until(lambda: False, timeout=0.05, what="never")

    asyncio.run(main())


# ---------------------------------------------------------------------------- ports


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports + [free_port()]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_refusing_port_refuses():
    with RefusingPort() as closed:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", closed.port), timeout=scaled(5))


# ---------------------------------------------------------------------------- servers


def _exchange(port: int, data: bytes) -> bytes:
    """Send all, half-close, read until EOF (what a well-behaved client does)."""
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(10)) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_echo_server_honours_half_close():
    data = os.urandom(3 * 1024 * 1024)
    with EchoServer() as echo:
        assert _exchange(echo.port, data) == data
        assert _exchange(echo.port, b"") == b""
        assert echo.connections == 2
        wait_until(lambda: echo.active == 0, 5, what="echo connections to close")
        assert echo.errors == []


def test_sink_server_reports_digest_and_count():
    data = os.urandom(1024 * 1024 + 7)
    with SinkServer() as sink:
        reply = _exchange(sink.port, data)
        assert reply == hashlib.sha256(data).hexdigest().encode() + b"\n"
        (result,) = sink.wait_results(1)
        assert (result.index, result.nbytes, result.sha256) == (
            0, len(data), hashlib.sha256(data).hexdigest())


def test_source_server_sends_per_connection_payload():
    with SourceServer(lambda i: f"conn {i}\n".encode() * 1000) as source:
        assert _exchange(source.port, b"") == b"conn 0\n" * 1000
        assert _exchange(source.port, b"ignored") == b"conn 1\n" * 1000
        wait_until(lambda: source.bytes_received == 7, 5, what="source to read client bytes")


def test_stop_closes_open_connections():
    echo = EchoServer()
    s = socket.create_connection(("127.0.0.1", echo.port), timeout=scaled(5))
    echo.wait_connections(1)
    echo.stop()
    assert s.recv(10) == b""  # server side closed
    s.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", echo.port), timeout=scaled(5))


# ---------------------------------------------------------------------------- netcat


@needs_binary("nc")
def test_nc_exchange_half_close_roundtrip():
    data = os.urandom(200_000)
    with EchoServer() as echo:
        assert nc_exchange("127.0.0.1", echo.port, data) == data
    with SinkServer() as sink:
        assert nc_exchange("127.0.0.1", sink.port, data).strip() == hashlib.sha256(data).hexdigest().encode()


@needs_binary("nc")
def test_nc_exchange_without_half_close_reads_until_server_closes():
    with SourceServer(b"server speaks first\n") as source:
        # nc keeps its side open; SourceServer half-closes, nc then exits on its own.
        out = nc_exchange("127.0.0.1", source.port, b"", half_close=False, timeout=10)
        assert out == b"server speaks first\n"


@needs_binary("nc")
def test_nc_exchange_refused_raises():
    with RefusingPort() as closed, pytest.raises(NetcatError) as info:
        nc_exchange("127.0.0.1", closed.port, b"x", timeout=5)
    assert info.value.returncode != 0


@needs_binary("nc")
def test_nc_interactive_session():
    with EchoServer() as echo, nc_interactive("127.0.0.1", echo.port) as session:
        session.send(b"ping\n")
        assert session.read_exactly(5) == b"ping\n"
        session.send(b"last")
        session.shutdown_write()
        assert session.read_until_eof() == b"last"
        assert session.wait_exit() == 0


# ---------------------------------------------------------------------------- procs


@needs_binary("sh", "sleep")
def test_process_group_is_tracked_and_killed():
    position = procs.mark()
    # The main process exits at once but leaves a grandchild in its process group.
    tracked = procs.spawn(["sh", "-c", "sleep 60 & echo started"], title="orphan maker",
                          stdout=subprocess.PIPE)
    assert tracked.popen.stdout.readline() == b"started\n"
    tracked.popen.wait(scaled(5))
    assert tracked.alive(), "the grandchild keeps the group alive"
    assert procs.leftovers(position) == [tracked]
    procs.stop(tracked)
    tracked.popen.stdout.close()
    assert procs.leftovers(position) == []


# ---------------------------------------------------------------------------- gateway

FAKE_MAIN = textwrap.dedent('''
    """A stand-in for `python -m intercloud run CONFIG --log-format json` (admin contract only)."""
    import json, signal, sys, threading, tomllib
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    def log(**rec):
        print(json.dumps(rec), flush=True)

    assert sys.argv[1] == "run" and sys.argv[3:] == ["--log-format", "json"], sys.argv
    cfg = tomllib.load(open(sys.argv[2], "rb"))
    fake = cfg.get("fake", {})
    print("plain text line, not JSON", file=sys.stderr, flush=True)
    if "exit_code" in fake:
        log(level="error", event="config.invalid")
        sys.exit(fake["exit_code"])
    host, port = cfg["gateway"]["admin"].rsplit(":", 1)
    polls = {"n": 0}

    class Admin(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path == "/readyz":
                polls["n"] += 1
                code = 200 if polls["n"] > fake.get("not_ready_polls", 2) else 503
                body = b"ready" if code == 200 else b"starting"
            elif self.path == "/healthz":
                code, body = 200, b"ok"
            elif self.path == "/api/status":
                code = 200
                body = json.dumps({"node_id": cfg["gateway"].get("node_id", "fake"),
                                   "role": "cloud", "tunnels": [], "services": [],
                                   "streams": []}).encode()
            else:
                code, body = 404, b"no"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((host, int(port)), Admin)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGHUP, lambda *a: log(level="info", event="config.reloaded"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log(level="info", event="gateway.started", admin=cfg["gateway"]["admin"])
    done.wait()
    log(level="info", event="gateway.drained")
    sys.exit(0)
''')


@pytest.fixture
def fake_intercloud(tmp_path):
    """PYTHONPATH env that makes `python -m intercloud` the fake above."""
    pkg = tmp_path / "fake-site" / "intercloud"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_MAIN)
    return {"PYTHONPATH": str(pkg.parent)}


def _config(node: str = "cloud-1", extra: str = "") -> str:
    return f'[gateway]\nnode_id = "{node}"\nadmin = "127.0.0.1:{free_port()}"\n{extra}'


def test_gateway_lifecycle(gateways, fake_intercloud):
    gw = gateways("cloud1", _config(), env=fake_intercloud)
    assert gw.running and gw.admin_url.startswith("http://127.0.0.1:")
    assert gw.http_get("/healthz") == (200, b"ok")
    assert gw.status()["node_id"] == "cloud-1"

    started = gw.wait_log(lambda r: r["event"] == "gateway.started")
    assert started["admin"] == gw.admin_url.removeprefix("http://")
    assert "plain text line, not JSON" in gw.log_text()
    assert all(isinstance(r, dict) for r in gw.log_lines())

    mark = gw.log_mark()
    gw.signal(signal.SIGHUP)
    gw.wait_log("config.reloaded", since=mark)

    gw.terminate()
    assert gw.wait_exit() == 0
    assert gw.log_lines()[-1]["event"] == "gateway.drained"

    first_pid = gw.pid
    gw.restart(_config(node="cloud-1b"))
    assert gw.pid != first_pid and gw.status()["node_id"] == "cloud-1b"
    assert "restarting cloud1" in gw.log_text()
    assert gw.kill() == -signal.SIGKILL


def test_gateway_wait_ready_fails_fast_when_process_exits(gateways, fake_intercloud):
    gw = gateways("broken", _config(extra="[fake]\nexit_code = 3\n"), env=fake_intercloud,
                  ready=False)
    with pytest.raises(AssertionError) as info:
        gw.wait_ready(timeout=30)
    message = str(info.value)
    assert "exited with code 3" in message and "config.invalid" in message
    with pytest.raises(AssertionError, match="without logging"):
        gw.wait_log("never logged", timeout=30)


def test_gateway_wait_ready_times_out_with_last_status(gateways, fake_intercloud):
    gw = gateways("slow", _config(extra="[fake]\nnot_ready_polls = 1000000\n"),
                  env=fake_intercloud, ready=False)
    with pytest.raises(AssertionError) as info:
        gw.wait_ready(timeout=0.5)
    assert "503" in str(info.value) and "gateway.started" in str(info.value)


def test_gateway_config_without_admin_is_reported(tmp_path):
    gw = Gateway(tmp_path, "noadmin", "[gateway]\nnode_id = 'x'\n")
    with pytest.raises(AssertionError, match="no \\[gateway\\] admin"):
        gw.wait_ready()


# ---------------------------------------------------------------------------- conftest hooks

_INNER_TESTS = '''
import signal, sys
import pytest
from tests.support import procs

@pytest.fixture(scope="module")
def module_leak():
    procs.spawn(["sleep", "61"], title="module-scoped leak")

def test_uses_module_fixture(module_leak):
    pass

def test_leaks_a_process():
    procs.spawn(["sleep", "60"], title="leaky sleep")

def test_failing_gateway_attaches_log(gateways, tmp_path):
    fake = tmp_path / "fake" / "intercloud"
    fake.mkdir(parents=True)
    (fake / "__main__.py").write_text("print('fake gateway says goodbye'); raise SystemExit(1)")
    gw = gateways("attached", "[gateway]\\nadmin = \\"127.0.0.1:1\\"\\n",
                  env={"PYTHONPATH": str(fake.parent)}, ready=False)
    gw.wait_exit(30)
    assert False, "deliberate failure"
'''


@needs_binary("sleep")
def test_conftest_kills_leftovers_and_attaches_logs(pytester, monkeypatch):
    from tests.support.gateway import REPO_ROOT

    pytester.makeconftest((REPO_ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_inner=_INNER_TESTS)
    env_path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", env_path)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    out = result.stdout.str()
    assert "processes left running after the test (now killed)" in out, out
    assert "leaky sleep" in out
    assert "deliberate failure" in out
    # the gateway's log is attached to the report
    assert "gateway attached (pid" in out and "fake gateway says goodbye" in out, out
    # a leak from a wider-scoped fixture is caught once the session ends
    assert "processes left running at the end of the session (now killed)" in out, out
    assert "module-scoped leak" in out
    result.assert_outcomes(passed=2, failed=1, errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
