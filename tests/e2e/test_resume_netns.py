"""Resume (issue 15, docs/protocol.md §10) end to end in network namespaces, with real gateways.

The 4-ha picture of ``netns_topology.py`` (cloud1, cloud2 in a cluster; onprem1, onprem2 dialing
both; an echo server behind each service; nginx in front of the members when asked for), every
gateway with ``ping_interval`` 1 s, ``ping_timeout`` 3 s and the default ``resume_timeout`` (30 s).

1. The network breaks every tunnel while 100 paced transfers run, 50 through service A (client in
   the root namespace -> a member's client port -> tunnel -> on-prem gateway -> echo server) and 50
   through service B (client -> an on-prem gateway's client port -> tunnel -> member -> echo
   server). The breaks: (a) every tunnel connection reset (``ss -K`` inside the on-prem hosts),
   (b) a 5 s blackhole between the on-prem and the cloud hosts (longer than ping_timeout, so both
   ends see silence), (c) the nginx load balancer that the on-prem gateways dial through is
   restarted. Each time: every transfer is byte-exact (SHA-256), no stream is reset, no
   ``stream.resume_failed``, both ends of every stream log ``stream.resumed``; the gaps are printed.
2. An end gateway is SIGKILLed: the gateway at the stream's other end resets the stream within
   ping_timeout + 1 s (protocol §10.4: a connection closed by the network waits at most
   ping_timeout), not after resume_timeout, and logs ``stream.resume_failed``.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from tests.support.netns import lab_fixture
from tests.support.nginx import SS
from tests.support.timeouts import scaled, wait_until

from .netns_topology import CLOUDS, ONPREMS, PER_MEMBER, TUNNEL_PORT, Topology, Transfer, build

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.netns,
    pytest.mark.needs_root,
    pytest.mark.needs_binary("ip", "nginx", "iptables", "ss"),
]

KiB = 1024
PING_INTERVAL, PING_TIMEOUT = 1.0, 3.0
PING = (f"{PING_INTERVAL:g}s", f"{PING_TIMEOUT:g}s")
RESUME_TIMEOUT = 30.0  # the default: not set in the configs
BLACKHOLE = 5.0  # seconds; longer than PING_TIMEOUT

# The transfers of part 1: paced (CHUNK every PACE seconds, 320 KiB/s each, ~32 MB/s in all each way),
# so that bytes are in flight when the break comes; the last quarter of each waits for the gate, which
# opens once the break is injected, so every transfer spans the break whatever the machine's speed.
# The break comes once every transfer has MOVED bytes back: past ACK_EVERY (512 KiB, protocol §10.3),
# so both ends have ACKed and trimmed what they keep, and the replay starts inside a trimmed buffer.
N_PER_SERVICE = 50
SIZE = 1536 * KiB
CHUNK = 16 * KiB
PACE = 0.05
GATE_AT = 0.75
MOVED = 640 * KiB


@pytest.fixture
def lab():
    yield from lab_fixture()


@pytest.fixture
def topology(lab, gateways, tmp_path):
    with contextlib.ExitStack() as stack:
        yield lambda **kw: build(stack, lab, tmp_path, gateways, ping=PING, **kw)


# --- helpers ---------------------------------------------------------------------------------

def _start(topo: Topology, vias: list[str], gate: threading.Event, size: int = SIZE) -> list[Transfer]:
    transfers = []
    for i, via in enumerate(vias):
        tr = Transfer(topo.client_addr(via), size, seed=i, chunk=CHUNK, pace=PACE, gate=gate, gate_at=GATE_AT,
                      label=f"{'A' if via in CLOUDS else 'B'}#{i} via {via}", via=via)
        transfers.append(tr)
        tr.start()
    for tr in transfers:
        assert tr.connected.wait(scaled(10)) and tr.local_port, tr.describe()
    assert len({tr.local_port for tr in transfers}) == len(transfers), "two transfers share a client port"
    try:
        wait_until(lambda: all(tr.received >= MOVED for tr in transfers), 30,
                   what=f"every transfer to have {MOVED} bytes back")
    except AssertionError as exc:
        behind = [tr.describe() for tr in transfers if tr.received < MOVED]
        raise AssertionError(f"{exc}; {len(behind)} behind, e.g. {behind[:5]}") from None
    return transfers


def _client(topo: Topology, tr: Transfer) -> str:
    """How the gateways name ``tr``'s stream (the ``client`` of its log lines, at both ends)."""
    return f"{topo.lab.root_ip}:{tr.local_port}"


