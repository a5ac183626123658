"""Throw-away certificates for tests (CA, server, client), written as PEM files.

Why: TLS is not optional in intercloud (mutual TLS by default), squid's ssl-bump needs its
own CA, and TLS targets need a certificate. Generating them per test with ``cryptography``
keeps the suite hermetic: no checked-in keys, nothing that expires under us.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertKey", "make_ca", "issue_cert", "self_signed"]


@dataclass(frozen=True)
class CertKey:
    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    key: object  # private key object

    @property
    def subject_cn(self) -> str:
        return self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _new_key(key_type: str):
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"key_type must be 'ec' or 'rsa', not {key_type!r}")


def _write(dirpath: Path, stem: str, cert: x509.Certificate, key) -> CertKey:
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = dirpath / f"{stem}.pem", dirpath / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    key_path.chmod(0o600)
    return CertKey(cert_path, key_path, cert, key)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = _dt.datetime.now(_dt.timezone.utc)
    return builder.not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(
        now + _dt.timedelta(days=days))


def make_ca(dirpath: str | Path, name: str = "intercloud test CA", *, key_type: str = "ec") -> CertKey:
    """Self-signed CA that may sign leaf certificates; files ``<dir>/<stem>.pem|.key``."""
    key = _new_key(key_type)
    builder = _validity(x509.CertificateBuilder(), 30)
    cert = (
        builder.subject_name(_name(name)).issuer_name(_name(name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(dirpath, _stem(name), cert, key)


def _stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _san(dns: Sequence[str], ips: Sequence[str]) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName(
        [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips])


def issue_cert(
    ca: CertKey,
    dirpath: str | Path,
    name: str,
    *,
    dns: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1",),
    server: bool = True,
    client: bool = False,
    key_type: str = "ec",
) -> CertKey:
    """Leaf certificate with CN ``name`` and the given SANs, signed by ``ca``."""
    key = _new_key(key_type)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (
        _validity(x509.CertificateBuilder(), 30)
        .subject_name(_name(name)).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
    )
    if dns or ips:
        builder = builder.add_extension(_san(dns, ips), critical=False)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return _write(dirpath, _stem(name), builder.sign(ca.key, hashes.SHA256()), key)


def self_signed(
    dirpath: str | Path,
    name: str = "localhost",
    *,
    dns: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1",),
    key_type: str = "ec",
) -> CertKey:
    """A self-signed server certificate (not a CA), e.g. for a TLS target server."""
    key = _new_key(key_type)
    cert = (
        _validity(x509.CertificateBuilder(), 30)
        .subject_name(_name(name)).issuer_name(_name(name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(dns, ips), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(dirpath, _stem(name), cert, key)
