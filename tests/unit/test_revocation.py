"""Certificate revocation lists: loading (revocation.py), ``certs revoke`` / ``certs crl`` (certs.py) and
what ``intercloud check`` says about ``tls.crl`` / ``cluster.crl`` (config/rules.py)."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from intercloud import certs
from intercloud.cli import certs as cli_certs
from intercloud.cli import check as cli_check
from intercloud.config import ConfigError, load_config
from intercloud.revocation import CrlError, load_crl_file, load_revocations

NOW = dt.datetime.now(dt.UTC)


def der(path: Path) -> bytes:
    return certs.load_certificates(path)[0].public_bytes(serialization.Encoding.DER)


def make_crl(ca: certs.Issued, serials: list[int], *, next_update: dt.datetime | None = None) -> bytes:
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
         .last_update(NOW - dt.timedelta(days=10)).next_update(next_update or NOW + dt.timedelta(days=7)))
    for s in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s).revocation_date(NOW).build())
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    certs.init_certs(d, cloud=["cloud1"], onprem=["dc1", "dc2"])
    return d


@pytest.fixture
def other(tmp_path: Path) -> Path:
    """A second CA (another tenant's) with its own on-prem certificate."""
    d = tmp_path / "other"
    certs.init_certs(d, cloud=[], onprem=["dc9"])
    return d


def serial(path: Path) -> int:
    return certs.load_certificates(path)[0].serial_number


# ---------------------------------------------------------------------------------------------
# Loading and checking
# ---------------------------------------------------------------------------------------------


def test_init_writes_an_empty_crl_that_revokes_nothing(pki: Path) -> None:
    revs = load_revocations([pki / "crl.pem"])
    assert len(revs.crls) == 1 and len(list(revs.crls[0].crl)) == 0
    assert revs.check(der(pki / "dc1.pem")) is None
    # signed by the CA, nextUpdate 30 days out
    ca = certs.load_ca(pki)
    assert revs.crls[0].crl.is_signature_valid(ca.cert.public_key())
    assert dt.timedelta(days=29) < revs.crls[0].next_update - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)


def test_revoked_and_not_revoked(pki: Path) -> None:
    certs.revoke(pki, "dc2")
    revs = load_revocations([pki / "crl.pem"])
    hit = revs.check(der(pki / "dc2.pem"))
    assert hit is not None and hit.serial == serial(pki / "dc2.pem") and hit.path == pki / "crl.pem"
    assert hit.subject == "CN=dc2"
    why = hit.why()
    assert why.startswith(f"certificate CN=dc2 serial {serial(pki / 'dc2.pem'):#x} revoked by CRL {pki / 'crl.pem'} on ")
    assert why.endswith("UTC; refused")
    assert revs.check(der(pki / "dc1.pem")) is None
    assert revs.check(None) is None and revs.check(b"") is None


def test_issuer_matching_several_cas_and_a_crl_for_one(pki: Path, other: Path, tmp_path: Path) -> None:
    """A CA without a CRL revokes nothing (unlike OpenSSL's CRL_CHECK_LEAF), and a CRL only counts for
    certificates of its own issuer, even when another CA's certificate has the same serial."""
    ca = certs.load_ca(pki)
    dc9 = serial(other / "dc9.pem")
    (tmp_path / "one.pem").write_bytes(make_crl(ca, [dc9, serial(pki / "dc1.pem")]))
    revs = load_revocations([tmp_path / "one.pem"])
    assert revs.check(der(other / "dc9.pem")) is None  # same serial, other issuer
    assert revs.check(der(pki / "dc1.pem")) is not None
    assert revs.check(der(pki / "dc2.pem")) is None


