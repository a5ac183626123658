"""TCP options of tunnel sockets and TCP_INFO (transport/sockopts.py), on real loopback connections."""

from __future__ import annotations

import errno
import logging
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from intercloud.admin.status import tcp_view
from intercloud.transport import sockopts

HEADER = Path("/usr/include/linux/tcp.h")


@pytest.fixture
def pair():
    """A connected loopback TCP pair (client, server end)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname(), timeout=5)
        server, _ = srv.accept()
    server.settimeout(5)
    yield client, server
    client.close()
    server.close()


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test starts as a fresh process would: nothing warned about yet, nothing resolved."""
    monkeypatch.setattr(sockopts, "_warned", set())
    monkeypatch.setattr(sockopts, "_in_use", {})


def congestion_of(sock) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, sockopts.TCP_CONGESTION, 16).split(b"\0")[0].decode()


def kernel_default() -> str:
    with socket.socket() as s:
        return congestion_of(s)


def other_than_default() -> str:
    """An algorithm this kernel has that new sockets do not get by default (reno is always built in)."""
    default = kernel_default()
    names = [n for n in (sockopts.available() or ["reno"]) if n != default]
    return "reno" if "reno" in names else names[0]


def ping_pong(a, b, rounds: int = 50, size: int = 1000) -> None:
    for _ in range(rounds):
        a.sendall(b"x" * size)
        got = 0
        while got < size:
            got += len(b.recv(65536))
        b.sendall(b"y")
        assert a.recv(1) == b"y"


def test_tcp_info_layout_matches_the_kernel_header(tmp_path):
    """Every offset and size in TCP_INFO_FIELDS is the one linux/tcp.h gives (compiled with offsetof)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        pytest.skip("needs a C compiler and /usr/include/linux/tcp.h")
    lines = "".join(
        f'printf("{name} %zu %zu\\n", offsetof(struct tcp_info, tcpi_{name}), '
        f"sizeof(((struct tcp_info *)0)->tcpi_{name}));\n"
        for name, _fmt, _off in sockopts.TCP_INFO_FIELDS)
    src = tmp_path / "layout.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/tcp.h>\nint main(void) {\n"
                   f"{lines}return 0;\n}}\n")
    subprocess.run([cc, str(src), "-o", str(tmp_path / "layout")], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    header = {name: (int(off), int(size)) for name, off, size in (line.split() for line in out.splitlines())}
    ours = {name: (off, {"B": 1, "I": 4, "Q": 8}[fmt]) for name, fmt, off in sockopts.TCP_INFO_FIELDS}
    assert ours == header


def test_tcp_info_of_a_loopback_connection(pair):
    client, server = pair
    ping_pong(client, server)
    info = sockopts.tcp_info(client)
    assert info is not None
    assert info["state"] == 1  # TCP_ESTABLISHED
    assert info["rtt"] > 0 and info["min_rtt"] > 0 and info["rto"] > 0
    assert info["snd_cwnd"] > 0 and info["snd_mss"] > 0
    assert info["bytes_sent"] >= 50 * 1000 and info["bytes_acked"] >= 50 * 1000
    assert info["total_retrans"] == 0 and info["bytes_retrans"] == 0
    assert info["congestion"] == congestion_of(client) == kernel_default()
    assert info["send_queue"] == 0 and info["notsent_bytes"] == 0  # all acknowledged by now
    assert info["notsent_lowat"] == 0  # not set
    assert sockopts.pacing_rate(client) == info["pacing_rate"] > 0  # the one field, as size_queues reads it


def test_pacing_rate_and_notsent_lowat_setter_on_odd_sockets(pair):
    """Tunnel.size_queues reads the rate of whatever socket it has: none, a Unix socket or a closed
    one give 0 (the configured limits stay); the setter takes a new value on a live socket."""
    client, _server = pair
    sockopts.set_notsent_lowat(client, 48 * 1024)
    assert client.getsockopt(socket.IPPROTO_TCP, sockopts.TCP_NOTSENT_LOWAT) == 48 * 1024
    a, b = socket.socketpair()
    with a, b:
        assert sockopts.pacing_rate(a) == 0
    assert sockopts.pacing_rate(None) == 0
    client.close()
    assert sockopts.pacing_rate(client) == 0
    sockopts.set_notsent_lowat(client, 16 * 1024)  # closed: nothing to do, no error


def test_send_queue_counts_what_the_peer_has_not_taken(pair):
    client, server = pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast: data stays in client's queue
    client.setblocking(False)
    sent = 0
    try:
        while sent < 8 * 1024 * 1024:
            sent += client.send(b"z" * 65536)
    except BlockingIOError:
        pass
    info = sockopts.tcp_info(client)
    assert info["send_queue"] > 0 and info["notsent_bytes"] > 0
    assert info["send_queue"] >= info["notsent_bytes"]


def test_apply_sets_congestion_and_notsent_lowat(pair):
    client, server = pair
    name = other_than_default()
    assert sockopts.apply(client, name, 64 * 1024) == []
    assert congestion_of(client) == name
    assert client.getsockopt(socket.IPPROTO_TCP, sockopts.TCP_NOTSENT_LOWAT) == 64 * 1024
    assert congestion_of(server) == kernel_default()  # the other end is its own socket
    info = sockopts.tcp_info(client)
    assert info["congestion"] == name and info["notsent_lowat"] == 64 * 1024
    assert sockopts.in_use_for(name) == name


def test_apply_works_on_asyncios_transport_socket(pair):
    """What Tunnel.on_ws_connected gets from get_extra_info("socket"): asyncio's TransportSocket."""
    from asyncio.trsock import TransportSocket

    client, _server = pair
    wrapped = TransportSocket(client)
    name = other_than_default()
    assert sockopts.apply(wrapped, name, 16 * 1024) == []
    assert congestion_of(client) == name
    assert sockopts.tcp_info(wrapped)["notsent_lowat"] == 16 * 1024


