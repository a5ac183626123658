"""Certificate revocation (issue 16 point 4): ``certs revoke`` + SIGHUP closes the revoked gateway's tunnels
(or a member's peer link), refuses its next handshakes with one log line naming it and the CRL, and leaves
every other tunnel and its streams alone."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

from intercloud.certs import init_certs
from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import scaled, wait_until

from .ha import HA, Addr, make_certs

L = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]


def certs_cli(*argv: str) -> subprocess.CompletedProcess:
    """``intercloud certs ...`` as an operator runs it (this worktree's src first on the path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "intercloud", "certs", *argv], env=env, capture_output=True,
                          text=True, timeout=scaled(60))


def _svc(name: str, *, accept: int | None = None, connect: int | None = None) -> str:
    ep = f'accept = "tcp://{L}:{accept}"' if accept else f'connect = "tcp://{L}:{connect}"'
    return f'[[service]]\nname = "{name}"\n{ep}\n'


class World:
    """One cloud; dc1 connects service1, dc2 connects service2 (each to its own echo server). Every gateway
    has ``tls.crl`` = the CRL that ``certs init`` wrote next to the CA."""

    def __init__(self, tmp_path: Path, echo1: EchoServer, echo2: EchoServer):
        self.certs = tmp_path / "pki"
        init_certs(self.certs, cloud=["cloud1"], onprem=["dc1", "dc2"])
        assert (self.certs / "crl.pem").is_file()
        p = iter(free_ports(6))
        self.tunnel, self.admin, self.port1, self.port2 = next(p), next(p), next(p), next(p)
        self.onprem_admin = {"dc1": next(p), "dc2": next(p)}
        self.echo = {"dc1": echo1.port, "dc2": echo2.port}

    def tls(self, name: str) -> str:
        return (f'[tls]\ncert = "{self.certs}/{name}.pem"\nkey = "{self.certs}/{name}.key"\n'
                f'ca = "{self.certs}/ca.pem"\ncrl = "{self.certs}/crl.pem"\n\n')

    def cloud(self) -> str:
        return (f'[gateway]\nrole = "cloud"\nnode_id = "cloud1"\nadmin = "{L}:{self.admin}"\nroute_wait = "2s"\n\n'
                + self.tls("cloud1")
                + f'[tunnel]\nlisten = "wss://{L}:{self.tunnel}/intercloud"\nping_interval = "1s"\n'
                  'ping_timeout = "4s"\nresume_timeout = "0s"\n\n'
                + _svc("service1", accept=self.port1) + _svc("service2", accept=self.port2))

    def onprem(self, name: str, service: str) -> str:
        return (f'[gateway]\nrole = "onprem"\nnode_id = "{name}"\nadmin = "{L}:{self.onprem_admin[name]}"\n\n'
                + self.tls(name)
                + f'[tunnel]\nconnect = ["wss://localhost:{self.tunnel}/intercloud"]\nper_member = 2\n'
                  'reconnect_min = "100ms"\nreconnect_max = "500ms"\n\n'
                + _svc(service, connect=self.echo[name]))