def test_several_blocks_in_one_file_and_several_files(pki: Path, other: Path, tmp_path: Path) -> None:
    ca, ca9 = certs.load_ca(pki), certs.load_ca(other)
    both = tmp_path / "both.pem"
    both.write_bytes(make_crl(ca, [serial(pki / "dc1.pem")]) + b"\n" + make_crl(ca9, [serial(other / "dc9.pem")]))
    assert len(load_crl_file(both)) == 2
    revs = load_revocations([both])
    assert revs.check(der(pki / "dc1.pem")) is not None and revs.check(der(other / "dc9.pem")) is not None
    # two files, each with its own CRL of the same CA: both count
    (tmp_path / "a.pem").write_bytes(make_crl(ca, [serial(pki / "dc1.pem")]))
    (tmp_path / "b.pem").write_bytes(make_crl(ca, [serial(pki / "dc2.pem")]))
    revs = load_revocations([tmp_path / "a.pem", tmp_path / "b.pem"])
    assert revs.check(der(pki / "dc1.pem")).path == tmp_path / "a.pem"
    assert revs.check(der(pki / "dc2.pem")).path == tmp_path / "b.pem"
    assert revs.check(der(pki / "cloud1.pem")) is None


@pytest.mark.parametrize(("content", "message"), [
    (b"", "no PEM CRL found"),
    (b"hello", "no PEM CRL found"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "is this the CA file"),
    (b"0\x82\x01\x00garbage", "looks like DER"),
    (b"-----BEGIN X509 CRL-----\nbm90IGEgY3Js\n-----END X509 CRL-----\n", "CRL block 1 of 1 is malformed"),
])
def test_bad_pem_is_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(CrlError, match=message) as info:
        load_crl_file(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)  # a SIGHUP reload keeps the old CRLs on it


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CrlError, match="file not found"):
        load_revocations([tmp_path / "nope.pem"])


# ---------------------------------------------------------------------------------------------
# certs revoke / certs crl
# ---------------------------------------------------------------------------------------------


def crl_of(pki: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())


def number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_revoke_keeps_earlier_entries_and_bumps_the_number(pki: Path) -> None:
    n0 = number(crl_of(pki))
    first = certs.revoke(pki, "dc1")
    assert not first.already and first.serial == serial(pki / "dc1.pem")
    certs.revoke(pki, "dc2", days=3)
    crl = crl_of(pki)
    assert {e.serial_number for e in crl} == {serial(pki / "dc1.pem"), serial(pki / "dc2.pem")}
    assert number(crl) == n0 + 2
    assert dt.timedelta(days=2) < crl.next_update_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(days=3)
    assert crl.is_signature_valid(certs.load_ca(pki).cert.public_key())


def test_revoke_is_idempotent(pki: Path) -> None:
    first = certs.revoke(pki, "dc2")
    when = crl_of(pki).get_revoked_certificate_by_serial_number(serial(pki / "dc2.pem")).revocation_date_utc
    again = certs.revoke(pki, "dc2")
    assert again.already
    crl = crl_of(pki)
    assert len(list(crl)) == 1
    assert crl.get_revoked_certificate_by_serial_number(first.serial).revocation_date_utc == when


def test_revoke_unknown_name_lists_the_known_ones(pki: Path) -> None:
    with pytest.raises(certs.CertError, match=r"unknown name 'dc3'.*cloud1, dc1, dc2"):
        certs.revoke(pki, "dc3")
    with pytest.raises(certs.CertError, match="invalid name"):
        certs.revoke(pki, "../etc/passwd")


def test_revoke_without_a_ca_key(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(certs.CertError, match="has no CA"):
        certs.revoke(tmp_path / "empty", "dc1")
    (pki / "ca.key").unlink()
    with pytest.raises(certs.CertError, match=r"ca\.pem exists but .*ca\.key does not"):
        certs.revoke(pki, "dc1")


def test_revoke_refuses_a_crl_of_another_ca(pki: Path, other: Path) -> None:
    (pki / "crl.pem").write_bytes((other / "crl.pem").read_bytes())
    with pytest.raises(certs.CertError, match="was not signed by the CA in"):
        certs.revoke(pki, "dc1")


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="intercloud")
    cli_certs.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["certs", *argv])
    return args.func(args)


