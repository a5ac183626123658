"""Loading and validating gateway configuration files (intercloud.config)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from intercloud import certs
from intercloud.cli import check as cli_check
from intercloud.transport import sockopts
from intercloud.config import (
    Config,
    ConfigError,
    Endpoint,
    HostPort,
    ProxyUrl,
    Secret,
    TunnelConfig,
    WsUrl,
    load_config,
    parse_config,
)

KiB = 1024
MiB = 1024 * KiB
PASSWORD = "hunter2-S3cr3t"  # must never show up in any output
TOKEN = "admin-T0ken-xyz"


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CA + cloud1 + onprem1, an expired certificate and a certificate from a foreign CA."""
    d = tmp_path_factory.mktemp("pki")
    certs.init_certs(d, cloud=["cloud1"], onprem=["onprem1"])
    ca = certs.load_ca(d)
    assert ca is not None
    now = dt.datetime.now(dt.UTC)
    old = certs.issue(
        ca, "old", dns_names=["old"], not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=1)
    )
    certs.write_certificate(d / "old.pem", old.cert)
    certs.write_private_key(d / "old.key", old.key)
    return d


@pytest.fixture(autouse=True)
def _congestion_sysctls(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """The default tunnel.congestion ("bbr") is warned about where this kernel has not loaded it or a
    process without CAP_NET_ADMIN may not pick it; the tests read made-up sysctls that allow it, so that
    they do not depend on the host (the tests of that warning set their own)."""
    d = tmp_path_factory.mktemp("sysctl")
    (d / "available").write_text("reno cubic bbr\n")
    (d / "allowed").write_text("reno cubic bbr\n")
    (d / "default").write_text("cubic\n")
    monkeypatch.setattr(sockopts, "AVAILABLE", d / "available")
    monkeypatch.setattr(sockopts, "ALLOWED", d / "allowed")
    monkeypatch.setattr(sockopts, "DEFAULT", d / "default")


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def cloud_toml(pki: Path, *, gateway: str = "", tls: str = "", tunnel: str = "", services: str = "") -> str:
    return f"""
[gateway]
role = "cloud"
node_id = "cloud1"
{gateway}

[tls]
cert = "{pki}/cloud1.pem"
key = "{pki}/cloud1.key"
ca = "{pki}/ca.pem"
{tls}

[tunnel]
listen = "wss://0.0.0.0:8443/intercloud"
{tunnel}

{services}
"""


def onprem_toml(
    pki: Path,
    *,
    gateway: str = "",
    tls: str = "",
    tunnel: str = "",
    services: str = "",
    connect: str = '["wss://cloud1:8443/intercloud"]',
) -> str:
    return f"""
[gateway]
role = "onprem"
{gateway}

[tls]
cert = "{pki}/onprem1.pem"
key = "{pki}/onprem1.key"
ca = "{pki}/ca.pem"
{tls}

[tunnel]
connect = {connect}
{tunnel}

{services}
"""


def problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def problem_for(path: Path, key: str) -> str:
    """The one message reported for ``key`` (fails if there is none or several)."""
    found = [msg for k, msg in problems(path) if k == key]
    assert len(found) == 1, f"expected one problem for {key}, got {problems(path)}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# Valid configurations
# ---------------------------------------------------------------------------------------------


def test_valid_cloud_config(tmp_path: Path, pki: Path) -> None:
    path = write(
        tmp_path,
        cloud_toml(
            pki,
            gateway='admin = "127.0.0.1:9101"\nroute_wait = "2s"\ndrain_timeout = "1m"',
            tunnel='stream_window = "8MiB"\nmax_frame = "64KiB"\nping_interval = "500ms"\nping_timeout = 2',
            services="""
[[service]]
name = "db"
accept = "tcp://0.0.0.0:5432"

[[service]]
name = "web"
connect = "tcp://10.0.0.5:80"
""",
        ),
    )
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.source == path
    assert cfg.gateway.role == "cloud" and cfg.gateway.node_id == "cloud1"
    assert cfg.gateway.admin == HostPort("127.0.0.1", 9101)
    assert (cfg.gateway.admin.host, cfg.gateway.admin.port) == ("127.0.0.1", 9101)
    assert cfg.gateway.route_wait == 2.0 and cfg.gateway.drain_timeout == 60.0
    assert cfg.tls.cert == pki / "cloud1.pem" and cfg.tls.ca == pki / "ca.pem"
    assert cfg.tls.verify_client is True and cfg.tls.insecure is False and cfg.tls.server_name is None
    listen = cfg.tunnel.listen
    assert listen is not None
    assert (listen.scheme, listen.host, listen.port, listen.path) == ("wss", "0.0.0.0", 8443, "/intercloud")
    assert str(listen) == "wss://0.0.0.0:8443/intercloud"
    assert cfg.tunnel.stream_window == 8 * MiB and cfg.tunnel.max_frame == 64 * 1024
    assert cfg.tunnel.ping_interval == 0.5 and cfg.tunnel.ping_timeout == 2.0
    assert [s.name for s in cfg.services] == ["db", "web"]
    assert [s.name for s in cfg.accept_services] == ["db"]
    assert [s.name for s in cfg.connect_services] == ["web"]
    db = cfg.services[0]
    assert db.accept == Endpoint("0.0.0.0", 5432) and db.connect is None
    assert str(db.accept) == "tcp://0.0.0.0:5432"
    assert db.direction == "accept" and db.endpoint is db.accept
    assert cfg.service("web") is cfg.services[1] and cfg.service("nope") is None
    assert cfg.warnings == []


def test_defaults(tmp_path: Path, pki: Path) -> None:
    cfg = load_config(write(tmp_path, cloud_toml(pki)))
    g, tls, t = cfg.gateway, cfg.tls, cfg.tunnel
    assert g.admin is None and g.admin_token is None
    assert g.route_wait == 5.0 and g.drain_timeout == 30.0
    assert tls.verify_client is True and tls.insecure is False
    assert t.connect == [] and t.per_member == 2 and t.proxy is None and t.proxy_disabled is False
    assert (t.ping_interval, t.ping_timeout, t.handshake_timeout, t.connect_timeout) == (5.0, 15.0, 10.0, 10.0)
    assert t.stream_window == 4 * MiB and t.max_frame == 256 * 1024
    assert t.max_streams == 10000 and t.max_tunnel_buffer == 1024 * KiB
    assert (t.reconnect_min, t.reconnect_max) == (0.2, 30.0)
    assert t.congestion == "bbr" and t.notsent_lowat == 1024 * 1024
    assert cfg.services == []


@pytest.mark.parametrize(
    ("lines", "congestion", "notsent_lowat"),
    [
        ('congestion = "reno"\nnotsent_lowat = "64KiB"', "reno", 64 * 1024),
        ('congestion = "system"\nnotsent_lowat = 0', "system", 0),
        ('congestion = ""\nnotsent_lowat = "16KiB"', "system", 16 * 1024),
        ('congestion = "tcp_4_x"\nnotsent_lowat = 67108864', "tcp_4_x", 64 * MiB),
    ],
)
def test_tcp_socket_options(tmp_path: Path, pki: Path, lines: str, congestion: str, notsent_lowat: int) -> None:
    for toml in (cloud_toml(pki, tunnel=lines), onprem_toml(pki, tunnel=lines)):
        t = load_config(write(tmp_path, toml)).tunnel
        assert (t.congestion, t.notsent_lowat) == (congestion, notsent_lowat)


def test_congestion_errors_name_the_file_and_the_key(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, onprem_toml(pki, tunnel='congestion = "BBR v2"\nnotsent_lowat = "1KiB"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path}: invalid configuration (2 problems):")
    assert "  tunnel.congestion: invalid congestion control algorithm 'BBR v2'" in text
    assert '"system" to keep the kernel\'s default' in text
    assert "  tunnel.notsent_lowat: must be between 16KiB and 64MiB (or 0 to leave the kernel's setting), got 1KiB" \
        in text


def _sysctls(tmp_path: Path, monkeypatch, available: str | None, allowed: str | None) -> None:
    for name, value in (("AVAILABLE", available), ("ALLOWED", allowed)):
        path = tmp_path / name.lower()
        if value is not None:
            path.write_text(value + "\n")
        monkeypatch.setattr(sockopts, name, path)


def test_congestion_algorithm_the_kernel_has_not_loaded_is_a_warning(tmp_path: Path, pki: Path, monkeypatch) -> None:
    _sysctls(tmp_path, monkeypatch, "reno cubic", "reno cubic")
    cfg = load_config(write(tmp_path, cloud_toml(pki)))
    ((key, msg),) = cfg.warnings
    assert key == "tunnel.congestion"
    assert '"bbr" is not among the algorithms this kernel has loaded' in msg and "reno cubic" in msg
    assert "default (cubic)" in msg and "modprobe tcp_bbr" in msg and 'congestion = "system"' in msg


def test_congestion_algorithm_not_allowed_without_cap_net_admin_is_a_warning(tmp_path: Path, pki: Path,
                                                                           monkeypatch) -> None:
    _sysctls(tmp_path, monkeypatch, "reno cubic bbr", "reno cubic")
    ((key, msg),) = load_config(write(tmp_path, onprem_toml(pki))).warnings
    assert key == "tunnel.congestion"
    assert "not in net.ipv4.tcp_allowed_congestion_control (reno cubic)" in msg and "CAP_NET_ADMIN" in msg


@pytest.mark.parametrize(("available", "allowed", "tunnel"), [
    ("reno cubic bbr", "reno cubic bbr", ""),  # loaded and allowed
    (None, None, ""),  # no /proc to tell (another OS, a container without it): nothing to say
    ("reno cubic", "reno cubic", 'congestion = "system"'),  # the kernel's default is always fine
])
def test_no_congestion_warning(tmp_path: Path, pki: Path, monkeypatch, available, allowed, tunnel) -> None:
    _sysctls(tmp_path, monkeypatch, available, allowed)
    assert load_config(write(tmp_path, cloud_toml(pki, tunnel=tunnel))).warnings == []


def test_valid_onprem_config_defaults_node_id_to_the_certificate_cn(tmp_path: Path, pki: Path, monkeypatch) -> None:
    # not the host name: cloned VMs share it, and the cloud admits only a node id the certificate names
    monkeypatch.setattr(socket, "gethostname", lambda: "dc1-gw.example.com")
    cfg = load_config(
        write(
            tmp_path,
            onprem_toml(
                pki,
                connect='["wss://a.example.com/intercloud", "wss://b.example.com:8443/x"]',
                tunnel="per_member = 3",
                services='[[service]]\nname = "db"\nconnect = "tcp://db.internal:5432"',
            ),
        )
    )
    assert cfg.gateway.role == "onprem" and cfg.gateway.node_id == "onprem1"
    assert cfg.warnings == []
    a, b = cfg.tunnel.connect
    assert (a.scheme, a.host, a.port, a.path) == ("wss", "a.example.com", 443, "/intercloud")
    assert (b.port, b.path) == (8443, "/x")
    assert [str(u) for u in cfg.tunnel.connect] == ["wss://a.example.com/intercloud", "wss://b.example.com:8443/x"]
    assert cfg.tunnel.per_member == 3
    assert cfg.connect_services[0].connect == Endpoint("db.internal", 5432)


def test_onprem_node_id_may_be_set(tmp_path: Path, pki: Path) -> None:
    cfg = load_config(write(tmp_path, onprem_toml(pki, gateway='node_id = "onprem1"')))
    assert cfg.gateway.node_id == "onprem1" and cfg.warnings == []


@pytest.mark.parametrize("role", ["onprem", "cloud"])
def test_node_id_that_the_certificate_does_not_name_is_a_warning(tmp_path: Path, pki: Path, role: str) -> None:
    text = (onprem_toml(pki, gateway='node_id = "dc1"') if role == "onprem"
            else cloud_toml(pki).replace('node_id = "cloud1"', 'node_id = "cloud9"'))
    cfg = load_config(write(tmp_path, text))  # it still starts: whether the peer checks is the peer's config
    (key, msg), = cfg.warnings
    node, cert = ("dc1", "onprem1") if role == "onprem" else ("cloud9", "cloud1")
    assert key == "gateway.node_id" and f"{node!r} is not a name of tls.cert" in msg, msg
    assert f"{pki / cert}.pem" in msg and f"'{cert}'" in msg and "refuse" in msg, msg
    assert "set node_id to one of those names" in msg and f"issue a certificate for {node!r}" in msg, msg


def _leaf(directory: Path, stem: str, cn: str | None, dns: list[str]) -> None:
    """An on-prem certificate from the pki CA with this CN (None: no CN at all) and these DNS SANs."""
    import datetime as _dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ca = certs.load_ca(directory)
    key = certs.generate_key()
    now = _dt.datetime.now(_dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
               .issuer_name(ca.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - _dt.timedelta(hours=1)).not_valid_after(now + _dt.timedelta(days=90)))
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    certs.write_certificate(directory / f"{stem}.pem", builder.sign(ca.key, hashes.SHA256()))
    certs.write_private_key(directory / f"{stem}.key", key)


@pytest.mark.parametrize(("cn", "dns", "expected"), [
    (None, ["dc7.example.com", "dc7"], "dc7.example.com"),  # no CN: the first DNS SAN
    ("DC 7 gateway", ["dc7"], "dc7"),  # a CN that is no valid node id: the first name that is
])
def test_onprem_default_node_id_is_the_certificates_first_usable_name(tmp_path: Path, pki: Path, cn, dns,
                                                                      expected) -> None:
    d = tmp_path / "pki"
    shutil.copytree(pki, d)
    _leaf(d, "leaf", cn, dns)
    cfg = load_config(write(tmp_path, onprem_toml(d).replace("onprem1.", "leaf.")))
    assert cfg.gateway.node_id == expected and cfg.warnings == []


def test_onprem_certificate_without_a_usable_name_must_set_node_id(tmp_path: Path, pki: Path) -> None:
    d = tmp_path / "pki"
    shutil.copytree(pki, d)
    _leaf(d, "leaf", "DC 7 gateway", [])
    msg = problem_for(write(tmp_path, onprem_toml(d).replace("onprem1.", "leaf.")), "gateway.node_id")
    assert "no name of tls.cert" in msg and "'DC 7 gateway'" in msg and "set gateway.node_id" in msg, msg


def _plain_onprem(gateway: str = "") -> str:
    return (f'[gateway]\nrole = "onprem"\n{gateway}\n[tls]\ninsecure = true\n'
            '[tunnel]\nconnect = ["ws://cloud1:8080/intercloud"]\n')


def test_onprem_without_a_certificate_defaults_node_id_to_the_host_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "dc1-gw.example.com")
    cfg = load_config(write(tmp_path, _plain_onprem()))
    assert cfg.gateway.node_id == "dc1-gw.example.com"


def test_onprem_with_unusable_host_name_must_set_node_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "bad host name")
    msg = problem_for(write(tmp_path, _plain_onprem()), "gateway.node_id")
    assert "'bad host name' is not a valid node id" in msg and "set gateway.node_id" in msg


def test_relative_paths_are_resolved_against_the_config_directory(tmp_path: Path, pki: Path, monkeypatch) -> None:
    conf_dir = tmp_path / "etc"
    shutil.copytree(pki, conf_dir / "certs")
    write(
        conf_dir,
        """
[gateway]
role = "cloud"
node_id = "c1"
[tls]
cert = "certs/cloud1.pem"
key = "./certs/cloud1.key"
ca = "certs/../certs/ca.pem"
[tunnel]
listen = "wss://127.0.0.1:0/"
""",
    )
    monkeypatch.chdir(tmp_path)  # somewhere else: the cwd must not matter
    cfg = load_config(Path("etc/gateway.toml"))
    assert cfg.tls.cert == conf_dir / "certs" / "cloud1.pem"
    assert cfg.tls.key == conf_dir / "certs" / "cloud1.key"
    assert cfg.tls.ca == conf_dir / "certs" / "ca.pem"
    assert cfg.source == conf_dir / "gateway.toml"
    assert cfg.tunnel.listen is not None and cfg.tunnel.listen.path == "/" and cfg.tunnel.listen.port == 0


def test_plain_ws_with_insecure_needs_no_certificates(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
[gateway]
role = "onprem"
node_id = "dc1"
[tls]
insecure = true
[tunnel]
connect = "ws://127.0.0.1:8080"
""",
        )
    )
    assert cfg.tls.insecure is True
    url = cfg.tunnel.connect[0]  # a single string is a one-element list
    assert (url.scheme, url.port, url.path, str(url)) == ("ws", 8080, "/intercloud", "ws://127.0.0.1:8080/intercloud")


def test_config_is_frozen(tmp_path: Path, pki: Path) -> None:
    cfg = load_config(write(tmp_path, cloud_toml(pki)))
    with pytest.raises(ValidationError):
        cfg.gateway.node_id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.tunnel.per_member = 5  # type: ignore[misc]


def test_parse_config_from_a_dict(pki: Path) -> None:
    cfg = parse_config(
        {
            "gateway": {"role": "onprem", "node_id": "x"},
            "tls": {"cert": str(pki / "onprem1.pem"), "key": str(pki / "onprem1.key"), "ca": "ca.pem"},
            "tunnel": {"connect": ["wss://c/"]},
        },
        base_dir=pki,
    )
    assert cfg.tls.ca == pki / "ca.pem"


# ---------------------------------------------------------------------------------------------
# File-level errors and the report format
# ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    assert "file not found" in str(info.value) and str(path) in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nrole = "cloud"\nnode_id "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    ((key, message),) = info.value.problems
    assert key == ""
    assert message.startswith("TOML syntax error at line 3, column 9:")


def test_duplicate_toml_key_is_a_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TOML syntax error at line 3"):
        load_config(write(tmp_path, '[gateway]\nrole = "cloud"\nrole = "onprem"\n'))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[gateway]\nrole = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="line 2: not valid UTF-8"):
        load_config(path)


def test_report_format(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nrole = "edge"\n[tunnel]\nper_member = 0\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.problems == [
        ("gateway.role", "must be 'cloud' or 'onprem', got 'edge'"),
        ("tunnel.per_member", "must be between 1 and 16, got 0"),
    ]
    assert str(err) == (
        f"{path}: invalid configuration (2 problems):\n"
        "  gateway.role: must be 'cloud' or 'onprem', got 'edge'\n"
        "  tunnel.per_member: must be between 1 and 16, got 0"
    )


def test_report_format_singular(tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: invalid configuration (1 problem):\n  gateway.role: required key is missing"


# ---------------------------------------------------------------------------------------------
# Unknown keys and types
# ---------------------------------------------------------------------------------------------


def test_unknown_keys_everywhere(tmp_path: Path, pki: Path) -> None:
    path = write(
        tmp_path,
        cloud_toml(
            pki,
            gateway="nodeid = 'x'",
            tls="verify_clients = false",
            tunnel="ping_intervall = '1s'",
            services='[[service]]\nname = "a"\naccept = "tcp://127.0.0.1:1"\nlisten = "x"',
        )
        + "\n[tunel]\n",
    )
    found = dict(problems(path))
    assert "did you mean 'node_id'?" in found["gateway.nodeid"]
    assert "valid keys in [gateway]: role, node_id" in found["gateway.nodeid"]
    assert "did you mean 'verify_client'?" in found["tls.verify_clients"]
    assert "did you mean 'ping_interval'?" in found["tunnel.ping_intervall"]
    assert "unknown key" in found["service[0].listen"]
    assert "did you mean [tunnel]?" in found["tunel"]


def test_key_at_top_level_names_its_section(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, 'role = "cloud"\n' + cloud_toml(pki))
    assert "did you mean gateway.role (put it under [gateway])?" in problem_for(path, "role")


def test_single_bracket_service_table(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, services='[service]\nname = "a"\naccept = "tcp://127.0.0.1:1"'))
    assert "[[service]] table (double brackets)" in problem_for(path, "service")


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ("verify_client = 'yes'", "tls.verify_client", "expected true or false"),
        ("insecure = 1", "tls.insecure", "expected true or false"),
        ("cert = 5", "tls.cert", "expected a file path string, got a number"),
        ("cert = ''", "tls.cert", "must not be empty"),
    ],
)
def test_tls_types(tmp_path: Path, pki: Path, line: str, key: str, message: str) -> None:
    text = cloud_toml(pki).replace("[tls]\n", f"[tls]\n{line}\n").replace(f'\n{key.split(".")[1]} = "{pki}', "\n#")
    assert message in problem_for(write(tmp_path, text), key)


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    assert "expected a table ([gateway])" in problem_for(write(tmp_path, 'gateway = "cloud"\n'), "gateway")


# ---------------------------------------------------------------------------------------------
# Value syntax and bounds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ("ping_interval = 'fast'", "tunnel.ping_interval", "expected a duration like '5s' or '500ms', got 'fast'"),
        ("ping_interval = 0", "tunnel.ping_interval", "must be longer than 0s"),
        ("connect_timeout = -1", "tunnel.connect_timeout", "cannot be negative"),
        ("per_member = 0", "tunnel.per_member", "must be between 1 and 16, got 0"),
        ("per_member = 17", "tunnel.per_member", "must be between 1 and 16, got 17"),
        ("per_member = '2'", "tunnel.per_member", "expected an integer"),
        ("per_member = true", "tunnel.per_member", "expected an integer"),
        ("stream_window = '1KiB'", "tunnel.stream_window", "must be between 64KiB and 64MiB, got 1KiB"),
        ("stream_window = '128MiB'", "tunnel.stream_window", "must be between 64KiB and 64MiB, got 128MiB"),
        ("max_frame = '2MiB'", "tunnel.max_frame", "must be between 16KiB and 1MiB, got 2MiB"),
        ("max_frame = '8KiB'", "tunnel.max_frame", "must be between 16KiB and 1MiB"),
        ("max_frame = 'huge'", "tunnel.max_frame", "expected a size like '4MiB'"),
        ("max_streams = 0", "tunnel.max_streams", "must be between 1 and 1000000"),
        ("congestion = 'BBR'", "tunnel.congestion", "invalid congestion control algorithm 'BBR': use the kernel's"),
        ("congestion = 'tcp-bbr'", "tunnel.congestion", "1-15 characters from a-z 0-9 _"),
        ("congestion = 'abcdefghijklmnop'", "tunnel.congestion", "invalid congestion control algorithm"),
        ("congestion = 1", "tunnel.congestion", "expected a string, got a"),
        ("notsent_lowat = '15KiB'", "tunnel.notsent_lowat",
         "must be between 16KiB and 64MiB (or 0 to leave the kernel's setting), got 15KiB"),
        ("notsent_lowat = '65MiB'", "tunnel.notsent_lowat", "must be between 16KiB and 64MiB"),
        ("notsent_lowat = 'small'", "tunnel.notsent_lowat", "expected a size like '4MiB'"),
        ("notsent_lowat = -1", "tunnel.notsent_lowat", "negative"),
        ("connect = 'wss://a/'", "tunnel.connect", "only on-prem gateways dial tunnels"),
        ("proxy = 'socks5://p:1080'", "tunnel.proxy", "expected an http:// proxy URL"),
    ],
)
def test_tunnel_values(tmp_path: Path, pki: Path, line: str, key: str, message: str) -> None:
    assert message in problem_for(write(tmp_path, cloud_toml(pki, tunnel=line)), key)


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("https://x/", "expected a wss:// (or ws://) URL"),
        ("wss://", "missing host"),
        ("wss://h:99999/", "port 99999 out of range"),
        ("wss://h:abc/", "invalid port 'abc'"),
        ("wss://::1:443/", "IPv6 addresses need brackets"),
        ("wss://h/?q=1", "no query or fragment"),
        ("wss://u:p@h/", "cannot carry credentials"),
        ("wss://bad_host!/", "invalid host name"),
    ],
)
def test_bad_tunnel_urls(tmp_path: Path, pki: Path, listen: str, message: str) -> None:
    text = cloud_toml(pki).replace('listen = "wss://0.0.0.0:8443/intercloud"', f'listen = "{listen}"')
    assert message in problem_for(write(tmp_path, text), "tunnel.listen")


def test_bad_connect_url_is_reported_with_its_index(tmp_path: Path, pki: Path) -> None:
    path = write(
        tmp_path,
        onprem_toml(pki, gateway='node_id = "x"').replace(
            'connect = ["wss://cloud1:8443/intercloud"]', 'connect = ["wss://ok/", "tcp://nope:1"]'
        ),
    )
    assert "expected a wss://" in problem_for(path, "tunnel.connect[1]")


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:9101", "127.0.0.1", 9101, "127.0.0.1:9101"),
        ("[::1]:9101", "::1", 9101, "[::1]:9101"),
        ("localhost:0", "localhost", 0, "localhost:0"),
        ("0.0.0.0:80", "0.0.0.0", 80, "0.0.0.0:80"),
    ],
)
def test_host_port(text: str, host: str, port: int, shown: str) -> None:
    hp = HostPort.parse(text)
    assert (hp.host, hp.port, str(hp)) == (host, port, shown)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "missing port"),
        (":9101", "missing host"),
        ("::1:9101", "IPv6 addresses need brackets"),
        ("[::1]9101", "missing port"),
        ("h:65536", "out of range"),
        ("h:-1", "invalid port"),
    ],
)
def test_bad_host_port(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HostPort.parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1:5432", "expected 'tcp://HOST:PORT'"),
        ("udp://h:1", "expected 'tcp://HOST:PORT'"),
        ("tcp://h:1/x", "has no path"),
        ("tcp://h", "missing port"),
    ],
)
def test_bad_endpoints(tmp_path: Path, pki: Path, text: str, message: str) -> None:
    path = write(tmp_path, cloud_toml(pki, services=f'[[service]]\nname = "a"\naccept = "{text}"'))
    assert message in problem_for(path, "service[0].accept")


def test_ipv6_endpoint_and_url() -> None:
    assert str(Endpoint.parse("tcp://[::1]:22")) == "tcp://[::1]:22"
    url = WsUrl.parse("WSS://[::1]:8443/t")
    assert (url.scheme, url.host, url.port, str(url)) == ("wss", "::1", 8443, "wss://[::1]:8443/t")
    assert WsUrl.parse("ws://h").port == 80


# ---------------------------------------------------------------------------------------------
# Role rules
# ---------------------------------------------------------------------------------------------


def test_cloud_requires_node_id_and_listen(tmp_path: Path, pki: Path) -> None:
    text = cloud_toml(pki).replace('node_id = "cloud1"', "").replace('listen = "wss://0.0.0.0:8443/intercloud"', "")
    found = dict(problems(write(tmp_path, text)))
    assert 'required for role = "cloud"' in found["gateway.node_id"]
    assert 'required for role = "cloud"' in found["tunnel.listen"]
    assert "wss://0.0.0.0:8443/intercloud" in found["tunnel.listen"]  # shows an example


def test_onprem_requires_connect(tmp_path: Path, pki: Path) -> None:
    text = onprem_toml(pki).replace('connect = ["wss://cloud1:8443/intercloud"]', "")
    assert 'required for role = "onprem"' in problem_for(write(tmp_path, text), "tunnel.connect")


def test_onprem_requires_at_least_one_connect_url(tmp_path: Path, pki: Path) -> None:
    text = onprem_toml(pki).replace('connect = ["wss://cloud1:8443/intercloud"]', "connect = []")
    assert 'required for role = "onprem"' in problem_for(write(tmp_path, text), "tunnel.connect")


def test_listen_on_onprem_is_an_error(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, onprem_toml(pki, tunnel='listen = "wss://0.0.0.0:8443/"'))
    assert "on-prem gateways never listen" in problem_for(path, "tunnel.listen")


def test_connect_on_cloud_is_an_error(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, tunnel='connect = ["wss://other/"]'))
    assert "only on-prem gateways dial tunnels" in problem_for(path, "tunnel.connect")


def test_duplicate_connect_urls(tmp_path: Path, pki: Path) -> None:
    text = onprem_toml(pki).replace(
        'connect = ["wss://cloud1:8443/intercloud"]', 'connect = ["wss://c:443/intercloud", "wss://c/intercloud"]'
    )
    assert "listed twice" in problem_for(write(tmp_path, text), "tunnel.connect[1]")


def test_bad_role(tmp_path: Path) -> None:
    assert "must be 'cloud' or 'onprem'" in problem_for(write(tmp_path, '[gateway]\nrole = "edge"\n'), "gateway.role")


@pytest.mark.parametrize("node_id", ["", "a b", "x" * 65, "ü"])
def test_bad_node_id(tmp_path: Path, pki: Path, node_id: str) -> None:
    text = cloud_toml(pki).replace('node_id = "cloud1"', f'node_id = "{node_id}"')
    assert "use 1-64 characters from A-Z a-z 0-9 . _ -" in problem_for(write(tmp_path, text), "gateway.node_id")


# ---------------------------------------------------------------------------------------------
# Transport security
# ---------------------------------------------------------------------------------------------

WS_MESSAGE = "plain ws:// sends tunnel traffic unencrypted"


def test_ws_without_insecure_is_an_error(tmp_path: Path, pki: Path) -> None:
    text = cloud_toml(pki).replace("wss://0.0.0.0:8443", "ws://0.0.0.0:8080")
    msg = problem_for(write(tmp_path, text), "tunnel.listen")
    assert msg.startswith(WS_MESSAGE)
    assert "use wss:// or set tls.insecure = true for experiments" in msg


def test_ws_connect_without_insecure_names_the_url(tmp_path: Path, pki: Path) -> None:
    text = onprem_toml(pki).replace('connect = ["wss://cloud1:8443/intercloud"]', 'connect = ["ws://a/", "ws://b/"]')
    path = write(tmp_path, text)
    assert WS_MESSAGE in problem_for(path, "tunnel.connect[0]")
    assert WS_MESSAGE in problem_for(path, "tunnel.connect[1]")


def test_insecure_with_wss_is_an_error(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, tls="insecure = true"))
    msg = problem_for(path, "tls.insecure")
    assert "only for plain ws://" in msg and "tunnel.listen is wss://0.0.0.0:8443/intercloud" in msg


@pytest.mark.parametrize("missing", ["cert", "key", "ca"])
def test_cloud_wss_requires_cert_key_and_ca(tmp_path: Path, pki: Path, missing: str) -> None:
    text = "\n".join(line for line in cloud_toml(pki).splitlines() if not line.startswith(f"{missing} ="))
    msg = problem_for(write(tmp_path, text), f"tls.{missing}")
    assert "required because tunnel.listen is wss://" in msg


@pytest.mark.parametrize("missing", ["cert", "key", "ca"])
def test_onprem_wss_requires_cert_key_and_ca(tmp_path: Path, pki: Path, missing: str) -> None:
    text = "\n".join(line for line in onprem_toml(pki).splitlines() if not line.startswith(f"{missing} ="))
    msg = problem_for(write(tmp_path, text), f"tls.{missing}")
    assert "required because tunnel.connect[0] is wss://" in msg


def test_cloud_wss_without_any_tls_reports_all_three(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nrole = "cloud"\nnode_id = "c"\n[tunnel]\nlisten = "wss://0.0.0.0:1/"\n')
    assert [k for k, _ in problems(path)] == ["tls.cert", "tls.key", "tls.ca"]


def test_cert_without_key_even_on_plain_ws(tmp_path: Path, pki: Path) -> None:
    path = write(
        tmp_path,
        f'[gateway]\nrole = "cloud"\nnode_id = "c"\n[tls]\ninsecure = true\ncert = "{pki}/cloud1.pem"\n'
        '[tunnel]\nlisten = "ws://127.0.0.1:0/"\n',
    )
    assert "tls.cert is set but tls.key is not" in problem_for(path, "tls.key")


# ---------------------------------------------------------------------------------------------
# Certificate files
# ---------------------------------------------------------------------------------------------


def test_missing_file_names_key_and_resolved_path(tmp_path: Path, pki: Path) -> None:
    text = cloud_toml(pki).replace(f'ca = "{pki}/ca.pem"', 'ca = "certs/missing-ca.pem"')
    msg = problem_for(write(tmp_path, text), "tls.ca")
    assert msg == f"file not found: {tmp_path / 'certs' / 'missing-ca.pem'}"


def test_directory_instead_of_pem(tmp_path: Path, pki: Path) -> None:
    text = cloud_toml(pki).replace(f'ca = "{pki}/ca.pem"', f'ca = "{pki}"')
    assert "is a directory" in problem_for(write(tmp_path, text), "tls.ca")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files regardless of their mode")
def test_unreadable_file(tmp_path: Path, pki: Path) -> None:
    copy = tmp_path / "ca.pem"
    shutil.copy(pki / "ca.pem", copy)
    copy.chmod(0)
    text = cloud_toml(pki).replace(f'ca = "{pki}/ca.pem"', f'ca = "{copy}"')
    assert "permission denied" in problem_for(write(tmp_path, text), "tls.ca")


def test_garbage_certificate(tmp_path: Path, pki: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("hello\n")
    text = cloud_toml(pki).replace(f'cert = "{pki}/cloud1.pem"', f'cert = "{bad}"')
    msg = problem_for(write(tmp_path, text), "tls.cert")
    assert str(bad) in msg and "no PEM certificate found" in msg


def test_truncated_certificate(tmp_path: Path, pki: Path) -> None:
    bad = tmp_path / "cut.pem"
    bad.write_text((pki / "cloud1.pem").read_text()[:200] + "\n-----END CERTIFICATE-----\n")
    text = cloud_toml(pki).replace(f'cert = "{pki}/cloud1.pem"', f'cert = "{bad}"')
    assert "malformed PEM certificate" in problem_for(write(tmp_path, text), "tls.cert")


def test_swapped_cert_and_key(tmp_path: Path, pki: Path) -> None:
    text = cloud_toml(pki).replace("cloud1.pem", "TMP").replace("cloud1.key", "cloud1.pem").replace("TMP", "cloud1.key")
    found = dict(problems(write(tmp_path, text)))
    assert "are tls.cert and tls.key swapped?" in found["tls.cert"]
    assert "are tls.cert and tls.key swapped?" in found["tls.key"]


def test_key_that_does_not_match_the_certificate(tmp_path: Path, pki: Path) -> None:
    text = cloud_toml(pki).replace("cloud1.key", "onprem1.key")
    msg = problem_for(write(tmp_path, text), "tls.key")
    assert f"private key {pki}/onprem1.key does not match the certificate {pki}/cloud1.pem" in msg


def test_expired_certificate_is_a_warning(tmp_path: Path, pki: Path) -> None:
    text = onprem_toml(pki).replace("onprem1.", "old.")
    cfg = load_config(write(tmp_path, text))
    (key, msg), *_ = cfg.warnings
    assert key == "tls.cert" and "expired on" in msg and "renew it" in msg


def test_certificate_without_server_usage_on_cloud_is_a_warning(tmp_path: Path, pki: Path) -> None:
    cfg = load_config(write(tmp_path, cloud_toml(pki).replace("cloud1.", "onprem1.")))
    assert any(k == "tls.cert" and "TLS server (serverAuth)" in m for k, m in cfg.warnings)


# ---------------------------------------------------------------------------------------------
# Tunnel rules
# ---------------------------------------------------------------------------------------------


def test_ping_timeout_must_exceed_ping_interval(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, tunnel='ping_interval = "10s"\nping_timeout = "10s"'))
    msg = problem_for(path, "tunnel.ping_timeout")
    assert "must be longer than tunnel.ping_interval (10s), got 10s" in msg


def test_reconnect_max_must_not_be_below_reconnect_min(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, tunnel='reconnect_min = "5s"\nreconnect_max = "1s"'))
    assert "must be at least tunnel.reconnect_min (5s), got 1s" in problem_for(path, "tunnel.reconnect_max")


def test_equal_reconnect_bounds_are_fine(tmp_path: Path, pki: Path) -> None:
    load_config(write(tmp_path, cloud_toml(pki, tunnel='reconnect_min = "1s"\nreconnect_max = "1s"')))


def test_frame_larger_than_window(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, tunnel='stream_window = "64KiB"\nmax_frame = "128KiB"'))
    assert "must not exceed tunnel.stream_window (64KiB)" in problem_for(path, "tunnel.max_frame")


def test_rule_is_skipped_when_its_input_is_broken(tmp_path: Path, pki: Path) -> None:
    # ping_interval is invalid: no second, misleading complaint about ping_timeout vs the default.
    path = write(tmp_path, cloud_toml(pki, tunnel='ping_interval = "soon"\nping_timeout = "1s"'))
    assert [k for k, _ in problems(path)] == ["tunnel.ping_interval"]


# ---------------------------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------------------------


def svc(name: str, **kw: str) -> str:
    lines = [f'[[service]]\nname = "{name}"'] + [f'{k} = "{v}"' for k, v in kw.items()]
    return "\n".join(lines) + "\n"


def test_more_connect_services_than_a_peer_accepts(tmp_path: Path, pki: Path) -> None:
    many = "".join(svc(f"s{i}", connect="tcp://h:2") for i in range(1025))
    path = write(tmp_path, cloud_toml(pki, services=many))
    assert "1025 connect services; a gateway announces at most 1024" in problem_for(path, "service")
    ok = "".join(svc(f"s{i}", connect="tcp://h:2") for i in range(1024))
    assert len(load_config(write(tmp_path, cloud_toml(pki, services=ok), "ok.toml")).services) == 1024


def test_more_accept_services_than_a_route_set_holds(tmp_path: Path, pki: Path) -> None:
    many = "".join(svc(f"s{i}", accept="tcp://127.0.0.1:0") for i in range(4097))
    path = write(tmp_path, cloud_toml(pki, services=many))
    assert "4097 accept services; a member's route set holds at most 4096" in problem_for(path, "service")


def test_duplicate_service_names(tmp_path: Path, pki: Path) -> None:
    path = write(
        tmp_path, cloud_toml(pki, services=svc("db", accept="tcp://127.0.0.1:1") + svc("db", connect="tcp://h:2"))
    )
    assert problem_for(path, "service[1].name") == "duplicate service name 'db', already used by service[0]"


def test_duplicate_accept_endpoints(tmp_path: Path, pki: Path) -> None:
    services = svc("a", accept="tcp://0.0.0.0:5000") + svc("b", accept="tcp://0.0.0.0:5000")
    msg = problem_for(write(tmp_path, cloud_toml(pki, services=services)), "service[1].accept")
    assert "tcp://0.0.0.0:5000 is already used by service 'a' (service[0].accept)" in msg


def test_wildcard_and_specific_address_on_the_same_port_conflict(tmp_path: Path, pki: Path) -> None:
    services = svc("a", accept="tcp://0.0.0.0:5000") + svc("b", accept="tcp://127.0.0.1:5000")
    assert "already used by service 'a'" in problem_for(
        write(tmp_path, cloud_toml(pki, services=services)), "service[1].accept"
    )


def test_accept_endpoints_that_do_not_conflict(tmp_path: Path, pki: Path) -> None:
    services = (
        svc("a", accept="tcp://127.0.0.1:5000")
        + svc("b", accept="tcp://127.0.0.2:5000")
        + svc("c", accept="tcp://[::1]:5000")
        + svc("d", accept="tcp://127.0.0.1:0")
        + svc("e", accept="tcp://127.0.0.1:0")
    )
    load_config(write(tmp_path, cloud_toml(pki, services=services)))


def test_accept_on_the_tunnel_or_admin_port(tmp_path: Path, pki: Path) -> None:
    services = svc("a", accept="tcp://0.0.0.0:8443") + svc("b", accept="tcp://127.0.0.1:9101")
    found = dict(problems(write(tmp_path, cloud_toml(pki, gateway='admin = "127.0.0.1:9101"', services=services))))
    assert "already used by the tunnel listener (tunnel.listen)" in found["service[0].accept"]
    assert "already used by the admin endpoint (gateway.admin)" in found["service[1].accept"]


def test_service_with_both_accept_and_connect(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, services=svc("x", accept="tcp://127.0.0.1:1", connect="tcp://h:1")))
    assert "has both accept and connect" in problem_for(path, "service[0]")


def test_service_with_neither_accept_nor_connect(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, services=svc("x")))
    assert "needs exactly one of accept" in problem_for(path, "service[0]")


def test_service_with_a_broken_endpoint_is_not_called_empty(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, services=svc("x", accept="nonsense")))
    assert [k for k, _ in problems(path)] == ["service[0].accept"]


def test_connect_to_port_zero(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, services=svc("x", connect="tcp://h:0")))
    assert "port 0 cannot be dialed" in problem_for(path, "service[0].connect")


def test_service_needs_a_name(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, services='[[service]]\naccept = "tcp://127.0.0.1:1"\n'))
    assert problem_for(path, "service[0].name") == "required key is missing"


# ---------------------------------------------------------------------------------------------
# Admin endpoint
# ---------------------------------------------------------------------------------------------


def test_network_admin_without_token(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, gateway='admin = "0.0.0.0:9101"'))
    assert problem_for(path, "gateway.admin") == (
        "admin endpoint on 0.0.0.0:9101 is reachable from the network; set gateway.admin_token "
        "or bind to 127.0.0.1:9101"
    )


def test_network_admin_with_token(tmp_path: Path, pki: Path) -> None:
    cfg = load_config(write(tmp_path, cloud_toml(pki, gateway=f'admin = "0.0.0.0:9101"\nadmin_token = "{TOKEN}"')))
    token = cfg.gateway.admin_token
    assert isinstance(token, Secret) and token.reveal() == TOKEN


@pytest.mark.parametrize(
    "admin", ["127.0.0.1:9101", "127.8.9.10:1", "[::1]:9101", "localhost:9101", "[::ffff:127.0.0.1]:1"]
)
def test_loopback_admin_needs_no_token(tmp_path: Path, pki: Path, admin: str) -> None:
    load_config(write(tmp_path, cloud_toml(pki, gateway=f'admin = "{admin}"')))


@pytest.mark.parametrize("admin", ["[::]:9101", "10.1.2.3:9101", "admin.example.com:9101"])
def test_non_loopback_admin_needs_token(tmp_path: Path, pki: Path, admin: str) -> None:
    path = write(tmp_path, cloud_toml(pki, gateway=f'admin = "{admin}"'))
    assert "is reachable from the network" in problem_for(path, "gateway.admin")


# ---------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------


def test_all_problems_are_reported_in_one_go(tmp_path: Path, pki: Path) -> None:
    path = write(
        tmp_path,
        f"""
[gateway]
role = "cloud"
admin = "0.0.0.0:9101"
typo = 1

[tls]
cert = "{pki}/cloud1.pem"
key = "{pki}/onprem1.key"

[tunnel]
listen = "ws://0.0.0.0:8080/"
ping_interval = "30s"
reconnect_max = "10ms"
max_frame = "2MiB"

[[service]]
name = "a"
accept = "tcp://0.0.0.0:1"

[[service]]
name = "a"
accept = "tcp://0.0.0.0:1"
""",
    )
    keys = {k for k, _ in problems(path)}
    assert {
        "gateway.typo",
        "gateway.node_id",
        "gateway.admin",
        "tunnel.max_frame",
        "tunnel.listen",
        "tunnel.ping_timeout",
        "tunnel.reconnect_max",
        "tls.key",
        "service[1].name",
        "service[1].accept",
    } <= keys


# ---------------------------------------------------------------------------------------------
# Secrets never leak
# ---------------------------------------------------------------------------------------------


def test_secret_type() -> None:
    s = Secret("pw")
    assert str(s) == "***" and repr(s) == "***" and f"{s}" == "***" and s.reveal() == "pw"
    assert s == Secret("pw") and s != Secret("other")
    assert "pw" not in repr([s, {"k": s}])


def test_proxy_url_hides_password() -> None:
    proxy = ProxyUrl.parse(f"http://alice:{PASSWORD}@proxy.example.com:3128")
    assert (proxy.host, proxy.port, proxy.username) == ("proxy.example.com", 3128, "alice")
    assert proxy.password is not None and proxy.password.reveal() == PASSWORD
    assert str(proxy) == "http://alice:***@proxy.example.com:3128"
    assert PASSWORD not in repr(proxy) and PASSWORD not in str(proxy)
    assert proxy.proxy_authorization() is not None and proxy.proxy_authorization().startswith("Basic ")


def test_proxy_url_decodes_percent_escapes() -> None:
    proxy = ProxyUrl.parse("http://a%40b:p%3Aw@[::1]:8080")
    assert proxy.username == "a@b" and proxy.password is not None and proxy.password.reveal() == "p:w"
    assert str(proxy) == "http://a@b:***@[::1]:8080"
    assert ProxyUrl.parse("http://p:1").username is None and str(ProxyUrl.parse("http://u@p:1")) == "http://u@p:1"


def test_proxy_none_disables_environment_proxy(tmp_path: Path, pki: Path) -> None:
    cfg = load_config(write(tmp_path, onprem_toml(pki, tunnel='proxy = "none"')))
    assert cfg.tunnel.proxy is None and cfg.tunnel.proxy_disabled is True
    assert cfg.tunnel.effective_proxy("cloud1", {"HTTPS_PROXY": "http://p:3128"}) is None


def test_effective_proxy_from_environment(tmp_path: Path, pki: Path) -> None:
    cfg = load_config(write(tmp_path, onprem_toml(pki)))
    env = {"HTTPS_PROXY": "proxy.corp:3128", "NO_PROXY": "localhost,.internal"}
    proxy = cfg.tunnel.effective_proxy("cloud.example.com", env)
    assert proxy is not None and (proxy.host, proxy.port) == ("proxy.corp", 3128)
    assert cfg.tunnel.effective_proxy("gw.internal", env) is None
    assert cfg.tunnel.effective_proxy("cloud.example.com", {}) is None
    with pytest.raises(ValueError) as info:
        cfg.tunnel.effective_proxy("x", {"https_proxy": f"http://u:{PASSWORD}@p"})
    assert PASSWORD not in str(info.value) and "HTTPS_PROXY" in str(info.value)


def test_configured_proxy_wins_over_environment(tmp_path: Path, pki: Path) -> None:
    cfg = load_config(write(tmp_path, onprem_toml(pki, tunnel=f'proxy = "http://u:{PASSWORD}@squid:3128"')))
    assert cfg.tunnel.proxy is not None and cfg.tunnel.proxy_disabled is False
    assert cfg.tunnel.effective_proxy("c", {"HTTPS_PROXY": "http://other:1"}) == cfg.tunnel.proxy


def test_valid_config_never_shows_secrets(tmp_path: Path, pki: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            onprem_toml(
                pki,
                gateway=f'admin = "0.0.0.0:9101"\nadmin_token = "{TOKEN}"',
                tunnel=f'proxy = "http://alice:{PASSWORD}@squid:3128"',
            ),
        )
    )
    dumped = cfg.model_dump(mode="json")
    assert dumped["tunnel"]["proxy"] == "http://alice:***@squid:3128"
    assert dumped["gateway"]["admin_token"] == "***"
    for text in (repr(cfg), str(cfg), str(dumped), cfg.model_dump_json(), repr(cfg.model_dump())):
        assert PASSWORD not in text and TOKEN not in text


@pytest.mark.parametrize(
    "proxy",
    [
        f"http://alice:{PASSWORD}@squid",  # no port
        f"https://alice:{PASSWORD}@squid:3128",  # wrong scheme
        f"http://alice:{PASSWORD}@squid:99999",  # bad port
        f"http://alice:{PASSWORD}@squid:3128/path",  # path
        f"http://alice:{PASSWORD}@bad host:3128",  # bad host
        f"http://alice:{PASSWORD}/x@squid:3128",  # unescaped slash in the password
        f"ftp://alice:{PASSWORD}@squid:21",
    ],
)
def test_invalid_proxy_never_shows_password(tmp_path: Path, pki: Path, proxy: str) -> None:
    path = write(
        tmp_path,
        onprem_toml(pki, gateway=f'admin_token = "{TOKEN}"\nbogus = 1', tunnel=f'proxy = "{proxy}"\nper_member = 99'),
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert any(k == "tunnel.proxy" for k, _ in err.problems), err.problems
    for text in (str(err), repr(err), repr(err.problems), str(err.args)):
        assert PASSWORD not in text and TOKEN not in text

    # The pydantic layer on its own: the ValidationError text hides inputs too.
    with pytest.raises(ValidationError) as verr:
        TunnelConfig.model_validate({"proxy": proxy, "per_member": 99})
    assert PASSWORD not in str(verr.value)
    assert all(PASSWORD not in e["msg"] for e in verr.value.errors())


def test_secret_in_a_wrong_place_is_not_echoed(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, cloud_toml(pki, gateway=f"admin_token = 42\nadmin_tokn = '{TOKEN}'"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert TOKEN not in str(info.value)
    assert "expected a string, got a number" in dict(info.value.problems)["gateway.admin_token"]


def test_empty_admin_token(tmp_path: Path, pki: Path) -> None:
    assert "must not be empty" in problem_for(
        write(tmp_path, cloud_toml(pki, gateway='admin_token = ""')), "gateway.admin_token"
    )


# ---------------------------------------------------------------------------------------------
# `intercloud check`
# ---------------------------------------------------------------------------------------------


def run_check(path: Path) -> int:
    parser = argparse.ArgumentParser(prog="intercloud")
    cli_check.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["check", str(path)])
    return args.func(args)


def test_check_valid(tmp_path: Path, pki: Path, capsys) -> None:
    services = svc("a", accept="tcp://127.0.0.1:1") + svc("b", connect="tcp://h:2")
    path = write(tmp_path, cloud_toml(pki, services=services))
    assert run_check(path) == 0
    out = capsys.readouterr().out
    assert out == f"{path}: valid (role cloud, node cloud1, 2 services)\n"


def test_check_valid_one_service_with_warning(tmp_path: Path, pki: Path, capsys) -> None:
    path = write(
        tmp_path,
        onprem_toml(pki, gateway='node_id = "dc1"', services=svc("a", connect="tcp://h:2")).replace("onprem1.", "old."),
    )
    assert run_check(path) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: valid (role onprem, node dc1, 1 service)\n"
    assert f"{path}: warning: tls.cert:" in captured.err


def test_check_invalid_lists_every_problem(tmp_path: Path, pki: Path, capsys) -> None:
    path = write(
        tmp_path,
        cloud_toml(pki, gateway='admin = "0.0.0.0:1"', tunnel=f'per_member = 0\nproxy = "http://u:{PASSWORD}@p"'),
    )
    assert run_check(path) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"{path}: invalid configuration (3 problems):\n")
    for key in ("gateway.admin", "tunnel.per_member", "tunnel.proxy"):
        assert f"\n  {key}: " in captured.err
    assert PASSWORD not in captured.err


def test_check_missing_file(tmp_path: Path, capsys) -> None:
    assert run_check(tmp_path / "nope.toml") == 2
    assert "file not found" in capsys.readouterr().err


def test_unreadable_file_even_as_root(tmp_path: Path, pki: Path, monkeypatch) -> None:
    # Root reads every file, so simulate the permission check failing.
    import intercloud.config.load as load_module

    real_access = os.access
    monkeypatch.setattr(
        load_module.os, "access", lambda p, mode: False if str(p).endswith("ca.pem") else real_access(p, mode)
    )
    msg = problem_for(write(tmp_path, cloud_toml(pki)), "tls.ca")
    assert msg == f"cannot read {pki / 'ca.pem'}: permission denied; make it readable by the user running intercloud"


# --- tenants (issue 3) ---------------------------------------------------------------------------

def _tenant_cloud(tmp_path, extra_tls: str = "", tenants: str = "", services: str = "") -> str:
    from intercloud.certs import init_certs

    init_certs(tmp_path / "tc", cloud=["cloud1"], onprem=[])
    d = tmp_path / "tc"
    return (f'[gateway]\nrole = "cloud"\nnode_id = "cloud1"\n[tls]\ncert = "{d}/cloud1.pem"\nkey = "{d}/cloud1.key"\n'
            f'ca = "{d}/ca.pem"\n{extra_tls}\n[tunnel]\nlisten = "wss://127.0.0.1:8443/x"\n{tenants}\n{services}')


def _problems(tmp_path, text: str) -> dict[str, str]:
    from intercloud.config import ConfigError, load_config

    p = tmp_path / "t.toml"
    p.write_text(text)
    try:
        load_config(p)
    except ConfigError as exc:
        return dict(exc.problems)
    return {}


T101 = '[[tenant]]\nname = "tenant101"\nclient_cn = ["tenant101"]\n'


def test_tenants_reject_verify_client_false(tmp_path):
    probs = _problems(tmp_path, _tenant_cloud(tmp_path, "verify_client = false", T101))
    assert "tls.verify_client" in probs and "tenant" in probs["tls.verify_client"]


def test_tenants_reject_insecure(tmp_path):
    text = ('[gateway]\nrole = "cloud"\nnode_id = "c"\n[tls]\ninsecure = true\n[tunnel]\n'
            'listen = "ws://127.0.0.1:8080/x"\n' + T101)
    probs = _problems(tmp_path, text)
    assert "tls.insecure" in probs


def test_tenant_services_need_a_known_tenant_and_names_are_per_tenant(tmp_path):
    services = ('[[service]]\nname = "serviceA"\ntenant = "tenant101"\naccept = "tcp://127.0.0.1:5551"\n'
                '[[service]]\nname = "serviceA"\ntenant = "tenant201"\naccept = "tcp://127.0.0.1:5552"\n'
                '[[service]]\nname = "serviceB"\naccept = "tcp://127.0.0.1:5553"\n')
    probs = _problems(tmp_path, _tenant_cloud(tmp_path, "", T101, services))
    assert "unknown tenant 'tenant201'" in probs["service[1].tenant"]
    assert "needs tenant" in probs["service[2].tenant"]
    assert "service[1].name" not in probs  # same name, other tenant: allowed


def test_tenant_without_matchers_and_bad_fingerprint(tmp_path):
    tenants = '[[tenant]]\nname = "t1"\n\n[[tenant]]\nname = "t2"\nclient_fingerprint = ["sha256:zz"]\n'
    probs = _problems(tmp_path, _tenant_cloud(tmp_path, "", tenants))
    assert "no client_cn" in probs["tenant[0]"]
    assert "fingerprint" in probs["tenant[1].client_fingerprint"]


# ---------------------------------------------------------------------------------------------
# PROXY protocol keys (docs/operations.md §10.5)
# ---------------------------------------------------------------------------------------------

_PP_ACCEPT = '[[service]]\nname = "a"\naccept = "tcp://127.0.0.1:7000"\n'
_PP_CONNECT = '[[service]]\nname = "b"\nconnect = "tcp://127.0.0.1:7001"\n'


def test_proxy_protocol_keys_load(tmp_path: Path, pki: Path) -> None:
    cfg = load_config(write(tmp_path, cloud_toml(
        pki, tunnel='accept_proxy_protocol = true\ntrusted_proxies = ["10.0.0.0/24", "fd00::/64"]',
        services=_PP_ACCEPT + 'accept_proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\n'
        + _PP_CONNECT + 'proxy_protocol = "v2"\n')))
    assert cfg.tunnel.accept_proxy_protocol and cfg.tunnel.trusted_proxies == ["10.0.0.0/24", "fd00::/64"]
    assert cfg.services[0].accept_proxy_protocol and cfg.services[0].trusted_proxies == ["127.0.0.1/32"]
    assert cfg.services[1].proxy_protocol == "v2" and cfg.services[0].proxy_protocol is None


@pytest.mark.parametrize("services, tunnel, key, words", [
    (_PP_ACCEPT + 'proxy_protocol = "v1"\n', "", "service[0].proxy_protocol", "sent to the target by the gateway"),
    (_PP_CONNECT + 'proxy_protocol = "v3"\n', "", "service[0].proxy_protocol", "v1"),
    (_PP_CONNECT + "accept_proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]\n", "",
     "service[0].accept_proxy_protocol", "side that accepts"),
    (_PP_ACCEPT + "accept_proxy_protocol = true\n", "", "service[0].trusted_proxies", "required with"),
    (_PP_ACCEPT + 'trusted_proxies = ["10.0.0.0/8"]\n', "", "service[0].trusted_proxies", "no effect without"),
    (_PP_ACCEPT + 'accept_proxy_protocol = true\ntrusted_proxies = ["10.0.0.1/8"]\n', "",
     "service[0].trusted_proxies[0]", "10.0.0.1/8"),
    ("", "accept_proxy_protocol = true", "tunnel.trusted_proxies", "required with"),
    ("", 'trusted_proxies = ["10.0.0.0/8"]', "tunnel.trusted_proxies", "no effect without"),
])
def test_proxy_protocol_key_errors_name_the_key(tmp_path: Path, pki: Path, services: str, tunnel: str, key: str,
                                                words: str) -> None:
    assert words in problem_for(write(tmp_path, cloud_toml(pki, tunnel=tunnel, services=services)), key)


def test_onprem_gateways_take_no_tunnel_proxy_header(tmp_path: Path, pki: Path) -> None:
    path = write(tmp_path, onprem_toml(pki, tunnel='accept_proxy_protocol = true\ntrusted_proxies = ["10.0.0.0/8"]'))
    assert "on-prem gateways accept no tunnels" in problem_for(path, "tunnel.accept_proxy_protocol")
