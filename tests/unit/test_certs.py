"""Certificates made by intercloud.certs: file layout, contents, and real TLS handshakes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from intercloud import certs
from intercloud.certs import CertError, create_ca, init_certs, issue

UTC = dt.UTC


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One certificate directory shared by the read-only tests of this module."""
    directory = tmp_path_factory.mktemp("pki")
    init_certs(directory, cloud=["cloud1", "cloud2"], onprem=["onprem1"], sans=["lb.example.com", "10.0.0.1"])
    return directory


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans_of(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(ext.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
    return dns, ips


def eku_of(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_init_writes_expected_files(tmp_path: Path) -> None:
    written = init_certs(tmp_path / "pki", cloud=["cloud1"], onprem=["onprem1", "onprem2"])
    names = [p.name for p in written]
    assert sorted(names) == sorted(
        ["ca.pem", "ca.key", "crl.pem", "cloud1.pem", "cloud1.key", "onprem1.pem", "onprem1.key", "onprem2.pem", "onprem2.key"]
    )
    assert all(p.parent == tmp_path / "pki" and p.is_file() for p in written)


def test_key_files_are_private_and_certs_world_readable(pki: Path) -> None:
    for key in pki.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for pem in pki.glob("*.pem"):
        assert stat.S_IMODE(pem.stat().st_mode) == 0o644, pem


def test_keys_are_unencrypted_pkcs8_p256(pki: Path) -> None:
    for path in pki.glob("*.key"):
        data = path.read_bytes()
        assert data.startswith(b"-----BEGIN PRIVATE KEY-----"), path  # PKCS#8, not "EC PRIVATE KEY"
        key = serialization.load_pem_private_key(data, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"


def test_leaf_files_hold_only_the_leaf(pki: Path) -> None:
    for name in ("cloud1", "onprem1"):
        chain = x509.load_pem_x509_certificates((pki / f"{name}.pem").read_bytes())
        assert len(chain) == 1
        assert chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name


def test_ssl_module_loads_every_pair(pki: Path) -> None:
    for name in ("cloud1", "cloud2", "onprem1"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki / f"{name}.pem", pki / f"{name}.key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.pem")
    assert ctx.cert_store_stats()["x509_ca"] == 1


def test_private_key_is_never_world_readable_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = certs.write_private_key(tmp_path / "k.key", certs.generate_key())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# ---------------------------------------------------------------------------------------------
# Contents
# ---------------------------------------------------------------------------------------------


def test_ca_certificate(pki: Path) -> None:
    ca = load_cert(pki / "ca.pem")
    assert ca.issuer == ca.subject
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    ca.verify_directly_issued_by(ca)


def test_cloud_certificate(pki: Path) -> None:
    cert = load_cert(pki / "cloud1.pem")
    dns, ips = sans_of(cert)
    assert dns == {"cloud1", "lb.example.com", "localhost"}
    assert ips == {"127.0.0.1", "::1", "10.0.0.1"}  # the IP literal in --san became an IP SAN
    assert eku_of(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    cert.verify_directly_issued_by(load_cert(pki / "ca.pem"))


def test_onprem_certificate(pki: Path) -> None:
    cert = load_cert(pki / "onprem1.pem")
    dns, ips = sans_of(cert)
    assert dns == {"onprem1"} and ips == set()
    assert eku_of(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) == []
    cert.verify_directly_issued_by(load_cert(pki / "ca.pem"))


def test_validity_days(tmp_path: Path) -> None:
    init_certs(tmp_path, cloud=["c"], onprem=[], days=10)
    cert = load_cert(tmp_path / "c.pem")
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    # valid from one hour ago (clock skew allowance) until 10 days from now
    assert dt.timedelta(days=10) < lifetime <= dt.timedelta(days=10, hours=1, minutes=1)
    assert cert.not_valid_before_utc < dt.datetime.now(UTC)


def test_tenant_is_written_into_onprem_certificates(tmp_path: Path) -> None:
    init_certs(tmp_path, cloud=["c"], onprem=["o"], tenant="acme")
    onprem = load_cert(tmp_path / "o.pem")
    assert onprem.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
    cloud = load_cert(tmp_path / "c.pem")
    assert cloud.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) == []


# ---------------------------------------------------------------------------------------------
# Reusing a CA, and errors
# ---------------------------------------------------------------------------------------------


def test_existing_ca_is_reused(tmp_path: Path) -> None:
    init_certs(tmp_path, cloud=["cloud1"], onprem=[])
    ca_before = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()
    written = init_certs(tmp_path, cloud=[], onprem=["onprem9"])
    assert [p.name for p in written] == ["onprem9.key", "onprem9.pem"]
    assert ((tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()) == ca_before
    load_cert(tmp_path / "onprem9.pem").verify_directly_issued_by(load_cert(tmp_path / "ca.pem"))


def test_reissuing_a_name_replaces_its_files(tmp_path: Path) -> None:
    init_certs(tmp_path, cloud=["cloud1"], onprem=[])
    first = (tmp_path / "cloud1.key").read_bytes()
    init_certs(tmp_path, cloud=["cloud1"], onprem=[])
    assert (tmp_path / "cloud1.key").read_bytes() != first


def test_half_a_ca_is_an_error(tmp_path: Path) -> None:
    init_certs(tmp_path, cloud=["c"], onprem=[])
    (tmp_path / "ca.key").unlink()
    with pytest.raises(CertError, match=r"ca\.pem exists but .*ca\.key does not"):
        init_certs(tmp_path, cloud=["d"], onprem=[])


def test_mismatched_ca_pair_is_an_error(tmp_path: Path) -> None:
    init_certs(tmp_path, cloud=[], onprem=[])
    certs.write_private_key(tmp_path / "ca.key", certs.generate_key())
    with pytest.raises(CertError, match="does not belong to CA certificate"):
        init_certs(tmp_path, cloud=["c"], onprem=[])


def test_leaf_may_not_outlive_the_ca(tmp_path: Path) -> None:
    ca = create_ca(days=30)
    certs.write_certificate(tmp_path / "ca.pem", ca.cert)
    certs.write_private_key(tmp_path / "ca.key", ca.key)
    with pytest.raises(CertError, match="would outlive the CA"):
        init_certs(tmp_path, cloud=["c"], onprem=[], days=60)


@pytest.mark.parametrize(
    ("cloud", "onprem", "sans", "message"),
    [
        (["bad name"], [], [], "invalid cloud name 'bad name'"),
        ([], ["x/y"], [], "invalid onprem name 'x/y'"),
        (["ca"], [], [], "would overwrite the CA files"),
        (["gw"], ["gw"], [], "name 'gw' given twice"),
        (["c"], [], ["not a name"], "invalid subjectAltName entry 'not a name'"),
        (["c"], [], [""], "empty subjectAltName entry"),
    ],
)
def test_invalid_requests_write_nothing(tmp_path: Path, cloud, onprem, sans, message) -> None:
    with pytest.raises(CertError, match=message):
        init_certs(tmp_path / "pki", cloud=cloud, onprem=onprem, sans=sans)
    assert not (tmp_path / "pki").exists()


def test_encrypted_key_is_rejected_with_advice(tmp_path: Path) -> None:
    key = certs.generate_key()
    path = tmp_path / "enc.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(CertError, match=r"encrypted with a passphrase.*openssl pkey"):
        certs.load_private_key(path)


def test_swapped_files_are_recognised(pki: Path) -> None:
    with pytest.raises(CertError, match="swapped"):
        certs.load_certificates(pki / "cloud1.key")
    with pytest.raises(CertError, match="swapped"):
        certs.load_private_key(pki / "cloud1.pem")


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CertError, match=r"certificate .*nope\.pem: file not found"):
        certs.load_certificates(tmp_path / "nope.pem")


def test_issue_with_explicit_validity_makes_expired_certificates() -> None:
    ca = create_ca()
    now = dt.datetime.now(UTC)
    old = issue(
        ca, "old", dns_names=["old"], not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1)
    )
    assert old.cert.not_valid_after_utc < now
    with pytest.raises(CertError, match=r"expire .* before it starts"):
        issue(ca, "x", not_before=now, not_after=now - dt.timedelta(seconds=1))
    with pytest.raises(CertError, match="at least one of server or client"):
        issue(ca, "x", server=False, client=False)


def test_split_san() -> None:
    entries = certs.split_san(["a.example", "10.1.2.3", "::1", "[fe80::1]", "A.example", "*.lb.example"])
    assert entries == [
        x509.DNSName("a.example"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.IPAddress(ipaddress.ip_address("fe80::1")),
        x509.DNSName("*.lb.example"),
    ]


# ---------------------------------------------------------------------------------------------
# Real TLS handshakes over a socket pair
# ---------------------------------------------------------------------------------------------


def server_context(pki: Path, name: str, *, require_client: bool = True, ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki / f"{name}.pem", pki / f"{name}.key")
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(ca or pki / "ca.pem")
    return ctx


def client_context(pki: Path, name: str | None, *, ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.load_verify_locations(ca or pki / "ca.pem")
    if name is not None:
        ctx.load_cert_chain(pki / f"{name}.pem", pki / f"{name}.key")
    return ctx


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> tuple[Exception | None, Exception | None, dict | None]:
    """Run a TLS handshake plus one byte each way; return (client error, server error, client cert seen by server)."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as tls:
                result["peer"] = tls.getpeercert()
                tls.sendall(b"s")
                tls.recv(1)
        except Exception as exc:
            result["server_error"] = exc
        finally:
            a.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_error: Exception | None = None
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_hostname) as tls:
            # With TLS 1.3 the server checks the client certificate after the client's handshake
            # has finished: only this read tells the client whether it was accepted.
            if tls.recv(1) != b"s":
                raise ConnectionError("server closed the connection")
            tls.sendall(b"c")
    except Exception as exc:
        client_error = exc
    finally:
        b.close()
        thread.join(10)
    return client_error, result.get("server_error"), result.get("peer")  # type: ignore[return-value]


@pytest.mark.parametrize("hostname", ["localhost", "cloud1", "lb.example.com", "127.0.0.1", "::1", "10.0.0.1"])
def test_mutual_tls_handshake_verifies_cloud_names(pki: Path, hostname: str) -> None:
    client_err, server_err, peer = handshake(server_context(pki, "cloud1"), client_context(pki, "onprem1"), hostname)
    assert client_err is None and server_err is None
    assert peer is not None
    assert dict(x[0] for x in peer["subject"])["commonName"] == "onprem1"


def test_wrong_hostname_is_rejected(pki: Path) -> None:
    client_err, _, _ = handshake(server_context(pki, "cloud1"), client_context(pki, "onprem1"), "cloud2")
    assert isinstance(client_err, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in str(client_err) or "hostname" in str(client_err).lower()


def test_cloud_members_can_authenticate_each_other(pki: Path) -> None:
    # Peer links: a cloud certificate also works as a client certificate.
    client_err, server_err, _ = handshake(server_context(pki, "cloud1"), client_context(pki, "cloud2"), "cloud1")
    assert client_err is None and server_err is None


def test_onprem_certificate_cannot_serve(pki: Path) -> None:
    client_err, _, _ = handshake(
        server_context(pki, "onprem1", require_client=False), client_context(pki, None), "onprem1"
    )
    assert isinstance(client_err, ssl.SSLCertVerificationError)
    assert "certificate purpose" in str(client_err)  # "unsuitable"/"unsupported" by OpenSSL version


def test_client_without_certificate_is_rejected(pki: Path) -> None:
    client_err, server_err, _ = handshake(server_context(pki, "cloud1"), client_context(pki, None), "cloud1")
    assert isinstance(server_err, ssl.SSLError)
    assert client_err is not None


def test_expired_certificate_is_rejected(tmp_path: Path) -> None:
    init_certs(tmp_path, cloud=[], onprem=[])
    ca = certs.load_ca(tmp_path)
    assert ca is not None
    now = dt.datetime.now(UTC)
    old = issue(
        ca, "old", dns_names=["old"], not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    certs.write_certificate(tmp_path / "old.pem", old.cert)
    certs.write_private_key(tmp_path / "old.key", old.key)
    client_err, _, _ = handshake(
        server_context(tmp_path, "old", require_client=False), client_context(tmp_path, None), "old"
    )
    assert isinstance(client_err, ssl.SSLCertVerificationError)
    assert "certificate has expired" in str(client_err)


def test_certificate_from_another_ca_is_rejected(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_certs(other, cloud=[], onprem=["intruder"])
    # The intruder's client certificate is signed by a CA the cloud does not trust.
    client_err, server_err, _ = handshake(
        server_context(pki, "cloud1"), client_context(other, "intruder", ca=pki / "ca.pem"), "cloud1"
    )
    assert isinstance(server_err, ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in str(server_err)
    assert client_err is not None
    # And a client that trusts only the other CA does not accept the cloud.
    client_err, _, _ = handshake(
        server_context(pki, "cloud1", require_client=False), client_context(other, None), "cloud1"
    )
    assert isinstance(client_err, ssl.SSLCertVerificationError)
