"""On-prem gateways behind a corporate forward proxy: a real squid between on-prem and cloud.

Every mode an operator meets: a plain CONNECT proxy (configured, or from HTTPS_PROXY with NO_PROXY
honoured), one that wants credentials (which must never leak), one that forbids CONNECT, and one
that intercepts TLS (ssl-bump: must fail with a message that names the fix) or merely splices it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from tests.support.netcat import nc_exchange
from tests.support.squid import Squid, connect_via_proxy, has_ssl_bump
from tests.support.timeouts import scaled, wait_until

from .conftest import wait_tunnels
from .topology import make_pair

pytestmark = pytest.mark.needs_binary("squid", "nc")

needs_ssl_bump = pytest.mark.skipif(not has_ssl_bump(), reason="needs squid built with OpenSSL (squid-openssl)")


def _start_pair(tmp_path, gateways, echo_a, echo_b, *, proxy: str | None = None, env: dict | None = None,
                onprem_ready: bool = True):
    pair = make_pair(tmp_path, a_target=echo_a.port, b_target=echo_b.port)
    if proxy is not None:
        pair.extra_onprem_tunnel = f'proxy = "{proxy}"\n'
    cloud = gateways("cloud1", pair.cloud_config())
    onprem = gateways("onprem1", pair.onprem_config(), ready=onprem_ready, env=env)
    return pair, cloud, onprem


def _assert_echo_both_ways(pair) -> None:
    assert nc_exchange("127.0.0.1", pair.a_port, b"cloud to onprem\n") == b"cloud to onprem\n"
    assert nc_exchange("127.0.0.1", pair.b_port, b"onprem to cloud\n") == b"onprem to cloud\n"


def _onprem_peer(onprem) -> str:
    """Where the on-prem gateway's tunnel socket goes: the proxy, or the cloud directly."""
    tunnels = onprem.status()["tunnels"]
    assert len(tunnels) == 1, tunnels
    return tunnels[0]["peer_addr"]


def _tunnel_connects(squid: Squid, pair) -> list[str]:
    """Access-log lines of CONNECTs to the cloud's tunnel port (squid logs a CONNECT when it ends)."""
    return [line for line in squid.access_log_text().splitlines()
            if "CONNECT" in line and f":{pair.tunnel_port}" in line]


def _dial_failure(onprem, since: int = 0) -> dict:
    return onprem.wait_log(lambda r: r["event"] == "tunnel.dial_failed", timeout=15, since=since)


def _probe_logged(squid: Squid) -> None:
    """CONNECT through squid ourselves and wait until squid logged it: everything squid finished
    before (such as a tunnel whose gateway has stopped) is then in its access log too."""
    with socket_listener() as port:
        resp = connect_via_proxy(squid.host, squid.port, "127.0.0.1", port, auth=squid.auth)
        resp.sock.close()
        assert resp.status == 200, resp.head
        wait_until(lambda: f"127.0.0.1:{port}" in squid.access_log_text(), 10,
                   what=f"squid to log the probe CONNECT to port {port}")