def _ends(topo: Topology, names=(*CLOUDS, *ONPREMS)) -> dict[str, set[str]]:
    """client -> the gateways holding a local end (not a relay) of that stream now."""
    ends: dict[str, set[str]] = {}
    for n in names:
        for s in topo.status(n)["streams"]:
            if s["side"] in ("accept", "connect"):
                ends.setdefault(s["client"], set()).add(n)
    return ends


def _records(topo: Topology, marks: dict[str, int], event: str) -> list[dict]:
    return [dict(r, gw=n) for n, gw in topo.gws.items() for r in gw.log_lines(since=marks[n])
            if r.get("event") == event]


def _pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))]


def _reset_tunnels(topo: Topology) -> str:
    """(a) The kernel aborts every tunnel connection of both on-prem hosts (the gateway sees
    ECONNABORTED, the member a TCP reset): what a WAN blip or a middlebox does."""
    out = []
    for o in ONPREMS:
        killed = topo.hosts[o].run([SS, "-K", "-tn", "dport", "=", f":{TUNNEL_PORT}"]).stdout
        n = sum(1 for line in killed.splitlines() if line.startswith("ESTAB"))
        assert n == len(CLOUDS) * PER_MEMBER, f"ss -K in {o} aborted {n} tunnel connections:\n{killed}"
        out.append(f"{o}: {n} reset")
    return ", ".join(out)


def _blackhole(topo: Topology) -> str:
    """(b) Everything between the on-prem and the cloud hosts is dropped, both ways, for BLACKHOLE s."""
    for o in ONPREMS:
        for c in CLOUDS:
            topo.hosts[o].block(topo.hosts[c].ip)
    time.sleep(BLACKHOLE)  # the deliberate outage
    for o in ONPREMS:
        topo.hosts[o].unblock()
    return f"{BLACKHOLE:g}s blackhole"


def _restart_lb(topo: Topology) -> str:
    """(c) nginx stops (SIGTERM: it closes every proxied connection) and starts again."""
    t = time.monotonic()
    topo.lb.stop()
    topo.lb.start()
    topo.lb.wait_ready()
    return f"nginx down {time.monotonic() - t:.2f}s"


BREAKS = {"reset": _reset_tunnels, "blackhole": _blackhole, "lb_restart": _restart_lb}


# --- 1. the network breaks every tunnel ------------------------------------------------------