def test_cli_revoke_and_crl(pki: Path, capsys) -> None:
    assert run_cli("revoke", str(pki), "dc2") == 0
    out = capsys.readouterr()
    assert out.out == f"{pki / 'crl.pem'}\n" and "CN=dc2" in out.err and "revoked" in out.err
    assert run_cli("revoke", str(pki), "dc2") == 0
    assert "already revoked" in capsys.readouterr().err
    assert run_cli("revoke", str(pki), "nobody") == 1
    err = capsys.readouterr().err
    assert err.startswith("intercloud certs revoke: ") and "unknown name 'nobody'" in err and "Traceback" not in err
    n = number(crl_of(pki))
    assert run_cli("crl", str(pki), "--days", "5") == 0
    crl = crl_of(pki)
    assert number(crl) == n + 1 and len(list(crl)) == 1


def test_init_names_crl_reserved(tmp_path: Path) -> None:
    with pytest.raises(certs.CertError, match="would overwrite the CA files"):
        certs.init_certs(tmp_path, cloud=[], onprem=["crl"])


def test_init_keeps_an_existing_crl(pki: Path) -> None:
    certs.revoke(pki, "dc1")
    before = (pki / "crl.pem").read_bytes()
    written = certs.init_certs(pki, cloud=[], onprem=["dc5"])
    assert [p.name for p in written] == ["dc5.key", "dc5.pem"]
    assert (pki / "crl.pem").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# intercloud check: tls.crl and cluster.crl
# ---------------------------------------------------------------------------------------------


def cloud_toml(pki: Path, crl: str = "", cluster: str = "") -> str:
    return f"""
[gateway]
role = "cloud"
node_id = "cloud1"

[tls]
cert = "{pki}/cloud1.pem"
key = "{pki}/cloud1.key"
ca = "{pki}/ca.pem"
{crl}

[tunnel]
listen = "wss://127.0.0.1:8443/intercloud"
{cluster}
"""


def cluster_section(pki: Path, crl: str) -> str:
    return f"""
[cluster]
listen = "wss://127.0.0.1:9443/cluster"
peers = ["wss://127.0.0.1:9444/cluster"]
ca = "{pki}/ca.pem"
peer_names = ["cloud1", "cloud2"]
{crl}
"""


def run_check(path: Path) -> int:
    parser = argparse.ArgumentParser(prog="intercloud")
    cli_check.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["check", str(path)])
    return args.func(args)


