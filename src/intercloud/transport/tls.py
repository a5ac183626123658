"""TLS contexts for both roles (docs/configuration.md [tls], docs/operations.md §2): TLS 1.2 minimum, mutual by default."""

from __future__ import annotations

import ctypes
import logging
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

log = logging.getLogger("intercloud.tls")

# TLS 1.3 suites in our order of preference. OpenSSL 3 puts AES-256-GCM first; AES-128-GCM is the same
# construction with 10 rounds instead of 14 and costs ~25 % less CPU per byte (docs/performance.md, P9:
# AES-GCM is a quarter of a gateway's CPU per GB). Go's crypto/tls (frp, most clouds' front ends) and
# Mozilla's recommended configurations also put it first. All three stay enabled: a peer that only
# offers AES-256 or ChaCha20 still connects.
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def _ssl_ctx_pointer(ctx: ssl.SSLContext):
    """OpenSSL's SSL_CTX* behind ``ctx`` and the libssl that CPython uses, or None if unavailable.
    Python (3.11, and no later version yet) has no API for TLS 1.3 suites; CPython's PySSLContext
    starts with PyObject_HEAD then the SSL_CTX pointer (aiofastnet, our TLS transport, relies on the
    same layout). The pointer is checked against ``ctx.options`` before it is used."""
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)  # dlsym on it also searches the libssl it links against
        get_options = lib.SSL_CTX_get_options
        get_options.restype = ctypes.c_uint64
        get_options.argtypes = [ctypes.c_void_p]
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not ptr or get_options(ptr) != ctx.options:
            return None
        return lib, ptr
    except (OSError, AttributeError, ImportError, ValueError):
        return None


def prefer_tls13_suites(ctx: ssl.SSLContext, suites: str = TLS13_SUITES) -> bool:
    """Set the TLS 1.3 cipher suites of ``ctx`` (in order of preference). Returns False, leaving
    OpenSSL's defaults, where this Python does not allow it."""
    found = _ssl_ctx_pointer(ctx)
    if found is None:
        log.debug("TLS 1.3 cipher suite order left at OpenSSL's default (cannot reach SSL_CTX)")
        return False
    lib, ptr = found
    setter = lib.SSL_CTX_set_ciphersuites
    setter.restype = ctypes.c_int
    setter.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return setter(ptr, suites.encode()) == 1


def server_context(cert: Path, key: Path, ca: Path | None, verify_client: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if verify_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    prefer_tls13_suites(ctx)
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
    prefer_tls13_suites(ctx)
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


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The names a gateway's node_id may be (protocol §5.4): the subject CN first, then the DNS SANs,
    in certificate order, without repeats. The first one is the on-prem gateway's default node id."""
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        names += cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    return list(dict.fromkeys(names))


def cert_names(der: bytes | None) -> set[str]:
    """CN and DNS SANs of a DER certificate: the names a gateway's node_id must be among
    (protocol §5.4)."""
    if not der:
        return set()
    return set(certificate_names(x509.load_der_x509_certificate(der)))
