"""The rules that relate keys of a gateway configuration to each other.

:mod:`intercloud.config.load` validates each section on its own first (:mod:`.model`), then runs
these rules on the sections that passed: role-specific keys, TLS files and their contents, tenants,
the cluster, duplicate names, what a gateway announces, conflicting listeners. A rule whose inputs
are broken is skipped, since its input already has a problem reported (see :meth:`Rules.ok`).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import socket
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from .. import certs, revocation
from ..transport import sockopts
from ..transport.tls import certificate_names
from .fields import default_node_id
from .model import ClusterConfig, GatewayConfig, Service, TlsConfig, TunnelConfig
from .units import format_duration, format_size
from .values import HostPort, WsUrl

__all__ = ["EXPIRY_WARNING", "Problem", "Rules"]

#: (key path, message), e.g. ("tunnel.ping_timeout", "must be longer than ...").
Problem = tuple[str, str]

#: A certificate that expires within this time gets a warning.
EXPIRY_WARNING = _dt.timedelta(days=30)


class Rules:
    """Collects problems and warnings while validating one configuration, and holds the rules that
    relate keys to each other. The loader's checker subclasses it and decides which rules run, and
    in which order."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self._reported: set[str] = set()  # key paths that already have a problem
        self._broken: set[str] = set()  # key paths whose value failed validation
        self._leaf: x509.Certificate | None = None  # the certificate of tls.cert, once loaded

    # -- bookkeeping -------------------------------------------------------------------------

    def problem(self, key: str, message: str) -> None:
        self.problems.append((key, message))
        self._reported.add(key)

    def warn(self, key: str, message: str) -> None:
        self.warnings.append((key, message))

    def ok(self, *keys: str) -> bool:
        """True if none of ``keys`` failed to validate (rules skip inputs that are already wrong)."""
        return not any(key in self._broken for key in keys)

    # -- rules -------------------------------------------------------------------------------

    def _check_tenants(self, role: str, tenants: list, services: list, tls: TlsConfig) -> None:
        """Issue 3: tenants come from client certificates, so they need verified mutual TLS."""
        if not tenants:
            for i, svc in enumerate(services):
                if svc is not None and svc.tenant is not None:
                    self.problem(f"service[{i}].tenant", f"service {svc.name!r} names tenant {svc.tenant!r} but "
                                 "there is no [[tenant]] table; add one or remove the key")
            return
        if role != "cloud":
            self.problem("tenant", "[[tenant]] tables belong in a cloud gateway's config; the cloud derives "
                         "an on-prem gateway's tenant from its certificate")
            return
        if tls.insecure:
            self.problem("tls.insecure", "tenants are identified by client certificates; plain ws:// cannot "
                         "carry them. Remove tls.insecure or the [[tenant]] tables")
        if not tls.verify_client:
            self.problem("tls.verify_client", "tenants are identified by verified client certificates; "
                         "set tls.verify_client = true (the default) or remove the [[tenant]] tables")
        seen: dict[str, int] = {}
        for i, t in enumerate(tenants):
            if t is None:
                continue
            if t.name in seen:
                self.problem(f"tenant[{i}].name", f"duplicate tenant {t.name!r}, already tenant[{seen[t.name]}]")
            seen.setdefault(t.name, i)
            if not (t.client_cn or t.client_san or t.client_fingerprint):
                self.problem(f"tenant[{i}]", f"tenant {t.name!r} has no client_cn, client_san or "
                             "client_fingerprint, so no certificate can belong to it")
        for i, svc in enumerate(services):
            if svc is None:
                continue
            if svc.tenant is None:
                self.problem(f"service[{i}].tenant", f"service {svc.name!r} needs tenant = \"...\" "
                             f"(one of: {', '.join(sorted(seen))}); with [[tenant]] tables every service has one")
            elif svc.tenant not in seen:
                self.problem(f"service[{i}].tenant", f"unknown tenant {svc.tenant!r} (known: {', '.join(sorted(seen))})")

    def _check_gateway(self, gw: GatewayConfig) -> None:
        if (
            gw.admin is not None
            and not gw.admin.is_loopback
            and gw.admin_token is None
            and self.ok("gateway.admin_token")
        ):
            self.problem(
                "gateway.admin",
                f"admin endpoint on {gw.admin} is reachable from the network; set gateway.admin_token "
                f"or bind to 127.0.0.1:{gw.admin.port}",
            )
        if gw.admin is None and gw.admin_token is not None and self.ok("gateway.admin"):
            self.warn("gateway.admin_token", "set but gateway.admin is not, so there is no admin endpoint to protect")
        if gw.audit_log is not None and self.ok("gateway.audit_log"):
            self._check_audit_log(gw.audit_log)

    def _check_audit_log(self, path: Path) -> None:
        """gateway.audit_log must be a file this process can append to, or one it can create: found
        here rather than by the first record (a startup error) or never (a reload)."""
        key = "gateway.audit_log"
        if path.exists() or path.is_symlink():
            if not path.is_file():
                kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
                self.problem(key, f"{path} is {kind}; give the path of a file to append JSON lines to")
            elif not os.access(path, os.W_OK):
                self.problem(key, f"{path} is not writable by this user (uid {os.geteuid()}); fix its permissions "
                             "or choose another path")
            return
        parent = path.parent
        if not parent.is_dir():
            self.problem(key, f"directory {parent} does not exist; create it (writable by the gateway's user) "
                         "or choose another path")
        elif not os.access(parent, os.W_OK | os.X_OK):
            self.problem(key, f"cannot create {path}: directory {parent} is not writable by this user "
                         f"(uid {os.geteuid()}) or is on a read-only file system; fix it or choose another path")

    def _node_identity(self, gw: GatewayConfig, tls: TlsConfig | None) -> GatewayConfig:
        """gateway.node_id and this gateway's certificate (protocol §5.4). The other side admits only a
        node id that the certificate names, so an on-prem gateway without node_id takes the first name
        of tls.cert (its CN), and a node id that tls.cert does not name is a warning here rather than
        a refused tunnel later. Without a certificate (tls.insecure) the on-prem default is the host
        name. Returns ``gw`` with the default filled in."""
        if not self.ok("gateway.node_id"):
            return gw
        presented = tls is not None and not tls.insecure and tls.cert is not None
        if presented and self._leaf is None:
            return gw  # tls.cert is broken: that problem is reported, and nothing can be checked
        names = certificate_names(self._leaf) if presented else None
        shown_names = ", ".join(repr(n[:80]) for n in (names or [])[:8]) or "none"
        if gw.node_id is None:
            if gw.role == "cloud":
                self.problem(
                    "gateway.node_id",
                    'required for role = "cloud": every cloud member needs a stable, unique node id that '
                    'its certificate names, e.g. node_id = "cloud1"',
                )
                return gw
            node_id = default_node_id(names)
            if node_id is not None:
                return gw.model_copy(update={"node_id": node_id})
            if names is not None:
                self.problem(
                    "gateway.node_id",
                    f"not set, and no name of tls.cert {tls.cert} (CN and DNS names: {shown_names}) is a valid "
                    "node id, so none can be the default; set gateway.node_id (1-64 characters from "
                    "A-Z a-z 0-9 . _ -) and issue a certificate that names it",
                )
            else:
                self.problem(
                    "gateway.node_id",
                    f"the host name {socket.gethostname()[:80]!r} is not a valid node id, so it cannot be "
                    "the default; set gateway.node_id (1-64 characters from A-Z a-z 0-9 . _ -)",
                )
            return gw
        if names is not None and gw.node_id not in names:
            who = ("on-prem gateways refuse this cloud gateway" if gw.role == "cloud"
                   else "a cloud gateway that verifies client certificates refuses this gateway")
            self.warn(
                "gateway.node_id",
                f"{gw.node_id!r} is not a name of tls.cert {tls.cert} (CN and DNS names: {shown_names}); {who} "
                f"(a node id must be a name of the gateway's certificate): set node_id to one of those names, "
                f"or issue a certificate for {gw.node_id!r}",
            )
        return gw

    def _check_role_tunnel(self, role: str, tunnel: TunnelConfig) -> None:
        if role == "cloud":
            if tunnel.listen is None and self.ok("tunnel.listen"):
                self.problem(
                    "tunnel.listen",
                    'required for role = "cloud": the URL on-prem gateways connect to, '
                    'e.g. listen = "wss://0.0.0.0:8443/intercloud"',
                )
            if tunnel.connect:
                self.problem(
                    "tunnel.connect",
                    'only on-prem gateways dial tunnels; remove tunnel.connect or set gateway.role = "onprem"',
                )
            return
        # on-prem
        if tunnel.accept_proxy_protocol:
            self.problem("tunnel.accept_proxy_protocol",
                         "on-prem gateways accept no tunnels; it belongs in the cloud's [tunnel], "
                         "behind the load balancer that sends the header")
        if tunnel.listen is not None:
            self.problem(
                "tunnel.listen",
                "on-prem gateways never listen for tunnels, they only dial out; remove tunnel.listen "
                'or set gateway.role = "cloud"',
            )
        if not tunnel.connect and self.ok("tunnel.connect"):
            self.problem(
                "tunnel.connect",
                'required for role = "onprem": the cloud URL(s) to dial, '
                'e.g. connect = ["wss://cloud.example.com/intercloud"]',
            )
        seen: dict[str, int] = {}
        for i, url in enumerate(tunnel.connect):
            if url.port == 0:
                self.problem(f"tunnel.connect[{i}]", f"port 0 cannot be dialed in {url}; give the cloud gateway's port")
            if str(url) in seen:
                self.problem(
                    f"tunnel.connect[{i}]", f"{url} is listed twice (also tunnel.connect[{seen[str(url)]}]); remove one"
                )
            seen.setdefault(str(url), i)

    def _check_tunnel(self, t: TunnelConfig) -> None:
        self._check_trusted("tunnel", t.accept_proxy_protocol, t.trusted_proxies)
        if t.ping_timeout <= t.ping_interval and self.ok("tunnel.ping_timeout", "tunnel.ping_interval"):
            self.problem(
                "tunnel.ping_timeout",
                f"must be longer than tunnel.ping_interval ({format_duration(t.ping_interval)}), got "
                f"{format_duration(t.ping_timeout)}: a tunnel silent for ping_timeout is declared dead, "
                "so it must allow at least one ping and its answer",
            )
        if t.reconnect_max < t.reconnect_min and self.ok("tunnel.reconnect_max", "tunnel.reconnect_min"):
            self.problem(
                "tunnel.reconnect_max",
                f"must be at least tunnel.reconnect_min ({format_duration(t.reconnect_min)}), got "
                f"{format_duration(t.reconnect_max)}",
            )
        if t.max_frame > t.stream_window and self.ok("tunnel.max_frame", "tunnel.stream_window"):
            self.problem(
                "tunnel.max_frame",
                f"must not exceed tunnel.stream_window ({format_size(t.stream_window)}), got "
                f"{format_size(t.max_frame)}: a frame larger than the window could never be sent",
            )
        if t.max_tunnel_buffer < t.max_frame and self.ok("tunnel.max_tunnel_buffer", "tunnel.max_frame"):
            self.problem(
                "tunnel.max_tunnel_buffer",
                f"must be at least tunnel.max_frame ({format_size(t.max_frame)}), "
                f"got {format_size(t.max_tunnel_buffer)}",
            )
        if self.ok("tunnel.congestion"):
            self._check_congestion(t.congestion)

    def _check_congestion(self, name: str) -> None:
        """Warn when this host's kernel would refuse ``tunnel.congestion`` (the gateway then falls back
        to the kernel's default, transport/sockopts.py). Only where /proc says; the gateway may run on
        another host than ``intercloud check``."""
        if name == sockopts.SYSTEM:
            return
        keep = f'or set congestion = "{sockopts.SYSTEM}" to keep the kernel\'s default'
        available = sockopts.available()
        if available is not None and name not in available:
            self.warn("tunnel.congestion",
                      f'"{name}" is not among the algorithms this kernel has loaded '
                      f"(net.ipv4.tcp_available_congestion_control: {' '.join(available)}); unless the gateway "
                      f"can load it itself (as root or with CAP_NET_ADMIN), its tunnels use the kernel's default "
                      f"({sockopts.kernel_default() or '?'}): run modprobe tcp_{name} (and list tcp_{name} in "
                      f"/etc/modules-load.d/), {keep}")
            return
        allowed = sockopts.allowed()
        if allowed is not None and name not in allowed:
            self.warn("tunnel.congestion",
                      f'"{name}" is not in net.ipv4.tcp_allowed_congestion_control ({" ".join(allowed)}): a gateway '
                      f"that runs without CAP_NET_ADMIN (not as root) falls back to the kernel's default "
                      f"({sockopts.kernel_default() or '?'}); add it there (sysctl), {keep}")

    def _check_transport_security(self, role: str, tunnel: TunnelConfig, tls: TlsConfig) -> None:
        if role == "cloud":
            urls = [("tunnel.listen", tunnel.listen)] if tunnel.listen is not None else []
        else:
            urls = [(f"tunnel.connect[{i}]", url) for i, url in enumerate(tunnel.connect)]
        if not self.ok("tunnel.listen" if role == "cloud" else "tunnel.connect", "tls.insecure"):
            return
        plain = [(key, url) for key, url in urls if not url.secure]
        secure = [(key, url) for key, url in urls if url.secure]

        if not tls.insecure:
            for key, url in plain:
                self.problem(
                    key,
                    f"plain ws:// sends tunnel traffic unencrypted ({url}); use wss:// or set "
                    "tls.insecure = true for experiments",
                )
        elif secure:
            key, url = secure[0]
            self.problem(
                "tls.insecure",
                f"tls.insecure = true is only for plain ws:// tunnels, but {key} is {url}; remove "
                "tls.insecure (wss:// always uses and verifies TLS)",
            )

        if not secure:
            return
        first_key = secure[0][0]
        if role == "cloud":
            needs = {
                "tls.cert": f"required because {first_key} is wss://: the cloud gateway's certificate (PEM)",
                "tls.key": f"required because {first_key} is wss://: the private key of tls.cert (PEM)",
                "tls.ca": f"required because {first_key} is wss://: the CA certificate(s) that signed the "
                "on-prem gateways' client certificates",
            }
        else:
            needs = {
                "tls.cert": f"required because {first_key} is wss://: the on-prem gateway's client "
                "certificate (the cloud verifies it and derives the tenant from it)",
                "tls.key": f"required because {first_key} is wss://: the private key of tls.cert (PEM)",
                "tls.ca": f"required because {first_key} is wss://: the CA certificate(s) that signed the "
                "cloud gateways' certificates",
            }
        for key, message in needs.items():
            if getattr(tls, key.split(".")[1]) is None and self.ok(key):
                self.problem(key, message)

    def _check_tls_files(self, role: str | None, tls: TlsConfig) -> None:
        # A lone cert or key is wrong whatever the URLs say; skip if a wss rule already said so.
        if (tls.cert is None) != (tls.key is None) and self.ok("tls.cert", "tls.key"):
            missing, present = ("tls.key", "tls.cert") if tls.key is None else ("tls.cert", "tls.key")
            if missing not in self._reported:
                self.problem(
                    missing, f"{present} is set but {missing} is not; give both the certificate and its private key"
                )

        cert_chain: list[x509.Certificate] | None = None
        key = None
        if tls.cert is not None and self._readable("tls.cert", tls.cert):
            try:
                cert_chain = certs.load_certificates(tls.cert, "certificate")
            except certs.CertError as exc:
                self.problem("tls.cert", str(exc))
        if tls.key is not None and self._readable("tls.key", tls.key):
            try:
                key = certs.load_private_key(tls.key, "private key")
            except certs.CertError as exc:
                self.problem("tls.key", str(exc))
        if tls.ca is not None and self._readable("tls.ca", tls.ca):
            try:
                ca_certs = certs.load_certificates(tls.ca, "CA file")
            except certs.CertError as exc:
                self.problem("tls.ca", str(exc))
            else:
                if not any(_is_ca(c) for c in ca_certs):
                    self.warn(
                        "tls.ca",
                        f"{tls.ca} holds no CA certificate (basicConstraints CA:TRUE); it will only "
                        "trust that exact certificate",
                    )
                for c in ca_certs:
                    self._check_validity("tls.ca", tls.ca, c)

        if cert_chain and key is not None and not certs.public_key_matches(cert_chain[0], key):
            self.problem(
                "tls.key",
                f"private key {tls.key} does not match the certificate {tls.cert} (tls.cert); "
                "give the key that the certificate was issued for",
            )
        if cert_chain:
            leaf = self._leaf = cert_chain[0]
            assert tls.cert is not None
            self._check_validity("tls.cert", tls.cert, leaf)
            if role is not None:
                self._check_usage(role, tls.cert, leaf)

    def _check_cluster(self, role: str, cl: ClusterConfig, tls: TlsConfig, tunnel: TunnelConfig) -> None:
        """[cluster] rules (docs/ha.md §4): peer links are authenticated by their own CA and names."""
        if role != "cloud":
            if cl.enabled or cl.advertise is not None or cl.crl:
                self.problem("cluster", "only cloud gateways form a cluster; remove [cluster] from an on-prem config")
            return
        if "allow_members" in tunnel.model_fields_set:
            self.problem("tunnel.allow_members", "allow_members is an on-prem setting; remove it from a cloud config")
        if not cl.enabled:
            if cl.crl:
                self.warn("cluster.crl", "no cluster (cluster.listen, cluster.peers): cluster.crl is not used")
            return
        if cl.peers and cl.listen is None:
            self.problem("cluster.listen", "cluster.peers is set but cluster.listen is not; members accept "
                         "peer links there (e.g. \"wss://0.0.0.0:9443/cluster\")")
        for key, url in [("cluster.listen", cl.listen)] + [(f"cluster.peers[{i}]", u) for i, u in enumerate(cl.peers)]:
            if url is not None and (url.scheme == "ws") != tls.insecure:
                self.problem(key, f"{url} uses {url.scheme}:// but tls.insecure is {str(tls.insecure).lower()}; "
                             "peer links use wss:// unless tls.insecure = true")
        if tls.insecure:
            return
        if cl.ca is None:
            self.problem("cluster.ca", "peer links need their own CA (cluster.ca) so that no tenant certificate "
                         "can pose as a member; create one with `intercloud certs init`")
        elif self._readable("cluster.ca", cl.ca):
            try:
                certs.load_certificates(cl.ca, "CA file")
            except certs.CertError as exc:
                self.problem("cluster.ca", str(exc))
        self._check_crls("cluster.crl", cl.crl, "cluster.ca", cl.ca)
        if not cl.peer_names:
            self.problem("cluster.peer_names", "list the member names (certificate CN or DNS SAN) allowed on "
                         "peer links, e.g. [\"cloud1\", \"cloud2\"]")
        for key in ("cert", "key"):
            path = getattr(cl, key)
            if path is not None:
                self._readable(f"cluster.{key}", path)
            elif getattr(tls, key) is None:
                self.problem(f"cluster.{key}", f"peer links need a certificate: set cluster.{key} or tls.{key}")
        if cl.member_ttl <= tunnel.ping_timeout:
            self.problem("cluster.member_ttl", f"member_ttl ({format_duration(cl.member_ttl)}) must exceed "
                         f"tunnel.ping_timeout ({format_duration(tunnel.ping_timeout)}) or live members are "
                         "forgotten between pings")

    def _check_crls(self, key: str, paths: list[Path], ca_key: str, ca: Path | None) -> None:
        """``tls.crl`` / ``cluster.crl``: every file parses, every CRL in it is signed by a CA of the matching
        ``ca`` key (a CRL of another CA would revoke nothing: it is an error), and a CRL past its
        nextUpdate is a warning: it is still used (a stale list beats none), but it should be renewed."""
        if not paths:
            return
        cas: list[x509.Certificate] | None = None
        if ca is None:
            self.problem(key, f"{key} is set but {ca_key} is not; a CRL is checked against the CA that signed it")
        elif self.ok(ca_key) and ca.is_file():
            try:
                cas = certs.load_certificates(ca, "CA file")
            except certs.CertError:
                cas = None  # reported under ca_key
        now = _dt.datetime.now(_dt.UTC)
        for i, path in enumerate(paths):
            where = f"{key}[{i}]" if len(paths) > 1 else key
            if not self._readable(where, path):
                continue
            try:
                loaded = revocation.load_crl_file(path)
            except revocation.CrlError as exc:
                self.problem(where, f"{exc}")
                continue
            for n, crl in enumerate(loaded, 1):
                which = f"CRL {path}" + (f" (block {n} of {len(loaded)})" if len(loaded) > 1 else "")
                if cas is not None and revocation.signed_by(crl, cas) is None:
                    names = ", ".join(c.subject.rfc4514_string() for c in cas[:5]) or "none"
                    self.problem(where, f"{which} is a CRL for another CA: issued by {crl.issuer}, but no CA in "
                                 f"{ca_key} ({ca}: {names}) signed it; give the CRL that the CA in {ca_key} "
                                 f"published, or add its CA to {ca_key}")
                nxt = crl.next_update
                if nxt is not None and nxt <= now:
                    self.warn(where, f"{which} is stale: its nextUpdate was {nxt:%Y-%m-%d %H:%M} UTC; it is still "
                              "used, but revocations since then are missing. Fetch the current CRL (intercloud "
                              "certs crl DIR re-signs one made by certs revoke) and send SIGHUP")

    def _check_tls_crl(self, role: str | None, tls: TlsConfig) -> None:
        if not tls.crl:
            return
        if tls.insecure:
            self.warn("tls.crl", "tls.insecure = true: tunnels carry no certificates, so tls.crl is not used")
            return
        if role == "cloud" and not tls.verify_client:
            self.warn("tls.crl", "tls.verify_client = false: on-prem gateways present no certificate, so tls.crl "
                      "revokes nothing; set verify_client = true or remove tls.crl")
        self._check_crls("tls.crl", tls.crl, "tls.ca", tls.ca)

    def _check_tls_role_keys(self, role: str, tls: TlsConfig) -> None:
        if role == "onprem" and "verify_client" in tls.model_fields_set:
            self.warn("tls.verify_client", 'only used by cloud gateways; ignored on role = "onprem"')
        if role == "cloud" and tls.server_name is not None:
            self.warn("tls.server_name", 'only used by on-prem gateways; ignored on role = "cloud"')

    def _readable(self, key: str, path: Path) -> bool:
        if not path.exists():
            self.problem(key, f"file not found: {path}")
            return False
        if path.is_dir():
            self.problem(key, f"{path} is a directory; give the path of a PEM file")
            return False
        if not path.is_file():  # a FIFO or device would block every read (and a SIGHUP reload with it)
            self.problem(key, f"{path} is not a regular file (a FIFO, socket or device); give the path of a PEM file")
            return False
        if not os.access(path, os.R_OK):
            self.problem(key, f"cannot read {path}: permission denied; make it readable by the user running intercloud")
            return False
        return True

    def _check_validity(self, key: str, path: Path, cert: x509.Certificate) -> None:
        now = _dt.datetime.now(_dt.UTC)
        subject = cert.subject.rfc4514_string() or "(empty subject)"
        if cert.not_valid_after_utc <= now:
            self.warn(
                key,
                f"certificate {subject} in {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                "peers will reject it, renew it",
            )
        elif cert.not_valid_before_utc > now:
            self.warn(
                key,
                f"certificate {subject} in {path} is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check the clock",
            )
        elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
            self.warn(
                key, f"certificate {subject} in {path} expires on {cert.not_valid_after_utc:%Y-%m-%d}; renew it soon"
            )

    def _check_usage(self, role: str, path: Path, cert: x509.Certificate) -> None:
        try:
            usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            return  # no EKU extension: any usage is allowed
        needed = ExtendedKeyUsageOID.SERVER_AUTH if role == "cloud" else ExtendedKeyUsageOID.CLIENT_AUTH
        if needed not in usages:
            what = "TLS server (serverAuth)" if role == "cloud" else "TLS client (clientAuth)"
            self.warn(
                "tls.cert",
                f"certificate {path} is not allowed for use as a {what}; a {role} gateway's peers will reject it",
            )

    def _check_services(self, services: list[Service | None]) -> None:
        names: dict[str, int] = {}
        for i, svc in enumerate(services):
            if svc is None:
                continue
            if not self.ok(f"service[{i}].accept", f"service[{i}].connect"):
                pass  # the broken endpoint already has its problem
            elif svc.accept is None and svc.connect is None:
                self.problem(
                    f"service[{i}]",
                    f'service {svc.name!r} needs exactly one of accept = "tcp://HOST:PORT" (listen here) '
                    'or connect = "tcp://HOST:PORT" (dial the target from here)',
                )
            elif svc.accept is not None and svc.connect is not None:
                self.problem(
                    f"service[{i}]",
                    f"service {svc.name!r} has both accept and connect; a service accepts on one gateway "
                    "and connects on the gateway at the other end of the tunnel, so keep one here and "
                    "put the other in that gateway's config",
                )
            self._check_proxy_keys(i, svc)
            if svc.connect is not None and svc.connect.port == 0:
                self.problem(
                    f"service[{i}].connect", f"port 0 cannot be dialed in {svc.connect}; give the target's port"
                )
            key = f"{svc.tenant}/{svc.name}" if svc.tenant else svc.name
            if key in names:
                owner = f" of tenant {svc.tenant!r}" if svc.tenant else ""
                self.problem(
                    f"service[{i}].name",
                    f"duplicate service name {svc.name!r}{owner}, already used by service[{names[key]}]",
                )
            else:
                names[key] = i
        self._check_announcements([s for s in services if s is not None])

    def _check_proxy_keys(self, i: int, svc: Service) -> None:
        """PROXY protocol: sent by the side that dials the target, taken by the side that accepts."""
        if svc.proxy_protocol is not None and svc.accept is not None:
            self.problem(f"service[{i}].proxy_protocol",
                         f"service {svc.name!r} accepts here; proxy_protocol is sent to the target by the gateway "
                         "that connects it: move it to that gateway's [[service]], or use "
                         "accept_proxy_protocol to take a load balancer's header here")
        if svc.accept_proxy_protocol and svc.connect is not None:
            self.problem(f"service[{i}].accept_proxy_protocol",
                         f"service {svc.name!r} connects a target here; accept_proxy_protocol is for the side that "
                         "accepts clients behind a load balancer (proxy_protocol sends a header to the target)")
        self._check_trusted(f"service[{i}]", svc.accept_proxy_protocol, svc.trusted_proxies)

    def _check_trusted(self, where: str, on: bool, trusted: list[str]) -> None:
        if on and not trusted and self.ok(f"{where}.trusted_proxies"):
            self.problem(f"{where}.trusted_proxies",
                         "required with accept_proxy_protocol = true: the load balancers' networks "
                         'whose PROXY headers are believed, e.g. trusted_proxies = ["10.0.0.0/24"]')
        elif trusted and not on:
            self.problem(f"{where}.trusted_proxies",
                         "has no effect without accept_proxy_protocol = true; set it, or remove trusted_proxies")

    def _check_announcements(self, services: list[Service]) -> None:
        """What a gateway announces must fit what every peer accepts (protocol §5.3, §5.5): at most
        1024 connect services per tenant (HELLO, SERVICES) and 4096 accepting routes (a cloud
        member's route set on peer links)."""
        from ..protocol.peer_input import MAX_ROUTES, MAX_SERVICES

        connect: dict[str, int] = {}
        accept = 0
        for svc in services:
            if svc.connect is not None:
                connect[svc.tenant or ""] = connect.get(svc.tenant or "", 0) + 1
            elif svc.accept is not None:
                accept += 1
        for tenant, n in connect.items():
            if n > MAX_SERVICES:
                who = f" of tenant {tenant!r}" if tenant else ""
                self.problem("service", f"{n} connect services{who}; a gateway announces at most {MAX_SERVICES} "
                             "to one peer (protocol §5.3): split them over several gateways or tenants")
        if accept > MAX_ROUTES:
            self.problem("service", f"{accept} accept services; a member's route set holds at most {MAX_ROUTES} "
                         "routes (protocol §5.5): split them over several gateways")

    def _check_listeners(
        self, gateway: GatewayConfig | None, listen: WsUrl | None, services: list[Service | None],
        cluster_listen: WsUrl | None = None,
    ) -> None:
        """Two listeners on the same address would fail at start-up with EADDRINUSE; say so now."""
        listeners: list[tuple[str, str, HostPort]] = []
        if gateway is not None and gateway.admin is not None:
            listeners.append(("gateway.admin", "the admin endpoint (gateway.admin)", gateway.admin))
        if listen is not None:
            listeners.append(("tunnel.listen", "the tunnel listener (tunnel.listen)", listen.hostport))
        if cluster_listen is not None:
            listeners.append(("cluster.listen", "the peer-link listener (cluster.listen)", cluster_listen.hostport))
        for i, svc in enumerate(services):
            if svc is not None and svc.accept is not None:
                listeners.append(
                    (f"service[{i}].accept", f"service {svc.name!r} (service[{i}].accept)", svc.accept.address)
                )
        for j, (key, _, addr) in enumerate(listeners):
            if addr.port == 0:
                continue  # the OS picks a free port
            for _, other_desc, other in listeners[:j]:
                if _addresses_overlap(addr, other):
                    shown = f"tcp://{addr}" if key.startswith("service") else str(addr)
                    self.problem(
                        key, f"{shown} is already used by {other_desc} on {other}; give each listener its own port"
                    )
                    break


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _addresses_overlap(a: HostPort, b: HostPort) -> bool:
    """Would binding ``a`` and ``b`` conflict? Same port and same host, or a wildcard of the same family.

    asyncio binds IPv6 sockets with IPV6_V6ONLY, so ``::`` does not cover IPv4 addresses.
    """
    if a.port != b.port:
        return False
    if a.host == b.host:
        return True
    try:
        ia, ib = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    except ValueError:
        return False  # a host name: its addresses are unknown until it is resolved
    if ia.version != ib.version:
        return False
    return ia.is_unspecified or ib.is_unspecified
