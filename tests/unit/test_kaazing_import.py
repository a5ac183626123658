"""``intercloud import-kaazing``: KWIC gateway-config.xml -> intercloud TOML (issue 7).

Every XML file of the KWIC tutorials in shared/reference is imported here with the -D values its
docker-compose.yml passed in GATEWAY_OPTS, and the result must pass ``load_config``. Keystores are
JCEKS files this module writes itself (``write_jceks``, from certificates made by
``intercloud.certs.init_certs``), so the conversion path is exercised without Java.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import struct
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from intercloud.certs import init_certs, load_certificates, load_private_key
from intercloud.cli import import_kaazing as cli_import
from intercloud.config import load_config
from intercloud.kwic import (
    EXIT_BAD_INPUT,
    EXIT_DROPPED,
    EXIT_OK,
    ImportOptions,
    KaazingImportError,
    import_kaazing,
    parse_gateway_opts,
    parse_kwic_duration,
    write_import,
)

TUTORIALS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "kaazing-tutorials"
if not TUTORIALS.is_dir():  # the repository may sit elsewhere than /work/main
    TUTORIALS = Path("/work/shared/reference/kaazing-tutorials")

needs_tutorials = pytest.mark.skipif(not TUTORIALS.is_dir(), reason="KWIC tutorials (shared/reference) not present")


# ---------------------------------------------------------------------------------------------
# JCEKS keystores, written as Java's JceKeyStore does (independent of pyjks, which only reads them)
# ---------------------------------------------------------------------------------------------

_JCE_PBE_OID = bytes([0x2B, 0x06, 0x01, 0x04, 0x01, 0x2A, 0x02, 0x13, 0x01])  # 1.3.6.1.4.1.42.2.19.1


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _utf(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def _data(raw: bytes) -> bytes:
    return struct.pack(">i", len(raw)) + raw


def _jce_pbe_key(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """Sun's PBEWithMD5AndTripleDES key derivation (com.sun.crypto.provider.PBES1Core)."""
    halves = [salt[:4], salt[4:]]
    if halves[0] == halves[1]:
        s = bytearray(halves[0])
        halves[0] = bytes([s[3], s[0], s[1], s[3]])
    derived = b""
    for half in halves:
        h = half
        for _ in range(iterations):
            h = hashlib.md5(h + password.encode("ascii")).digest()
        derived += h
    return derived[:24], derived[24:]


def _protect_key(pkcs8: bytes, password: str, iterations: int = 1000) -> bytes:
    from Cryptodome.Cipher import DES3  # pycryptodomex comes with pyjks

    salt = os.urandom(8)
    key, iv = _jce_pbe_key(password, salt, iterations)
    pad = 8 - len(pkcs8) % 8
    encrypted = DES3.new(key, DES3.MODE_CBC, iv=iv).encrypt(pkcs8 + bytes([pad]) * pad)
    params = _der(0x30, _der(0x04, salt) + _der(0x02, iterations.to_bytes(4, "big").lstrip(b"\0")))
    return _der(0x30, _der(0x30, _der(0x06, _JCE_PBE_OID) + params) + _der(0x04, encrypted))


def write_jceks(path: Path, password: str, *, key=None, chain=(), alias: str = "gateway", trusted=(),
                key_password: str | None = None) -> Path:
    """Write a JCEKS keystore: one private key entry (``key`` + ``chain``) and/or trusted certificates."""
    now = int(time.time() * 1000)
    entries = []
    if key is not None:
        pkcs8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        entry = struct.pack(">i", 1) + _utf(alias) + struct.pack(">q", now)
        entry += _data(_protect_key(pkcs8, key_password or password)) + struct.pack(">i", len(chain))
        for cert in chain:
            entry += _utf("X.509") + _data(cert.public_bytes(serialization.Encoding.DER))
        entries.append(entry)
    for i, cert in enumerate(trusted):
        entries.append(struct.pack(">i", 2) + _utf(f"ca{i}") + struct.pack(">q", now) + _utf("X.509")
                       + _data(cert.public_bytes(serialization.Encoding.DER)))
    body = struct.pack(">IiI", 0xCECECECE, 2, len(entries)) + b"".join(entries)
    digest = hashlib.sha1(password.encode("utf-16be") + b"Mighty Aphrodite" + body).digest()
    Path(path).write_bytes(body + digest)
    return Path(path)


def make_stores(directory: Path, pki: Path, name: str, *, password: str = "changeit",
                trust_password: str = "trustme", key_password: str | None = None,
                label: str | None = None) -> dict[str, Path]:
    """keystore-LABEL.jceks (certificate NAME's key + chain) and truststore-LABEL.jceks (the CA) with
    .pw files, as the KWIC tutorials' cert-generator left them in /x509/stores (LABEL defaults to NAME)."""
    directory.mkdir(parents=True, exist_ok=True)
    label = label or name
    ca = load_certificates(pki / "ca.pem")[0]
    key = load_private_key(pki / f"{name}.key")
    leaf = load_certificates(pki / f"{name}.pem")
    files = {
        "keystore": write_jceks(directory / f"keystore-{label}.jceks", password, key=key, chain=[*leaf, ca],
                                alias=name, key_password=key_password),
        "truststore": write_jceks(directory / f"truststore-{label}.jceks", trust_password, trusted=[ca]),
        "keystore_pw": directory / f"keystore-{label}.pw",
        "truststore_pw": directory / f"truststore-{label}.pw",
    }
    files["keystore_pw"].write_text(password + "\n")
    files["truststore_pw"].write_text(trust_password + "\n")
    return files