@pytest.mark.parametrize("kind", list(BREAKS))
def test_streams_survive_the_network_breaking_every_tunnel(topology, kind, capsys):
    """100 paced transfers, 50 per service direction, through a break of every tunnel: all byte-exact,
    none reset, both ends of each stream resumed; the gaps are printed."""
    t_start = time.monotonic()
    if kind == "lb_restart":
        topo = topology(lb_method="least_conn", fail_timeout="1s", onprems_reach_only_lb=True)
    else:
        topo = topology()
    topo.wait_full_coverage()
    if kind == "lb_restart":
        for o in ONPREMS:
            assert {t["url"] for t in topo.status(o)["tunnels"]} == {topo.lb_url}
    for n in (*CLOUDS, *ONPREMS):
        topo.check_path(n)
    marks = {n: gw.log_mark() for n, gw in topo.gws.items()}
    gate = threading.Event()
    vias = [CLOUDS[i % 2] for i in range(N_PER_SERVICE)] + [ONPREMS[i % 2] for i in range(N_PER_SERVICE)]
    transfers = _start(topo, vias, gate)
    try:
        at_break = {tr: tr.received for tr in transfers}
        sending = sum(1 for tr in transfers if tr.sent < int(SIZE * GATE_AT))  # not yet waiting for the gate
        early = [tr.describe() for tr in transfers if tr.ended_at is not None]
        assert not early, f"transfers ended before the break: {early}"
        t_break, w_break = time.monotonic(), time.time()  # log lines carry wall-clock times
        what = BREAKS[kind](topo)
        t_healed = time.monotonic()
    finally:
        gate.set()
    for tr in transfers:
        tr.join(max(0.1, t_healed + scaled(60) - time.monotonic()))
    t_done = time.monotonic()

    hung = [tr.describe() for tr in transfers if tr.is_alive()]
    assert not hung, f"{len(hung)} transfers still running 60 s after the {kind}: {hung[:5]}"
    broken = [tr.describe() for tr in transfers if not tr.intact]
    assert not broken, f"{len(broken)} of {len(transfers)} transfers broken by the {kind}: {broken[:5]}"
    assert all(tr.ended_at > t_break for tr in transfers)
    assert all(MOVED <= at_break[tr] < SIZE for tr in transfers)

    failed = _records(topo, marks, "stream.resume_failed")
    assert not failed, f"{len(failed)} stream.resume_failed lines: {failed[:3]}"
    bugs = _records(topo, marks, "internal.error")
    assert not bugs, f"internal errors: {bugs[:3]}"
    clients = {_client(topo, tr) for tr in transfers}
    closed = _records(topo, marks, "stream.closed")
    resets = [r for r in closed if r["client"] in clients and "reset" in r["reason"]]
    assert not resets, f"{len(resets)} streams reset: {resets[:3]}"
    # A member that relayed a RESUME over a tunnel that then broke too resets that relay leg with
    # PATH_LOST (the end tries another path): by design, and not a stream of a client.
    legs = [r for r in closed if r["client"] not in clients and "reset" in r["reason"]]
    assert all("PATH_LOST" in r["reason"] for r in legs), [r["reason"] for r in legs if "PATH_LOST" not in r["reason"]]
    parked = _records(topo, marks, "stream.parked")
    resumed = _records(topo, marks, "stream.resumed")
    per_stream: dict[str, int] = {}
    for r in resumed:
        per_stream[r["client"]] = per_stream.get(r["client"], 0) + 1
    missed = [tr.label for tr in transfers if per_stream.get(_client(topo, tr), 0) < 2]
    assert not missed, (f"{len(missed)} streams did not resume at both ends (the {kind} did not break their "
                        f"path?): {missed[:10]}")
    if kind == "blackhole":  # both ends saw silence, not a closed connection: they wait resume_timeout
        waits = {r["timeout"] for r in parked}
        assert waits == {RESUME_TIMEOUT}, f"parked with timeouts {waits} after a silent blackhole"
    for n in topo.gws:
        wait_until(lambda: topo.status(n)["resume"]["parked"] == 0, 10, what=f"nothing parked on {n}")
    gaps = [r["gap"] for r in resumed]  # from when that end noticed the break and parked
    outage = [r["ts"] - w_break for r in resumed]  # from when the break began
    with capsys.disabled():
        print(f"\n[resume {kind}] {what}; {sending} of {len(transfers)} transfers still sending at the break; "
              f"all {len(transfers)} of {SIZE // KiB} KiB intact; "
              f"{len(per_stream)} streams resumed ({len(resumed)} ends, {sum(1 for r in resumed if r['relayed'])} "
              f"through a relay; {len(parked)} ends parked), "
              f"gap p50 {_pct(gaps, 0.5):.3f}s max {max(gaps):.3f}s (from the break: p50 {_pct(outage, 0.5):.3f}s "
              f"max {max(outage):.3f}s), "
              f"{sum(r['bytes_replayed'] for r in resumed)} bytes replayed, {len(legs)} relay legs lost; "
              f"transfers done {t_done - t_healed:.1f}s after the break ended; test {time.monotonic() - t_start:.1f}s")


