"""KWIC tutorials, imported with ``intercloud import-kaazing`` and run for real (issue 7).

Each test imports the cloud and on-prem halves of a KWIC tutorial exactly as shipped (only the
keystore locations differ), with ``--rewrite-host``/``--rewrite-port`` putting every host on loopback
and every port on a free one (as the tutorials' docker-compose ``ports:`` did), starts the real
gateways from the generated TOML, and carries echo traffic through them with ``nc``. For the TLS
tutorials the keystores are JCEKS files made by the test from ``intercloud certs init`` certificates,
so the JCEKS -> PEM conversion is exercised end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from intercloud.certs import init_certs
from tests.support.gateway import REPO_ROOT
from tests.support.netcat import nc_exchange
from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import scaled, wait_until
from tests.unit.test_kaazing_import import TUTORIALS, compose_opts, make_stores

from .conftest import wait_tunnels

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.needs_binary("nc"),
    pytest.mark.skipif(not TUTORIALS.is_dir(), reason="KWIC tutorials (shared/reference) not present"),
]

L = "127.0.0.1"
KWIC = TUTORIALS / "kwic"


def kwic_import(tmp: Path, xml: Path, name: str, *args: str) -> str:
    """Run ``intercloud import-kaazing XML -o tmp/NAME.toml ARGS``; it must succeed with exit 0."""
    out = tmp / f"{name}.toml"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "src"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "intercloud", "import-kaazing", str(xml), "-o", str(out), *args],
        capture_output=True, text=True, timeout=scaled(60), env=env, cwd=tmp)
    assert proc.returncode == 0, f"import of {xml} failed ({proc.returncode}):\n{proc.stderr}"
    return out.read_text()


def loopback(*hosts: str) -> list[str]:
    args = ["--rewrite-host", "@eth0=127.0.0.1"]
    for h in hosts:
        args += ["--rewrite-host", f"{h}=127.0.0.1"]
    return args


def ports(mapping: dict[int, int]) -> list[str]:
    return [a for old, new in mapping.items() for a in ("--rewrite-port", f"{old}={new}")]


def echo_ok(port: int, word: bytes = b"hello\n") -> None:
    assert nc_exchange(L, port, word) == word


def copy_with_stores(tmp: Path, xml: Path) -> Path:
    """The tutorial XML with /x509/stores/ pointing at tmp/x509/stores/ (where the test's JCEKS files are)."""
    copy = tmp / "xml" / xml.name
    copy.parent.mkdir(exist_ok=True)
    copy.write_text(xml.read_text().replace("/x509/stores/", f"{tmp}/x509/stores/"))
    return copy


def test_1_simple(tmp_path, gateways):
    cfg = KWIC / "1-simple" / "config"
    with EchoServer() as a, EchoServer() as b, EchoServer() as c, EchoServer() as d:
        tun, ca, cc, ob, od, adm_c, adm_o = free_ports(7)
        hosts = loopback("example.com", "server-a", "server-b", "server-c", "server-d")
        cloud = kwic_import(tmp_path, cfg / "cloud-config.xml", "cloud", *hosts, "--node-id", "cloud1",
                            "--admin", f"{L}:{adm_c}",
                            *ports({80: tun, 5551: ca, 7771: cc, 6661: b.port, 8881: d.port}))
        onprem = kwic_import(tmp_path, cfg / "onprem-config.xml", "onprem", *hosts, "--node-id", "onprem1",
                             "--admin", f"{L}:{adm_o}",
                             *ports({80: tun, 5551: a.port, 7771: c.port, 6661: ob, 8881: od}))
        # 1-simple has no keystore: the importer named PEM files for `intercloud certs init pki ...`
        assert 'cert = "pki/cloud1.pem"' in cloud and 'cert = "pki/onprem1.pem"' in onprem
        init_certs(tmp_path / "pki", cloud=["cloud1"], onprem=["onprem1"])
        gc = gateways("cloud", cloud)
        gateways("onprem", onprem)
        wait_tunnels(gc, 1)
        for port in (ca, cc, ob, od):  # client A, C (cloud -> on-prem) and B, D (on-prem -> cloud)
            echo_ok(port)
        assert a.connections and b.connections and c.connections and d.connections


def test_2_tls_jceks_keystores(tmp_path, gateways):
    cfg = KWIC / "2-tls" / "config"
    pki = tmp_path / "ca"
    init_certs(pki, cloud=["cloud1"], onprem=["onprem1"], sans=["example.com"])
    stores = tmp_path / "x509" / "stores"
    make_stores(stores, pki, "cloud1", label="cloud")
    make_stores(stores, pki, "onprem1", label="onprem")
    with EchoServer() as a, EchoServer() as b:
        tun, ca, ob, adm_c, adm_o = free_ports(5)
        hosts = loopback("example.com", "server-a", "server-b")
        cloud = kwic_import(tmp_path, copy_with_stores(tmp_path, cfg / "cloud-config.xml"), "cloud", *hosts,
                            "--node-id", "cloud1", "--admin", f"{L}:{adm_c}",
                            *ports({443: tun, 5551: ca, 6661: b.port}))
        onprem = kwic_import(tmp_path, copy_with_stores(tmp_path, cfg / "onprem-config.xml"), "onprem", *hosts,
                             "--node-id", "onprem1", "--admin", f"{L}:{adm_o}",
                             *ports({443: tun, 5551: a.port, 6661: ob}))
        assert 'cert = "cloud.pem"' in cloud and "JCEKS" in cloud
        assert (tmp_path / "onprem.key").stat().st_mode & 0o077 == 0
        gc = gateways("cloud", cloud)
        go = gateways("onprem", onprem)
        wait_tunnels(gc, 1)
        echo_ok(ca)
        echo_ok(ob, b"world\n")
        # mutual TLS with the converted certificates: the cloud saw the on-prem's certificate
        tunnel = gc.status()["tunnels"][0]
        assert "onprem1" in tunnel["peer_cert"] and tunnel["tls"].startswith("TLSv1.")
        assert go.status()["tunnels"]


def test_3_multi_tenant(tmp_path, gateways):
    cfg = KWIC / "3-multi-tenant" / "config"
    pki = tmp_path / "ca"
    init_certs(pki, cloud=["cloud1"], onprem=["tenant101", "tenant201"], sans=["example.com"])
    stores = tmp_path / "x509" / "stores"
    make_stores(stores, pki, "cloud1", label="cloud")
    make_stores(stores, pki, "tenant101")
    make_stores(stores, pki, "tenant201")
    with EchoServer() as a, EchoServer() as b:
        tun, ca, cc, p101, p201, adm_c, adm_1, adm_2 = free_ports(8)
        hosts = loopback("example.com", "server-a", "server-b")
        cloud = kwic_import(tmp_path, copy_with_stores(tmp_path, cfg / "cloud-config.xml"), "cloud", *hosts,
                            "--node-id", "cloud1", "--admin", f"{L}:{adm_c}",
                            "--tenant", "tenant101=serviceA,serviceB", "--tenant", "tenant201=serviceC,serviceD",
                            *ports({443: tun, 5551: ca, 7771: cc, 6661: b.port}))
        tenants = {}
        for name, port, adm in (("tenant101", p101, adm_1), ("tenant201", p201, adm_2)):
            # both tenants listen on 6661 in KWIC; docker-compose mapped tenant201's to 9991
            tenants[name] = kwic_import(tmp_path, copy_with_stores(tmp_path, cfg / f"{name}-config.xml"), name,
                                        *hosts, "--node-id", name, "--admin", f"{L}:{adm}",
                                        *ports({443: tun, 5551: a.port, 6661: port}))
        gc = gateways("cloud", cloud)
        gateways("tenant101", tenants["tenant101"])
        gateways("tenant201", tenants["tenant201"])
        wait_tunnels(gc, 2)
        echo_ok(ca)  # client A -> tenant101 -> server A
        echo_ok(cc)  # client C -> tenant201 -> server A (tenant201-config.xml connects server-a:5551)
        echo_ok(p101, b"world\n")  # client B -> cloud -> server B
        echo_ok(p201, b"world\n")  # client D -> cloud -> server B
        # the tenants are enforced: each service routes only to its own tenant's gateway
        status = gc.status()
        assert {t["tenant"] for t in status["tunnels"]} == {"tenant101", "tenant201"}
        routes = {s["name"]: s.get("routes") for s in status["services"]}
        assert routes["serviceA"] == ["tenant101"] and routes["serviceC"] == ["tenant201"]


@pytest.mark.needs_binary("nginx")
def test_4_ha_lb(tmp_path, gateways):
    from tests.support.nginx import NginxLB

    tutorial = TUTORIALS / "kwic-fork" / "4-ha-lb"
    cfg = tutorial / "config"
    pki = tmp_path / "ca"
    init_certs(pki, cloud=["cloud1", "cloud2"], onprem=["onprem1", "onprem2"], sans=["example.com"])
    stores = {n: make_stores(tmp_path / "stores", pki, n) for n in ("cloud1", "cloud2", "onprem1", "onprem2")}

    def tls(name: str) -> list[str]:
        s = stores[name]
        return ["--keystore", str(s["keystore"]), "--keystore-password-file", str(s["keystore_pw"]),
                "--truststore", str(s["truststore"]), "--truststore-password-file", str(s["truststore_pw"])]

    props = compose_opts(tutorial)["cloud-config.xml"]  # -Dcloud-node-hostname=cloudN.example.com ...
    with EchoServer() as a, EchoServer() as b:
        p = iter(free_ports(13))
        cl = {n: {k: next(p) for k in ("tun", "peer", "client", "admin")} for n in ("cloud1", "cloud2")}
        op = {n: {k: next(p) for k in ("client", "admin")} for n in ("onprem1", "onprem2")}
        lb_port = next(p)
        lb = NginxLB(tmp_path, None, lb_port, [(L, cl[n]["tun"]) for n in cl], method="least_conn",
                     fail_timeout="2s")
        lb.start()
        try:
            lb.wait_ready()
            gws = {}
            for i, name in enumerate(cl):
                other = "cloud2" if name == "cloud1" else "cloud1"
                defines = [a for k, v in props[i].items() for a in ("-D", f"{k}={v}")]
                text = kwic_import(tmp_path, cfg / "cloud-config.xml", name, *defines, *tls(name),
                                   *loopback("server-b"), "--node-id", name, "--admin", f"{L}:{cl[name]['admin']}",
                                   # 4-ha-lb's members did not know each other (that starved them); here they do
                                   "--peer", f"{L}:{cl[other]['peer']}", "--cluster-listen", f"{L}:{cl[name]['peer']}",
                                   *ports({443: cl[name]["tun"], 5551: cl[name]["client"], 6661: b.port}))
                gws[name] = gateways(name, text)
            for name in op:
                text = kwic_import(tmp_path, cfg / "onprem-config.xml", name, *tls(name),
                                   *loopback("example.com", "server-a"), "--node-id", name,
                                   "--admin", f"{L}:{op[name]['admin']}",
                                   *ports({443: lb_port, 5551: a.port, 6661: op[name]["client"]}))
                gws[name] = gateways(name, text)

            def coverage(gw) -> dict[str, int]:
                cov: dict[str, int] = {}
                for t in gw.status()["tunnels"]:
                    cov[t["peer_node"]] = cov.get(t["peer_node"], 0) + 1
                return cov

            for name in op:  # every on-prem gateway reaches BOTH members through the load balancer
                wait_until(lambda name=name: coverage(gws[name]) == {"cloud1": 2, "cloud2": 2}, 20,
                           what=f"{name} to hold 2 tunnels to each member through nginx")
            for name in cl:  # client A via cloud1 (5551) and via cloud2 (5552)
                echo_ok(cl[name]["client"])
            for name in op:  # client B via onprem1 (6661) and via onprem2 (6662)
                echo_ok(op[name]["client"], b"bar\n")
        finally:
            lb.stop()