def test_cert_names_are_the_tls_names_without_wildcards(tmp_path):
    """The importer's certificate names are transport.tls.certificate_names (CN first, then DNS SANs,
    in order), less wildcards, which a node id cannot be."""
    from intercloud.kwic.keystores import cert_names
    from intercloud.transport.tls import certificate_names

    init_certs(tmp_path, cloud=["cloud1"], onprem=[], sans=["b.example.com", "*.wild.example.com", "cloud1"])
    cert = load_certificates(tmp_path / "cloud1.pem")[0]
    assert "*.wild.example.com" in certificate_names(cert)
    assert cert_names(cert) == [n for n in certificate_names(cert) if n != "*.wild.example.com"]
    assert cert_names(cert)[:2] == ["cloud1", "b.example.com"]


def test_write_jceks_is_read_by_pyjks(tmp_path):
    import jks

    init_certs(tmp_path / "pki", cloud=["cloud1"], onprem=[])
    stores = make_stores(tmp_path / "stores", tmp_path / "pki", "cloud1")
    ks = jks.KeyStore.load(str(stores["keystore"]), "changeit")
    assert ks.store_type == "jceks"
    entry = ks.private_keys["cloud1"]
    assert entry.is_decrypted() and len(entry.cert_chain) == 2
    ts = jks.KeyStore.load(str(stores["truststore"]), "trustme")
    assert list(ts.certs) == ["ca0"]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def compose_opts(tutorial: Path) -> dict[str, list[dict[str, str]]]:
    """XML file name -> the -D properties of every docker-compose service that runs it."""
    text = (tutorial / "docker-compose.yml").read_text()
    out: dict[str, list[dict[str, str]]] = {}
    for block in re.split(r"\n(?=  [A-Za-z0-9_.-]+:\s*\n)", text):
        m = re.search(r"\./config/([A-Za-z0-9_.-]+\.xml):/kaazing-gateway/conf/gateway-config\.xml", block)
        if not m:
            continue
        opts = re.search(r"GATEWAY_OPTS:\s*(.+)", block)
        props = parse_gateway_opts(opts.group(1).strip().strip('"')) [0] if opts else {}
        out.setdefault(m.group(1), []).append(props)
    return out


def create_pending(out: Path, result) -> None:
    """Run the `intercloud certs init` commands the importer asked for (PEM files the TOML names)."""
    done = set()
    for _path, cmd in result.to_create:
        if cmd in done or not cmd.startswith("intercloud certs init"):
            continue
        done.add(cmd)
        words = shlex.split(cmd)[3:]
        parser = argparse.ArgumentParser()
        parser.add_argument("dir")
        parser.add_argument("--cloud", default="")
        parser.add_argument("--onprem", default="")
        parser.add_argument("--san", action="append", default=[])
        a = parser.parse_args(words)
        init_certs(Path(a.dir) if Path(a.dir).is_absolute() else out.parent / a.dir, cloud=[n for n in a.cloud.split(",") if n],
                   onprem=[n for n in a.onprem.split(",") if n], sans=a.san)


def do_import(xml: Path, out: Path, **kw) -> tuple[object, object]:
    """Import, write, create any PEM files still needed, load; returns (result, config)."""
    result = import_kaazing(xml, ImportOptions(out=out, **kw))
    assert result.toml is not None, [str(f) for f in result.findings]
    write_import(result, out, force=True)
    create_pending(out, result)
    return result, load_config(out)


def names(cfg, direction: str) -> set[str]:
    return {s.name for s in cfg.services if s.direction == direction}


def assert_node_id_named_by_cert(cfg) -> None:
    """The peer admits a gateway only if its node id is a name of its certificate (protocol §5.4)."""
    from intercloud.transport.tls import certificate_names

    cert_names = certificate_names(load_certificates(cfg.tls.cert)[0])
    assert cfg.gateway.node_id in cert_names, (cfg.gateway.node_id, cert_names)
    assert not [w for w in cfg.warnings if w[0] == "gateway.node_id"], cfg.warnings


def stores_for(tmp_path: Path, xml: Path, pki: Path, name: str) -> dict:
    """Import options that point a <security> section at JCEKS stores made for certificate NAME."""
    stores = make_stores(tmp_path / "stores" / name, pki, name)
    return {"keystore": stores["keystore"], "truststore": stores["truststore"],
            "keystore_password_file": stores["keystore_pw"], "truststore_password_file": stores["truststore_pw"]}


def _tutorial_xml_files() -> list[Path]:
    return sorted(TUTORIALS.rglob("*.xml")) if TUTORIALS.is_dir() else []


# ---------------------------------------------------------------------------------------------
# Every XML file of every tutorial
# ---------------------------------------------------------------------------------------------


@needs_tutorials
@pytest.mark.parametrize("xml", _tutorial_xml_files(), ids=lambda p: str(p.relative_to(TUTORIALS)))
def test_every_tutorial_xml_imports(xml, tmp_path):
    tutorial = xml.parent.parent
    text = xml.read_text()
    if "<log4j:configuration" in text:
        with pytest.raises(KaazingImportError) as err:
            import_kaazing(xml, ImportOptions(out=tmp_path / "x.toml"))
        assert "log4j configuration" in str(err.value) and "--log-level" in str(err.value)
        return
    runs = compose_opts(tutorial).get(xml.name)
    if not runs:  # not run by this tutorial's docker-compose.yml (the perf tutorial's echo server)
        runs = [{"service-hostname": "echo", "service-port": "7"} if "${service-port}" in text else {}]
    for i, props in enumerate(runs):
        out = tmp_path / f"run{i}" / f"{xml.stem}.toml"
        out.parent.mkdir()
        if "<type>echo</type>" in text:
            result = import_kaazing(xml, ImportOptions(out=out, properties=props))
            assert result.toml is None and result.exit_code == EXIT_DROPPED
            assert any("echo" in f.message and f.level == "dropped" for f in result.findings)
            continue
        kw = {}
        if "<keystore>" in text:
            pki = tmp_path / f"run{i}" / "ca"
            cloud = "cloud" in xml.name
            name = "member" if cloud else "gateway"
            init_certs(pki, cloud=[name] if cloud else [], onprem=[] if cloud else [name], sans=["example.com"])
            kw = stores_for(tmp_path / f"run{i}", xml, pki, name)
        result, cfg = do_import(xml, out, properties=props, **kw)
        assert result.exit_code == EXIT_OK, [str(f) for f in result.dropped]
        assert cfg.services, "no service imported"
        assert cfg.gateway.role == ("cloud" if "cloud" in xml.name else "onprem")
        # every value says where it came from
        assert f"{xml.name}:" in out.read_text()


