"""Certificates for intercloud gateways: a small private CA and the leaf certificates it issues.

intercloud tunnels use mutual TLS by default: the cloud gateway proves its name to the on-prem
gateway, and the on-prem gateway proves its identity (which becomes its tenant) to the cloud.
``intercloud certs init`` creates everything a first deployment needs in one directory::

    DIR/ca.pem          CA certificate (distribute to every gateway as tls.ca)
    DIR/ca.key          CA private key (mode 0600; keep it off the gateways)
    DIR/NAME.pem        leaf certificate of gateway NAME (leaf only, no chain)
    DIR/NAME.key        its private key (mode 0600, unencrypted PKCS#8 PEM)
    DIR/crl.pem         the CA's certificate revocation list (empty at first; ``certs revoke``)

All keys are ECDSA P-256. Cloud certificates carry the names an on-prem gateway may dial
(``NAME``, every ``--san``, ``localhost``, 127.0.0.1, ::1) and may act as TLS server and client
(members also dial each other over peer links). On-prem certificates are client-only.

The lower-level functions :func:`create_ca` and :func:`issue` take explicit validity bounds so tests
can make expired certificates or certificates from a foreign CA.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import ipaddress
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CRL_FILE",
    "DEFAULT_CRL_DAYS",
    "DEFAULT_CA_DAYS",
    "DEFAULT_LEAF_DAYS",
    "CertError",
    "Issued",
    "create_ca",
    "generate_key",
    "init_certs",
    "issue",
    "load_ca",
    "load_certificates",
    "load_private_key",
    "public_key_matches",
    "revoke",
    "write_crl",
    "split_san",
    "write_certificate",
    "write_private_key",
]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CRL_FILE = "crl.pem"
#: nextUpdate of the CRLs that ``certs init`` and ``certs revoke`` sign: gateways warn about a CRL
#: past it (a stale CRL), so re-sign it (``certs revoke`` again, or ``certs crl``) before then.
DEFAULT_CRL_DAYS = 30

#: Default lifetime of leaf certificates. 825 days is the longest lifetime that Apple platforms
#: (and many TLS inspection products modelled on them) accept for TLS server certificates.
DEFAULT_LEAF_DAYS = 825
#: Default lifetime of a new CA: long enough to outlive several generations of leaf certificates.
DEFAULT_CA_DAYS = 3650

#: Certificates start being valid this long before "now", so a peer whose clock is a little
#: behind does not reject a freshly issued certificate as "not yet valid".
CLOCK_SKEW = _dt.timedelta(hours=1)

#: Gateway names double as file names and DNS names: keep them to a safe alphabet. This is the
#: same rule as ``gateway.node_id`` in the configuration.
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_RESERVED_NAMES = {"ca", "crl"}


class CertError(Exception):
    """A certificate could not be created, written or loaded; the message says which file and why."""


@dataclass(frozen=True)
class Issued:
    """A certificate together with its private key."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes


# ---------------------------------------------------------------------------------------------
# Creating keys and certificates
# ---------------------------------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    """Return a new ECDSA P-256 private key (fast to make, small, supported by every TLS stack)."""
    return ec.generate_private_key(ec.SECP256R1())


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _validity(
    days: int, not_before: _dt.datetime | None, not_after: _dt.datetime | None
) -> tuple[_dt.datetime, _dt.datetime]:
    """Resolve validity bounds: explicit bounds win, otherwise ``now - CLOCK_SKEW`` .. ``now + days``."""
    now = _utcnow()
    start = not_before if not_before is not None else now - CLOCK_SKEW
    end = not_after if not_after is not None else now + _dt.timedelta(days=days)
    if start.tzinfo is None or end.tzinfo is None:
        raise CertError("certificate validity bounds must be timezone-aware datetimes (use UTC)")
    if end <= start:
        raise CertError(
            f"certificate would expire ({end:%Y-%m-%d %H:%M} UTC) before it starts ({start:%Y-%m-%d %H:%M} UTC)"
        )
    return start, end


