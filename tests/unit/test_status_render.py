"""`intercloud status` shows dial targets only when a host name was looked up (operations.md §6.1)."""

from __future__ import annotations

from intercloud.cli.status import render


def doc(targets: list[dict], role: str = "onprem") -> dict:
    return {"role": role, "node_id": "onprem1", "ready": True, "uptime": 5, "members": [], "tunnels": [],
            "services": [], "counters": {}, "events": [], "dial_targets": targets}


def test_a_name_with_two_members_is_listed_with_each_address() -> None:
    out = render(doc([{"url": "wss://cloud.test/intercloud", "address": "10.0.0.1", "error": None},
                      {"url": "wss://cloud.test/intercloud", "address": "10.0.0.2", "error": None}]))
    table = out.split("Dial targets\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split() for line in table[2:]] == [["wss://cloud.test/intercloud", "10.0.0.1", "-"],
                                                    ["wss://cloud.test/intercloud", "10.0.0.2", "-"]]


def test_a_name_that_never_resolved_shows_why() -> None:
    out = render(doc([{"url": "wss://nowhere.test/intercloud", "address": None,
                       "error": "cannot resolve nowhere.test: Name or service not known"}]))
    assert "cannot resolve nowhere.test: Name or service not known" in out


def test_urls_dialed_by_name_add_no_table() -> None:
    assert "Dial targets" not in render(doc([{"url": "wss://192.0.2.1/intercloud", "address": None, "error": None}]))
    assert "Peer dial targets" in render(doc([{"url": "wss://c.test:9443/cluster", "address": "10.0.0.3",
                                              "error": None}], role="cloud"))