# ---------------------------------------------------------------------------------------------
# The two halves of each tutorial agree
# ---------------------------------------------------------------------------------------------


@needs_tutorials
def test_1_simple_halves_match(tmp_path):
    cfg_dir = TUTORIALS / "kwic" / "1-simple" / "config"
    _, cloud = do_import(cfg_dir / "cloud-config.xml", tmp_path / "cloud.toml")
    _, onprem = do_import(cfg_dir / "onprem-config.xml", tmp_path / "onprem.toml")
    assert names(cloud, "accept") == names(onprem, "connect") == {"serviceA", "serviceC"}
    assert names(cloud, "connect") == names(onprem, "accept") == {"serviceB", "serviceD"}
    assert str(cloud.service("serviceA").accept) == "tcp://0.0.0.0:5551"
    assert str(cloud.service("serviceB").connect) == "tcp://server-b:6661"
    assert str(onprem.service("serviceA").connect) == "tcp://server-a:5551"
    assert str(onprem.service("serviceD").accept) == "tcp://0.0.0.0:8881"
    # ws:// is imported as wss:// on the same port and path, on both halves
    assert str(cloud.tunnel.listen) == "wss://0.0.0.0:80/kwic"
    assert [str(u) for u in onprem.tunnel.connect] == ["wss://example.com:80/kwic"]
    # ws.inactivity.timeout 55 seconds
    assert cloud.tunnel.ping_timeout == onprem.tunnel.ping_timeout == 55
    assert cloud.tunnel.ping_interval == 18
    assert cloud.gateway.node_id == "example.com"
    # with the certificates the importer says to create, each half is who its certificate says
    assert onprem.gateway.node_id == "onprem"  # not set: the CN of pki/onprem.pem (certs init --onprem onprem)
    assert_node_id_named_by_cert(cloud)
    assert_node_id_named_by_cert(onprem)


@needs_tutorials
def test_insecure_ws_keeps_plain_websocket(tmp_path):
    xml = TUTORIALS / "kwic" / "1-simple" / "config" / "onprem-config.xml"
    result, cfg = do_import(xml, tmp_path / "onprem.toml", insecure_ws=True)
    assert cfg.tls.insecure and [str(u) for u in cfg.tunnel.connect] == ["ws://example.com/kwic"]
    assert not result.to_create
    assert any("NOT encrypted" in f.message for f in result.findings)


@needs_tutorials
def test_2_tls_keystores_are_converted(tmp_path):
    cfg_dir = TUTORIALS / "kwic" / "2-tls" / "config"
    pki = tmp_path / "pki"
    init_certs(pki, cloud=["example.com"], onprem=["onprem"])
    result, cloud = do_import(cfg_dir / "cloud-config.xml", tmp_path / "cloud.toml",
                              **stores_for(tmp_path, cfg_dir, pki, "example.com"))
    _, onprem = do_import(cfg_dir / "onprem-config.xml", tmp_path / "onprem.toml",
                          **stores_for(tmp_path, cfg_dir, pki, "onprem"))
    assert cloud.tls.cert == tmp_path / "cloud.pem" and cloud.tls.key == tmp_path / "cloud.key"
    assert (tmp_path / "cloud.key").stat().st_mode & 0o077 == 0
    assert load_certificates(cloud.tls.cert)[0] == load_certificates(pki / "example.com.pem")[0]
    assert load_certificates(cloud.tls.ca) == load_certificates(pki / "ca.pem")
    assert load_certificates(onprem.tls.cert)[0] == load_certificates(pki / "onprem.pem")[0]
    assert cloud.tls.verify_client is True
    assert str(cloud.tunnel.listen) == "wss://0.0.0.0/kwic"
    assert [str(u) for u in onprem.tunnel.connect] == ["wss://example.com/kwic"]
    assert names(cloud, "accept") == names(onprem, "connect") == {"serviceA"}
    assert names(cloud, "connect") == names(onprem, "accept") == {"serviceB"}
    assert not result.to_create
    text = (tmp_path / "cloud.toml").read_text()
    assert "converted from" in text and "JCEKS" in text
    assert cloud.gateway.node_id == "example.com" and onprem.gateway.node_id == "onprem"
    assert_node_id_named_by_cert(cloud)
    assert_node_id_named_by_cert(onprem)
    assert not any("is not a name of the certificate" in f.message for f in result.findings)


@needs_tutorials
@pytest.mark.parametrize("role", ["cloud", "onprem"])
def test_node_id_that_the_keystore_certificate_does_not_name_is_reported(tmp_path, role):
    """KWIC keystores name whatever their cert-generator was told (the tutorials: example.com); a
    --node-id the certificate does not name would be refused by the other half, so the import says so."""
    cfg_dir = TUTORIALS / "kwic" / "2-tls" / "config"
    pki = tmp_path / "pki"
    init_certs(pki, cloud=["example.com"], onprem=["onprem"])
    cert, node = ("example.com", "cloud1") if role == "cloud" else ("onprem", "onprem1")
    result, cfg = do_import(cfg_dir / f"{role}-config.xml", tmp_path / f"{role}.toml", node_id=node,
                            **stores_for(tmp_path, cfg_dir, pki, cert))
    assert result.exit_code == EXIT_OK
    note = next(f for f in result.findings if "is not a name of the certificate" in f.message)
    assert note.level == "note" and f"gateway.node_id {node!r} (--node-id)" in note.message, note
    assert f"CN={cert}" in note.message and "refuse" in note.message, note
    assert f"give --node-id {cert}" in note.message and f"certs init pki --{role} {node}" in note.message, note
    head = " ".join((tmp_path / f"{role}.toml").read_text().replace("\n#", " ").split())
    assert " ".join(note.message.split()) in head  # also in the report at the head of the TOML
    assert [k for k, _ in cfg.warnings] == ["gateway.node_id"]  # and `intercloud check` warns


