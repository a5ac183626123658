"""TLS contexts for both roles (DESIGN §2, issue 2 item 4): TLS 1.2 minimum, mutual by default."""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID


def server_context(cert: Path, key: Path, ca: Path | None, verify_client: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if verify_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def client_context(cert: Path | None, key: Path | None, ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        ctx.load_verify_locations(cafile=str(ca))
    else:
        ctx.load_default_certs()
    if cert and key:
        ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def describe_peer_cert(der: bytes | None) -> dict:
    """Subject CN, issuer CN and fingerprint of a DER certificate, for logs and diagnostics."""
    if not der:
        return {}
    cert = x509.load_der_x509_certificate(der)

    def cn(name: x509.Name) -> str:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else name.rfc4514_string()

    from cryptography.hazmat.primitives import hashes

    return {
        "subject": cn(cert.subject),
        "issuer": cn(cert.issuer),
        "fingerprint": "sha256:" + cert.fingerprint(hashes.SHA256()).hex(),
    }


def session_info(ssl_object) -> dict:
    if ssl_object is None:
        return {"tls": "none"}
    cipher = ssl_object.cipher()
    return {"tls": ssl_object.version(), "cipher": cipher[0] if cipher else "?"}
