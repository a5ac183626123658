"""A client certificate maps to exactly one tenant, by CN, SAN (incl. the --tenant URI) or fingerprint."""

from __future__ import annotations

from types import SimpleNamespace as T

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from intercloud.certs import init_certs, tenant_uri
from intercloud.cloud.tenants import identities, match_tenant


def _der(path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


def _tenant(name, cn=(), san=(), fp=()):
    return T(name=name, client_cn=list(cn), client_san=list(san), client_fingerprint=list(fp))


def test_cn_san_uri_and_fingerprint_each_map(tmp_path):
    init_certs(tmp_path, cloud=[], onprem=["gw-a"], tenant="tenant101")
    init_certs(tmp_path, cloud=[], onprem=["gw-b"])
    a, b = _der(tmp_path / "gw-a.pem"), _der(tmp_path / "gw-b.pem")
    _, _, fp_b = identities(b)
    tenants = [_tenant("tenant101", san=[tenant_uri("tenant101")]), _tenant("tenant201", fp=[fp_b]),
               _tenant("tenant301", cn=["gw-c"])]
    assert match_tenant(tenants, a) == ("tenant101", None)
    assert match_tenant(tenants, b) == ("tenant201", None)


def test_no_tenant_or_two_tenants_is_a_refusal(tmp_path):
    init_certs(tmp_path, cloud=[], onprem=["gw-a"], tenant="tenant101")
    a = _der(tmp_path / "gw-a.pem")
    name, why = match_tenant([_tenant("other", cn=["x"])], a)
    assert name == "" and "maps to no tenant" in why and "gw-a" in why
    name, why = match_tenant([_tenant("t1", cn=["gw-a"]), _tenant("t2", san=[tenant_uri("tenant101")])], a)
    assert name == "" and "several tenants (t1, t2)" in why
    assert match_tenant([_tenant("t1", cn=["gw-a"])], None)[1].startswith("no client certificate")