@needs_tutorials
def test_keystore_paths_and_password_files_from_the_xml(tmp_path):
    """<file> and <password-file> are read as KWIC did (relative to the XML's directory)."""
    pki = tmp_path / "pki"
    init_certs(pki, cloud=["example.com"], onprem=[])
    make_stores(tmp_path / "x509" / "stores", pki, "example.com")
    text = (TUTORIALS / "kwic" / "2-tls" / "config" / "cloud-config.xml").read_text()
    text = text.replace("/x509/stores/keystore-cloud", "x509/stores/keystore-example.com")
    text = text.replace("/x509/stores/truststore-cloud", "x509/stores/truststore-example.com")
    xml = tmp_path / "cloud-config.xml"
    xml.write_text(text)
    _, cfg = do_import(xml, tmp_path / "out" / "cloud1.toml")
    assert cfg.tls.cert == tmp_path / "out" / "cloud1.pem"
    assert load_certificates(cfg.tls.ca) == load_certificates(pki / "ca.pem")


@needs_tutorials
def test_3_multi_tenant_with_tenants(tmp_path):
    cfg_dir = TUTORIALS / "kwic" / "3-multi-tenant" / "config"
    tenants = {"tenant101": ["serviceA", "serviceB"], "tenant201": ["serviceC", "proxy service D"]}
    pki = _pki(tmp_path, ["example.com"], ["tenant101", "tenant201"])
    result, cloud = do_import(cfg_dir / "cloud-config.xml", tmp_path / "cloud.toml", tenants=tenants,
                              **stores_for(tmp_path, cfg_dir, pki, "example.com"))
    assert any("tenants are enforced" in f.message for f in result.findings)
    assert [t.name for t in cloud.tenants] == ["tenant101", "tenant201"]
    assert cloud.tenants[0].client_cn == ["tenant101"]
    assert {s.name: s.tenant for s in cloud.services} == {
        "serviceA": "tenant101", "serviceB": "tenant101", "serviceC": "tenant201", "serviceD": "tenant201"}
    t101 = do_import(cfg_dir / "tenant101-config.xml", tmp_path / "t101.toml",
                     **stores_for(tmp_path, cfg_dir, tmp_path / "pki", "tenant101"))[1]
    t201 = do_import(cfg_dir / "tenant201-config.xml", tmp_path / "t201.toml",
                     **stores_for(tmp_path, cfg_dir, tmp_path / "pki", "tenant201"))[1]
    assert names(t101, "connect") | names(t201, "connect") == names(cloud, "accept")
    assert names(t101, "accept") | names(t201, "accept") == names(cloud, "connect")
    assert str(t201.service("serviceC").connect) == "tcp://server-a:5551"  # as tenant201-config.xml says
    assert (t101.gateway.node_id, t201.gateway.node_id) == ("tenant101", "tenant201")  # their certificates' CNs
    for cfg in (cloud, t101, t201):
        assert_node_id_named_by_cert(cfg)


def _pki(tmp_path: Path, cloud: list[str], onprem: list[str]) -> Path:
    pki = tmp_path / "pki"
    init_certs(pki, cloud=cloud, onprem=onprem, sans=["example.com"])
    return pki


@needs_tutorials
def test_3_multi_tenant_without_tenants_is_reported(tmp_path):
    cfg_dir = TUTORIALS / "kwic" / "3-multi-tenant" / "config"
    result, cloud = do_import(cfg_dir / "cloud-config.xml", tmp_path / "cloud.toml",
                              **stores_for(tmp_path, cfg_dir, _pki(tmp_path, ["example.com"], []), "example.com"))
    assert not cloud.tenants
    assert any("--tenant" in f.message for f in result.findings)


@needs_tutorials
def test_4_ha_cluster_and_merged_member_services(tmp_path):
    cfg_dir = TUTORIALS / "kwic" / "4-ha" / "config"
    pki = _pki(tmp_path, ["cloud1.example.com", "cloud2.example.com"], ["onprem"])
    props = compose_opts(cfg_dir.parent)["cloud-config.xml"][0]
    assert props == {"cloud-node-hostname": "cloud1.example.com", "other-cluster-member-ip": "cloud2.example.com"}
    result, cloud = do_import(cfg_dir / "cloud-config.xml", tmp_path / "cloud1.toml", properties=props,
                              **stores_for(tmp_path, cfg_dir, pki, "cloud1.example.com"))
    assert cloud.gateway.node_id == "cloud1.example.com"  # -D overrode <value>www.yahoo.com</value>
    assert str(cloud.cluster.listen) == "wss://0.0.0.0:5941/cluster"
    assert [str(p) for p in cloud.cluster.peers] == ["wss://cloud2.example.com:5941/cluster"]
    assert {"cloud1.example.com", "cloud2.example.com", "example.com"} <= set(cloud.cluster.peer_names)
    assert cloud.cluster.member_ttl > cloud.tunnel.ping_timeout
    assert names(cloud, "accept") == {"serviceA"} and names(cloud, "connect") == {"serviceB"}
    levels = {(f.level, f.path) for f in result.findings}
    assert ("superseded", "/gateway-config/service[2]") in levels  # the balancer service
    assert ("superseded", "/gateway-config/service[3]/balance") in levels
    result, onprem = do_import(cfg_dir / "onprem-config.xml", tmp_path / "onprem.toml", node_id="onprem1",
                               **stores_for(tmp_path, cfg_dir, pki, "onprem"))
    assert [str(u) for u in onprem.tunnel.connect] == ["wss://cloud1.example.com/kwic", "wss://cloud2.example.com/kwic"]
    assert names(onprem, "connect") == {"serviceA"}  # "from cloud1" and "from cloud2" are one service
    assert any("merged" in f.message for f in result.findings)
    assert any(f.path.endswith("http.maximum.redirects") and f.level == "superseded" for f in result.findings)


