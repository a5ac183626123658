"""Configs for a cloud gateway and an on-prem gateway on loopback, as the KWIC 1-simple and 2-tls
tutorials lay them out: service A (cloud accepts, on-prem connects) and service B (the mirror)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from intercloud.certs import init_certs
from tests.support.ports import free_ports


@dataclass
class Pair:
    certs: Path
    tunnel_port: int
    cloud_admin: int
    onprem_admin: int
    a_port: int  # cloud-side accept port of service A
    b_port: int  # on-prem-side accept port of service B
    insecure: bool = False
    extra_cloud: str = ""
    extra_onprem_tunnel: str = ""
    per_member: int = 1
    server_name: str = "localhost"
    onprem_cert: str | None = None  # None: each on-prem gateway's own certificate, named like its node id
    cloud_services: list[str] = field(default_factory=list)
    onprem_services: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{'ws' if self.insecure else 'wss'}://{self.server_name}:{self.tunnel_port}/intercloud"

    def _tls(self, cert: str) -> str:
        if self.insecure:
            return "[tls]\ninsecure = true\n"
        return (f'[tls]\ncert = "{self.certs}/{cert}.pem"\nkey = "{self.certs}/{cert}.key"\n'
                f'ca = "{self.certs}/ca.pem"\n')

    def cloud_config(self) -> str:
        return (f'[gateway]\nrole = "cloud"\nnode_id = "cloud1"\nadmin = "127.0.0.1:{self.cloud_admin}"\n'
                f'route_wait = "2s"\n{self.extra_cloud}\n'
                f'{self._tls("cloud1")}\n'
                f'[tunnel]\nlisten = "{"ws" if self.insecure else "wss"}://127.0.0.1:{self.tunnel_port}/intercloud"\n'
                f'ping_interval = "1s"\nping_timeout = "4s"\n\n' + "\n".join(self.cloud_services) + "\n")

    def onprem_config(self, name: str = "onprem1", admin: int | None = None, b_port: int | None = None) -> str:
        """An on-prem gateway with node id ``name``. Its certificate names it (the cloud admits only a
        node id its certificate names, protocol §5.4); one is issued from the pair's CA if need be."""
        cert = self.onprem_cert or name
        if not self.insecure and not (self.certs / f"{cert}.pem").exists():
            init_certs(self.certs, cloud=[], onprem=[cert])
        return (f'[gateway]\nrole = "onprem"\nnode_id = "{name}"\nadmin = "127.0.0.1:{admin or self.onprem_admin}"\n'
                f'route_wait = "2s"\n\n{self._tls(cert)}\n'
                f'[tunnel]\nconnect = ["{self.url}"]\nper_member = {self.per_member}\n'
                f'ping_interval = "1s"\nping_timeout = "4s"\nreconnect_min = "100ms"\nreconnect_max = "1s"\n'
                f'{self.extra_onprem_tunnel}\n' + "\n".join(self.onprem_services) + "\n")


def service(name: str, *, accept: int | None = None, connect: int | None = None) -> str:
    if accept is not None:
        return f'[[service]]\nname = "{name}"\naccept = "tcp://127.0.0.1:{accept}"\n'
    return f'[[service]]\nname = "{name}"\nconnect = "tcp://127.0.0.1:{connect}"\n'


def make_pair(tmp_path: Path, *, a_target: int, b_target: int, insecure: bool = False, **kw) -> Pair:
    certs = tmp_path / "certs"
    if not insecure:
        init_certs(certs, cloud=["cloud1"], onprem=["onprem1", "onprem2"])
    tunnel, cadmin, oadmin, a, b = free_ports(5)
    p = Pair(certs=certs, tunnel_port=tunnel, cloud_admin=cadmin, onprem_admin=oadmin, a_port=a, b_port=b,
             insecure=insecure, **kw)
    p.cloud_services = [service("serviceA", accept=p.a_port), service("serviceB", connect=b_target)]
    p.onprem_services = [service("serviceA", connect=a_target), service("serviceB", accept=p.b_port)]
    return p