def split_san(names: Iterable[str]) -> list[x509.GeneralName]:
    """Turn host names and IP literals into subjectAltName entries (IP literals become IP SANs).

    Duplicates are dropped, order is kept.
    """
    result: list[x509.GeneralName] = []
    seen: set[x509.GeneralName] = set()
    for raw in names:
        name = raw.strip()
        if not name:
            raise CertError("empty subjectAltName entry; give a DNS name or an IP address")
        entry: x509.GeneralName
        try:
            entry = x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
        except ValueError:
            try:
                _check_dns_name(name)
            except ValueError as exc:
                raise CertError(f"invalid subjectAltName entry {name!r}: {exc}") from None
            entry = x509.DNSName(name.lower())
        if entry not in seen:
            seen.add(entry)
            result.append(entry)
    return result


_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _check_dns_name(name: str) -> None:
    labels = name.rstrip(".").split(".")
    if len(name) > 253:
        raise ValueError("longer than 253 characters")
    for i, label in enumerate(labels):
        if i == 0 and label == "*" and len(labels) > 1:
            continue  # wildcard in the leftmost label
        if not _DNS_LABEL_RE.fullmatch(label):
            raise ValueError(
                f"label {label!r} is not a valid DNS label (letters, digits and inner hyphens, 1-63 characters)"
            )


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    """Ed25519/Ed448 keys sign without a separate hash; every other key type uses SHA-256."""
    return None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()


def create_ca(
    common_name: str | None = None,
    *,
    days: int = DEFAULT_CA_DAYS,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> Issued:
    """Create a self-signed CA that can sign leaf certificates but no intermediate CAs.

    The default common name carries a random suffix so that two CAs made with this tool are
    distinguishable in logs and error messages ("unknown CA intercloud CA 3f9a...").
    """
    key = key or generate_key()
    start, end = _validity(days, not_before, not_after)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"intercloud CA {secrets.token_hex(4)}")])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def tenant_uri(tenant: str) -> str:
    """The URI SAN that ``certs init --tenant NAME`` writes into on-prem certificates."""
    return f"urn:intercloud:tenant:{tenant}"


def issue(
    ca: Issued,
    common_name: str,
    *,
    dns_names: Sequence[str] = (),
    server: bool = True,
    client: bool = True,
    days: int = DEFAULT_LEAF_DAYS,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
    organization: str | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> Issued:
    """Issue a leaf certificate signed by ``ca``.

    ``dns_names`` become subjectAltName entries (IP literals become IP SANs; modern TLS clients
    check only SANs, never the CN). ``server``/``client`` select the extended key usages
    serverAuth/clientAuth. ``not_before``/``not_after`` override the validity window, e.g. to make
    an expired certificate for tests; unlike :func:`init_certs`, this function does not clamp the
    window to the CA's, so tests can also make certificates that outlive their CA.
    """
    if not (server or client):
        raise CertError(f"certificate {common_name!r} needs at least one of server or client usage")
    key = key or generate_key()
    start, end = _validity(days, not_before, not_after)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    sans = split_san(dns_names)
    if organization and client and not server:
        # A tenant's gateways share this URI SAN, so one [[tenant]] client_san entry maps them all.
        sans.append(x509.UniformResourceIdentifier(tenant_uri(organization)))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, _signature_hash(ca.key)), key)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and rename it.

    The temporary file is created with ``mode`` already applied, so a private key is never
    readable by others, not even for a moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_certificate(path: Path, *certs: x509.Certificate) -> Path:
    """Write one or more certificates as PEM (mode 0644) and return ``path``."""
    data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    try:
        _atomic_write(Path(path), data, 0o644)
    except OSError as exc:
        raise CertError(f"cannot write certificate {path}: {exc.strerror or exc}") from exc
    return Path(path)


