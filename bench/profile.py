#!/usr/bin/env python3
"""Profile the intercloud gateways under benchmark load (docs/performance.md, "Where the CPU goes").

    .venv/bin/python bench/profile.py                       # intercloud-A, loads P1R P8R conns, 10 s each
    .venv/bin/python bench/profile.py --system intercloud-B --loads P1,P1R --seconds 15 --perf

Starts the system as bench/run.py does, then for each load runs py-spy (installed from PyPI into
bench/.venv-prof on first use) on both gateway processes while the load runs:

    P1 / P1R / P8 / P8R   iperf3 with 1 or 8 streams, forward or reverse (-R)
    conns                 new connections (32 concurrent clients: connect, 1 byte echoed, close)

and writes to bench/results/profile-<timestamp>/: per load and gateway a flame graph
(``<load>-<gw>.svg``), the raw collapsed stacks (``.txt``) and ``summary.txt`` (top functions by own
time and by total time). With ``--perf`` it also runs ``perf record -g`` and adds perf's split of the
CPU time by shared object (kernel, libcrypto, libpython, uvloop, picows) and its top symbols.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py

LOADS = {"P1": (1, False), "P1R": (1, True), "P8": (8, False), "P8R": (8, True)}


def ensure_pyspy(venv: Path) -> Path:
    exe = venv / "bin" / "py-spy"
    if not exe.exists():
        run.log(f"installing py-spy into {venv}")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                        "--disable-pip-version-check", "py-spy"], check=True)
    return exe


def summarize_collapsed(path: Path, top: int = 25) -> str:
    """Own time (leaf frame) and total time (any frame on the stack) per function, in % of samples."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    n = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        n += c
        frames = [f.strip() for f in stack.split(";")]
        own[_short(frames[-1])] += c
        for f in {_short(f) for f in frames}:
            total[f] += c
    if not n:
        return "  (no samples: the process was idle)\n"
    out = [f"  {n} samples\n  own time:\n"]
    out += [f"    {100 * c / n:5.1f}%  {f}\n" for f, c in own.most_common(top)]
    out.append("  total time (function on the stack):\n")
    out += [f"    {100 * c / n:5.1f}%  {f}\n" for f, c in total.most_common(top)]
    return "".join(out)


def _short(frame: str) -> str:
    # py-spy raw frames look like "send_data (intercloud/tunnel/tunnel.py:251)"; drop the line number
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", "/src/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{name} ({file})" if file else name