@needs_tutorials
def test_4_ha_lb_prepared_connection_count_is_superseded(tmp_path):
    cfg_dir = TUTORIALS / "kwic-fork" / "4-ha-lb" / "config"
    pki = _pki(tmp_path, ["cloud1"], ["onprem"])
    result, onprem = do_import(cfg_dir / "onprem-config.xml", tmp_path / "onprem.toml",
                               **stores_for(tmp_path, cfg_dir, pki, "onprem"))
    f = next(f for f in result.findings if "prepared.connection.count" in f.path)
    assert f.level == "superseded" and f.line == 17 and "per_member" in f.message
    assert result.exit_code == EXIT_OK
    result, cloud = do_import(cfg_dir / "cloud-config.xml", tmp_path / "cloud1.toml", node_id="cloud1",
                              peers=["cloud2.example.com:5941"], **stores_for(tmp_path, cfg_dir, pki, "cloud1"))
    assert str(cloud.tunnel.listen) == "wss://0.0.0.0/kwic"  # <tcp.bind>443</tcp.bind>
    assert cloud.tls.verify_client is True  # <socks.ssl.verify-client>required</...>
    assert [str(p) for p in cloud.cluster.peers] == ["wss://cloud2.example.com:5941/cluster"]
    assert names(cloud, "accept") == names(onprem, "connect") == {"serviceA"}


@needs_tutorials
def test_forward_proxy_java_properties_become_tunnel_proxy(tmp_path):
    tutorial = TUTORIALS / "kwic-fork" / "2-tls-forward-proxy"
    props = compose_opts(tutorial)["onprem-config.xml"][0]
    assert props == {"http.proxyHost": "squid", "http.proxyPort": "3128"}
    pki = _pki(tmp_path, [], ["onprem"])
    result, cfg = do_import(tutorial / "config" / "onprem-config.xml", tmp_path / "onprem.toml", properties=props,
                            **stores_for(tmp_path, tutorial, pki, "onprem"))
    assert str(cfg.tunnel.proxy) == "http://squid:3128"
    assert any(f.path.endswith("ssl.protocols") and f.level == "superseded" for f in result.findings)
    assert not any("proxyHost" in f.message for f in result.findings)  # not reported as unused


@needs_tutorials
def test_rewrite_host_and_port(tmp_path):
    xml = TUTORIALS / "kwic" / "1-simple" / "config" / "onprem-config.xml"
    _, cfg = do_import(xml, tmp_path / "onprem.toml",
                       rewrite_hosts={"example.com": "127.0.0.1", "server-a": "127.0.0.1", "@eth0": "127.0.0.1"},
                       rewrite_ports={80: 18080, 5551: 15551, 8881: 18881})
    assert [str(u) for u in cfg.tunnel.connect] == ["wss://127.0.0.1:18080/kwic"]
    assert str(cfg.service("serviceA").connect) == "tcp://127.0.0.1:15551"
    assert str(cfg.service("serviceD").accept) == "tcp://127.0.0.1:18881"
    assert str(cfg.service("serviceC").connect) == "tcp://server-c:7771"


# ---------------------------------------------------------------------------------------------
# Mapping details on small hand-written files
# ---------------------------------------------------------------------------------------------

NS = 'xmlns="http://xmlns.kaazing.org/2016/06/gateway"'

CLOUD_SERVICE_A = """
  <service>
    <name>proxy service A</name>
    <accept>tcp://0.0.0.0:5551</accept>
    <connect>pipe://serviceA</connect>
    <type>proxy</type>
    <connect-options>
      <pipe.transport>socks://example.com</pipe.transport>
      <socks.mode>reverse</socks.mode>
      <socks.transport>ws://example.com:8000/kwic</socks.transport>
      {extra}
    </connect-options>
  </service>
"""


def xml_file(tmp_path: Path, body: str, name: str = "gateway-config.xml") -> Path:
    path = tmp_path / name
    path.write_text(f'<?xml version="1.0" encoding="UTF-8" ?>\n<gateway-config {NS}>\n{body}\n</gateway-config>\n')
    return path


@pytest.mark.parametrize(("text", "seconds"), [
    ("55 seconds", 55), ("55s", 55), ("55", 55), ("500 milliseconds", 0.5), ("500ms", 0.5),
    ("2 minutes", 120), ("1 hour", 3600), ("1.5sec", 1.5)])
def test_kwic_durations(text, seconds):
    assert parse_kwic_duration(text) == seconds


def test_bad_duration_names_the_element(tmp_path):
    xml = xml_file(tmp_path, CLOUD_SERVICE_A.format(extra="<ws.inactivity.timeout>soon</ws.inactivity.timeout>"))
    with pytest.raises(KaazingImportError) as err:
        import_kaazing(xml, ImportOptions(out=tmp_path / "o.toml", insecure_ws=True))
    assert "connect-options/ws.inactivity.timeout" in str(err.value) and "55 seconds" in str(err.value)


