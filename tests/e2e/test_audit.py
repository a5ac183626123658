"""The audit log (docs/operations.md §10.3) end to end: every way a stream or a connection ends that
this suite can produce gives audit lines that validate against the shipped JSON Schema (with the
jsonschema library), tunnels and peer links up and down included; the log survives a logrotate-style
rename plus SIGHUP; an unusable path is a startup error naming gateway.audit_log.

CASES is a table: one more way to end (e.g. a revoked certificate) is one more Case whose ``run``
drives it and whose ``expect`` says which record must appear on which gateway.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

from intercloud.audit import schema
from intercloud.certs import init_certs
from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import scaled, wait_until

from .conftest import wait_tunnels
from .ha import HA, Addr, make_certs
from .topology import make_pair, service

pytestmark = [pytest.mark.e2e]
VALIDATOR = jsonschema.Draft202012Validator(schema())
L = "127.0.0.1"


def records(path: Path) -> list[dict]:
    """Every line of an audit log, each checked against the schema."""
    if not path.exists():
        return []
    out = []
    text = path.read_text()
    for line in text[:text.rfind("\n") + 1].splitlines():  # not a line the writer is still writing
        rec = json.loads(line)
        VALIDATOR.validate(rec)
        out.append(rec)
    return out


def wait_record(path: Path, match: Callable[[dict], bool], what: str, timeout: float = 10) -> dict:
    def find():
        return next((r for r in records(path) if match(r)), None)

    return wait_until(find, timeout, interval=0.05, what=f"audit record in {path.name}: {what}")


def sha256_of(pem: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(Encoding.DER)).hexdigest()


def echo(port: int, payload: bytes = b"hello", *, source: str | None = None, rst: bool = False,
         keep: bool = False) -> tuple[str, socket.socket | None]:
    """One client: send ``payload``, read the echo. Returns (result, socket if ``keep``). ``rst``: end with a
    TCP reset instead of a close. result: 'ok', 'reset' or 'closed after N bytes'; the client's
    HOST:PORT is in sock.getsockname()."""
    s = socket.socket()
    s.settimeout(scaled(10))
    s.bind((source or L, 0))  # the client address is known before connect: a refusal may reset connect()
    echo.last = "%s:%d" % s.getsockname()
    try:
        s.connect((L, port))
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                s.close()
                return f"closed after {len(got)} bytes", None
            got += chunk
    except ConnectionResetError:
        s.close()
        return "reset", None
    if keep:
        return "ok", s
    if rst:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    s.close()
    return "ok", None


def refused_at_accept(port: int, *, source: str | None = None) -> str:
    result, _ = echo(port, source=source)
    assert result != "ok", f"port {port}: expected a refusal"
    return echo.last


@dataclass
class World:
    cloud_log: Path
    onprem_log: Path
    ports: dict[str, int]
    echo_port: int
    dead_port: int
    certs: Path
    start_onprem: Callable[[str], object]  # another on-prem gateway of the pair, by node id (its own cert)
    cloud: object  # tests.support.gateway.Gateway


@dataclass
class Case:
    name: str
    run: Callable[[World], dict]  # drives it; returns facts for expect (e.g. the client address)
    expect: Callable[[World, dict], list[tuple[Path, Callable[[dict], bool], str]]]


def _normal(w: World) -> dict:
    assert echo(w.ports["serviceA"], b"hello")[0] == "ok"
    return {"client": echo.last}


def _reset(w: World) -> dict:
    assert echo(w.ports["serviceA"], b"bye", rst=True)[0] == "ok"
    return {"client": echo.last}


def _target_refused(w: World) -> dict:
    return {"client": refused_at_accept(w.ports["refusedsvc"])}


def _route_timeout(w: World) -> dict:
    return {"client": refused_at_accept(w.ports["noroute"])}


def _max_connections(w: World) -> dict:
    result, held = echo(w.ports["lim"], keep=True)
    assert result == "ok"
    try:
        return {"client": refused_at_accept(w.ports["lim"])}
    finally:
        held.close()


def _max_rate(w: World) -> dict:
    assert echo(w.ports["rate"])[0] == "ok"  # the bucket's one token
    return {"client": refused_at_accept(w.ports["rate"])}


def _acl_deny(w: World) -> dict:
    return {"client": refused_at_accept(w.ports["acl"], source="127.0.0.2")}


def _acl_allow(w: World) -> dict:
    assert echo(w.ports["acl"])[0] == "ok"  # 127.0.0.1 is allowed
    return {"client": refused_at_accept(w.ports["acl"], source="127.0.0.3")}


def _proxy_real_client(w: World) -> dict:
    """Through a trusted load balancer: the PROXY header's client is the one audited, on both sides."""
    with socket.create_connection((L, w.ports["pp"]), timeout=scaled(10)) as s:
        s.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 5000\r\nhello")
        got = b""
        while len(got) < 5:
            chunk = s.recv(100)
            assert chunk, got
            got += chunk
        assert got == b"hello"
        s.shutdown(socket.SHUT_WR)
        while s.recv(100):
            pass
    return {"client": "203.0.113.7:40000"}


