"""TLS contexts: the suites they negotiate (docs/performance.md P9) and mutual authentication, over
memory BIOs (no sockets)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from intercloud.certs import init_certs
from intercloud.transport.tls import client_context, prefer_tls13_suites, server_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_certs(directory, cloud=["cloud1"], onprem=["onprem1"])
    return directory


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_name: str = "cloud1") -> tuple:
    """Run a TLS handshake between two contexts in memory; return (version, cipher) the client sees."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname=server_name)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", cli), ("s", srv)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "handshake did not finish"
    return cli.version(), cli.cipher()[0], srv.getpeercert()


def gateway_contexts(pki: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = server_context(pki / "cloud1.pem", pki / "cloud1.key", pki / "ca.pem", verify_client=True)
    client = client_context(pki / "onprem1.pem", pki / "onprem1.key", pki / "ca.pem")
    return server, client


def test_gateways_negotiate_tls13_aes128_gcm(pki: Path) -> None:
    version, cipher, peer = handshake(*gateway_contexts(pki))
    assert (version, cipher) == ("TLSv1.3", "TLS_AES_128_GCM_SHA256")
    assert peer, "the cloud side verified the on-prem client certificate"


def test_all_default_suites_stay_enabled_in_our_order(pki: Path) -> None:
    server, client = gateway_contexts(pki)
    for ctx in (server, client):
        tls13 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
        assert tls13 == ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]


@pytest.mark.parametrize("only", ["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"])
def test_a_peer_offering_another_suite_still_connects(pki: Path, only: str) -> None:
    server, client = gateway_contexts(pki)
    assert prefer_tls13_suites(client, only)
    assert handshake(server, client)[:2] == ("TLSv1.3", only)


def test_unknown_suite_is_refused_and_leaves_context_usable(pki: Path) -> None:
    server, client = gateway_contexts(pki)
    assert not prefer_tls13_suites(client, "TLS_NO_SUCH_SUITE")
    assert handshake(server, client)[1] == "TLS_AES_128_GCM_SHA256"
