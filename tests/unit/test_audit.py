"""The audit log's writer and records (src/intercloud/audit.py, docs/operations.md §10.3): the bounded
queue and its drop count, reopening after a logrotate-style rename, failed writes, the records and the
shipped JSON Schema, and the config rule for gateway.audit_log."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest

from intercloud import audit as audit_mod
from intercloud import certs
from intercloud.audit import AuditLog, refused_record, stream_record, tunnel_record
from intercloud.config import ConfigError, load_config
from intercloud.stats import REFUSAL_KINDS, GatewayStats

from tests.support.timeouts import wait_until

VALIDATOR = jsonschema.Draft202012Validator(audit_mod.schema(), format_checker=jsonschema.FormatChecker())


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def valid(rec: dict) -> dict:
    VALIDATOR.validate(rec)
    return rec


@pytest.fixture(scope="module")
def der(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("pki")
    certs.init_certs(d, cloud=["cloud1"], onprem=["onprem1"])
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate((d / "onprem1.pem").read_bytes()).public_bytes(Encoding.DER)


# --- records and the schema ---------------------------------------------------------------------------
def test_the_schema_is_shipped_in_the_package_and_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(audit_mod.schema())
    # every refusal kind GatewayStats knows is one the schema accepts
    assert set(audit_mod.schema()["$defs"]["refused"]["properties"]["kind"]["enum"]) == set(REFUSAL_KINDS)


def test_rfc3339_is_utc_with_microseconds() -> None:
    t = dt.datetime(2026, 12, 4, 15, 1, 2, 123456, tzinfo=dt.UTC).timestamp()
    assert audit_mod.rfc3339(t) == "2026-12-04T15:01:02.123456Z"


def test_stream_record_accept_side_with_a_verified_peer(der: bytes) -> None:
    rec = valid(stream_record("cloud1", 1000.5, start=1000.0, service="db", tenant="default", side="accept",
                              client="10.0.0.7:5000", target=None, peer=("onprem1", der, "127.0.0.1:4000", "tunnel"),
                              bytes_to_target=10, bytes_to_client=20, end="closed", reason="closed"))
    assert rec["v"] == 1 and rec["type"] == "stream" and rec["node"] == "cloud1"
    assert rec["duration"] == 0.5 and rec["start"].endswith("Z")
    assert rec["path"] == ["cloud1", "onprem1"] and rec["relayed"] is False
    import hashlib

    assert rec["peer"]["sha256"] == hashlib.sha256(der).hexdigest()
    assert "CN=onprem1" in rec["peer"]["subject"]
    assert rec["target"] is None and rec["client"] == "10.0.0.7:5000"


def test_stream_record_paths_for_connect_relay_and_a_relaying_member() -> None:
    link = ("cloud1", None, "127.0.0.1:1", "link")
    tunnel = ("onprem1", None, "127.0.0.1:2", "tunnel")
    connect = valid(stream_record("onprem1", 2.0, start=1.0, service="db", tenant="default", side="connect",
                                  client="c:1", target="db:5432", peer=("cloud2", None, "", "tunnel")))
    assert connect["path"] == ["cloud2", "onprem1"] and connect["target"] == "db:5432"
    carried = valid(stream_record("cloud2", 2.0, start=1.0, service="db", tenant="default", side="relay",
                                  client="c:1", target=None, peer=link, onward=tunnel))
    assert carried["path"] == ["cloud1", "cloud2", "onprem1"] and carried["relayed"] is True
    assert carried["onward"]["node"] == "onprem1" and carried["peer"]["kind"] == "link"
    relaying = valid(stream_record("cloud1", 2.0, start=1.0, service="db", tenant="default", side="accept",
                                   client="c:1", target=None, peer=("cloud2", None, "", "link"), far="onprem1"))
    assert relaying["path"] == ["cloud1", "cloud2", "onprem1"] and relaying["relayed"] is True
    # a far node id that is not one (a hostile value) is left out, not written
    odd = valid(stream_record("cloud1", 2.0, start=1.0, service="db", tenant="default", side="accept",
                              client="c:1", target=None, peer=("cloud2", None, "", "link"), far="x\n" * 40))
    assert odd["path"] == ["cloud1", "cloud2"]


def test_tunnel_link_and_refused_records_validate() -> None:
    peer = ("onprem1", None, "127.0.0.1:4000", "tunnel")
    up = valid(tunnel_record("cloud1", 5.0, kind="tunnel", event="up", peer=peer, tunnel_id=3, tenant="default",
                             dialed=False))
    assert "reason" not in up
    down = valid(tunnel_record("cloud1", 7.5, kind="link", event="down", peer=peer, tunnel_id=3, tenant="default",
                               dialed=True, opened_at=5.0, streams=4, reason="peer gone"))
    assert down["duration"] == 2.5 and down["streams"] == 4 and down["type"] == "link"
    for kind in REFUSAL_KINDS:
        valid(refused_record("cloud1", 1.0, kind=kind, why="because", client="1.2.3.4:5", service="db",
                             tenant="default", rule="deny 1.2.3.4/32"))


def test_the_schema_rejects_what_the_writer_must_not_write() -> None:
    good = refused_record("cloud1", 1.0, kind="acl", why="x")
    for bad in ({**good, "v": 2}, {**good, "kind": "whatever"}, {**good, "extra": 1},
                {k: v for k, v in good.items() if k != "ts"}, {**good, "ts": "yesterday"}):
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(bad)
    down = tunnel_record("cloud1", 2.0, kind="tunnel", event="down", peer=("a", None, "", "tunnel"), tunnel_id=1,
                         tenant="default", dialed=False, opened_at=1.0, streams=0, reason="x")
    with pytest.raises(jsonschema.ValidationError):  # a down record says why
        VALIDATOR.validate({k: v for k, v in down.items() if k != "reason"})


# --- the writer ---------------------------------------------------------------------------------------
def test_the_queue_is_bounded_and_drops_are_counted(tmp_path: Path) -> None:
    a = AuditLog(tmp_path / "audit.log", "cloud1", max_queue=100)
    a.open()
    for i in range(130):  # no writer yet: the queue fills up
        a.refused("acl", f"r{i}")
    assert a.dropped_full == 30 and a.dropped == 30
    a.start()
    a.close()
    got = lines(tmp_path / "audit.log")
    assert [r["reason"] for r in got] == [f"r{i}" for i in range(100)]
    assert a.written == 100
    for r in got:
        valid(r)


def test_put_never_blocks_while_the_writer_is_stuck(tmp_path: Path, monkeypatch) -> None:
    a = AuditLog(tmp_path / "audit.log", "cloud1", max_queue=10)
    a.open()
    gate = threading.Event()
    real = audit_mod.os.write

    def slow_write(fd, data):  # a hung disk
        gate.wait(10)
        return real(fd, data)

    monkeypatch.setattr(audit_mod.os, "write", slow_write)
    a.start()
    a.refused("acl", "first")
    wait_until(lambda: a._q.qsize() == 0, 5, what="the writer to take the first record")
    t0 = time.monotonic()
    for i in range(1000):
        a.refused("acl", f"r{i}")
    assert time.monotonic() - t0 < 0.5
    assert a.dropped_full == 990
    gate.set()
    a.close()
    assert len(lines(tmp_path / "audit.log")) == 11


def test_reopen_after_a_logrotate_rename(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    a = AuditLog(path, "cloud1")
    a.open()
    a.start()
    a.refused("acl", "before")
    wait_until(lambda: a.written == 1, 5, what="the first record")
    path.rename(tmp_path / "audit.log.1")
    a.refused("acl", "after rename, before HUP")  # still goes to the renamed file (same descriptor)
    wait_until(lambda: a.written == 2, 5, what="the second record")
    a.reopen()
    a.refused("acl", "after HUP")
    a.close()
    assert [r["reason"] for r in lines(tmp_path / "audit.log.1")] == ["before", "after rename, before HUP"]
    assert [r["reason"] for r in lines(path)] == ["after HUP"]
    assert a.dropped == 0
    assert (path.stat().st_mode & 0o777) == 0o640


def test_reopen_to_a_new_path_and_a_failed_reopen_keeps_the_old_file(tmp_path: Path) -> None:
    a = AuditLog(tmp_path / "one.log", "cloud1")
    a.open()
    a.start()
    a.reopen(tmp_path / "missing-dir" / "x.log")  # fails: logged, the old file stays in use
    a.refused("acl", "one")
    wait_until(lambda: a.written == 1, 5, what="a record")
    a.reopen(tmp_path / "two.log")
    a.refused("acl", "two")
    a.close()
    assert [r["reason"] for r in lines(tmp_path / "one.log")] == ["one"]
    assert [r["reason"] for r in lines(tmp_path / "two.log")] == ["two"]


def test_a_failed_write_drops_its_batch_counted_with_one_error_line(tmp_path: Path, monkeypatch, caplog) -> None:
    a = AuditLog(tmp_path / "audit.log", "cloud1")
    a.open()
    real = audit_mod.os.write
    full = [True]

    def write(fd, data):
        if full[0]:
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(audit_mod.os, "write", write)
    a.start()
    for i in range(3):
        a.refused("acl", f"lost{i}")
        wait_until(lambda i=i: a.dropped_failed == i + 1, 5, what="a failed write")
    errors = [r for r in caplog.records if getattr(r, "event", "") == "audit.write_failed"]
    assert len(errors) == 1 and "No space left" in errors[0].getMessage()
    full[0] = False
    a.refused("acl", "kept")
    a.close()
    assert [r["reason"] for r in lines(tmp_path / "audit.log")] == ["kept"]
    assert a.dropped == 3 and a.written == 1


def test_gateway_stats_hands_records_to_the_audit_log(tmp_path: Path) -> None:
    stats = GatewayStats()
    a = stats.audit = AuditLog(tmp_path / "audit.log", "cloud1")
    a.open()
    a.start()
    stats.refused("max_rate", "too fast", client="1.2.3.4:5", service="db", tenant="default", rule="max_rate 5")
    tunnel = SimpleNamespace(peer_node="onprem1", peer_der=None, peer_addr="127.0.0.1:9", kind="tunnel", id=7,
                             label="tunnel#7", tenant="default", client=False, opened_at=time.time() - 1,
                             streams_total=1)
    stream = SimpleNamespace(side="accept", service="db", tenant="default", client="1.2.3.4:6", target="", sid=1,
                             started=time.monotonic() - 0.25, bytes_up=3, bytes_down=4, counted=False, gate=None,
                             in_service=True, far=None)
    stats.tunnel_up(tunnel)
    stats.stream_closed(tunnel, stream, "reset: ABORTED client went away")
    stats.tunnel_down(tunnel, "peer closed")
    a.close()
    recs = [valid(r) for r in lines(tmp_path / "audit.log")]
    assert [r["type"] for r in recs] == ["refused", "tunnel", "stream", "tunnel"]
    assert recs[0]["kind"] == "max_rate" and recs[0]["rule"] == "max_rate 5"
    s = recs[2]
    assert (s["bytes_to_target"], s["bytes_to_client"], s["end"]) == (3, 4, "reset")
    assert 0.2 < s["duration"] < 5 and s["path"] == ["cloud1", "onprem1"]
    assert recs[3]["event"] == "down" and recs[3]["reason"] == "peer closed"


# --- gateway.audit_log in the configuration -----------------------------------------------------------
def _config(tmp_path: Path, audit_log: str) -> Path:
    p = tmp_path / "gw.toml"
    p.write_text(f'[gateway]\nrole = "onprem"\nnode_id = "dc1"\naudit_log = "{audit_log}"\n\n[tls]\ninsecure = true\n\n'
                 '[tunnel]\nconnect = ["ws://127.0.0.1:9/intercloud"]\n')
    return p


def test_audit_log_path_relative_to_the_config(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, "audit.jsonl"))
    assert cfg.gateway.audit_log == tmp_path / "audit.jsonl"


@pytest.mark.parametrize("case", ["no_dir", "directory", "fifo"])
def test_an_unusable_audit_log_path_is_a_config_problem_naming_the_key(tmp_path: Path, case: str) -> None:
    target = {"no_dir": tmp_path / "nope" / "audit.log", "directory": tmp_path, "fifo": tmp_path / "fifo"}[case]
    if case == "fifo":
        os.mkfifo(target)
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, str(target)))
    found = [m for k, m in info.value.problems if k == "gateway.audit_log"]
    assert found and str(target.parent if case == "no_dir" else target) in found[0], info.value.problems


def test_a_fifo_or_directory_at_the_path_is_refused_at_open_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    for target in (tmp_path / "fifo", tmp_path):
        with pytest.raises(OSError):
            AuditLog(target, "cloud1").open()


def test_a_path_that_cannot_be_opened_at_startup_is_a_startup_error_naming_the_key(tmp_path: Path) -> None:
    from intercloud.errors import StartupError
    from intercloud.gateway import Gateway

    cfg = load_config(_config(tmp_path, "audit.jsonl"))
    cfg = cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update={"audit_log": tmp_path})})  # a directory
    with pytest.raises(StartupError) as info:
        Gateway(cfg)._open_audit()
    assert "gateway.audit_log" in str(info.value) and str(tmp_path) in str(info.value)


def test_hostile_text_stays_one_ascii_line_and_a_bad_record_costs_only_itself(tmp_path: Path) -> None:
    a = AuditLog(tmp_path / "audit.log", "cloud1")
    a.open()
    a.start()
    a.refused("acl", "line\u2028sep\nnew \udcff surrogate \x1b[31m")
    a.put(refused_record, kind="acl")  # a bug: a required argument missing
    a.refused("acl", "after")
    a.close()
    raw = (tmp_path / "audit.log").read_bytes()
    assert raw.isascii() and raw.count(b"\n") == 2
    got = lines(tmp_path / "audit.log")
    assert got[0]["reason"].startswith("line\u2028sep\nnew") and got[1]["reason"] == "after"
    assert a.dropped_failed == 1


def test_rfc3339_matches_datetime_across_seconds() -> None:
    for t in (0.0, 1.9999996, 1796395733.98496, 1796395734.000001, 1796395733.5, 1796395734.999999):
        want = dt.datetime.fromtimestamp(round(t * 1e6) / 1e6, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert audit_mod.rfc3339(t) == want, t