def _proxy_garbage(w: World) -> dict:
    result, _ = echo(w.ports["pp"], b"GET / HTTP/1.0\r\n\r\n")
    assert result != "ok"
    return {"client": echo.last}


def _tenant_refuses_tunnel(w: World) -> dict:
    gw = w.start_onprem("onprem2")  # its certificate maps to no [[tenant]] of the cloud
    try:
        wait_record(w.cloud_log, lambda r: _refused(r, kind="tenant", peer_node="onprem2"), "tunnel refused")
    finally:
        gw.stop()
    return {}


def _revoked(w: World) -> dict:
    """certs revoke + SIGHUP on the cloud: onprem3's handshakes are refused (tls.crl, operations §10.2)."""
    done = subprocess.run([sys.executable, "-m", "intercloud", "certs", "revoke", str(w.certs), "onprem3"],
                          capture_output=True, text=True, timeout=scaled(60),
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")})
    assert done.returncode == 0, done.stderr
    mark = w.cloud.log_mark()
    w.cloud.signal(signal.SIGHUP)
    w.cloud.wait_log(lambda r: r["event"] == "gateway.reloaded", since=mark)
    gw = w.start_onprem("onprem3")
    try:
        wait_record(w.cloud_log, lambda r: _refused(r, kind="revoked"), "a revoked certificate refused")
    finally:
        gw.stop()
    return {}


def _tenant_limit(w: World) -> dict:
    held = []
    try:
        for _ in range(2):  # the tenant's max_streams
            result, s = echo(w.ports["serviceA"], keep=True)
            assert result == "ok"
            held.append(s)
        return {"client": refused_at_accept(w.ports["serviceA"])}
    finally:
        for s in held:
            s.close()


def _stream(r: dict, **want) -> bool:
    return r["type"] == "stream" and all(r.get(k) == v for k, v in want.items())


def _refused(r: dict, **want) -> bool:
    return r["type"] == "refused" and all(r.get(k) == v for k, v in want.items())


CASES = [
    Case("normal close", _normal, lambda w, f: [
        (w.cloud_log, lambda r: _stream(r, client=f["client"], side="accept", end="closed", opened=True,
                                        bytes_to_target=5, bytes_to_client=5, path=["cloud1", "onprem1"])
         and r["peer"]["sha256"] == sha256_of(w.certs / "onprem1.pem") and "CN=onprem1" in r["peer"]["subject"],
         "the cloud's accept side, with the on-prem gateway's certificate"),
        (w.onprem_log, lambda r: _stream(r, client=f["client"], side="connect", end="closed",
                                         target=f"{L}:{w.echo_port}", path=["cloud1", "onprem1"])
         and r["peer"]["sha256"] == sha256_of(w.certs / "cloud1.pem"), "the on-prem connect side")]),
    Case("reset", _reset, lambda w, f: [
        (w.cloud_log, lambda r: _stream(r, client=f["client"], end="reset", opened=True), "cloud: reset"),
        (w.onprem_log, lambda r: _stream(r, client=f["client"], end="reset"), "on-prem: reset")]),
    Case("target refused", _target_refused, lambda w, f: [
        (w.cloud_log, lambda r: _stream(r, client=f["client"], service="refusedsvc", opened=False, end="refused"),
         "cloud: the OPEN refused"),
        (w.onprem_log, lambda r: _stream(r, client=f["client"], side="connect", opened=False, end="refused",
                                         target=f"{L}:{w.dead_port}"), "on-prem: the target refused")]),
    Case("route timeout", _route_timeout, lambda w, f: [
        (w.cloud_log, lambda r: _refused(r, client=f["client"], kind="no_route", service="noroute"), "no route")]),
    Case("max_connections", _max_connections, lambda w, f: [
        (w.cloud_log, lambda r: _refused(r, client=f["client"], kind="max_connections", rule="max_connections 1"),
         "max_connections")]),
    Case("max_rate", _max_rate, lambda w, f: [
        (w.cloud_log, lambda r: _refused(r, client=f["client"], kind="max_rate", service="rate"), "max_rate")]),
    Case("acl deny", _acl_deny, lambda w, f: [
        (w.cloud_log, lambda r: _refused(r, client=f["client"], kind="acl", rule="deny 127.0.0.2/32"), "deny")]),
    Case("acl allow", _acl_allow, lambda w, f: [
        (w.cloud_log, lambda r: _refused(r, client=f["client"], kind="acl", rule="allow", service="acl"), "allow")]),
    Case("PROXY protocol: the real client", _proxy_real_client, lambda w, f: [
        (w.cloud_log, lambda r: _stream(r, client=f["client"], service="pp", end="closed"), "cloud"),
        (w.onprem_log, lambda r: _stream(r, client=f["client"], service="pp", end="closed"), "on-prem")]),
    Case("PROXY protocol: no header", _proxy_garbage, lambda w, f: [
        (w.cloud_log, lambda r: _refused(r, client=f["client"], kind="proxy_protocol", service="pp"),
         "refused: no PROXY header")]),
    Case("tenant refuses a tunnel", _tenant_refuses_tunnel, lambda w, f: [
        (w.cloud_log, lambda r: _refused(r, kind="tenant", peer_node="onprem2") and "onprem2" in r["reason"]
         and r["client"].startswith("127.0.0.1:"), "a tunnel refused by the tenant rules")]),
    Case("revoked", _revoked, lambda w, f: [
        (w.cloud_log, lambda r: _refused(r, kind="revoked") and "onprem3" in r["reason"], "revoked")]),
    Case("tenant max_streams", _tenant_limit, lambda w, f: [
        (w.cloud_log, lambda r: _refused(r, client=f["client"], kind="tenant", tenant="t1", rule="max_streams 2"),
         "tenant limit")]),
]


@pytest.fixture
def audited_pair(tmp_path, gateways):
    with EchoServer() as e:
        pair = make_pair(tmp_path, a_target=e.port, b_target=e.port)
        names = ("serviceA", "refusedsvc", "noroute", "lim", "rate", "acl", "pp")
        dead, *ports = free_ports(1 + len(names))
        port = dict(zip(names, ports))
        rules = {"lim": "max_connections = 1\n", "rate": "max_rate = 0.01\n", "acl": 'allow = ["127.0.0.1"]\ndeny = ["127.0.0.2"]\n',
                 "pp": 'accept_proxy_protocol = true\ntrusted_proxies = ["127.0.0.1"]\n'}
        pair.cloud_services = ['[[tenant]]\nname = "t1"\nclient_cn = ["onprem1"]\nmax_streams = 2\n'] + [
            service(n, accept=port[n]) + 'tenant = "t1"\n' + rules.get(n, "") for n in names]
        pair.onprem_services = [service(n, connect=dead if n == "refusedsvc" else e.port)
                                for n in names if n != "noroute"]
        admin2 = free_ports(1)[0]
        w = World(tmp_path / "audit" / "cloud1.jsonl", tmp_path / "audit" / "onprem1.jsonl", port, e.port, dead,
                  pair.certs, lambda name: gateways(name, pair.onprem_config(name, admin=admin2), ready=False), None)
        init_certs(pair.certs, cloud=[], onprem=["onprem3"])  # revoked by the "revoked" case
        (tmp_path / "audit").mkdir()
        cloud_text = pair.cloud_config().replace('route_wait = "2s"\n',
                                                 f'route_wait = "1s"\naudit_log = "{w.cloud_log}"\n', 1)
        onprem_text = pair.onprem_config().replace('route_wait = "2s"\n',
                                                   f'route_wait = "2s"\naudit_log = "{w.onprem_log}"\n', 1)
        cloud_text = cloud_text.replace(f'ca = "{pair.certs}/ca.pem"\n', f'ca = "{pair.certs}/ca.pem"\n'
                                        f'crl = "{pair.certs}/crl.pem"\n', 1)
        cloud = w.cloud = gateways("cloud1", cloud_text)
        onprem = gateways("onprem1", onprem_text)
        wait_tunnels(cloud, 1)
        yield w, cloud, onprem


def test_every_way_a_stream_or_connection_ends_is_audited_and_valid(audited_pair):
    w, cloud, onprem = audited_pair
    up_c = wait_record(w.cloud_log, lambda r: r["type"] == "tunnel" and r["event"] == "up", "tunnel up")
    assert up_c["peer"]["node"] == "onprem1" and up_c["dialed"] is False and up_c["tenant"] == "t1"
    assert up_c["peer"]["sha256"] == sha256_of(w.certs / "onprem1.pem")
    up_o = wait_record(w.onprem_log, lambda r: r["type"] == "tunnel" and r["event"] == "up", "tunnel up")
    assert up_o["peer"]["node"] == "cloud1" and up_o["dialed"] is True
    for case in CASES:
        facts = case.run(w)
        for path, match, what in case.expect(w, facts):
            wait_record(path, match, f"{case.name}: {what}")
    onprem.terminate()
    assert onprem.wait_exit(20) == 0
    down = wait_record(w.cloud_log, lambda r: r["type"] == "tunnel" and r["event"] == "down", "tunnel down")
    assert down["peer"]["node"] == "onprem1" and down["reason"] and down["streams"] >= 1
    # the on-prem gateway wrote its own tunnel's end before it exited
    assert any(r["type"] == "tunnel" and r["event"] == "down" for r in records(w.onprem_log))
    every = records(w.cloud_log) + records(w.onprem_log)  # every line valid (records() validates)
    assert {r["type"] for r in every} == {"stream", "tunnel", "refused"}
    assert all(r["v"] == 1 and r["node"] in ("cloud1", "onprem1") for r in every)
    assert "intercloud_audit_dropped_total{reason=\"queue_full\"} 0.0" in cloud.http_get("/metrics")[1].decode()


def test_logrotate_rename_and_sighup_lose_nothing(tmp_path, gateways):
    with EchoServer() as e:
        pair = make_pair(tmp_path, a_target=e.port, b_target=e.port)
        log = tmp_path / "cloud-audit.jsonl"
        cloud = gateways("cloud1", pair.cloud_config().replace('route_wait = "2s"\n',
                                                               f'route_wait = "2s"\naudit_log = "{log}"\n', 1))
        gateways("onprem1", pair.onprem_config())
        wait_tunnels(cloud, 1)
        done = [0]
        errors: list[str] = []
        stop = threading.Event()

        def traffic():
            while not stop.is_set():
                result, _ = echo(pair.a_port, b"x" * 100)
                if result != "ok":
                    errors.append(result)
                done[0] += 1

        th = threading.Thread(target=traffic, daemon=True)
        th.start()
        try:
            wait_until(lambda: done[0] >= 20, 20, what="20 streams before the rotation")
            log.rename(tmp_path / "cloud-audit.jsonl.1")  # logrotate's mv ...
            at = done[0]
            wait_until(lambda: done[0] >= at + 10, 20, what="10 streams into the renamed file")
            mark = cloud.log_mark()
            cloud.signal(signal.SIGHUP)  # ... then its postrotate HUP
            cloud.wait_log(lambda r: r["event"] == "audit.reopened", since=mark)
            at = done[0]
            wait_until(lambda: done[0] >= at + 20, 20, what="20 streams after the HUP")
        finally:
            stop.set()
            th.join(scaled(15))
        assert not errors, errors
        old, new = records(tmp_path / "cloud-audit.jsonl.1"), None

        def all_there():
            nonlocal new
            new = records(log)
            return sum(r["type"] == "stream" for r in old + new) == done[0]

        wait_until(all_there, 10, what=f"{done[0]} stream records across both files")
        assert sum(r["type"] == "stream" for r in new) >= 20, "the new file gets the new lines"
        assert old[-1]["ts"] <= new[0]["ts"]
        metrics = cloud.http_get("/metrics")[1].decode()
        assert 'intercloud_audit_dropped_total{reason="queue_full"} 0.0' in metrics
        assert 'intercloud_audit_dropped_total{reason="write_failed"} 0.0' in metrics


def test_relay_and_peer_links_are_audited_on_every_member(tmp_path, gateways):
    """Two members; onprem1 dials only cloud2, so a client of cloud1 is relayed through cloud2."""
    with EchoServer() as a, EchoServer() as b:
        certs = make_certs(tmp_path / "certs", ["cloud1", "cloud2"], ["onprem1"], sans=[])
        ports = iter(free_ports(10))
        clouds = {n: {k: Addr(L, next(ports)) for k in ("tunnel", "peer", "client", "admin")}
                  for n in ("cloud1", "cloud2")}
        onprems = {"onprem1": {k: Addr(L, next(ports)) for k in ("client", "admin")}}
        ha = HA(certs, clouds, onprems, Addr(L, a.port), Addr(L, b.port), per_member=1,
                connect_urls=[f"wss://{L}:{clouds['cloud2']['tunnel'].port}/intercloud"])
        logs = {n: tmp_path / f"{n}.audit.jsonl" for n in ("cloud1", "cloud2", "onprem1")}

        def audited(name: str, text: str) -> str:
            return text.replace('drain_timeout = "10s"\n', f'drain_timeout = "10s"\naudit_log = "{logs[name]}"\n', 1)

        gws = {n: gateways(n, audited(n, ha.cloud_config(n))) for n in clouds}
        gws["onprem1"] = gateways("onprem1", audited("onprem1", ha.onprem_config("onprem1")))
        for n in ("cloud1", "cloud2"):
            wait_record(logs[n], lambda r: r["type"] == "link" and r["event"] == "up", f"{n}: link up", 20)
        wait_tunnels(gws["cloud2"], 1)
        link = wait_record(logs["cloud2"], lambda r: r["type"] == "link" and r["event"] == "up", "link up")
        assert link["peer"]["node"] == "cloud1" and link["peer"]["kind"] == "link"
        assert link["peer"]["sha256"] == sha256_of(certs / "cluster" / "cloud1.pem")

        def relayed() -> bool:
            return echo(clouds["cloud1"]["client"].port, b"via cloud2")[0] == "ok"

        wait_until(relayed, 20, what="a client of cloud1 served through cloud2")
        client = echo.last
        first = wait_record(logs["cloud1"], lambda r: _stream(r, client=client), "the relaying member's record")
        assert first["side"] == "accept" and first["relayed"] is True and first["peer"]["node"] == "cloud2"
        assert first["path"] == ["cloud1", "cloud2", "onprem1"], first["path"]
        carried = wait_record(logs["cloud2"], lambda r: _stream(r, client=client), "the carrying member's record")
        assert carried["side"] == "relay" and carried["path"] == ["cloud1", "cloud2", "onprem1"]
        assert carried["peer"]["node"] == "cloud1" and carried["onward"]["node"] == "onprem1"
        assert carried["onward"]["sha256"] == sha256_of(certs / "onprem1.pem")
        assert carried["bytes_to_target"] == carried["bytes_to_client"] == len(b"via cloud2")
        last = wait_record(logs["onprem1"], lambda r: _stream(r, client=client), "the on-prem record")
        assert last["side"] == "connect" and last["path"] == ["cloud2", "onprem1"]
        gws["cloud1"].terminate()
        assert gws["cloud1"].wait_exit(20) == 0
        down = wait_record(logs["cloud2"], lambda r: r["type"] == "link" and r["event"] == "down", "link down")
        assert down["peer"]["node"] == "cloud1" and down["reason"]
        for path in logs.values():
            records(path)  # every line validates


def test_an_unusable_audit_log_path_is_a_startup_error_naming_the_key(tmp_path, gateways):
    pair = make_pair(tmp_path, a_target=9, b_target=9)
    text = pair.cloud_config().replace('route_wait = "2s"\n',
                                       f'route_wait = "2s"\naudit_log = "{tmp_path}/no/such/dir/audit.jsonl"\n', 1)
    cloud = gateways("cloud1", text, ready=False)
    assert cloud.wait_exit(30) == 2
    out = cloud.log_text()
    assert "gateway.audit_log" in out and f"{tmp_path}/no/such/dir" in out and "Traceback" not in out, out
    check = subprocess.run([sys.executable, "-m", "intercloud", "check", str(cloud.config_path)],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")})
    assert check.returncode != 0 and "gateway.audit_log" in check.stdout + check.stderr


def test_sighup_moves_the_audit_log_to_a_new_path_and_turning_it_off_takes_a_restart(tmp_path, gateways):
    with EchoServer() as e:
        pair = make_pair(tmp_path, a_target=e.port, b_target=e.port)
        one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"

        def text(path: Path | None) -> str:
            line = f'audit_log = "{path}"\n' if path else ""
            return pair.cloud_config().replace('route_wait = "2s"\n', f'route_wait = "2s"\n{line}', 1)

        cloud = gateways("cloud1", text(one))
        gateways("onprem1", pair.onprem_config())
        wait_tunnels(cloud, 1)
        assert echo(pair.a_port)[0] == "ok"
        wait_record(one, lambda r: _stream(r, client=echo.last), "a stream in the first file")
        cloud.config_text = text(two)
        mark = cloud.log_mark()
        cloud.signal(signal.SIGHUP)
        cloud.wait_log(lambda r: r["event"] == "gateway.reloaded", since=mark)
        cloud.wait_log(lambda r: r["event"] == "audit.reopened" and r["path"] == str(two), since=mark)
        assert echo(pair.a_port)[0] == "ok"
        wait_record(two, lambda r: _stream(r, client=echo.last), "a stream in the new file")
        assert not any(r.get("client") == echo.last for r in records(one))
        # no audit_log any more: that takes a restart; the reload says so and the log goes on
        cloud.config_text = text(None)
        mark = cloud.log_mark()
        cloud.signal(signal.SIGHUP)
        rec = cloud.wait_log(lambda r: r["event"] == "gateway.reload_partial", since=mark)
        assert "gateway.audit_log" in rec["keys"], rec
        assert echo(pair.a_port)[0] == "ok"
        wait_record(two, lambda r: _stream(r, client=echo.last), "still audited after the reload")


@pytest.mark.needs_root
@pytest.mark.needs_binary("mount", "umount")
def test_a_full_disk_drops_records_counted_with_one_error_and_streams_go_on(tmp_path, gateways):
    """The audit log on a 64 KiB tmpfs: once it is full, records are dropped and counted, one error line
    says so, and clients keep getting their echoes."""
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        with EchoServer() as e:
            pair = make_pair(tmp_path, a_target=e.port, b_target=e.port)
            log = disk / "audit.jsonl"
            cloud = gateways("cloud1", pair.cloud_config().replace(
                'route_wait = "2s"\n', f'route_wait = "2s"\naudit_log = "{log}"\n', 1))
            gateways("onprem1", pair.onprem_config())
            wait_tunnels(cloud, 1)
            for i in range(200):  # ~700 bytes a record: 64 KiB holds fewer than 100
                assert echo(pair.a_port, b"%d" % i)[0] == "ok", i

            def dropped() -> float:
                for line in cloud.http_get("/metrics")[1].decode().splitlines():
                    if line.startswith('intercloud_audit_dropped_total{reason="write_failed"}'):
                        return float(line.split()[-1])
                return 0.0

            wait_until(lambda: dropped() > 0, 10, what="records dropped for a full disk")
            errors = [r for r in cloud.log_lines() if r.get("event") == "audit.write_failed"]
            assert len(errors) == 1 and "No space left" in errors[0]["msg"], errors
            kept = records(log)  # what made it is whole, valid lines (a failed batch is cut off)
            assert 0 < len(kept) < 200
            assert log.read_bytes().endswith(b"\n")
            assert cloud.running
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