# --- 2. an end gateway dies ------------------------------------------------------------------

KILL_TRANSFERS = 12


@pytest.mark.parametrize("victim", ["onprem1", "cloud1"])
def test_killed_end_resets_the_other_end_within_ping_timeout(topology, victim, capsys):
    """SIGKILL the gateway holding the target side of streams (onprem1 for service A, cloud1 for
    service B): the gateway holding the client side parks them (the connection was reset, not
    silent), finds no path to that instance, and resets the client within ping_timeout + 1 s,
    logging stream.resume_failed. Streams whose ends both live complete intact."""
    t_start = time.monotonic()
    topo = topology()
    topo.wait_full_coverage()
    marks = {n: gw.log_mark() for n, gw in topo.gws.items()}
    client_side = CLOUDS if victim in ONPREMS else ONPREMS
    gate = threading.Event()
    transfers = _start(topo, [client_side[i % 2] for i in range(KILL_TRANSFERS)], gate)
    try:
        ends = wait_until(lambda: (e := _ends(topo)) and all(len(e.get(_client(topo, tr), ())) == 2
                                                              for tr in transfers) and e,
                          5, what="both ends of every stream in the status")
        for tr in transfers:
            tr.path = ends[_client(topo, tr)]
        affected = [tr for tr in transfers if victim in tr.path]
        spared = [tr for tr in transfers if victim not in tr.path]
        assert affected and spared, [(tr.label, sorted(tr.path)) for tr in transfers]
        t_kill = time.monotonic()
        topo.gws[victim].kill()
    finally:
        gate.set()
    bound = PING_TIMEOUT + scaled(1.0)
    for tr in affected:
        tr.join(max(0.1, t_kill + scaled(bound + 5) - time.monotonic()))
    hung = [tr.describe() for tr in affected if tr.is_alive()]
    assert not hung, f"streams whose end {victim} died still run {bound + 5:g}s later: {hung}"
    took = {tr: tr.ended_at - t_kill for tr in affected}
    slow = [f"{tr.label}: {took[tr]:.2f}s" for tr in affected if took[tr] > bound]
    assert not slow, (f"the client side reset streams whose far end {victim} was killed only after more than "
                      f"ping_timeout + 1 = {bound:g}s (resume_timeout {RESUME_TIMEOUT:g}s): {slow}")
    # A TCP reset is reported once, to whichever of the client's reader and writer threads calls first
    # (the other then sees EOF or EPIPE): the error of either counts.
    not_reset = [tr.describe() for tr in affected
                 if tr.intact or "ConnectionResetError" not in f"{tr.recv_end} {tr.error}"]
    assert not not_reset, f"clients not reset: {not_reset}"
    for tr in affected:
        survivor = next(iter(tr.path - {victim}))
        rec = topo.gws[survivor].wait_log(lambda r: r.get("event") == "stream.resume_failed"
                                          and r.get("client") == _client(topo, tr), since=marks[survivor], timeout=2)
        assert rec["peer_node"] == victim, rec
        # why it took no longer: the survivor saw the connection reset, not silence (protocol §10.4)
        parked = [r for r in topo.gws[survivor].log_lines(since=marks[survivor])
                  if r.get("event") == "stream.parked" and r.get("client") == _client(topo, tr)]
        assert [r["timeout"] for r in parked] == [min(PING_TIMEOUT, RESUME_TIMEOUT)], parked
    for tr in spared:
        tr.join(max(0.1, t_kill + scaled(60) - time.monotonic()))
    broken = [f"{tr.describe()} ends {sorted(tr.path)}" for tr in spared if tr.is_alive() or not tr.intact]
    assert not broken, f"streams whose ends both live were damaged by the death of {victim}: {broken}"
    with capsys.disabled():
        t = sorted(took.values())
        print(f"\n[kill {victim}] {len(affected)} streams with an end on {victim} reset at the client after "
              f"{t[0]:.2f}..{t[-1]:.2f}s (bound {bound:g}s), {len(spared)} others intact; "
              f"test {time.monotonic() - t_start:.1f}s")