def perf_summary(data: Path) -> str:
    out = []
    for sort, top in (("dso", 12), ("dso,sym", 30)):
        r = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", sort,
                            "-g", "none", "--percent-limit", "0.5"], capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
        out.append(f"  perf, by {sort}:\n" + "".join(f"    {ln.strip()}\n" for ln in lines[:top]))
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", default="intercloud-A", choices=("intercloud-A", "intercloud-B"))
    p.add_argument("--loads", default="P1R,P8R,conns", help="comma-separated: P1, P1R, P8, P8R, conns")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too; pauses the process)")
    p.add_argument("--perf", action="store_true", help="also perf record -g (needs linux-perf)")
    p.add_argument("--intercloud-src", type=Path, help="run the gateways from this source tree")
    p.add_argument("--out", type=Path, help="default bench/results/profile-<timestamp>")
    p.add_argument("--pyspy-venv", type=Path, default=run.BENCH / ".venv-prof")
    cfg = p.parse_args(argv)
    loads = [x.strip() for x in cfg.loads.split(",") if x.strip()]
    for x in loads:
        if x not in LOADS and x != "conns":
            p.error(f"unknown load {x!r}")
    pyspy = ensure_pyspy(cfg.pyspy_venv)
    if cfg.perf and shutil.which("perf") is None:
        p.error("perf is not installed (apt-get install linux-perf)")
    out = cfg.out or run.BENCH / "results" / f"profile-{time.strftime('%Y%m%dT%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    run.raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="intercloud-prof-"))
    (work / "logs").mkdir()
    procs = run.Procs(work / "logs")
    summary = [f"intercloud profile: {cfg.system}, {cfg.seconds:g} s per load, py-spy {cfg.rate} Hz"
               f"{' --native' if cfg.native else ''}; machine: {run.machine_info()}\n\n"]
    try:
        env = run.Env(work, procs, None, cfg.intercloud_src)
        env.make_certs()
        env.start_backends()
        system = run.SYSTEM_CLASSES[cfg.system](env)
        system.start()
        system.ready()
        pids = {n: pr.pid for n, pr in system.relays.items()}
        for load in loads:
            run.log(f"profiling {cfg.system} under {load}")
            spies = []
            for gw, pid in pids.items():
                # raw collapsed stacks; the flame graph is drawn from them (one sampler per process)
                argv_ = [str(pyspy), "record", "--pid", str(pid), "--rate", str(cfg.rate),
                         "--duration", f"{int(cfg.seconds)}", "--format", "raw", "-o", str(out / f"{load}-{gw}.txt")]
                argv_ += ["--native"] if cfg.native else ["--nonblocking"]
                spies.append(subprocess.Popen(argv_, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                if cfg.perf:
                    spies.append(subprocess.Popen(
                        ["perf", "record", "-F", "499", "-g", "-o", str(out / f"{load}-{gw}.perf.data"),
                         "-p", str(pid), "--", "sleep", f"{cfg.seconds:g}"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)
            result: dict = {}

            def drive(load: str = load, result: dict = result) -> None:
                if load == "conns":
                    result["r"] = run.run_async(run._conn_rate(system.echo_port, 32, cfg.seconds))
                else:
                    streams, rev = LOADS[load]
                    result["r"] = run.iperf(system.iperf_port, streams, rev, cfg.seconds)

            t = threading.Thread(target=drive)
            cpu0 = {gw: run.cpu_seconds(pid) for gw, pid in pids.items()}
            t.start()
            t.join()
            cpu = {gw: run.cpu_seconds(pid) - cpu0[gw] for gw, pid in pids.items()}
            for s in spies:
                try:
                    s.wait(cfg.seconds + 30)
                except subprocess.TimeoutExpired:
                    s.kill()
            r = result.get("r", {})
            what = (f"{r.get('gbps', 0):.2f} Gbit/s" if "gbps" in r else
                    f"{r.get('conns_per_s', 0):.0f} connections/s")
            summary.append(f"== {load}: {what}; CPU s during the load: "
                           + ", ".join(f"{gw} {v:.2f}" for gw, v in cpu.items()) + "\n")
            for gw in pids:
                raw = out / f"{load}-{gw}.txt"
                summary.append(f"-- {gw} gateway (pid {pids[gw]})\n")
                if raw.exists():
                    summary.append(summarize_collapsed(raw))
                    flame(raw, out / f"{load}-{gw}.svg", f"{cfg.system} {gw} gateway, {load}: {what}")
                if cfg.perf and (out / f"{load}-{gw}.perf.data").exists():
                    summary.append(perf_summary(out / f"{load}-{gw}.perf.data"))
            summary.append("\n")
        system.stop()
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    (out / "summary.txt").write_text("".join(summary))
    print("".join(summary))
    print(f"profiles in {out}")
    return 0


def flame(collapsed: Path, svg: Path, title: str) -> None:
    """A minimal flame graph (SVG) from collapsed stacks, so one sampling run gives both files."""
    root: dict = {"n": 0, "c": {}}
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        node = root
        node["n"] += c
        for f in stack.split(";"):
            node = node["c"].setdefault(_short(f.strip()), {"n": 0, "c": {}})
            node["n"] += c
    if not root["n"]:
        return
    width, row = 1600.0, 16
    rects: list[str] = []
    depth_max = 0

    def walk(node: dict, x: float, depth: int) -> None:
        nonlocal depth_max
        depth_max = max(depth_max, depth)
        for name, child in sorted(node["c"].items()):
            w = width * child["n"] / root["n"]
            if w >= 0.5:
                pct = 100 * child["n"] / root["n"]
                hue = 20 + (hash(name.split(" (")[-1]) % 40)
                label = name if w > 7 * len(name) else name[: max(0, int(w / 7) - 2)] + ".." if w > 30 else ""
                esc = (name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
                lab = (label.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
                rects.append(f'<g><title>{esc} ({pct:.1f}%)</title><rect x="{x:.1f}" y="{{Y{depth}}}" '
                             f'width="{w:.1f}" height="{row - 1}" fill="hsl({hue},80%,60%)"/>'
                             f'<text x="{x + 3:.1f}" y="{{T{depth}}}" font-size="11">{lab}</text></g>')
                walk(child, x, depth + 1)
            x += w

    walk(root, 0.0, 0)
    height = (depth_max + 2) * row + 30
    body = "\n".join(rects)
    for d in range(depth_max + 1):  # root at the bottom, as flame graphs go
        y = height - (d + 1) * row - 5
        body = body.replace(f"{{Y{d}}}", f"{y}").replace(f"{{T{d}}}", f"{y + 12}")
    title = title.replace("&", "&amp;").replace("<", "&lt;")
    svg.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
                   f'font-family="monospace"><text x="5" y="16" font-size="14">{title}</text>\n{body}\n</svg>\n')


if __name__ == "__main__":
    sys.exit(main())
