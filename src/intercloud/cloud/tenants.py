"""Which tenant a client certificate belongs to (issue 3). Pure: certificate bytes in, tenant out.

The tenant is taken from the certificate the cloud verified, never from anything the on-prem side
says. A certificate must map to exactly one tenant: none or several is a refusal.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID


def identities(der: bytes) -> tuple[set[str], set[str], str]:
    cert = x509.load_der_x509_certificate(der)
    cns = {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    sans: set[str] = set()
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = set(ext.get_values_for_type(x509.DNSName)) | set(ext.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        pass
    return cns, sans, "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def match_tenant(tenants, der: bytes | None) -> tuple[str, str | None]:
    """(tenant name, None) or ("", why the certificate maps to no single tenant)."""
    if not der:
        return "", "no client certificate; tenants need one"
    cns, sans, fp = identities(der)
    hits = [t.name for t in tenants
            if cns & set(t.client_cn) or sans & set(t.client_san) or fp in t.client_fingerprint]
    if len(hits) == 1:
        return hits[0], None
    if not hits:
        return "", (f"it maps to no tenant (CN {sorted(cns)}, SANs {sorted(sans)}, {fp}); add it to a "
                    "[[tenant]]'s client_cn, client_san or client_fingerprint")
    return "", (f"it maps to several tenants ({', '.join(hits)}); a certificate must identify exactly one — "
                "make the [[tenant]] matchers disjoint")
