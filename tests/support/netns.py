"""A private multi-host IPv4 network made of Linux network namespaces, for HA tests.

Why: high availability is about hosts failing *separately*: a cloud member that vanishes without
a FIN or RST, an on-prem site that can reach the load balancer but not the members behind it.
Loopback cannot express that. A :class:`Lab` builds a small L2 network on this machine instead:

* one Linux bridge (``icbrXXXX``) and a /24 picked to collide with no existing route;
* the root namespace (the test process) holds ``.1`` on the bridge, so the test reaches every
  host directly (admin endpoints bound on host IPs, nginx, servers);
* :meth:`Lab.host` adds a namespace (``icXXXX-NAME``) with a veth into the bridge, the next
  address, ``lo`` up and a default route via ``.1``;
* per host, iptables in that namespace give a *silent* partition (:meth:`Host.partition`,
  packets dropped both ways, no RST/FIN/ICMP) and per-peer blocks (:meth:`Host.block`).

Processes run inside a host through ``host.argv_prefix`` (``ip netns exec NS``), e.g.
``Gateway(..., argv_prefix=host.argv_prefix)`` or :meth:`Host.spawn`. In-process servers
(``servers.EchoServer`` ...) run inside a host when created under ``with host.entered():``
(their thread, and every socket it makes, stays in that namespace).

Teardown (even after failures, and via ``atexit`` for interrupted runs) kills every process
left in the lab's namespaces (SIGTERM, then SIGKILL), deletes the veths, namespaces, bridge
and the root-namespace FORWARD rule. Each lab records itself in ``/run/intercloud-netns``; a
lab whose owning process died without cleaning up (SIGKILLed pytest) is removed by the next
:class:`Lab` created on the machine.

Needs root and iproute2 (+ iptables for partition/block). Without permission the ``lab``
fixture skips with the reason.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterator, Sequence

from . import procs
from .markers import find_binary
from .timeouts import scaled, wait_until

__all__ = ["Lab", "Host", "LabUnavailable", "CommandFailed", "lab_fixture", "cleanup_stale_labs"]

STATE_DIR = Path("/run/intercloud-netns")
NETNS_ETC = Path("/etc/netns")  # per-namespace /etc files that `ip netns exec` mounts
_LOCK_FILE = STATE_DIR / ".lock"
IP = find_binary("ip") or "/usr/sbin/ip"
IPTABLES = find_binary("iptables") or "/usr/sbin/iptables"
IPTABLES_RESTORE = find_binary("iptables-restore") or "/usr/sbin/iptables-restore"
_CLONE_NEWNET = 0x40000000
_IFNAMSIZ = 15


class LabUnavailable(RuntimeError):
    """Network namespaces cannot be used here (not root, no iproute2, no permission)."""


class CommandFailed(subprocess.CalledProcessError):
    """A command exited non-zero; unlike the base class, ``str()`` shows its output."""

    def __str__(self) -> str:
        out = (self.stdout or "").strip() if isinstance(self.stdout, str) else self.stdout
        err = (self.stderr or "").strip() if isinstance(self.stderr, str) else self.stderr
        return f"{super().__str__()}\nstdout: {out!r}\nstderr: {err!r}"


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
         **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output, a scaled timeout and a readable failure."""
    kwargs.setdefault("capture_output", True)
    if "input" not in kwargs or isinstance(kwargs.get("input"), str):
        kwargs.setdefault("text", True)
    proc = subprocess.run(list(argv), timeout=scaled(timeout), **kwargs)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, list(argv), proc.stdout, proc.stderr)
    return proc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([IP, *args], check=check)


# --- setns for threads of the test process ----------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


# --- process helpers -------------------------------------------------------------------------

def _proc_start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (field 22 of /proc/PID/stat), None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = stat[stat.rfind(b")") + 2:].split()
    return int(rest[19])


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2:].split()[0] in (b"Z", b"X")


def _ns_pids(ns: str) -> list[int]:
    """Live (non-zombie) processes in namespace ``ns``, never this process."""
    res = _ip("netns", "pids", ns, check=False)
    if res.returncode != 0:
        return []
    pids = [int(p) for p in res.stdout.split() if p.isdigit()]
    return [p for p in pids if p != os.getpid() and not _is_zombie(p)]