def test_crl_paths_relative_to_the_config_one_or_a_list(pki: Path, tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(cloud_toml(pki, 'crl = "pki/crl.pem"'))
    assert load_config(path).tls.crl == [pki / "crl.pem"]
    path.write_text(cloud_toml(pki, 'crl = ["pki/crl.pem", "pki/crl.pem"]'))
    assert load_config(path).tls.crl == [pki / "crl.pem"] * 2
    path.write_text(cloud_toml(pki))
    assert load_config(path).tls.crl == []


def test_crl_for_another_ca_is_an_error_naming_tls_crl(pki: Path, other: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(cloud_toml(pki, f'crl = "{other}/crl.pem"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "tls.crl" in text and "a CRL for another CA" in text and str(other / "crl.pem") in text
    assert run_check(path) == 2
    err = capsys.readouterr().err
    assert "tls.crl: " in err and "another CA" in err and "Traceback" not in err


def test_unparsable_crl_is_an_error(pki: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.pem").write_text("not a crl\n")
    path = tmp_path / "gw.toml"
    path.write_text(cloud_toml(pki, f'crl = ["{pki}/crl.pem", "{tmp_path}/bad.pem"]'))
    assert run_check(path) == 2
    err = capsys.readouterr().err
    assert "tls.crl[1]: " in err and "no PEM CRL found" in err
    path.write_text(cloud_toml(pki, f'crl = "{tmp_path}/missing.pem"'))
    assert run_check(path) == 2
    assert "tls.crl: file not found" in capsys.readouterr().err


def test_stale_crl_is_a_warning_and_still_valid(pki: Path, tmp_path: Path, capsys) -> None:
    ca = certs.load_ca(pki)
    (tmp_path / "stale.pem").write_bytes(make_crl(ca, [1], next_update=NOW - dt.timedelta(days=2)))
    path = tmp_path / "gw.toml"
    path.write_text(cloud_toml(pki, f'crl = "{tmp_path}/stale.pem"'))
    cfg = load_config(path)
    assert any(k == "tls.crl" and "stale" in m for k, m in cfg.warnings)
    assert run_check(path) == 0
    assert "warning: tls.crl: " in capsys.readouterr().err


def test_cluster_crl_is_checked_against_cluster_ca(pki: Path, other: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(cloud_toml(pki, cluster=cluster_section(pki, f'crl = "{pki}/crl.pem"')))
    assert load_config(path).cluster.crl == [pki / "crl.pem"]
    path.write_text(cloud_toml(pki, cluster=cluster_section(pki, f'crl = "{other}/crl.pem"')))
    assert run_check(path) == 2
    err = capsys.readouterr().err
    assert "cluster.crl: " in err and "another CA" in err and "cluster.ca" in err


def test_crl_without_ca(pki: Path, tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(cloud_toml(pki, f'crl = "{pki}/crl.pem"').replace(f'ca = "{pki}/ca.pem"', ""))
    with pytest.raises(ConfigError, match="tls.crl is set but tls.ca is not"):
        load_config(path)


def test_a_stale_crl_is_logged_and_still_revokes(pki: Path, tmp_path: Path, caplog) -> None:
    from intercloud.revocation import warn_stale

    ca = certs.load_ca(pki)
    (tmp_path / "stale.pem").write_bytes(make_crl(ca, [serial(pki / "dc1.pem")], next_update=NOW - dt.timedelta(days=2)))
    revs = load_revocations([tmp_path / "stale.pem", pki / "crl.pem"])
    assert revs.check(der(pki / "dc1.pem")) is not None
    with caplog.at_level("WARNING", logger="intercloud.tls"):
        assert warn_stale(revs, "tls.crl") == 1
    rec = [r for r in caplog.records if getattr(r, "event", None) == "tls.crl_stale"]
    assert len(rec) == 1 and "tls.crl: CRL" in rec[0].getMessage() and "stale" in rec[0].getMessage()


# ---------------------------------------------------------------------------------------------
# The gateway side: refuse_revoked (handshakes) and close_revoked (after a reload)
# ---------------------------------------------------------------------------------------------


class FakeTunnel:
    def __init__(self, der_bytes: bytes | None, node: str, client: bool = False, closed: str = "") -> None:
        self.peer_der, self.peer_node, self.client, self.close_reason = der_bytes, node, client, closed
        self.peer = object()
        self.peer_addr, self.id, self.kind, self.tenant = "10.0.0.9:4000", f"t-{node}", "tunnel", "default"
        self.refusal_logged = False
        self.calls: list = []

    def goaway(self, text, code):
        self.calls.append(("goaway", int(code), text))

    def fail(self, reason, code, quiet=False):
        self.calls.append(("fail", int(code), reason))
        self.close_reason = reason


def fake_gateway(role: str = "cloud"):
    from types import SimpleNamespace

    from intercloud.gateway import Gateway
    from intercloud.stats import GatewayStats

    stats = GatewayStats()
    gw = SimpleNamespace(stats=stats, role=role, event=stats.event)
    return gw, Gateway


def test_refuse_revoked_counts_and_logs_one_refusal(pki: Path, caplog) -> None:
    certs.revoke(pki, "dc2")
    revs = load_revocations([pki / "crl.pem"])
    gw, Gateway = fake_gateway()
    ok, bad = FakeTunnel(der(pki / "dc1.pem"), "dc1"), FakeTunnel(der(pki / "dc2.pem"), "dc2")
    assert Gateway.refuse_revoked(gw, ok, revs, "tunnel") is None and not ok.refusal_logged
    with caplog.at_level("WARNING"):
        why = Gateway.refuse_revoked(gw, bad, revs, "tunnel")
    assert why.startswith("tunnel from 10.0.0.9:4000: certificate CN=dc2 serial ") and str(pki / "crl.pem") in why
    assert bad.refusal_logged
    assert gw.stats.counters["connections_refused"] == 1
    assert gw.stats.labelled[("connections_refused", (("kind", "revoked"), ("service", "")))] == 1
    lines = [r for r in caplog.records if getattr(r, "event", None) == "conn.refused"]
    assert len(lines) == 1 and lines[0].peer_node == "dc2" and "REFUSED dc2 (revoked)" in lines[0].getMessage()
    dialing = FakeTunnel(der(pki / "dc2.pem"), "dc2", client=True)
    assert Gateway.refuse_revoked(gw, dialing, revs, "peer link").startswith("peer link dialed at 10.0.0.9:4000: ")


def test_close_revoked_closes_only_live_revoked_tunnels(pki: Path, caplog) -> None:
    from intercloud.protocol.frames import Reason

    certs.revoke(pki, "dc2")
    revs = load_revocations([pki / "crl.pem"])
    gw, Gateway = fake_gateway()
    t1, t2 = FakeTunnel(der(pki / "dc1.pem"), "dc1"), FakeTunnel(der(pki / "dc2.pem"), "dc2")
    gone = FakeTunnel(der(pki / "dc2.pem"), "dc2", closed="already closing")
    insecure = FakeTunnel(None, "dc3")
    with caplog.at_level("WARNING"):
        Gateway.close_revoked(gw, {t1, t2, gone, insecure}, revs, "tunnel")
    assert t1.calls == [] and gone.calls == [] and insecure.calls == []
    assert [c[:2] for c in t2.calls] == [("goaway", int(Reason.FORBIDDEN)), ("fail", 1008)]
    assert "CN=dc2" in t2.calls[0][2]
    recs = [r for r in caplog.records if getattr(r, "event", None) == "cert.revoked"]
    assert len(recs) == 1 and recs[0].peer_node == "dc2" and recs[0].crl == str(pki / "crl.pem")
    # nothing loaded: nothing closed
    t3 = FakeTunnel(der(pki / "dc2.pem"), "dc2")
    Gateway.close_revoked(gw, {t3}, load_revocations([]), "tunnel")
    assert t3.calls == []


def test_describe_and_a_crl_that_goes_stale_while_running_is_said_once(pki: Path, tmp_path: Path, caplog) -> None:
    """/api/status ``crl`` (revocation.describe) and the gateway's CRL watch: a CRL that passes its
    nextUpdate while the gateway runs is logged once when the watch sees it, not at every round."""
    import asyncio
    from types import SimpleNamespace

    from intercloud.gateway import Gateway
    from intercloud.revocation import describe, warn_stale

    ca = certs.load_ca(pki)
    (tmp_path / "week.pem").write_bytes(make_crl(ca, [serial(pki / "dc1.pem"), serial(pki / "dc2.pem")]))
    revs = load_revocations([tmp_path / "week.pem"])
    [entry] = describe(revs, "tls.crl")
    assert entry["key"] == "tls.crl" and entry["path"] == str(tmp_path / "week.pem") and entry["revoked"] == 2
    assert entry["issuer"] == ca.cert.subject.rfc4514_string() and entry["stale"] is False
    assert dt.datetime.fromisoformat(entry["next_update"]) > NOW > dt.datetime.fromisoformat(entry["this_update"])
    later = NOW + dt.timedelta(days=8)
    assert describe(revs, "tls.crl", now=later)[0]["stale"] is True

    warned: set = set()
    with caplog.at_level("WARNING", logger="intercloud.tls"):
        assert warn_stale(revs, "tls.crl", warned=warned) == 0  # fresh: nothing said
        assert warn_stale(revs, "tls.crl", now=later, warned=warned) == 1
        assert warn_stale(revs, "tls.crl", now=later, warned=warned) == 1  # still stale, not said again
    assert len([r for r in caplog.records if getattr(r, "event", None) == "tls.crl_stale"]) == 1

    caplog.clear()
    (tmp_path / "old.pem").write_bytes(make_crl(ca, [], next_update=NOW - dt.timedelta(hours=1)))
    stale = load_revocations([tmp_path / "old.pem"])
    gw = SimpleNamespace(crl_sets=lambda: [("tls.crl", revs), ("cluster.crl", stale)], _crl_warned=set())

    async def rounds() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(Gateway._crl_watch(gw, every=0.001), 0.1)

    with caplog.at_level("WARNING", logger="intercloud.tls"):
        asyncio.run(rounds())
    lines = [r for r in caplog.records if getattr(r, "event", None) == "tls.crl_stale"]
    assert len(lines) == 1 and lines[0].key == "cluster.crl" and lines[0].crl == str(tmp_path / "old.pem")