def test_system_and_zero_leave_the_kernels_settings(pair):
    client, _server = pair
    assert sockopts.apply(client, "system", 0) == []
    assert congestion_of(client) == kernel_default()
    assert client.getsockopt(socket.IPPROTO_TCP, sockopts.TCP_NOTSENT_LOWAT) == 0
    assert sockopts.in_use_for("system") == kernel_default()


def test_unknown_algorithm_keeps_the_default_and_warns_once(caplog):
    default = kernel_default()
    caplog.set_level(logging.INFO, logger="intercloud.tunnel")
    problems = []
    with socket.create_server(("127.0.0.1", 0)) as srv:
        for _ in range(5):  # five tunnels, dialed and accepted
            with socket.create_connection(srv.getsockname()) as c:
                s, _ = srv.accept()
                with s:
                    for sock in (c, s):
                        problems += sockopts.apply(sock, "nosuchcc", 128 * 1024, source="/etc/gw.toml")
                        assert congestion_of(sock) == default
                        # the other option is still set
                        assert sock.getsockopt(socket.IPPROTO_TCP, sockopts.TCP_NOTSENT_LOWAT) == 128 * 1024
    assert len(problems) == 10  # each socket reports it...
    lines = [r for r in caplog.records if "nosuchcc" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # ...the log says it once
    msg = lines[0].getMessage()
    assert lines[0].levelno == logging.WARNING and lines[0].event == "tunnel.congestion_fallback"
    assert "/etc/gw.toml" in msg and '[tunnel] congestion = "nosuchcc"' in msg
    assert f'kernel\'s default "{default}"' in msg  # what is used instead
    assert "modprobe tcp_nosuchcc" in msg and 'congestion = "system"' in msg  # what to do
    assert sockopts.in_use_for("nosuchcc") == default


class _Refusing:
    """A TCP socket whose kernel refuses every congestion algorithm with ``code`` (EPERM cannot be
    provoked on a host whose tcp_allowed_congestion_control lists every algorithm it has)."""

    def __init__(self, sock, code):
        self.sock, self.code = sock, code
        self.family, self.type = sock.family, sock.type

    def setsockopt(self, level, opt, value):
        if opt == sockopts.TCP_CONGESTION:
            raise OSError(self.code, "refused")
        self.sock.setsockopt(level, opt, value)

    def getsockopt(self, *args):
        return self.sock.getsockopt(*args)


def test_algorithm_not_permitted_says_which_sysctl_to_change(pair, caplog):
    client, _server = pair
    caplog.set_level(logging.WARNING, logger="intercloud.tunnel")
    for _ in range(3):
        (problem,) = sockopts.apply(_Refusing(client, errno.EPERM), "bbr", 0)
    assert "CAP_NET_ADMIN" in problem and "net.ipv4.tcp_allowed_congestion_control" in problem
    assert f'default "{kernel_default()}"' in problem
    assert len([r for r in caplog.records if "bbr" in r.getMessage()]) == 1
    # another reason for the same algorithm is another line
    sockopts.apply(_Refusing(client, errno.ENOENT), "bbr", 0)
    assert len([r for r in caplog.records if "bbr" in r.getMessage()]) == 2


def test_sockets_that_are_not_tcp_are_skipped_silently(caplog):
    caplog.set_level(logging.DEBUG, logger="intercloud.tunnel")
    a, b = socket.socketpair()
    with a, b:
        assert sockopts.apply(a, "nosuchcc", 64 * 1024) == []
        assert sockopts.tcp_info(a) is None and tcp_view(a) is None
    assert sockopts.apply(None, "bbr", 0) == [] and sockopts.tcp_info(None) is None
    assert not caplog.records


def test_a_closed_socket_has_no_tcp_info(pair):
    client, _server = pair
    client.close()
    assert sockopts.tcp_info(client) is None


def test_status_view_of_a_connection(pair):
    client, server = pair
    sockopts.apply(client, other_than_default(), 64 * 1024)
    ping_pong(client, server, rounds=20)
    view = tcp_view(client)
    assert view["congestion"] == other_than_default() and view["notsent_lowat"] == 64 * 1024
    assert view["rtt_ms"] > 0 and view["min_rtt_ms"] > 0 and view["cwnd"] > 0
    assert view["retransmits"] == 0 and view["bytes_retrans"] == 0 and view["send_queue_bytes"] == 0
    assert set(view) >= {"rttvar_ms", "notsent_bytes", "delivery_rate_bps", "pacing_rate_bps", "bytes_sent"}