def _kill_ns_processes(ns: str, grace: float) -> list[int]:
    """SIGTERM everything in ``ns``, wait ``grace`` (nominal), SIGKILL the rest. Returns pids."""
    victims = _ns_pids(ns)
    if not victims:
        return []
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not _ns_pids(ns), grace, interval=0.02)
    for pid in _ns_pids(ns):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _ns_pids(ns), 5.0, interval=0.02,
               what=f"processes in netns {ns} to die after SIGKILL")
    return victims


# --- machine-wide bookkeeping ----------------------------------------------------------------

@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """Serialise subnet/name choice and stale cleanup between concurrent test runs."""
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(_LOCK_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _destroy(state: dict) -> list[str]:
    """Remove everything a lab state record names; returns error messages (never raises)."""
    errors: list[str] = []
    namespaces = state.get("namespaces", [])
    for ns in namespaces:
        try:
            _kill_ns_processes(ns, grace=state.get("grace", 3.0))
        except Exception as exc:  # noqa: BLE001 - teardown collects, never stops early
            errors.append(f"killing processes in {ns}: {exc}")
    for veth in state.get("veths", []):
        res = _ip("link", "del", veth, check=False)
        if res.returncode != 0 and "Cannot find device" not in res.stderr:
            errors.append(f"ip link del {veth}: {res.stderr.strip()}")
    for ns in namespaces:
        res = _ip("netns", "del", ns, check=False)
        if res.returncode != 0 and "No such file" not in res.stderr:
            errors.append(f"ip netns del {ns}: {res.stderr.strip()}")
        etc = NETNS_ETC / ns  # Host.set_hosts_file; `ip netns del` leaves it
        try:
            if etc.is_dir():
                shutil.rmtree(etc)
        except OSError as exc:
            errors.append(f"removing {etc}: {exc}")
    bridge = state.get("bridge")
    if bridge:
        res = _ip("link", "del", bridge, check=False)
        if res.returncode != 0 and "Cannot find device" not in res.stderr:
            errors.append(f"ip link del {bridge}: {res.stderr.strip()}")
    rule = state.get("forward_rule")
    if rule:
        res = _run([IPTABLES, "-w", "-D", *rule], check=False)
        if res.returncode != 0 and "does a matching rule exist" not in res.stderr \
                and "Bad rule" not in res.stderr:
            errors.append(f"iptables -D {' '.join(rule)}: {res.stderr.strip()}")
    return errors


def cleanup_stale_labs() -> list[str]:
    """Remove labs whose owning process is gone (crashed or SIGKILLed runs). Returns their ids."""
    removed = []
    if not STATE_DIR.is_dir():
        return removed
    with _machine_lock():
        for path in STATE_DIR.glob("*.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            if _proc_start_time(state.get("pid", -1)) == state.get("start_time"):
                continue  # owner still running: not ours to touch
            _destroy(state)
            path.unlink(missing_ok=True)
            removed.append(state.get("id", path.stem))
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    res = _ip("-4", "-j", "route", "show", "table", "all", check=False)
    try:
        routes = json.loads(res.stdout or "[]")
    except ValueError:
        routes = []
    for r in routes:
        dst = r.get("dst", "")
        if dst in ("", "default"):
            continue
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(dst, strict=False))
    res = _ip("-4", "-j", "addr", "show", check=False)
    with contextlib.suppress(ValueError):
        for link in json.loads(res.stdout or "[]"):
            for a in link.get("addr_info", []):
                with contextlib.suppress(ValueError, KeyError):
                    nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return [n for n in nets if n.prefixlen > 0]


def _pick_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    used = _used_networks()
    for _ in range(1000):
        net = ipaddress.IPv4Network(f"10.{rng.randint(1, 254)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise LabUnavailable("could not find a free 10.x.y.0/24 subnet")


def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _bridge_calls_iptables() -> bool:
    try:
        return Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip() == "1"
    except OSError:
        return False


_probe_result: list[str | None] = []  # cached: None = usable, else the reason


def _check_usable() -> None:
    if os.geteuid() != 0:
        raise LabUnavailable("network namespaces need root (run as root or in CI)")
    if not find_binary("ip"):
        raise LabUnavailable("needs iproute2 ('ip') installed")
    if not _probe_result:
        # Creating a bridge needs CAP_NET_ADMIN, `ip netns add` also needs to mount: probe
        # once so a lab without permission skips up front instead of failing in lab.host().
        ns = f"icprobe-{os.getpid()}"
        res = _ip("netns", "add", ns, check=False)
        if res.returncode == 0:
            _ip("netns", "del", ns, check=False)
            _probe_result.append(None)
        else:
            _probe_result.append(f"cannot create network namespaces (ip netns add): "
                                 f"{res.stderr.strip()}")
    if _probe_result[0]:
        raise LabUnavailable(_probe_result[0])


# --- hosts -----------------------------------------------------------------------------------

class Host:
    """One namespace on the lab network. Create with :meth:`Lab.host`."""

    iface = "eth0"

    def __init__(self, lab: "Lab", name: str, ns: str, ip: str, veth: str) -> None:
        self.lab = lab
        self.name = name
        self.ns = ns
        self.ip = ip
        self.veth = veth  # root-namespace end of the veth pair (a bridge port)
        self._partitioned = False
        self._allow: tuple[str, ...] = ()
        self._blocked: dict[str, bool] = {}  # ip -> reject?

    # -- running things -----------------------------------------------------------------

    @property
    def argv_prefix(self) -> list[str]:
        """Prefix a command with this to run it in the host: ``["ip","netns","exec",NS]``."""
        return [IP, "netns", "exec", self.ns]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
            **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run`` inside the host. Output is captured (text unless ``input`` is
        bytes); ``timeout`` is nominal; with ``check`` a failure raises :class:`CommandFailed`
        (a CalledProcessError whose message includes stdout/stderr)."""
        return _run([*self.argv_prefix, *argv], check=check, timeout=timeout, **kwargs)

    def spawn(self, argv: Sequence[str], *, title: str | None = None, **popen_kwargs) -> procs.Tracked:
        """Start a tracked background process inside the host (see ``procs.spawn``)."""
        return procs.spawn([*self.argv_prefix, *argv], title=title or f"{self.name}: {argv[0]}",
                           **popen_kwargs)

    def set_hosts_file(self, entries: dict[str, list[str]]) -> None:
        """Give processes started in this host (``ip netns exec``) their own /etc/hosts:
        ``{name: [ip, ...]}``, one line per address (so a name can resolve to several, like DNS
        round robin). ``ip netns exec`` bind-mounts /etc/netns/NS/hosts over /etc/hosts; threads
        switched in with :meth:`entered` still see the machine's file. Removed with the lab."""
        etc = NETNS_ETC / self.ns
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{ip} {name}" for name, ips in entries.items() for ip in ips]
        (etc / "hosts").write_text("\n".join(lines) + "\n")

    def pids(self) -> list[int]:
        """Processes currently running in this host's namespace."""
        return _ns_pids(self.ns)

    @contextlib.contextmanager
    def entered(self) -> Iterator["Host"]:
        """Switch the *calling thread* into this namespace for the ``with`` block.

        Sockets made inside stay in the namespace afterwards, and threads started inside
        stay in it for good; so ``with host.entered(): srv = EchoServer(host.ip)`` runs an
        in-process server on this host. Not for use across ``await`` points.
        """
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
            try:
                _setns(target)
                try:
                    yield self
                finally:
                    _setns(own)
            finally:
                os.close(target)
        finally:
            os.close(own)

    def create_connection(self, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
        """A TCP connection made from this host (``timeout`` nominal, also set on the socket)."""
        with self.entered():
            return socket.create_connection(address, timeout=scaled(timeout))

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """An unconnected socket that lives in this host's namespace."""
        with self.entered():
            return socket.socket(family, type)

    # -- failures -----------------------------------------------------------------------

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    @property
    def blocked(self) -> frozenset[str]:
        return frozenset(self._blocked)

    def partition(self, *, allow: Sequence[str] = ()) -> None:
        """Silently cut the host off: DROP all INPUT and OUTPUT except loopback (and the
        addresses in ``allow``, e.g. ``lab.root_ip`` to keep the test's admin access).
        Established connections stall (no RST/FIN); new ones time out, never refused."""
        self._partitioned = True
        self._allow = tuple(allow)
        self._apply_rules()

    def heal(self) -> None:
        """Undo :meth:`partition` (blocks stay). Stalled TCP connections resume on their
        next retransmission."""
        self._partitioned = False
        self._allow = ()
        self._apply_rules()

    def block(self, ip: str, *, reject: bool = False) -> None:
        """Stop traffic between this host and ``ip`` (both directions). Silent DROP by
        default; with ``reject`` this host's own connects to ``ip`` fail fast instead
        (TCP RST / ICMP unreachable generated locally)."""
        self._blocked[str(ipaddress.ip_address(ip))] = reject
        self._apply_rules()

    def unblock(self, ip: str | None = None) -> None:
        """Undo :meth:`block` for ``ip`` (all blocks if None)."""
        if ip is None:
            self._blocked.clear()
        else:
            self._blocked.pop(str(ipaddress.ip_address(ip)), None)
        self._apply_rules()

    def rules(self) -> str:
        """This host's filter table (``iptables -S``), for debugging."""
        return self.run([IPTABLES, "-w", "-S"]).stdout

    def _apply_rules(self) -> None:
        # The whole filter table is owned by the lab: rebuild it atomically from our state.
        lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
                 "-A INPUT -i lo -j ACCEPT", "-A OUTPUT -o lo -j ACCEPT"]
        for ip, reject in self._blocked.items():
            lines.append(f"-A INPUT -s {ip}/32 -j DROP")
            if reject:
                lines.append(f"-A OUTPUT -d {ip}/32 -p tcp -j REJECT --reject-with tcp-reset")
                lines.append(f"-A OUTPUT -d {ip}/32 -j REJECT --reject-with icmp-host-unreachable")
            else:
                lines.append(f"-A OUTPUT -d {ip}/32 -j DROP")
        if self._partitioned:
            for ip in self._allow:
                lines.append(f"-A INPUT -s {ip}/32 -j ACCEPT")
                lines.append(f"-A OUTPUT -d {ip}/32 -j ACCEPT")
            lines += ["-A INPUT -j DROP", "-A OUTPUT -j DROP"]
        lines.append("COMMIT")
        self.run([IPTABLES_RESTORE, "-w"], input="\n".join(lines) + "\n")

    def __repr__(self) -> str:
        flags = " partitioned" if self._partitioned else ""
        flags += f" blocked={sorted(self._blocked)}" if self._blocked else ""
        return f"<Host {self.name} {self.ip} ns={self.ns}{flags}>"


# --- the lab ---------------------------------------------------------------------------------

_live_labs: "set[Lab]" = set()
_live_lock = threading.Lock()


class Lab:
    """A private L2 network: one bridge, a /24, the root namespace at ``.1``, hosts added by
    :meth:`host`. Use as a context manager (or the ``lab`` fixture); :meth:`close` is
    idempotent and tears everything down even after partial setup.

    ``grace`` (nominal seconds) is how long processes still running in the namespaces at
    teardown get between SIGTERM and SIGKILL.
    """

    def __init__(self, *, grace: float = 3.0, subnet: str | None = None) -> None:
        self.grace = grace
        self._requested_subnet = subnet
        self.id = ""
        self.bridge = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self.root_ip = ""
        self.hosts: dict[str, Host] = {}
        self.killed_at_teardown: list[int] = []
        self._state: dict | None = None
        self._closed = False

    # -- setup ---------------------------------------------------------------------------

    def __enter__(self) -> "Lab":
        if self._state is not None:  # already set up (e.g. setup() then ``with lab:``)
            return self
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def setup(self) -> "Lab":
        """Create the bridge and subnet (``with Lab() as lab`` calls this)."""
        if self._closed:
            raise RuntimeError("lab is closed")
        if self._state is not None:
            return self
        _check_usable()
        cleanup_stale_labs()
        rng = random.Random()
        with _machine_lock():
            for _ in range(50):
                lab_id = f"{rng.getrandbits(16):04x}"
                if not _link_exists(f"icbr{lab_id}") and not (STATE_DIR / f"{lab_id}.json").exists():
                    break
            else:
                raise LabUnavailable("could not find a free lab id")
            self.id = lab_id
            self.bridge = f"icbr{lab_id}"
            self.subnet = (ipaddress.IPv4Network(self._requested_subnet) if self._requested_subnet
                           else _pick_subnet(rng))
            self.root_ip = str(self.subnet.network_address + 1)
            self._state = {"id": self.id, "pid": os.getpid(), "start_time": _proc_start_time(os.getpid()),
                           "bridge": self.bridge, "subnet": str(self.subnet), "namespaces": [],
                           "veths": [], "forward_rule": None, "grace": self.grace}
            self._save()
            with _live_lock:
                _live_labs.add(self)
            # A fixed MAC: a bridge otherwise takes the lowest port MAC, which changes as hosts
            # join and leaves stale ARP entries for .1 in the hosts.
            mac = "02:1c:" + ":".join(f"{rng.getrandbits(8):02x}" for _ in range(4))
            try:
                _ip("link", "add", self.bridge, "address", mac, "type", "bridge",
                    "forward_delay", "0", "stp_state", "0")
            except CommandFailed as exc:
                raise LabUnavailable(f"cannot create a bridge (ip link add ... type bridge): "
                                     f"{exc.stderr.strip()}") from None
            _ip("addr", "add", f"{self.root_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        # With br_netfilter loaded and bridge-nf-call-iptables=1 bridged frames traverse the
        # root namespace's FORWARD chain; make sure a restrictive policy there (docker sets
        # DROP) cannot cut host-to-host traffic.
        if _bridge_calls_iptables() and find_binary("iptables"):
            rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-m", "comment",
                    "--comment", f"intercloud-lab-{self.id}", "-j", "ACCEPT"]
            self._state["forward_rule"] = rule
            self._save()
            res = _run([IPTABLES, "-w", "-I", *rule], check=False)
            if res.returncode != 0:
                self._state["forward_rule"] = None
                self._save()
        return self

    def _save(self) -> None:
        assert self._state is not None
        path = STATE_DIR / f"{self.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state))
        tmp.replace(path)

    def host(self, name: str) -> Host:
        """Create host ``name`` (unique in this lab): namespace, veth into the bridge, the next
        free address, lo up, default route via :attr:`root_ip`."""
        if self._state is None or self._closed:
            raise RuntimeError("lab is not set up (use it as a context manager)")
        if name in self.hosts:
            raise ValueError(f"host {name!r} already exists in this lab")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", name):
            raise ValueError(f"bad host name {name!r} (letters, digits, _ . -)")
        index = len(self.hosts) + 2
        if index > self.subnet.num_addresses - 2:
            raise RuntimeError("lab subnet is full")
        ip = str(self.subnet.network_address + index)
        ns = f"ic{self.id}-{name}"
        veth = f"icv{self.id}h{index}"
        assert len(veth) <= _IFNAMSIZ
        self._state["namespaces"].append(ns)
        self._state["veths"].append(veth)
        self._save()
        try:
            _ip("netns", "add", ns)
        except CommandFailed as exc:
            self._state["namespaces"].remove(ns)
            self._save()
            raise LabUnavailable(f"cannot create a network namespace (ip netns add): "
                                 f"{exc.stderr.strip()}") from None
        _ip("link", "add", veth, "type", "veth", "peer", "name", Host.iface, "netns", ns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        pfx = [IP, "-n", ns]
        _run([*pfx, "link", "set", "lo", "up"])
        _run([*pfx, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", Host.iface])
        _run([*pfx, "link", "set", Host.iface, "up"])
        _run([*pfx, "route", "add", "default", "via", self.root_ip])
        host = Host(self, name, ns, ip, veth)
        self.hosts[name] = host
        return host

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Kill processes in the namespaces, delete veths, namespaces, bridge, FORWARD rule.
        Raises (after doing everything it can) if something could not be removed."""
        if self._closed:
            return
        self._closed = True
        with _live_lock:
            _live_labs.discard(self)
        if self._state is None:
            return
        for ns in self._state["namespaces"]:
            with contextlib.suppress(Exception):
                self.killed_at_teardown += _ns_pids(ns)
        errors = _destroy(self._state)
        if not errors:
            (STATE_DIR / f"{self.id}.json").unlink(missing_ok=True)
        else:
            raise RuntimeError(f"lab {self.id} teardown incomplete: " + "; ".join(errors))

    def __repr__(self) -> str:
        return f"<Lab {self.id} {self.bridge} {self.subnet} hosts={list(self.hosts)}>"


def _close_live_labs_at_exit() -> None:
    with _live_lock:
        labs = list(_live_labs)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.close()


atexit.register(_close_live_labs_at_exit)


def lab_fixture() -> Iterator[Lab]:
    """Generator for a pytest fixture: ``lab = pytest.fixture(lab_fixture, name="lab")`` or
    ``@pytest.fixture def lab(): yield from lab_fixture()``. Skips if namespaces are
    unavailable (not root, no iproute2, no permission)."""
    import pytest

    try:
        lab = Lab().__enter__()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield lab
    finally:
        lab.close()
