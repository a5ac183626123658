"""Proves tests/support/squid.py starts a real squid that behaves as each mode promises.

Gateways behind corporate proxies are tested against this harness, so the harness itself
must be shown right: the certificate a client sees through the proxy tells whether TLS was
relayed untouched (connect, auth, splice) or intercepted (bump).
"""

from __future__ import annotations

import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.support import pki
from tests.support.markers import needs_binary
from tests.support.servers import EchoServer
from tests.support.squid import connect_via_proxy, has_ssl_bump
from tests.support.timeouts import scaled

pytestmark = needs_binary("squid", "openssl")

needs_ssl_bump = pytest.mark.skipif(
    not has_ssl_bump(),
    reason="needs squid built with OpenSSL (squid-openssl)")

MESSAGE = b"hello through the proxy\n" * 100


@pytest.fixture(scope="module")
def tls_echo(tmp_path_factory):
    """A TLS echo server with a self-signed certificate: (server, certificate)."""
    cert = pki.self_signed(tmp_path_factory.mktemp("tls-echo"), "tls-echo-target")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert_path, cert.key_path)
    with EchoServer(ssl=ctx) as server:
        yield server, cert.cert


def tls_exchange(squid, port: int) -> tuple[x509.Certificate, bytes]:
    """CONNECT through ``squid`` to 127.0.0.1:port, do TLS without verification, echo."""
    resp = connect_via_proxy(squid.host, squid.port, "127.0.0.1", port, auth=squid.auth)
    with resp.sock:
        assert resp.status == 200, resp.head
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(resp.sock, server_hostname="localhost") as tls:
            tls.settimeout(scaled(10))
            seen = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            tls.sendall(MESSAGE)
            got = b""
            while len(got) < len(MESSAGE):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                got += chunk
    return seen, got


def fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


@pytest.mark.parametrize(
    "mode", ["connect", "auth", pytest.param("splice", marks=needs_ssl_bump)])
def test_tls_passes_untouched(squids, tls_echo, mode):
    server, server_cert = tls_echo
    squid = squids(mode)
    seen, echoed = tls_exchange(squid, server.port)
    assert fingerprint(seen) == fingerprint(server_cert)
    assert echoed == MESSAGE
    assert "CONNECT" in squid.access_log_text() or mode == "splice"


@needs_ssl_bump
def test_bump_presents_a_certificate_from_squids_ca(squids, tls_echo):
    server, server_cert = tls_echo
    squid = squids("bump")
    ca = x509.load_pem_x509_certificate(squid.ca_cert_path.read_bytes())
    seen, echoed = tls_exchange(squid, server.port)
    assert fingerprint(seen) != fingerprint(server_cert)
    assert seen.issuer == ca.subject
    seen.verify_directly_issued_by(ca)  # raises if not really signed by squid's CA
    assert echoed == MESSAGE  # non-HTTP inside the bumped tunnel is still relayed


def test_deny_refuses_connect_with_403(squids, tls_echo):
    server, _ = tls_echo
    squid = squids("deny")
    resp = connect_via_proxy(squid.host, squid.port, "127.0.0.1", server.port)
    resp.sock.close()
    assert resp.status == 403


@pytest.mark.parametrize("creds", [None, ("tunnel-user", "wrong-password")])
def test_auth_requires_credentials(squids, tls_echo, creds):
    server, _ = tls_echo
    squid = squids("auth")
    assert squid.url.startswith(f"http://{squid.username}:{squid.password}@127.0.0.1:")
    resp = connect_via_proxy(squid.host, squid.port, "127.0.0.1", server.port, auth=creds)
    resp.sock.close()
    assert resp.status == 407
    assert b"proxy-authenticate: basic" in resp.head.lower()