def write_private_key(path: Path, key: CertificateIssuerPrivateKeyTypes) -> Path:
    """Write ``key`` as unencrypted PKCS#8 PEM readable only by its owner (mode 0600)."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        _atomic_write(Path(path), data, 0o600)
    except OSError as exc:
        raise CertError(f"cannot write private key {path}: {exc.strerror or exc}") from exc
    return Path(path)


def read_file(path: Path, what: str) -> bytes:
    """A certificate, key or CRL file's bytes; CertError names the file and what to do."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertError(f"{what} {path}: file not found") from None
    except IsADirectoryError:
        raise CertError(f"{what} {path}: is a directory, expected a PEM file") from None
    except PermissionError:
        raise CertError(f"{what} {path}: permission denied; make it readable by this user") from None
    except OSError as exc:
        raise CertError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None


def load_certificates(path: Path, what: str = "certificate") -> list[x509.Certificate]:
    """Load every certificate from a PEM file (leaf first for chain files).

    Raises :class:`CertError` naming the file when it is missing, unreadable, empty or not PEM.
    """
    data = read_file(path, what)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        hint = ""
        if b"PRIVATE KEY-----" in data:
            hint = " (it holds a private key: are tls.cert and tls.key swapped?)"
        raise CertError(f"{what} {path}: no PEM certificate found (expected '-----BEGIN CERTIFICATE-----'){hint}")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertError(f"{what} {path}: malformed PEM certificate: {exc}") from None


def load_private_key(path: Path, what: str = "private key") -> CertificateIssuerPrivateKeyTypes:
    """Load an unencrypted PEM private key. Encrypted keys are rejected with a clear message."""
    data = read_file(path, what)
    if b"PRIVATE KEY-----" not in data:
        hint = ""
        if b"-----BEGIN CERTIFICATE-----" in data:
            hint = " (it holds a certificate: are tls.cert and tls.key swapped?)"
        raise CertError(f"{what} {path}: no PEM private key found (expected '-----BEGIN PRIVATE KEY-----'){hint}")
    if b"ENCRYPTED" in data:
        raise CertError(
            f"{what} {path}: the key is encrypted with a passphrase, which intercloud does not support; "
            f"decrypt it with 'openssl pkey -in {path} -out {path}.plain' and restrict its file mode to 0600"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{what} {path}: cannot load private key: {exc}") from None
    return key  # type: ignore[return-value]


def public_key_matches(cert: x509.Certificate, key: CertificateIssuerPrivateKeyTypes) -> bool:
    """True when ``key`` is the private key for ``cert``'s public key."""
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def load_ca(directory: Path) -> Issued | None:
    """Load ``DIR/ca.pem`` + ``DIR/ca.key`` if both exist; ``None`` if neither does.

    Raises :class:`CertError` when only one of the two exists, when they do not belong together
    or when the certificate is not a CA.
    """
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if not have_cert and not have_key:
        return None
    if have_cert != have_key:
        present, absent = (cert_path, key_path) if have_cert else (key_path, cert_path)
        raise CertError(
            f"{present} exists but {absent} does not; a CA needs both files. Restore the missing "
            f"file, or move {present} away to create a new CA (certificates it issued will then "
            "no longer be trusted)"
        )
    certs = load_certificates(cert_path, "CA certificate")
    key = load_private_key(key_path, "CA private key")
    cert = certs[0]
    if not public_key_matches(cert, key):
        raise CertError(f"CA private key {key_path} does not belong to CA certificate {cert_path}")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE missing)")
    # An existing CA may have an RSA key; issue() signs with whatever key type the CA has (only
    # the new leaf keys are always P-256).
    return Issued(cert, key)


# ---------------------------------------------------------------------------------------------
# The `intercloud certs init` operation
# ---------------------------------------------------------------------------------------------