def test_gateway_opts():
    assert parse_gateway_opts('-Da=b -Dc="x y" -Xmx1g') == ({"a": "b", "c": "x y"}, ["-Xmx1g"])


def test_tls_aliases_verify_client_none(tmp_path):
    xml = xml_file(tmp_path, CLOUD_SERVICE_A.format(extra="<socks.tls.verify-client>none</socks.tls.verify-client>"))
    result, cfg = do_import(xml, tmp_path / "cloud.toml")
    assert cfg.tls.verify_client is False
    assert any("verify-client none" in f.message for f in result.findings)


def test_properties_default_and_override(tmp_path):
    body = """<properties><property><name>port</name><value>5551</value></property>
      <property><name>host</name><value>${inner}.example.com</value></property>
      <property><name>inner</name><value>cloud</value></property></properties>""" + CLOUD_SERVICE_A.format(
        extra="").replace("0.0.0.0:5551", "0.0.0.0:${port}").replace("example.com:8000", "${host}:8000")
    xml = xml_file(tmp_path, body)
    _, cfg = do_import(xml, tmp_path / "a.toml", insecure_ws=True)
    assert cfg.service("serviceA").accept.port == 5551 and cfg.gateway.node_id == "cloud.example.com"
    _, cfg = do_import(xml, tmp_path / "b.toml", insecure_ws=True, properties={"port": "6000", "inner": "c2"})
    assert cfg.service("serviceA").accept.port == 6000 and cfg.gateway.node_id == "c2.example.com"


def test_unmappable_services_are_dropped_with_exit_1(tmp_path):
    body = CLOUD_SERVICE_A.format(extra="") + """
  <service><name>local</name><accept>tcp://0.0.0.0:7000</accept><connect>tcp://db:5432</connect>
    <type>proxy</type></service>
  <service><name>web</name><accept>http://0.0.0.0:8080/</accept><connect>http://intranet/</connect>
    <type>http.proxy</type></service>
  <service><name>JMX</name><type>management.jmx</type><accept>jmx://0.0.0.0:2020/</accept></service>
  <service><name>echo</name><accept>tcp://0.0.0.0:9000</accept><type>echo</type></service>
  <security><realm><name>demo</name></realm></security>"""
    xml = xml_file(tmp_path, body)
    result = import_kaazing(xml, ImportOptions(out=tmp_path / "o.toml", insecure_ws=True))
    assert result.exit_code == EXIT_DROPPED
    dropped = {f.path: f for f in result.dropped}
    assert set(dropped) == {"/gateway-config/service[2]", "/gateway-config/service[3]", "/gateway-config/service[5]"}
    assert "local TCP proxy" in dropped["/gateway-config/service[2]"].message
    assert "echo" in dropped["/gateway-config/service[5]"].message
    ignored = {f.path for f in result.findings if f.level == "ignored"}
    assert {"/gateway-config/service[4]", "/gateway-config/security/realm"} <= ignored
    # the report is in the TOML too, and the service that does map is there
    assert "dropped: gateway-config.xml:" in result.toml and 'name = "serviceA"' in result.toml
    # line numbers point at the elements
    assert dropped["/gateway-config/service[2]"].line == 17


def test_forward_socks_is_dropped(tmp_path):
    xml = xml_file(tmp_path, CLOUD_SERVICE_A.format(extra="").replace("<socks.mode>reverse</socks.mode>", "")
                   + CLOUD_SERVICE_A.format(extra="").replace("pipe://serviceA", "pipe://serviceB"))
    result = import_kaazing(xml, ImportOptions(out=tmp_path / "o.toml", insecure_ws=True))
    assert result.exit_code == EXIT_DROPPED
    assert "socks.mode forward" in result.dropped[0].message


def test_unknown_option_is_reported_not_silent(tmp_path):
    xml = xml_file(tmp_path, CLOUD_SERVICE_A.format(extra="<tcp.nodelay.fancy>yes</tcp.nodelay.fancy>"))
    result, _ = do_import(xml, tmp_path / "o.toml", insecure_ws=True)
    f = next(f for f in result.findings if f.path.endswith("tcp.nodelay.fancy"))
    assert f.level == "ignored" and result.exit_code == EXIT_OK


def test_both_halves_in_one_file(tmp_path):
    body = CLOUD_SERVICE_A.format(extra="") + """
  <service><name>B</name><accept>pipe://serviceB</accept><connect>tcp://db:5432</connect><type>proxy</type>
    <accept-options><socks.mode>reverse</socks.mode><socks.transport>ws://other:80/kwic</socks.transport>
    </accept-options></service>"""
    xml = xml_file(tmp_path, body)
    with pytest.raises(KaazingImportError) as err:
        import_kaazing(xml, ImportOptions(out=tmp_path / "o.toml"))
    assert "--role cloud" in str(err.value) and "--role onprem" in str(err.value)
    result, cfg = do_import(xml, tmp_path / "o.toml", role="onprem", insecure_ws=True)
    assert names(cfg, "connect") == {"serviceB"} and result.exit_code == EXIT_DROPPED
    assert "--role cloud" in result.dropped[0].message


def test_cluster_without_keystore_names_a_cluster_pki(tmp_path):
    body = """<cluster><name>c</name><accept>tcp://10.0.0.1:5941</accept><connect>tcp://cloud2:5941</connect>
      <connect>udp://224.2.2.44:54327</connect></cluster>""" + CLOUD_SERVICE_A.format(extra="")
    xml = xml_file(tmp_path, body)
    result, cfg = do_import(xml, tmp_path / "o.toml", node_id="cloud1")
    assert str(cfg.cluster.listen) == "wss://10.0.0.1:5941/cluster"
    assert cfg.cluster.ca == tmp_path / "pki" / "cluster" / "ca.pem"
    assert cfg.cluster.peer_names == ["cloud1", "cloud2"]
    assert [f.path for f in result.dropped] == ["/gateway-config/cluster/connect[2]"]  # multicast


