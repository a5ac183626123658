"""Certificate revocation lists (``[tls] crl``, ``[cluster] crl``; docs/operations.md §10.2).

Why the check is here and not in OpenSSL: ``VERIFY_CRL_CHECK_LEAF`` fails *every* certificate whose
issuer has no CRL loaded ("unable to get certificate CRL"). A cloud that trusts several tenant CAs
and has a CRL for only one of them would refuse the tenants of all the others, and the dialer would
only see a TLS alert. So the TLS handshake verifies the chain as before, and right after it the
peer's leaf certificate is looked up here: only CRLs whose issuer is the certificate's issuer are
consulted, a CA without a CRL revokes nothing, and the refusal names the certificate, its serial
and the CRL file that revoked it.

Loading reads files: on SIGHUP it runs in the reload thread (Gateway.load_tls); the result is an
immutable :class:`Revocations` that the loop swaps in (apply_tls) and then checks live tunnels against.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from .certs import CertError, read_file

__all__ = ["CrlError", "LoadedCrl", "Revocations", "Revoked", "describe", "load_crl_file", "load_revocations",
           "warn_stale"]

log = logging.getLogger("intercloud.tls")

_BLOCK = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.+?-----END X509 CRL-----", re.DOTALL)
#: A CRL file larger than this is refused: the whole file is parsed into memory on every reload.
MAX_CRL_FILE = 64 * 1024 * 1024


class CrlError(ValueError):
    """A CRL file could not be read or parsed; the message names the file and what to do.
    A ValueError so that a SIGHUP reload treats it like any other certificate file it cannot load
    (Gateway._load_for_reload: the old certificates and CRLs stay in use)."""


@dataclass(frozen=True)
class LoadedCrl:
    path: Path
    crl: x509.CertificateRevocationList

    @property
    def issuer(self) -> str:
        return self.crl.issuer.rfc4514_string() or "(empty issuer)"

    @property
    def next_update(self) -> _dt.datetime | None:
        return self.crl.next_update_utc


@dataclass(frozen=True)
class Revoked:
    """One peer certificate found in a CRL."""

    subject: str
    serial: int
    path: Path
    revoked_at: _dt.datetime

    def why(self) -> str:
        return (f"certificate {self.subject} serial {self.serial:#x} revoked by CRL {self.path} "
                f"on {self.revoked_at:%Y-%m-%d %H:%M} UTC; refused")


@dataclass(frozen=True)
class Revocations:
    """The revoked serials of every loaded CRL, by issuer name. Empty: nothing is revoked."""

    crls: tuple[LoadedCrl, ...] = ()
    _by_issuer: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        index: dict[x509.Name, dict[int, tuple[Path, _dt.datetime]]] = {}
        for loaded in self.crls:
            serials = index.setdefault(loaded.crl.issuer, {})
            for entry in loaded.crl:
                serials.setdefault(entry.serial_number, (loaded.path, entry.revocation_date_utc))
        self._by_issuer.update(index)

    def __bool__(self) -> bool:
        return bool(self.crls)

    def check_cert(self, cert: x509.Certificate) -> Revoked | None:
        """The revocation of ``cert`` (a leaf), or None. Only CRLs of ``cert``'s issuer count."""
        serials = self._by_issuer.get(cert.issuer)
        if not serials:
            return None
        hit = serials.get(cert.serial_number)
        if hit is None:
            return None
        return Revoked(cert.subject.rfc4514_string() or "(empty subject)", cert.serial_number, *hit)

    def check(self, der: bytes | None) -> Revoked | None:
        """The revocation of the peer certificate ``der`` (DER, as the TLS session gives it), or None.
        No certificate (plain ws://, a cloud with tls.verify_client = false): nothing to check."""
        if not der or not self._by_issuer:
            return None
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:  # the TLS stack verified it; a parse failure here is not the peer's doing
            return None
        return self.check_cert(cert)


