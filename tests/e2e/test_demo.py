"""The README's main command: ``intercloud demo --walkthrough`` passes and leaves nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.support.gateway import REPO_ROOT
from tests.support.timeouts import scaled

OFFSET = 20000  # keep clear of a demo a developer may have running on the default ports


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_walkthrough_passes_and_cleans_up():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    out = subprocess.run([sys.executable, "-m", "intercloud", "demo", "--walkthrough", "--port-offset", str(OFFSET)],
                         capture_output=True, text=True, timeout=scaled(240), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "walkthrough: PASSED" in out.stdout
    assert "FAIL" not in out.stdout.replace("FAILED", "")
    for port in (5551, 5552, 6661, 6662, 8441, 8442, 8443, 9441, 9442, 9101, 9102, 9103, 9104):
        assert not _listening(port + OFFSET), f"port {port + OFFSET} still listening after the demo"
    ps = subprocess.run(["pgrep", "-f", "intercloud-demo-"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", f"demo gateway processes left: {ps.stdout}"
    if "nginx" in out.stdout and "not installed" not in out.stdout:
        assert "cloud1 restarted (LB): on-prem tunnels back" in out.stdout
    ps = subprocess.run(["pgrep", "-f", "intercloud-demo-.*/nginx"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", f"demo nginx left: {ps.stdout}"
