"""Smoke test of the benchmark (bench/run.py, docs/performance.md).

Why: the benchmark is only run by hand, so nothing else notices when a change breaks it (a config
key renamed, a gateway that no longer starts with its configs, a JSON key the table reads). This
runs ``bench/run.py --quick --only intercloud,direct``: real gateways, iperf3, the echo server,
1,000 idle streams, every measurement once and short; then checks that it exits 0 within its
budget and that the JSON holds positive numbers for everything it measured. No frp (no download
in the suite) and no socat. Performance targets are not judged here: CI machines are too noisy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.markers import needs_binary
from tests.support.timeouts import scaled

REPO = Path(__file__).resolve().parents[2]
BUDGET = 90.0  # seconds, nominal (scaled by INTERCLOUD_TEST_TIMEOUT_FACTOR)
SYSTEMS = ("direct", "intercloud-A", "intercloud-B")
IPERF_KEYS = ("P1", "P1R", "P8", "P8R")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str, float]:
    out_dir = tmp_path_factory.mktemp("bench")
    argv = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--only", "intercloud,direct",
            "--out", str(out_dir)]
    t0 = time.monotonic()
    # its own session: if it overruns, the whole group (gateways, iperf3, echo server) is ended
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=scaled(BUDGET) + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # run.py stops its children on SIGTERM
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"bench/run.py --quick did not finish in {scaled(BUDGET) + 60:.0f}s:\n{output[-4000:]}")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"bench/run.py --quick exited {proc.returncode}:\n{output[-4000:]}"
    files = sorted(out_dir.glob("*-quick.json"))
    assert len(files) == 1, f"expected one JSON result in {out_dir}, found {files}:\n{output[-2000:]}"
    return json.loads(files[0].read_text()), output, elapsed


@needs_binary("iperf3")
def test_quick_bench_finishes_within_budget(quick_run):
    _, output, elapsed = quick_run
    assert elapsed < scaled(BUDGET), f"bench/run.py --quick took {elapsed:.0f}s (budget {scaled(BUDGET):.0f}s)"
    for name in SYSTEMS:
        assert name in output, f"the printed table lacks {name}:\n{output[-3000:]}"
    assert "raw results:" in output


@needs_binary("iperf3")
def test_quick_bench_numbers_are_sane(quick_run):
    data, _, _ = quick_run
    assert data["config"]["quick"] is True
    assert data["config"]["reps"] == 1
    for name in SYSTEMS:
        runs = data["systems"][name]["runs"]
        assert len(runs) == 1 and "error" not in runs[0], f"{name}: {runs}"
        med = data["systems"][name]["median"]
        for key in IPERF_KEYS:
            assert med[f"gbps.{key}"] > 0, (name, key)
        assert 0 < med["latency.p50_ms"] <= med["latency.p99_ms"], name
        assert runs[0]["latency"]["n"] == 200
        assert runs[0]["latency"]["errors"] <= 2, (name, runs[0]["latency"])
        assert med["rate.conns_per_s"] > 0, name
    for name in ("intercloud-A", "intercloud-B"):
        med = data["systems"][name]["median"]
        run = data["systems"][name]["runs"][0]
        assert run["idle"]["n"] == 1000
        assert run["idle"]["established"] == 1000, run["idle"]
        for gw in ("cloud", "onprem"):
            assert med[f"idle.rss_mib.{gw}"] > 0, (name, gw)
            assert med[f"rate.cpu_us_per_conn.{gw}"] > 0, (name, gw)
            for key in IPERF_KEYS:
                assert med[f"cpu_s_per_gb.{key}.{gw}"] > 0, (name, gw, key)
    # every target of issue 6 is evaluated for both directions; without frp/socat only the absolute
    # ones (latency, RSS, CPU per GB) can be judged, the ratios are "n/a" (None)
    targets = data["targets"]
    assert {t["system"] for t in targets} == {"intercloud-A", "intercloud-B"}
    absolute = [t for t in targets if t["reference"] is None]
    assert absolute and all(t["met"] in (True, False) for t in absolute)
    assert all(t["met"] is None for t in targets if t["reference"] is not None)