def _transfer(port: int, size: int, seed: int, out: dict, key, gate: threading.Event) -> None:
    """One echo transfer across the revocation: half, wait for ``gate``, the rest. Records (sent digest,
    received digest, error); a transfer whose tunnel is cut ends with an error, not an exception."""
    payload = random.Random(seed).randbytes(size)
    got = hashlib.sha256()
    errors: list[str] = []
    try:
        s = socket.create_connection((L, port), timeout=scaled(30))

        def send() -> None:
            try:
                s.sendall(payload[: size // 2])
                gate.wait(scaled(30))
                s.sendall(payload[size // 2:])
                s.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(repr(exc))

        th = threading.Thread(target=send, daemon=True)
        th.start()
        while chunk := s.recv(1 << 16):
            got.update(chunk)
        th.join()
        out[key] = (hashlib.sha256(payload).hexdigest(), got.hexdigest(), errors[0] if errors else None)
    except OSError as exc:
        out[key] = (hashlib.sha256(payload).hexdigest(), got.hexdigest(), repr(exc))


def _peers(gw) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in gw.status()["tunnels"]:
        out[t["peer_node"]] = out.get(t["peer_node"], 0) + 1
    return out


def test_revoked_onprem_is_cut_and_refused_while_the_other_streams_on(tmp_path, gateways):
    with EchoServer() as echo1, EchoServer() as echo2:
        w = World(tmp_path, echo1, echo2)
        cloud = gateways("cloud1", w.cloud())
        dc1 = gateways("dc1", w.onprem("dc1", "service1"))
        dc2 = gateways("dc2", w.onprem("dc2", "service2"))
        wait_until(lambda: _peers(cloud) == {"dc1": 2, "dc2": 2}, 15, what="two tunnels from each of dc1 and dc2")
        [crl] = cloud.status()["crl"]  # operators see the CRL in force: the empty one of certs init
        assert crl["key"] == "tls.crl" and crl["path"] == str(w.certs / "crl.pem") and crl["revoked"] == 0, crl
        assert crl["stale"] is False and crl["issuer"].startswith("CN=") and crl["next_update"], crl
        assert cloud.metric('intercloud_crl_revoked_certificates{key="tls.crl"}') == 0
        assert cloud.metric('intercloud_crl_stale{key="tls.crl"}') == 0
        nxt = cloud.metric('intercloud_crl_next_update_timestamp_seconds{key="tls.crl"}')
        assert abs(nxt - datetime.fromisoformat(crl["next_update"]).timestamp()) < 1, (nxt, crl)

        results: dict = {}
        gate = threading.Event()
        jobs = [(w.port1, ("dc1", i)) for i in range(3)] + [(w.port2, ("dc2", i)) for i in range(2)]
        threads = [threading.Thread(target=_transfer, args=(port, 4 << 20, n, results, key, gate), daemon=True)
                   for n, (port, key) in enumerate(jobs)]
        for th in threads:
            th.start()
        wait_until(lambda: len(cloud.status()["streams"]) >= 5, 10, what="five transfers in flight")

        done = certs_cli("revoke", str(w.certs), "dc2")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(w.certs / "crl.pem") and "CN=dc2" in done.stderr
        mark = cloud.log_mark()
        cloud.signal(signal.SIGHUP)
        cloud.wait_log(lambda r: r.get("event") == "gateway.reloaded", since=mark, timeout=10)
        cut = [r for r in cloud.log_lines(mark) if r.get("event") == "cert.revoked"]
        assert {r["peer_node"] for r in cut} == {"dc2"} and len(cut) == 2, cut
        assert all(r["crl"] == str(w.certs / "crl.pem") and r["subject"] == "CN=dc2" for r in cut)
        wait_until(lambda: _peers(cloud) == {"dc1": 2}, 10, what="only dc1's tunnels left")
        assert cloud.status()["crl"][0]["revoked"] == 1  # the reloaded CRL
        assert cloud.metric('intercloud_crl_revoked_certificates{key="tls.crl"}') == 1

        # dc2 redials at once: refused right after the TLS handshake, one line naming it and the CRL
        rec = cloud.wait_log(lambda r: r.get("event") == "conn.refused" and r.get("kind") == "revoked",
                             since=mark, timeout=10)
        assert "CN=dc2" in rec["reason"] and str(w.certs / "crl.pem") in rec["reason"], rec
        # the on-prem side hears why (GOAWAY FORBIDDEN, then the close reason of the refused handshakes)
        dc2.wait_log(lambda r: r.get("event") == "tunnel.dial_failed" and "revoked" in r.get("reason", ""),
                     timeout=10)

        gate.set()
        for th in threads:
            th.join(timeout=scaled(60))
        ok1 = {k: v for k, v in results.items() if k[0] == "dc1"}
        broken1 = {k: v for k, v in ok1.items() if v[2] is not None or v[0] != v[1]}
        assert len(ok1) == 3 and not broken1, broken1  # byte-exact across the revocation
        cut2 = {k: v for k, v in results.items() if k[0] == "dc2"}
        assert len(cut2) == 2 and all(v[2] is not None or v[0] != v[1] for v in cut2.values()), cut2

        # still refused, still no tunnel from dc2 (each redial refused); dc1 unaffected
        refusals = lambda: sum(1 for r in cloud.log_lines(mark)  # noqa: E731
                               if r.get("event") == "conn.refused" and r.get("kind") == "revoked")
        seen = refusals()
        wait_until(lambda: refusals() > seen, 10, what="dc2's next redial to be refused too")
        assert _peers(cloud) == {"dc1": 2} and not dc2.status()["tunnels"]
        assert _peers(dc1) == {"cloud1": 2}
        metrics = cloud.http_get("/metrics")[1].decode()
        assert 'kind="revoked"' in metrics


def test_onprem_closes_tunnels_to_a_revoked_cloud(tmp_path, gateways):
    """The other direction: an on-prem gateway checks the cloud's certificate against its own tls.crl."""
    with EchoServer() as echo1, EchoServer() as echo2:
        w = World(tmp_path, echo1, echo2)
        cloud = gateways("cloud1", w.cloud())
        dc1 = gateways("dc1", w.onprem("dc1", "service1"))
        wait_until(lambda: _peers(dc1) == {"cloud1": 2}, 15, what="dc1's two tunnels")
        assert certs_cli("revoke", str(w.certs), "cloud1").returncode == 0
        mark = dc1.log_mark()
        dc1.signal(signal.SIGHUP)
        rec = dc1.wait_log(lambda r: r.get("event") == "cert.revoked", since=mark, timeout=10)
        assert rec["peer_node"] == "cloud1" and rec["subject"] == "CN=cloud1"
        wait_until(lambda: not dc1.status()["tunnels"], 10, what="dc1's tunnels to close")
        ref = dc1.wait_log(lambda r: r.get("event") == "conn.refused" and r.get("kind") == "revoked",
                           since=mark, timeout=10)
        assert "CN=cloud1" in ref["reason"] and str(w.certs / "crl.pem") in ref["reason"]
        assert not cloud.status()["tunnels"]


def test_revoked_member_peer_link_is_closed_and_not_reestablished(tmp_path, gateways):
    with EchoServer() as a, EchoServer() as b:
        certs = make_certs(tmp_path / "certs", ["cloud1", "cloud2"], [], sans=[])
        ports = iter(free_ports(8))
        clouds = {n: {k: Addr(L, next(ports)) for k in ("tunnel", "peer", "client", "admin")} for n in ("cloud1", "cloud2")}
        ha = HA(certs, clouds, {}, Addr(L, a.port), Addr(L, b.port))
        crl = certs / "cluster" / "crl.pem"

        def config(name: str) -> str:
            return ha.cloud_config(name).replace('member_ttl = "6s"\n', f'member_ttl = "6s"\ncrl = "{crl}"\n')

        # cloud1 starts without cluster.crl: the reload adds it (no restart needed, unlike other [cluster] keys)
        gws = {"cloud1": gateways("cloud1", ha.cloud_config("cloud1")), "cloud2": gateways("cloud2", config("cloud2"))}
        for n, other in (("cloud1", "cloud2"), ("cloud2", "cloud1")):
            wait_until(lambda: any(link["peer_node"] == other for link in gws[n].status()["peer_links"]), 15,
                       what=f"{n}'s peer link to {other}")

        assert certs_cli("revoke", str(certs / "cluster"), "cloud2").returncode == 0
        c1 = gws["cloud1"]
        c1.config_text = config("cloud1")
        mark = c1.log_mark()
        c1.signal(signal.SIGHUP)  # only cloud1 re-reads the CRL
        cut = c1.wait_log(lambda r: r.get("event") == "cert.revoked", since=mark, timeout=10)
        assert not [r for r in c1.log_lines(mark) if r.get("event") == "gateway.reload_partial"]
        assert cut["peer_node"] == "cloud2" and cut["crl"] == str(crl) and cut["kind"] == "peer"
        wait_until(lambda: not c1.status()["peer_links"] and not gws["cloud2"].status()["peer_links"], 10,
                   what="the peer link to close on both members")
        # both directions are refused from now on: cloud2 dialing cloud1, and cloud1 dialing cloud2
        for want in ("peer link from", "peer link dialed at"):  # cloud1 accepting, cloud1 dialing
            rec = c1.wait_log(lambda r: r.get("event") == "conn.refused" and r.get("kind") == "revoked"
                              and want in r.get("reason", ""), since=mark, timeout=10)
            assert "CN=cloud2" in rec["reason"] and str(crl) in rec["reason"]
        refusals = lambda: sum(1 for r in c1.log_lines(mark)  # noqa: E731
                               if r.get("event") == "conn.refused" and r.get("kind") == "revoked")
        seen = refusals()
        wait_until(lambda: refusals() >= seen + 2, 15, what="more redials, each refused")
        assert not c1.status()["peer_links"] and not gws["cloud2"].status()["peer_links"]


def test_a_crl_for_another_ca_stops_startup_with_one_clear_error(tmp_path, gateways):
    with EchoServer() as echo1, EchoServer() as echo2:
        w = World(tmp_path, echo1, echo2)
        init_certs(tmp_path / "other", cloud=[], onprem=["x"])
        foreign = tmp_path / "other" / "crl.pem"
        cloud = gateways("cloud1", w.cloud().replace(f'crl = "{w.certs}/crl.pem"', f'crl = "{foreign}"'),
                         ready=False)
        code = cloud.wait_exit(30)
        text = cloud.log_text()
        assert code != 0 and "Traceback" not in text, text
        assert "tls.crl" in text and "a CRL for another CA" in text and str(foreign) in text, text
        # and a reload onto such a file is refused: the running configuration (and its CRLs) stay
        good = gateways("cloud1b", w.cloud())
        mark = good.log_mark()
        good.config_text = w.cloud().replace(f'crl = "{w.certs}/crl.pem"', f'crl = "{foreign}"')
        good.signal(signal.SIGHUP)
        rec = good.wait_log(lambda r: r.get("event") == "gateway.reload_failed", since=mark, timeout=10)
        assert "tls.crl" in good.log_text(mark) and "Traceback" not in good.log_text(mark), rec