def load_crl_file(path: Path, what: str = "CRL") -> list[LoadedCrl]:
    """Every CRL in a PEM file (several ``-----BEGIN X509 CRL-----`` blocks may follow each other).
    Raises CrlError naming the file when it is missing, unreadable, empty or not a PEM CRL."""
    path = Path(path)
    try:
        too_big = path.stat().st_size > MAX_CRL_FILE
    except OSError:
        too_big = False  # read_file says what is wrong with it
    if too_big:
        raise CrlError(f"{what} {path}: larger than {MAX_CRL_FILE // (1024 * 1024)} MiB; is it a CRL?")
    try:
        data = read_file(path, what)
    except CertError as exc:
        raise CrlError(str(exc)) from None
    blocks = _BLOCK.findall(data)
    if not blocks:
        hint = ""
        if b"-----BEGIN CERTIFICATE-----" in data:
            hint = " (it holds a certificate: is this the CA file?)"
        elif data.lstrip()[:1] == b"\x30":
            hint = " (it looks like DER; convert it: openssl crl -inform DER -in FILE -out FILE.pem)"
        raise CrlError(f"{what} {path}: no PEM CRL found (expected '-----BEGIN X509 CRL-----'){hint}")
    out = []
    for i, block in enumerate(blocks, 1):
        try:
            out.append(LoadedCrl(path, x509.load_pem_x509_crl(block)))
        except ValueError as exc:
            raise CrlError(f"{what} {path}: CRL block {i} of {len(blocks)} is malformed: {exc}; "
                           "replace the file with the CRL as its CA published it") from None
    return out


def load_revocations(paths: Iterable[Path]) -> Revocations:
    """One Revocations from every CRL in every file of ``paths`` (``[tls] crl`` or ``[cluster] crl``)."""
    crls: list[LoadedCrl] = []
    for path in paths:
        crls.extend(load_crl_file(path))
    return Revocations(tuple(crls))


def signed_by(loaded: LoadedCrl, cas: Sequence[x509.Certificate]) -> x509.Certificate | None:
    """The CA among ``cas`` that issued and signed this CRL, or None (a CRL of another CA)."""
    for ca in cas:
        if ca.subject != loaded.crl.issuer:
            continue
        try:
            if loaded.crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                return ca
        except (TypeError, ValueError):  # a key type that cannot sign CRLs
            continue
    return None


def warn_stale(revocations: Revocations, key: str, now: _dt.datetime | None = None,
               warned: set | None = None) -> int:
    """One WARNING per CRL past its nextUpdate (at start-up, on every reload, and from the gateway's
    CRL watch once a minute). A stale CRL is still used: it still revokes everything it lists, and
    refusing every peer because a CRL was not refreshed in time would turn a missed cron job into an
    outage. ``warned``: CRLs (key, path, nextUpdate) already warned about, skipped and added to, so the
    watch says it once per CRL. Returns how many were stale."""
    now = now or _dt.datetime.now(_dt.UTC)
    stale = 0
    for loaded in revocations.crls:
        nxt = loaded.next_update
        if nxt is not None and nxt <= now:
            stale += 1
            if warned is not None:
                if (key, loaded.path, nxt) in warned:
                    continue
                warned.add((key, loaded.path, nxt))
            log.warning("%s: CRL %s (issuer %s) is stale: its nextUpdate was %s UTC; still used, but revocations "
                        "since then are missing. Renew it (intercloud certs crl DIR, or fetch it from its CA) and "
                        "send SIGHUP", key, loaded.path, loaded.issuer, f"{nxt:%Y-%m-%d %H:%M}",
                        extra={"event": "tls.crl_stale", "key": key, "crl": str(loaded.path),
                               "next_update": nxt.isoformat()})
    return stale


def describe(revocations: Revocations, key: str, now: _dt.datetime | None = None) -> list[dict]:
    """The ``crl`` entries of /api/status for one config key (``tls.crl``, ``cluster.crl``): per CRL its
    file, issuer, dates, how many certificates it revokes and whether it is past its nextUpdate."""
    now = now or _dt.datetime.now(_dt.UTC)
    out = []
    for loaded in revocations.crls:
        nxt = loaded.next_update
        out.append({"key": key, "path": str(loaded.path), "issuer": loaded.issuer,
                    "this_update": loaded.crl.last_update_utc.isoformat(),
                    "next_update": nxt.isoformat() if nxt is not None else None,
                    "revoked": len(loaded.crl), "stale": nxt is not None and nxt <= now})
    return out
