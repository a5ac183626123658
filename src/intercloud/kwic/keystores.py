"""Reading KWIC's keystores and truststores (JKS and JCEKS through pyjks, PKCS12 through
cryptography) and the certificate helpers the [tls] mapping needs (PEM, subject, names)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..transport.tls import certificate_names
from .report import KaazingImportError
from .xmltree import Node

if TYPE_CHECKING:
    from .context import Context


def read_password(path: Path, what: str) -> str:
    try:
        data = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KaazingImportError(f"{what}: file not found; give a file holding the password") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KaazingImportError(f"{what}: cannot read the password: {getattr(exc, 'strerror', None) or exc}") from None
    return data.splitlines()[0] if data.splitlines() else ""


@dataclass
class Store:
    type: str
    path: Path
    keys: dict[str, object]  # alias -> pyjks entry or (key, chain) for PKCS12
    chains: dict[str, list[x509.Certificate]]
    trusted: list[tuple[str, x509.Certificate]]

    def decrypt(self, alias: str, password: str, source: str) -> tuple[object, list[x509.Certificate]]:
        entry = self.keys[alias]
        chain = self.chains[alias]
        if self.type == "pkcs12":
            return entry, chain
        import jks

        if not entry.is_decrypted():  # type: ignore[attr-defined]
            try:
                entry.decrypt(password)  # type: ignore[attr-defined]
            except (jks.util.DecryptionFailureException, ValueError):
                raise KaazingImportError(
                    f"{self.path}: cannot decrypt private key entry {alias!r} with the password from {source}; "
                    "the key has its own password: give it with --key-password-file FILE") from None
            except jks.util.KeystoreException as exc:
                raise KaazingImportError(f"{self.path}: private key entry {alias!r}: {exc}") from None
        try:
            key = serialization.load_der_private_key(entry.pkey_pkcs8, None)  # type: ignore[attr-defined]
        except (ValueError, TypeError) as exc:
            raise KaazingImportError(f"{self.path}: private key entry {alias!r} cannot be read: {exc}") from None
        return key, chain


def _detect_type(data: bytes) -> str | None:
    if data[:4] == b"\xfe\xed\xfe\xed":
        return "jks"
    if data[:4] == b"\xce\xce\xce\xce":
        return "jceks"
    if data[:1] == b"\x30":
        return "pkcs12"
    return None


def load_store(path: Path, declared: str | None, password: str, kind: str, pw_source: str,
               node: Node | None, ctx: Context) -> Store:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KaazingImportError(f"{path}: cannot read the {kind}: {exc.strerror or exc}") from None
    actual = _detect_type(data)
    want = (declared or "").strip().lower() or None
    if want is not None and want not in ("jks", "jceks", "pkcs12"):
        where = f"{ctx.source}:{node.line}: {node.path}/type" if node is not None else f"{path}"
        raise KaazingImportError(f"{where}: {kind} type {declared!r} is not supported; convert it to PKCS12, JKS "
                                 "or JCEKS (e.g. keytool -importkeystore -deststoretype pkcs12)")
    if actual is None:
        raise KaazingImportError(f"{path}: not a JKS, JCEKS or PKCS12 {kind} (unknown file format); give the "
                                 f"right file with --{kind} PATH")
    if want is not None and want != actual and node is not None:
        ctx.report("note", node, f"<type>{declared}</type> but {path} is a {actual.upper()} file; "
                   f"read it as {actual.upper()}")
    if actual == "pkcs12":
        return _load_pkcs12(path, data, password, kind, pw_source)
    import jks

    try:
        ks = jks.KeyStore.loads(data, password, try_decrypt_keys=False)
    except jks.util.KeystoreSignatureException:
        raise KaazingImportError(f"{path}: wrong {kind} password (from {pw_source}): the {actual.upper()} integrity "
                                 f"check failed; give the right password with --{kind}-password-file FILE") from None
    except (jks.util.KeystoreException, ValueError, IndexError, Exception) as exc:  # noqa: BLE001 - corrupt files
        raise KaazingImportError(f"{path}: cannot read the {actual.upper()} {kind}: {exc}") from None
    keys: dict[str, object] = {}
    chains: dict[str, list[x509.Certificate]] = {}
    trusted: list[tuple[str, x509.Certificate]] = []
    for alias, entry in ks.private_keys.items():
        keys[alias] = entry
        chains[alias] = [_der_cert(der, path, alias) for _t, der in entry.cert_chain]
    for alias, entry in ks.certs.items():
        trusted.append((alias, _der_cert(entry.cert, path, alias)))
    for alias in ks.secret_keys:
        ctx.report("ignored", node, f"{kind} secret key entry {alias!r} is not used by intercloud")
    return Store(actual, path, keys, chains, trusted)


def _load_pkcs12(path: Path, data: bytes, password: str, kind: str, pw_source: str) -> Store:
    from cryptography.hazmat.primitives.serialization import pkcs12

    try:
        p12 = pkcs12.load_pkcs12(data, password.encode() if password else None)
    except ValueError:
        raise KaazingImportError(f"{path}: cannot open the PKCS12 {kind} with the password from {pw_source}: wrong "
                                 f"password or not a PKCS12 file; give the right password with "
                                 f"--{kind}-password-file FILE") from None
    keys: dict[str, object] = {}
    chains: dict[str, list[x509.Certificate]] = {}
    trusted: list[tuple[str, x509.Certificate]] = []
    extra = [c.certificate for c in p12.additional_certs]
    if p12.key is not None and p12.cert is not None:
        alias = (p12.cert.friendly_name or b"key").decode(errors="replace")
        keys[alias] = p12.key
        chains[alias] = [p12.cert.certificate] + extra
    else:
        for c in p12.additional_certs:
            trusted.append(((c.friendly_name or b"cert").decode(errors="replace"), c.certificate))
    return Store("pkcs12", path, keys, chains, trusted)


def _der_cert(der: bytes, path: Path, alias: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise KaazingImportError(f"{path}: entry {alias!r} holds a certificate that cannot be read: {exc}") from None


def self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def sha256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def cert_names(cert: x509.Certificate) -> list[str]:
    """The certificate's names a node id can be (CN, then DNS SANs, in order), wildcards left out."""
    return [n for n in certificate_names(cert) if "*" not in n]