def _check_names(cloud: Sequence[str], onprem: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for role, names in (("cloud", cloud), ("onprem", onprem)):
        for name in names:
            if not _NAME_RE.fullmatch(name):
                raise CertError(
                    f"invalid {role} name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
                    "(the name becomes a file name and the certificate's DNS name)"
                )
            if name.lower() in _RESERVED_NAMES:
                raise CertError(
                    f"invalid {role} name {name!r}: it would overwrite the CA files {CA_CERT_FILE}/{CA_KEY_FILE}/{CRL_FILE}"
                )
            if name in seen:
                raise CertError(f"name {name!r} given twice (as {seen[name]} and as {role}); names must be unique")
            seen[name] = role


def init_certs(
    directory: Path,
    cloud: list[str],
    onprem: list[str],
    sans: list[str] = [],  # noqa: B006 - never mutated
    days: int = DEFAULT_LEAF_DAYS,
    tenant: str | None = None,
) -> list[Path]:
    """Create (or extend) a certificate directory and return the files written, in order.

    * ``DIR/ca.pem`` + ``DIR/ca.key`` are created unless both already exist, in which case the
      existing CA signs the new certificates (so gateways can be added later).
    * For every cloud NAME: ``NAME.pem``/``NAME.key``, CN=NAME, SANs NAME + ``sans`` + localhost +
      127.0.0.1 + ::1, usable as TLS server and client.
    * For every on-prem NAME: ``NAME.pem``/``NAME.key``, CN=NAME, SAN NAME, client only. With
      ``tenant``, the on-prem certificates also carry it as organization (O=tenant).

    Existing leaf files of the same name are replaced (re-issued with a new key).
    """
    directory = Path(directory)
    if days < 1:
        raise CertError(f"--days must be at least 1, got {days}")
    _check_names(cloud, onprem)
    if tenant is not None and not tenant.strip():
        raise CertError("--tenant must not be empty; leave it out to issue certificates without a tenant")
    split_san(sans)  # validate early, before anything is written
    if directory.exists() and not directory.is_dir():
        raise CertError(f"{directory} exists and is not a directory")

    written: list[Path] = []
    ca = load_ca(directory)
    if ca is None:
        ca = create_ca(days=max(DEFAULT_CA_DAYS, days + 365))
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CertError(f"cannot create directory {directory}: {exc.strerror or exc}") from exc
        # Key first: if writing it fails, no orphan ca.pem is left behind to trip load_ca later.
        written.append(write_private_key(directory / CA_KEY_FILE, ca.key))
        written.append(write_certificate(directory / CA_CERT_FILE, ca.cert))

    # A leaf must not outlive its CA: validators reject the chain once the CA has expired.
    start, end = _validity(days, None, None)
    ca_end = ca.cert.not_valid_after_utc
    if end > ca_end:
        raise CertError(
            f"certificates valid for {days} days would outlive the CA in {directory / CA_CERT_FILE}, "
            f"which expires {ca_end:%Y-%m-%d}; use a smaller --days or a new directory (new CA)"
        )

    jobs: list[tuple[str, Issued]] = []
    for name in cloud:
        names = [name, *sans, "localhost", "127.0.0.1", "::1"]
        jobs.append((name, issue(ca, name, dns_names=names, server=True, client=True, not_before=start, not_after=end)))
    for name in onprem:
        jobs.append(
            (
                name,
                issue(
                    ca,
                    name,
                    dns_names=[name],
                    server=False,
                    client=True,
                    not_before=start,
                    not_after=end,
                    organization=tenant,
                ),
            )
        )
    for name, leaf in jobs:
        written.append(write_private_key(directory / f"{name}.key", leaf.key))
        written.append(write_certificate(directory / f"{name}.pem", leaf.cert))
    if not (directory / CRL_FILE).exists():
        # an empty CRL from day one, so that `crl = "pki/crl.pem"` can be configured before anything
        # is revoked (and a revocation is then a `certs revoke` plus a SIGHUP, no config change)
        written.append(write_crl(directory, ca))
    return written


# ---------------------------------------------------------------------------------------------
# Revocation: `intercloud certs revoke` and `certs crl`
# ---------------------------------------------------------------------------------------------


def _load_crl(path: Path, ca: Issued) -> x509.CertificateRevocationList | None:
    """The CRL at ``path`` if there is one; it must be this CA's (its entries are carried over)."""
    if not path.exists():
        return None
    data = read_file(path, "CRL")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise CertError(f"CRL {path}: cannot load it ({exc}); move it away to start a new, empty CRL "
                        "(certificates it revoked are then valid again until revoked anew)") from None
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.key.public_key()):  # type: ignore[arg-type]
        raise CertError(f"CRL {path} was not signed by the CA in {path.parent / CA_CERT_FILE} "
                        f"(its issuer is {crl.issuer.rfc4514_string()}); move it away or use that CA's directory")
    return crl