# --- 3. the relay dies, both ends live --------------------------------------------------------

RELAYED_TRANSFERS = 12


def test_streams_through_a_killed_relay_resume_on_a_direct_tunnel(topology, capsys):
    """protocol §10 (a killed relay): the on-prem gateways reach only cloud2 at first, so service-A
    clients of cloud1 are relayed over the peer link to cloud2 and its tunnels. Then cloud1 becomes
    reachable (the on-prem gateways dial it; the relayed streams stay relayed) and cloud2, the relay,
    is SIGKILLed: both ends live, so every stream resumes on a direct tunnel, byte-exact, none reset."""
    t_start = time.monotonic()

    def unreachable_cloud1(hosts) -> None:
        for o in ONPREMS:
            hosts[o].block(hosts["cloud1"].ip, reject=True)

    topo = topology(before_start=unreachable_cloud1)
    topo.wait_full_coverage(clouds=("cloud2",))
    marks = {n: gw.log_mark() for n, gw in topo.gws.items()}
    gate = threading.Event()
    transfers = _start(topo, ["cloud1"] * RELAYED_TRANSFERS, gate)
    try:
        relayed = {s["client"] for s in topo.status("cloud1")["streams"] if s["side"] == "accept" and s["relay"]}
        assert relayed == {_client(topo, tr) for tr in transfers}, "cloud1's clients are not all relayed"
        for o in ONPREMS:
            topo.hosts[o].unblock(topo.hosts["cloud1"].ip)
        topo.wait_full_coverage()
        assert {s["client"] for s in topo.status("cloud1")["streams"] if s["side"] == "accept" and s["relay"]} \
            == relayed, "relayed streams moved before the relay died"
        early = [tr.describe() for tr in transfers if tr.ended_at is not None]
        assert not early, f"transfers ended before the relay died: {early}"
        t_kill, w_kill = time.monotonic(), time.time()
        topo.gws["cloud2"].kill()
    finally:
        gate.set()
    for tr in transfers:
        tr.join(max(0.1, t_kill + scaled(60) - time.monotonic()))
    broken = [tr.describe() for tr in transfers if tr.is_alive() or not tr.intact]
    assert not broken, f"{len(broken)} relayed transfers broken by the death of the relay: {broken[:5]}"
    failed = _records(topo, marks, "stream.resume_failed")
    assert not failed, failed[:3]
    resumed = _records(topo, marks, "stream.resumed")
    for tr in transfers:
        ends = {r["gw"] for r in resumed if r["client"] == _client(topo, tr)}
        assert "cloud1" in ends and len(ends) == 2, f"{tr.label} resumed at {ends}, not at both its ends"
    assert not any(r["relayed"] for r in resumed), "resumed through a relay although cloud1 has its own tunnels"
    gaps = [r["gap"] for r in resumed]
    outage = [r["ts"] - w_kill for r in resumed]
    with capsys.disabled():
        print(f"\n[relay killed] {len(transfers)} relayed transfers intact, resumed on direct tunnels: gap p50 "
              f"{_pct(gaps, 0.5):.3f}s max {max(gaps):.3f}s (from the kill: max {max(outage):.3f}s), "
              f"{sum(r['bytes_replayed'] for r in resumed)} bytes replayed; test {time.monotonic() - t_start:.1f}s")