def test_pkcs12_and_jks_keystores(tmp_path):
    import jks
    from cryptography.hazmat.primitives.serialization import pkcs12

    pki = _pki(tmp_path, ["example.com"], [])
    key = load_private_key(pki / "example.com.key")
    leaf = load_certificates(pki / "example.com.pem")[0]
    ca = load_certificates(pki / "ca.pem")[0]
    p12 = tmp_path / "ks.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(
        b"example.com", key, leaf, [ca], serialization.BestAvailableEncryption(b"p12pass")))
    (tmp_path / "p12.pw").write_text("p12pass")
    ks_jks = tmp_path / "ks.jks"
    der = lambda c: c.public_bytes(serialization.Encoding.DER)  # noqa: E731
    entry = jks.PrivateKeyEntry.new("example.com", [der(leaf), der(ca)], key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    jks.KeyStore.new("jks", [entry]).save(str(ks_jks), "jkspass")
    (tmp_path / "jks.pw").write_text("jkspass")
    xml = xml_file(tmp_path, CLOUD_SERVICE_A.format(extra="").replace("ws://", "wss://"))
    for store, pw in ((p12, "p12.pw"), (ks_jks, "jks.pw")):
        out = tmp_path / store.suffix[1:] / "cloud.toml"
        result, cfg = do_import(xml, out, keystore=store, keystore_password_file=tmp_path / pw)
        assert load_certificates(cfg.tls.cert)[0] == leaf
        # no truststore: the CA comes from the keystore's chain, with a note
        assert load_certificates(cfg.tls.ca) == [ca]
        assert any("no <truststore>" in f.message for f in result.findings)


def test_keystore_with_several_keys_needs_an_alias(tmp_path):
    pki = _pki(tmp_path, ["a", "b"], [])
    ca = load_certificates(pki / "ca.pem")[0]
    import jks

    der = lambda c: c.public_bytes(serialization.Encoding.DER)  # noqa: E731
    entries = [jks.PrivateKeyEntry.new(n, [der(load_certificates(pki / f"{n}.pem")[0]), der(ca)],
                                       load_private_key(pki / f"{n}.key").private_bytes(
                                           serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())) for n in ("a", "b")]
    jks.KeyStore.new("jks", entries).save(str(tmp_path / "ks.jks"), "pw")
    (tmp_path / "pw").write_text("pw")
    xml = xml_file(tmp_path, CLOUD_SERVICE_A.format(extra="").replace("ws://", "wss://"))
    with pytest.raises(KaazingImportError) as err:
        import_kaazing(xml, ImportOptions(out=tmp_path / "o.toml", keystore=tmp_path / "ks.jks",
                                          keystore_password_file=tmp_path / "pw"))
    assert "--key-alias" in str(err.value) and "'a'" in str(err.value)
    _, cfg = do_import(xml, tmp_path / "o.toml", keystore=tmp_path / "ks.jks", keystore_password_file=tmp_path / "pw",
                       key_alias="b")
    assert load_certificates(cfg.tls.cert)[0] == load_certificates(pki / "b.pem")[0]


# ---------------------------------------------------------------------------------------------
# Errors: file, element and fix
# ---------------------------------------------------------------------------------------------


def test_malformed_xml(tmp_path):
    xml = tmp_path / "bad.xml"
    xml.write_text(f"<gateway-config {NS}>\n  <service>\n    <name>x</name>\n  </servce>\n</gateway-config>\n")
    with pytest.raises(KaazingImportError) as err:
        import_kaazing(xml)
    msg = str(err.value)
    assert msg.startswith(f"{xml}:4:") and "malformed XML" in msg and "mismatched tag" in msg
    assert "inside <service>" in msg and "fix the XML" in msg


def test_not_xml_at_all(tmp_path):
    xml = tmp_path / "empty.xml"
    xml.write_text("")
    with pytest.raises(KaazingImportError, match="malformed XML"):
        import_kaazing(xml)


def test_entities_are_refused(tmp_path):
    xml = tmp_path / "lol.xml"
    xml.write_text('<?xml version="1.0"?><!DOCTYPE g [<!ENTITY a "aaaa">]><gateway-config>&a;</gateway-config>')
    with pytest.raises(KaazingImportError, match="entity declaration"):
        import_kaazing(xml)


def test_wrong_root_element(tmp_path):
    xml = tmp_path / "pom.xml"
    xml.write_text("<project></project>")
    with pytest.raises(KaazingImportError, match="expected <gateway-config>"):
        import_kaazing(xml)


def test_missing_xml_file(tmp_path):
    with pytest.raises(KaazingImportError, match="file not found"):
        import_kaazing(tmp_path / "nope.xml")


@needs_tutorials
def test_unknown_property_names_file_element_and_fix():
    xml = TUTORIALS / "kwic" / "4-ha" / "config" / "cloud-config.xml"
    with pytest.raises(KaazingImportError) as err:
        import_kaazing(xml, ImportOptions(properties={"cloud-node-hostname": "cloud1.example.com"}))
    msg = str(err.value)
    assert f"{xml}:19: /gateway-config/cluster/connect: unknown property ${{other-cluster-member-ip}}" in msg
    assert "-D other-cluster-member-ip=VALUE" in msg and "GATEWAY_OPTS" in msg


@needs_tutorials
def test_missing_keystore(tmp_path):
    xml = TUTORIALS / "kwic" / "2-tls" / "config" / "cloud-config.xml"
    with pytest.raises(KaazingImportError) as err:
        import_kaazing(xml, ImportOptions(out=tmp_path / "cloud.toml"))
    msg = str(err.value)
    where = f"{xml}:40: /gateway-config/security/keystore/file"
    assert f"{where}: keystore /x509/stores/keystore-cloud.jceks not found" in msg
    assert "--keystore PATH" in msg


@needs_tutorials
def test_missing_password_file(tmp_path):
    pki = _pki(tmp_path, ["example.com"], [])
    stores = make_stores(tmp_path / "s", pki, "example.com")
    xml = TUTORIALS / "kwic" / "2-tls" / "config" / "cloud-config.xml"
    with pytest.raises(KaazingImportError) as err:
        import_kaazing(xml, ImportOptions(out=tmp_path / "cloud.toml", keystore=stores["keystore"]))
    msg = str(err.value)
    assert "/gateway-config/security/keystore/password-file" in msg and "--keystore-password-file" in msg


@needs_tutorials
@pytest.mark.parametrize("which", ["keystore", "truststore"])
def test_wrong_store_password(tmp_path, which):
    pki = _pki(tmp_path, ["example.com"], [])
    opts = stores_for(tmp_path, None, pki, "example.com")
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-password\n")
    opts[f"{which}_password_file"] = wrong
    xml = TUTORIALS / "kwic" / "2-tls" / "config" / "cloud-config.xml"
    with pytest.raises(KaazingImportError) as err:
        import_kaazing(xml, ImportOptions(out=tmp_path / "cloud.toml", **opts))
    msg = str(err.value)
    assert f"wrong {which} password (from --{which}-password-file {wrong})" in msg
    assert f"--{which}-password-file FILE" in msg and str(opts[which]) in msg


def test_private_key_with_its_own_password(tmp_path):
    pki = _pki(tmp_path, ["example.com"], [])
    stores = make_stores(tmp_path / "s", pki, "example.com", key_password="keypass")
    xml = xml_file(tmp_path, CLOUD_SERVICE_A.format(extra="").replace("ws://", "wss://"))
    opts = {"keystore": stores["keystore"], "keystore_password_file": stores["keystore_pw"],
            "truststore": stores["truststore"], "truststore_password_file": stores["truststore_pw"]}
    with pytest.raises(KaazingImportError, match="--key-password-file"):
        import_kaazing(xml, ImportOptions(out=tmp_path / "o.toml", **opts))
    (tmp_path / "key.pw").write_text("keypass\n")
    _, cfg = do_import(xml, tmp_path / "o.toml", key_password_file=tmp_path / "key.pw", **opts)
    assert cfg.tls.key.exists()


def test_not_a_keystore(tmp_path):
    (tmp_path / "ks.jceks").write_text("hello")
    (tmp_path / "pw").write_text("x")
    xml = xml_file(tmp_path, CLOUD_SERVICE_A.format(extra="").replace("ws://", "wss://"))
    with pytest.raises(KaazingImportError, match="not a JKS, JCEKS or PKCS12 keystore"):
        import_kaazing(xml, ImportOptions(out=tmp_path / "o.toml", keystore=tmp_path / "ks.jceks",
                                          keystore_password_file=tmp_path / "pw"))


def test_keystore_needs_an_output_file(tmp_path):
    pki = _pki(tmp_path, ["example.com"], [])
    opts = stores_for(tmp_path, None, pki, "example.com")
    xml = xml_file(tmp_path, CLOUD_SERVICE_A.format(extra="").replace("ws://", "wss://"))
    with pytest.raises(KaazingImportError, match="-o OUT.toml"):
        import_kaazing(xml, ImportOptions(**opts))


# ---------------------------------------------------------------------------------------------
# The command (exit codes, report, refusing to overwrite)
# ---------------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli_import.add_parser(parser.add_subparsers(dest="command"))
    return cli_import.run(parser.parse_args(["import-kaazing", *argv]))


def test_cli_exit_codes_and_report(tmp_path, capsys):
    good = xml_file(tmp_path, CLOUD_SERVICE_A.format(extra=""), "good.xml")
    out = tmp_path / "good.toml"
    assert run_cli([str(good), "-o", str(out)]) == EXIT_OK
    err = capsys.readouterr().err
    assert "good.xml:" in err and f"intercloud certs init {tmp_path}/pki --cloud example.com" in err
    assert "imported as a cloud gateway" in err
    # an existing output is not replaced without --force
    assert run_cli([str(good), "-o", str(out)]) == EXIT_BAD_INPUT
    assert "already exist" in capsys.readouterr().err
    assert run_cli([str(good), "-o", str(out), "--force", "--insecure-ws"]) == EXIT_OK
    assert load_config(out).tls.insecure
    # dropped -> 1, and the report names line and element
    bad = xml_file(tmp_path, CLOUD_SERVICE_A.format(extra="") + "<service><name>e</name><type>echo</type></service>",
                   "bad.xml")
    assert run_cli([str(bad), "-o", str(tmp_path / "bad.toml"), "--insecure-ws"]) == EXIT_DROPPED
    err = capsys.readouterr().err
    assert "bad.xml:16: /gateway-config/service[2]: dropped:" in err
    # bad input -> 2, nothing written
    assert run_cli([str(tmp_path / "missing.xml"), "-o", str(tmp_path / "m.toml")]) == EXIT_BAD_INPUT
    assert not (tmp_path / "m.toml").exists()
    assert "error:" in capsys.readouterr().err


def test_cli_stdout(tmp_path, capsys):
    xml = xml_file(tmp_path, CLOUD_SERVICE_A.format(extra=""))
    assert run_cli([str(xml), "-D", "unused=1", "--gateway-opts=-Dalso=2 -Xmx512m"]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out.startswith("# intercloud configuration imported") and '[gateway]' in captured.out
    assert "-D unused was not used" in captured.err and "-Xmx512m" in captured.err


def test_cli_is_wired():
    from intercloud import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["import-kaazing", "--help"])
    assert exc.value.code == 0