def write_crl(
    directory: Path,
    ca: Issued,
    revoke: x509.Certificate | None = None,
    days: int = DEFAULT_CRL_DAYS,
    now: _dt.datetime | None = None,
) -> Path:
    """Sign ``DIR/crl.pem`` anew: every entry of the current one (if any), plus ``revoke`` unless it is
    already listed; the CRL number goes up by one, nextUpdate is ``days`` from now."""
    directory = Path(directory)
    if days < 1:
        raise CertError(f"--days must be at least 1, got {days}")
    path = directory / CRL_FILE
    old = _load_crl(path, ca)
    now = now or _utcnow()
    number = 1
    entries: list[x509.RevokedCertificate] = []
    if old is not None:
        entries = list(old)
        try:
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        except x509.ExtensionNotFound:
            number = 1
    if revoke is not None and all(e.serial_number != revoke.serial_number for e in entries):
        entries.append(
            x509.RevokedCertificateBuilder().serial_number(revoke.serial_number).revocation_date(now).build()
        )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - _dt.timedelta(minutes=5))  # a peer whose clock is a little behind
        .next_update(now + _dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)  # type: ignore[arg-type]
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, _signature_hash(ca.key))
    try:
        _atomic_write(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise CertError(f"cannot write CRL {path}: {exc.strerror or exc}") from exc
    return path


@dataclass(frozen=True)
class Revocation:
    """What ``certs revoke`` did."""

    crl: Path
    subject: str
    serial: int
    #: When the certificate was revoked: now, or earlier (it was already in the CRL).
    revoked_at: _dt.datetime
    already: bool


def revoke(directory: Path, name: str, days: int = DEFAULT_CRL_DAYS) -> Revocation:
    """Revoke ``DIR/NAME.pem`` (a certificate ``certs init DIR`` made) in ``DIR/crl.pem``, signed by the
    CA in DIR. Revoking it again changes no entry (the CRL is re-signed, its nextUpdate renewed)."""
    directory = Path(directory)
    if not _NAME_RE.fullmatch(name) or name.lower() in _RESERVED_NAMES:
        raise CertError(f"invalid name {name!r}: give the NAME of a certificate DIR/NAME.pem that certs init made")
    ca = load_ca(directory)
    if ca is None:
        raise CertError(f"{directory} has no CA ({CA_CERT_FILE} and {CA_KEY_FILE}); revoke in the directory "
                        "where `intercloud certs init` created the CA that issued the certificate")
    leaf_path = directory / f"{name}.pem"
    if not leaf_path.exists():
        known = sorted(p.stem for p in directory.glob("*.pem") if p.name not in (CA_CERT_FILE, CRL_FILE))
        raise CertError(f"no certificate {leaf_path}: unknown name {name!r}; the names in {directory} are: "
                        f"{', '.join(known[:20]) or 'none'}")
    leaf = load_certificates(leaf_path)[0]
    if leaf.issuer != ca.cert.subject:
        raise CertError(f"{leaf_path} was not issued by the CA in {directory / CA_CERT_FILE} (its issuer is "
                        f"{leaf.issuer.rfc4514_string()}); revoke it with the CA that issued it")
    old = _load_crl(directory / CRL_FILE, ca)
    before = next((e for e in old or () if e.serial_number == leaf.serial_number), None)
    now = _utcnow()
    path = write_crl(directory, ca, leaf, days, now)
    return Revocation(path, leaf.subject.rfc4514_string(), leaf.serial_number,
                      before.revocation_date_utc if before is not None else now, before is not None)