class socket_listener:  # noqa: N801 - used as a context manager like a function
    """A listening loopback socket (a CONNECT target that accepts)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


# --- mode connect ------------------------------------------------------------------------------

def test_configured_proxy_carries_the_tunnel(tmp_path, gateways, squids, echo_a, echo_b):
    squid = squids("connect")
    pair, cloud, onprem = _start_pair(tmp_path, gateways, echo_a, echo_b, proxy=squid.url)
    wait_tunnels(cloud, 1)
    assert _onprem_peer(onprem) == f"127.0.0.1:{squid.port}"
    _assert_echo_both_ways(pair)
    assert echo_a.connections == 1 and echo_b.connections == 1
    onprem.stop()  # squid writes the CONNECT line when the tunnel ends
    wait_until(lambda: _tunnel_connects(squid, pair), 10, what="squid access log to show the tunnel's CONNECT")
    line = _tunnel_connects(squid, pair)[0]
    assert f"localhost:{pair.tunnel_port}" in line and "/200" in line, line


def test_https_proxy_from_environment(tmp_path, gateways, squids, echo_a, echo_b):
    squid = squids("connect")
    pair, cloud, onprem = _start_pair(tmp_path, gateways, echo_a, echo_b, env={"HTTPS_PROXY": squid.url})
    assert "proxy" not in tomllib.loads(onprem.config_text)["tunnel"]
    wait_tunnels(cloud, 1)
    assert _onprem_peer(onprem) == f"127.0.0.1:{squid.port}"
    _assert_echo_both_ways(pair)
    onprem.stop()
    wait_until(lambda: _tunnel_connects(squid, pair), 10, what="squid access log to show the tunnel's CONNECT")


def test_no_proxy_covering_the_cloud_goes_direct(tmp_path, gateways, squids, echo_a, echo_b):
    squid = squids("connect")
    env = {"HTTPS_PROXY": squid.url, "NO_PROXY": "example.com,localhost"}
    pair, cloud, onprem = _start_pair(tmp_path, gateways, echo_a, echo_b, env=env)
    wait_tunnels(cloud, 1)
    assert _onprem_peer(onprem) == f"127.0.0.1:{pair.tunnel_port}"
    _assert_echo_both_ways(pair)
    onprem.stop()
    _probe_logged(squid)
    assert _tunnel_connects(squid, pair) == [], squid.access_log_text()


# --- mode auth -----------------------------------------------------------------------------------

def test_proxy_credentials_work_and_never_leak(tmp_path, gateways, squids, echo_a, echo_b):
    squid = squids("auth")
    secret = squid.password
    assert f":{secret}@" in squid.url
    pair, cloud, onprem = _start_pair(tmp_path, gateways, echo_a, echo_b, proxy=squid.url)
    wait_tunnels(cloud, 1)
    assert _onprem_peer(onprem) == f"127.0.0.1:{squid.port}"
    _assert_echo_both_ways(pair)

    code, body = onprem.http_get("/api/status")
    assert code == 200
    json.loads(body)
    assert secret.encode() not in body
    code, body = onprem.http_get("/metrics")
    assert secret.encode() not in body

    check = subprocess.run([sys.executable, "-m", "intercloud", "check", str(onprem.config_path)],
                           capture_output=True, text=True, timeout=scaled(30))
    assert check.returncode == 0, check.stderr
    assert secret not in check.stdout + check.stderr

    onprem.stop()
    wait_until(lambda: _tunnel_connects(squid, pair), 10, what="squid access log to show the tunnel's CONNECT")
    assert secret not in onprem.log_text()
    assert secret not in cloud.log_text()


@pytest.mark.parametrize("bad_url", [
    "http://tunnel-user:{pw}@127.0.0.1:99999",      # port out of range
    "http://tunnel-user:{pw}@127.0.0.1:http",      # port not a number
    "http://tunnel-user:{pw}@127.0.0.1",           # no port
    "https://tunnel-user:{pw}@127.0.0.1:3128",     # TLS to the proxy
    "socks5://tunnel-user:{pw}@127.0.0.1:1080",    # not an HTTP proxy
    "http://tunnel-user:{pw}@127.0.0.1:3128/path",  # a path
    "http://:{pw}@127.0.0.1:3128",                 # password without user
])
def test_invalid_proxy_url_never_shows_the_password(tmp_path, bad_url):
    secret = Squid.password
    pair = make_pair(tmp_path, a_target=1, b_target=2)
    pair.extra_onprem_tunnel = f'proxy = "{bad_url.format(pw=secret)}"\n'
    cfg = tmp_path / "onprem.toml"
    cfg.write_text(pair.onprem_config())
    for command in ("check", "run"):
        out = subprocess.run([sys.executable, "-m", "intercloud", command, str(cfg)],
                             capture_output=True, text=True, timeout=scaled(30))
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        text = out.stdout + out.stderr
        assert "tunnel.proxy" in text, text
        assert secret not in text, text


def test_proxy_without_credentials_says_it_wants_them(tmp_path, gateways, squids, echo_a, echo_b):
    squid = squids("auth")
    plain = f"http://{squid.host}:{squid.port}"
    _pair, _cloud, onprem = _start_pair(tmp_path, gateways, echo_a, echo_b, proxy=plain, onprem_ready=False)
    reason = _dial_failure(onprem)["reason"]
    assert "407" in reason and "credentials" in reason, reason
    assert f"127.0.0.1:{squid.port}" in reason, reason
    assert onprem.http_get("/readyz")[0] == 503


# --- mode deny -----------------------------------------------------------------------------------

def test_proxy_denying_connect(tmp_path, gateways, squids, echo_a, echo_b):
    squid = squids("deny")
    pair, _cloud, onprem = _start_pair(tmp_path, gateways, echo_a, echo_b, proxy=squid.url, onprem_ready=False)
    rec = _dial_failure(onprem)
    reason = rec["reason"]
    assert "refused CONNECT" in reason and "403" in reason, reason
    assert f"forward proxy http://127.0.0.1:{squid.port}" in reason, reason
    assert f"localhost:{pair.tunnel_port}" in reason, reason
    assert rec["level"] == "WARNING"
    assert onprem.http_get("/readyz")[0] == 503
    # it keeps retrying (squid logs each refused CONNECT) and stays not ready
    wait_until(lambda: len(_tunnel_connects(squid, pair)) >= 2, 10, what="the on-prem gateway to retry")
    assert onprem.http_get("/readyz")[0] == 503
    assert onprem.status()["tunnels"] == []
    assert "Traceback" not in onprem.log_text()


# --- modes bump and splice -----------------------------------------------------------------------

@needs_ssl_bump
def test_tls_intercepting_proxy_fails_naming_the_fix(tmp_path, gateways, squids, echo_a, echo_b):
    squid = squids("bump")
    _pair, cloud, onprem = _start_pair(tmp_path, gateways, echo_a, echo_b, proxy=squid.url, onprem_ready=False)
    reason = _dial_failure(onprem)["reason"]
    assert "intercepts TLS" in reason, reason
    assert "splice" in reason, reason
    assert f"127.0.0.1:{squid.port}" in reason, reason
    assert onprem.http_get("/readyz")[0] == 503
    assert cloud.status()["tunnels"] == []
    assert "Traceback" not in onprem.log_text()


@needs_ssl_bump
def test_splicing_proxy_works_end_to_end(tmp_path, gateways, squids, echo_a, echo_b):
    squid = squids("splice")
    pair, cloud, onprem = _start_pair(tmp_path, gateways, echo_a, echo_b, proxy=squid.url)
    wait_tunnels(cloud, 1)
    assert _onprem_peer(onprem) == f"127.0.0.1:{squid.port}"
    _assert_echo_both_ways(pair)
    t = cloud.status()["tunnels"][0]
    assert t["peer_cert"] == "onprem1"  # mutual TLS passed through the proxy untouched


@pytest.mark.parametrize("bad_env", [
    "socks5://tunnel-user:{pw}@127.0.0.1:1080",
    "http://tunnel-user:{pw}@127.0.0.1:99999",
])
def test_invalid_https_proxy_environment_is_reported_without_the_password(tmp_path, gateways, echo_a, echo_b,
                                                                          bad_env):
    secret = Squid.password
    _pair, cloud, onprem = _start_pair(tmp_path, gateways, echo_a, echo_b, onprem_ready=False,
                                       env={"HTTPS_PROXY": bad_env.format(pw=secret)})
    reason = _dial_failure(onprem)["reason"]
    assert "HTTPS_PROXY" in reason, reason
    assert onprem.running and onprem.http_get("/readyz")[0] == 503
    assert cloud.status()["tunnels"] == []
    text = onprem.log_text()
    assert secret not in text and "Traceback" not in text, text
