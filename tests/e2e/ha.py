"""Configs for the 4-ha topology: cloud members in a cluster, on-prem gateways that dial either every
member's URL or only a load balancer. Addresses are parameters so the same builder serves loopback
tests (one IP, many ports) and network-namespace tests (one IP per host)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from intercloud.certs import init_certs


@dataclass
class Addr:
    ip: str
    port: int


@dataclass
class HA:
    certs: Path
    clouds: dict[str, dict[str, Addr]]  # name -> {"tunnel", "peer", "client", "admin"}
    onprems: dict[str, dict[str, Addr]]  # name -> {"client", "admin"}
    echo_a: Addr  # service A's server (on-prem side)
    echo_b: Addr  # service B's server (cloud side)
    connect_urls: list[str] = field(default_factory=list)  # what on-prem gateways dial
    advertise: bool = False  # members advertise their own URLs
    per_member: int = 2
    route_wait: str = "3s"
    ping: tuple[str, str] = ("500ms", "2s")
    drain_timeout: str = "10s"
    extra_onprem_tunnel: str = ""
    peers_name: str | None = None  # cluster.peers is this one name (it resolves to every member)

    def cloud_config(self, name: str, peer_names: list[str] | None = None) -> str:
        c = self.clouds[name]
        peers = ", ".join(f'"wss://{o["peer"].ip}:{o["peer"].port}/cluster"' for o in self.clouds.values())
        if self.peers_name:
            peers = f'"wss://{self.peers_name}:{c["peer"].port}/cluster"'  # every member: the same port
        adv = f'advertise = "wss://{c["tunnel"].ip}:{c["tunnel"].port}/intercloud"\n' if self.advertise else ""
        names = ", ".join(f'"{n}"' for n in (peer_names or list(self.clouds)))
        return f"""[gateway]
role = "cloud"
node_id = "{name}"
admin = "{c['admin'].ip}:{c['admin'].port}"
route_wait = "{self.route_wait}"
drain_timeout = "{self.drain_timeout}"

[tls]
cert = "{self.certs}/{name}.pem"
key = "{self.certs}/{name}.key"
ca = "{self.certs}/ca.pem"

[tunnel]
listen = "wss://{c['tunnel'].ip}:{c['tunnel'].port}/intercloud"
ping_interval = "{self.ping[0]}"
ping_timeout = "{self.ping[1]}"
reconnect_min = "100ms"
reconnect_max = "1s"

[cluster]
listen = "wss://{c['peer'].ip}:{c['peer'].port}/cluster"
peers = [{peers}]
{adv}ca = "{self.certs}/cluster-ca.pem"
cert = "{self.certs}/cluster/{name}.pem"
key = "{self.certs}/cluster/{name}.key"
peer_names = [{names}]
member_ttl = "6s"

[[service]]
name = "serviceA"
accept = "tcp://{c['client'].ip}:{c['client'].port}"

[[service]]
name = "serviceB"
connect = "tcp://{self.echo_b.ip}:{self.echo_b.port}"
"""

    def onprem_config(self, name: str) -> str:
        o = self.onprems[name]
        urls = ", ".join(f'"{u}"' for u in self.connect_urls)
        return f"""[gateway]
role = "onprem"
node_id = "{name}"
admin = "{o['admin'].ip}:{o['admin'].port}"
route_wait = "{self.route_wait}"
drain_timeout = "{self.drain_timeout}"

[tls]
cert = "{self.certs}/{name}.pem"
key = "{self.certs}/{name}.key"
ca = "{self.certs}/ca.pem"

[tunnel]
connect = [{urls}]
per_member = {self.per_member}
ping_interval = "{self.ping[0]}"
ping_timeout = "{self.ping[1]}"
reconnect_min = "100ms"
reconnect_max = "1s"
{self.extra_onprem_tunnel}
[[service]]
name = "serviceA"
connect = "tcp://{self.echo_a.ip}:{self.echo_a.port}"

[[service]]
name = "serviceB"
accept = "tcp://{o['client'].ip}:{o['client'].port}"
"""


def make_certs(directory: Path, clouds: list[str], onprems: list[str], sans: list[str]) -> Path:
    """Tunnel PKI (cloud server certs name every address in ``sans``) and a separate cluster PKI."""
    init_certs(directory, cloud=clouds, onprem=onprems, sans=sans)
    cluster = directory / "cluster"
    init_certs(cluster, cloud=clouds, onprem=[])
    (directory / "cluster-ca.pem").write_bytes((cluster / "ca.pem").read_bytes())
    return directory
