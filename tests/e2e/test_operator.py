"""Issue 5: status, metrics and the dashboard follow a member's death; `intercloud status` prints it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.gateway import REPO_ROOT
from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import wait_until

from .ha import HA, Addr, make_certs

L = "127.0.0.1"


@pytest.fixture
def cluster(tmp_path, gateways):
    with EchoServer() as a, EchoServer() as b:
        certs = make_certs(tmp_path / "certs", ["cloud1", "cloud2"], ["onprem1", "onprem2"], sans=[])
        ports = iter(free_ports(16))
        clouds = {n: {k: Addr(L, next(ports)) for k in ("tunnel", "peer", "client", "admin")} for n in ("cloud1", "cloud2")}
        onprems = {n: {k: Addr(L, next(ports)) for k in ("client", "admin")} for n in ("onprem1",)}
        ha = HA(certs, clouds, onprems, Addr(L, a.port), Addr(L, b.port),
                connect_urls=[f"wss://localhost:{c['tunnel'].port}/intercloud" for c in clouds.values()])
        gws = {n: gateways(n, ha.cloud_config(n)) for n in clouds}
        gws["onprem1"] = gateways("onprem1", ha.onprem_config("onprem1"))
        wait_until(lambda: len(gws["onprem1"].status()["tunnels"]) == 4, 15, what="onprem1's four tunnels")
        yield ha, gws


def _metric(gw, name: str, labels: str = "") -> float:
    text = gw.http_get("/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return 0.0


def test_status_and_metrics_follow_a_killed_member(cluster):
    ha, gws = cluster
    c2, op = gws["cloud2"], gws["onprem1"]
    assert {m["node_id"]: m["up"] for m in c2.status()["members"]} == {"cloud1": True, "cloud2": True}
    assert _metric(op, "intercloud_tunnels", 'peer_node="cloud1"') == 2
    closed_before = _metric(op, "intercloud_tunnels_closed_total")
    gws["cloud1"].kill()
    wait_until(lambda: {m["node_id"]: m["up"] for m in c2.status()["members"]}.get("cloud1") is False, 10,
               what="cloud2 to mark cloud1 down")
    wait_until(lambda: {m["node_id"]: m["up"] for m in op.status()["members"]}.get("cloud1") is False, 10,
               what="onprem1 to mark cloud1 down")
    assert _metric(op, "intercloud_tunnels", 'peer_node="cloud1"') == 0
    assert _metric(op, "intercloud_tunnels_closed_total") >= closed_before + 2
    assert any(e["event"] == "cluster.link_down" for e in c2.status()["events"])

    out = subprocess.run([sys.executable, "-m", "intercloud", "status", op.admin_url, c2.admin_url],
                         capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT / "src")}, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "onprem gateway onprem1" in out.stdout and "cloud gateway cloud2" in out.stdout
    assert "Cloud members" in out.stdout and "DOWN" in out.stdout and "Tunnels" in out.stdout
    assert "Services" in out.stdout and "serviceB" in out.stdout


@pytest.mark.needs_binary("chromium")
def test_dashboard_shows_the_dead_member_down(cluster, tmp_path):
    from playwright.sync_api import sync_playwright

    ha, gws = cluster
    c2 = gws["cloud2"]
    shot = tmp_path / "dashboard-member-down.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 800})
            page.goto(c2.admin_url + "/")
            page.wait_for_selector('g[data-node="cloud1"][data-state="up"]', timeout=10_000)
            assert page.locator('g[data-node="cloud2"]').count() == 1
            assert page.locator("#ready").inner_text() == "READY"
            # the tunnels table shows each tunnel's TCP state: RTT, retransmits, queue, congestion control
            page.wait_for_selector("#tunnels tbody tr td:nth-child(10)")
            first = c2.status()["tunnels"][0]
            cells = page.locator("#tunnels tbody tr").first.locator("td")
            assert cells.nth(0).inner_text() == str(first["id"])
            assert cells.nth(9).inner_text() == first["tcp"]["congestion"]
            assert cells.nth(7).inner_text() == str(first["tcp"]["retransmits"])
            assert " / " in cells.nth(8).inner_text()  # unsent / unacknowledged
            gws["cloud1"].kill()
            # updates without a reload
            page.wait_for_selector('g[data-node="cloud1"][data-state="down"]', timeout=15_000)
            assert "DOWN" in page.locator('g[data-node="cloud1"]').text_content()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.exists() and shot.stat().st_size > 10_000
    artifacts = REPO_ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / shot.name).write_bytes(shot.read_bytes())
