"""The configuration model: the frozen pydantic models of one gateway's TOML file, one per section.

Each model validates its own keys (types, syntax, bounds, unknown keys) with the value types of
:mod:`intercloud.config.values` and :mod:`intercloud.config.fields`. Rules that relate several keys
(role-specific keys, TLS files, duplicate services, ...) live in :mod:`intercloud.config.rules`,
which :mod:`intercloud.config.load` runs after every section has been parsed, so that one run
reports all problems.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    PlainValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    field_validator,
    model_validator,
)

from .fields import NAME_PATTERN, BoundedInt, Cidr, ConfigPath, Congestion, Duration, GiB, KiB, MiB, Name, ServerName, Size
from .values import Endpoint, HostPort, ProxyUrl, Secret, WsUrl, invalid, is_ip_literal

__all__ = [
    # NAME_PATTERN and is_ip_literal live in .fields and .values; config/kaazing.py imports them from here.
    "NAME_PATTERN",
    "ClusterConfig",
    "Config",
    "GatewayConfig",
    "Service",
    "Tenant",
    "TlsConfig",
    "TunnelConfig",
    "is_ip_literal",
]


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not silently ignored.
    # hide_input_in_errors: str(ValidationError) never echoes an input value (may be a secret).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class GatewayConfig(_Section):
    """``[gateway]``: who this gateway is."""

    role: Literal["cloud", "onprem"]
    #: Stable member/gateway identity; must be a name of tls.cert where there is one (protocol §5.4).
    #: Required for cloud; on-prem defaults to tls.cert's first name (CN), else the host name (see
    #: config.rules, which knows the certificate).
    node_id: Name | None = None
    #: Address of the admin HTTP endpoint (health, metrics, status). None: no admin endpoint.
    admin: HostPort | None = None
    #: Bearer token for the admin endpoint; required when ``admin`` is not a loopback address.
    admin_token: Secret | None = None
    #: How long a client is held while no route to its service exists, before it is reset.
    route_wait: Duration(ge=0, le=3600) = 5.0
    #: On SIGTERM, how long open streams may run to completion before the process exits.
    drain_timeout: Duration(ge=0, le=86400) = 30.0
    #: On SIGHUP, how long reading the config and certificate files may take (a hung network file
    #: system); a reload that takes longer is abandoned and the running configuration stays.
    reload_timeout: Duration(gt=0, le=3600) = 10.0
    #: Process-wide budget for credit granted beyond each stream's initial 64 KiB window, which bounds
    #: the bytes received from tunnels and held in user space (docs/protocol.md §6.4).
    max_buffered: Size(ge=1 * MiB, le=64 * GiB) = 256 * MiB
    #: The audit log (docs/operations.md §10.3): JSON lines, one per stream, tunnel, peer link and
    #: refusal. None: no audit log. Its directory must exist and be writable (config.rules).
    audit_log: ConfigPath | None = None


class TlsConfig(_Section):
    """``[tls]``: certificates. Relative paths are relative to the config file's directory."""

    #: This gateway's certificate (PEM; leaf first, then any intermediates).
    cert: ConfigPath | None = None
    #: Private key of ``cert`` (unencrypted PEM).
    key: ConfigPath | None = None
    #: CA certificate(s) (PEM) that the other side's certificate must chain to.
    ca: ConfigPath | None = None
    #: Cloud: require and verify on-prem client certificates (the tenant comes from them).
    verify_client: StrictBool = True
    #: Allow plain ws:// tunnels (no TLS at all). For experiments only.
    insecure: StrictBool = False
    #: On-prem: the host name expected in the cloud's certificate, if not the URL's host.
    server_name: ServerName | None = None
    #: CRL file(s) (PEM, several CRLs per file allowed) checked after every tunnel handshake: the cloud
    #: checks on-prem certificates, an on-prem gateway the cloud's (revocation.py). Empty: none.
    crl: list[ConfigPath] = Field(default_factory=list, max_length=64)

    @field_validator("crl", mode="before")
    @classmethod
    def _one_crl_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


def _validate_rate(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"expected a number of new connections per second, got {value!r}")
    if not 0.01 <= value <= 1_000_000:
        raise invalid(f"must be between 0.01 and 1000000 connections per second, got {value}")
    return float(value)


#: ``max_rate``: new connections per second.
Rate = Annotated[float, PlainValidator(_validate_rate)]

#: What 0 means for a socket option (in the message of a value out of bounds).
_KERNEL_SETTING = "leave the kernel's setting"


class TunnelConfig(_Section):
    """``[tunnel]``: the WebSocket tunnels between on-prem and cloud gateways."""

    #: Cloud: tunnel connections arrive through a TCP load balancer in ``trusted_proxies`` that
    #: sends a PROXY protocol header (v1 or v2) first; the on-prem gateway's address it names is the
    #: one logs, status, the audit log and the per-source handshake limit use.
    accept_proxy_protocol: StrictBool = False
    #: The load balancers whose PROXY headers are believed (required with accept_proxy_protocol).
    trusted_proxies: list[Cidr] = Field(default_factory=list, max_length=4096)

    #: Cloud: where to accept tunnels, e.g. ``wss://0.0.0.0:8443/intercloud``.
    listen: WsUrl | None = None
    #: On-prem: the cloud URLs to dial (one per member or one load-balancer URL).
    connect: list[WsUrl] = Field(default_factory=list)
    #: Tunnels kept to every cloud member.
    per_member: BoundedInt(1, 16) = 2
    #: On-prem: hosts whose advertised member URLs may be dialed (default: the hosts in ``connect``).
    allow_members: list[str] = Field(default_factory=list)
    #: HTTP CONNECT proxy for dialing out. ``"none"`` ignores HTTPS_PROXY (see proxy_disabled).
    proxy: ProxyUrl | None = None
    ping_interval: Duration(gt=0, le=3600) = 5.0
    ping_timeout: Duration(gt=0, le=3600) = 15.0
    #: TLS + WebSocket upgrade + HELLO exchange must finish within this time.
    handshake_timeout: Duration(gt=0, le=3600) = 10.0
    #: Dialing a service's ``connect`` target.
    connect_timeout: Duration(gt=0, le=3600) = 10.0
    #: Flow-control window per stream (bytes in flight before the sender waits for WINDOW).
    stream_window: Size(ge=64 * KiB, le=64 * MiB) = 4 * MiB
    #: Largest DATA payload in one frame.
    max_frame: Size(ge=16 * KiB, le=1 * MiB) = 256 * KiB
    #: Concurrent streams per tunnel.
    max_streams: BoundedInt(1, 1_000_000) = 10000
    #: Bytes queued toward one tunnel in the process before streams with more to send wait for
    #: turns (protocol §6.3): every frame sent next waits behind this queue.
    #: A maximum: a tunnel starts at 256 KiB and is sized to ~10 ms of its rate (tunnel/turns.py).
    max_tunnel_buffer: Size(ge=64 * KiB, le=1 * GiB) = 1 * MiB
    #: How long a stream whose tunnel broke stays parked waiting to resume on another path
    #: (protocol §10); 0 turns resume off (streams are reset when their tunnel breaks).
    resume_timeout: Duration(ge=0, le=3600) = 30.0
    #: Redial backoff bounds (jittered exponential between them).
    reconnect_min: Duration(gt=0, le=3600) = 0.2
    reconnect_max: Duration(gt=0, le=86400) = 30.0
    #: TCP congestion control of tunnel and peer-link sockets, both sides ("system": the kernel's
    #: default). Set when the WebSocket is up (transport/sockopts.py); a refusal falls back to the default.
    congestion: Congestion = "bbr"
    #: TCP_NOTSENT_LOWAT of tunnel and peer-link sockets: unsent bytes the kernel takes (0: its default).
    #: A maximum: a tunnel starts at 128 KiB and is sized to ~10 ms of its rate (tunnel/turns.py).
    notsent_lowat: Size(ge=16 * KiB, le=64 * MiB, zero=_KERNEL_SETTING) = 1 * MiB

    _proxy_disabled: bool = PrivateAttr(default=False)

    @field_validator("connect", mode="before")
    @classmethod
    def _one_url_is_a_list(cls, value: Any) -> Any:
        # `connect = "wss://..."` is accepted as shorthand for a one-element array.
        return [value] if isinstance(value, str) else value

    @model_validator(mode="wrap")
    @classmethod
    def _proxy_none(cls, data: Any, handler: Any) -> Any:
        disabled = False
        if isinstance(data, dict) and isinstance(data.get("proxy"), str) and data["proxy"].strip().lower() == "none":
            data = {**data, "proxy": None}
            disabled = True
        model = handler(data)
        if disabled:
            model._proxy_disabled = True
        return model

    @property
    def proxy_disabled(self) -> bool:
        """True when the config says ``proxy = "none"``: dial directly even if HTTPS_PROXY is set."""
        return self._proxy_disabled

    def effective_proxy(self, host: str, environ: dict[str, str] | None = None) -> ProxyUrl | None:
        """The proxy to use for dialing ``host``: the configured one, else HTTPS_PROXY unless
        ``proxy = "none"`` or NO_PROXY matches ``host``.

        Raises ValueError (with the password redacted) when HTTPS_PROXY is not a valid proxy URL.
        """
        if self.proxy is not None:
            return self.proxy
        if self.proxy_disabled:
            return None
        env = os.environ if environ is None else environ
        raw = env.get("HTTPS_PROXY") or env.get("https_proxy") or ""
        if not raw.strip():
            return None
        if _no_proxy_matches(host, env.get("NO_PROXY") or env.get("no_proxy") or ""):
            return None
        if "://" not in raw:
            raw = "http://" + raw.strip()
        try:
            return ProxyUrl.parse(raw)
        except ValueError as exc:
            raise ValueError(
                f'environment variable HTTPS_PROXY: {exc}; fix it, or set tunnel.proxy = "none" to ignore it'
            ) from None


def _no_proxy_matches(host: str, no_proxy: str) -> bool:
    """curl-style NO_PROXY: '*', exact host, or domain suffix ('.example.com' or 'example.com')."""
    host = host.lower().rstrip(".")
    for entry in no_proxy.split(","):
        entry = entry.strip().lower().rstrip(".")
        if not entry:
            continue
        if entry == "*":
            return True
        entry = entry.split(":", 1)[0] if entry.count(":") == 1 else entry  # drop a :port
        bare = entry.lstrip(".")
        if host == bare or host.endswith("." + bare):
            return True
    return False


class ClusterConfig(_Section):
    """``[cluster]`` (cloud only): the members of one cloud cluster and the peer links between them."""

    #: Where this member accepts peer links from the other members, e.g. ``wss://0.0.0.0:9443/cluster``.
    listen: WsUrl | None = None
    #: Peer-link URLs of the other members (listing this member too is fine; it is recognised).
    peers: list[WsUrl] = Field(default_factory=list)
    #: The tunnel URL on-prem gateways should dial to reach *this* member directly (optional).
    advertise: WsUrl | None = None
    #: CA that signed the members' peer-link certificates. Keep it apart from tenant CAs.
    ca: ConfigPath | None = None
    #: This member's peer-link certificate and key (default: tls.cert / tls.key).
    cert: ConfigPath | None = None
    key: ConfigPath | None = None
    #: Names (certificate CN or DNS SAN) a peer-link certificate must carry to be accepted.
    peer_names: list[Name] = Field(default_factory=list)
    #: CRL file(s) (PEM) of cluster.ca, checked on peer-link handshakes both ways. Empty: none.
    crl: list[ConfigPath] = Field(default_factory=list, max_length=64)

    @field_validator("crl", mode="before")
    @classmethod
    def _one_crl_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value
    #: A member nobody has heard of for this long is forgotten.
    member_ttl: Duration(gt=0, le=86400) = 30.0
    #: Connections without HELLO yet (from accept: TLS, upgrade, HELLO) per listener (tunnel.listen,
    #: cluster.listen); more are closed at accept, before any TLS work, and the dialer retries.
    max_handshakes: BoundedInt(1, 100_000) = 64
    #: Of those, how many one source address (IPv6: its /64) or one client certificate may hold
    #: (none: max(1, max_handshakes / 8)). Raise it to max_handshakes behind a TCP load balancer.
    max_handshakes_per_source: BoundedInt(1, 100_000) | None = None

    @property
    def handshakes_per_source(self) -> int:
        if self.max_handshakes_per_source is not None:
            return min(self.max_handshakes_per_source, self.max_handshakes)
        return max(1, self.max_handshakes // 8)

    @property
    def enabled(self) -> bool:
        return bool(self.peers) or self.listen is not None


class Tenant(_Section):
    """One ``[[tenant]]`` (cloud only): a customer whose on-prem gateways are known by their client
    certificates. A tunnel belongs to the one tenant its certificate maps to (never to anything the
    on-prem side claims); services are scoped by tenant."""

    name: Name
    #: Certificate subject common names that identify this tenant's gateways.
    client_cn: list[str] = Field(default_factory=list)
    #: DNS or URI subject alternative names that identify this tenant's gateways.
    client_san: list[str] = Field(default_factory=list)
    #: Certificate fingerprints, ``"sha256:<hex>"`` (as ``openssl x509 -fingerprint -sha256`` without colons).
    client_fingerprint: list[str] = Field(default_factory=list)
    #: Tunnels this tenant may hold at once on this member (none: unlimited).
    max_tunnels: BoundedInt(1, 1_000_000) | None = None
    #: Streams this tenant may have open at once on this member (none: unlimited).
    max_streams: BoundedInt(1, 10_000_000) | None = None

    @field_validator("client_fingerprint")
    @classmethod
    def _fingerprints(cls, value: list[str]) -> list[str]:
        out = []
        for fp in value:
            hexpart = fp.lower().removeprefix("sha256:").replace(":", "")
            if not re.fullmatch(r"[0-9a-f]{64}", hexpart):
                raise invalid(f"fingerprint {fp!r} is not 'sha256:' followed by 64 hex digits")
            out.append("sha256:" + hexpart)
        return out


class Service(_Section):
    """One ``[[service]]``: a named TCP endpoint, ``accept`` on one side, ``connect`` on the other."""

    name: Name
    #: Cloud with ``[[tenant]]`` tables: the tenant this service belongs to (required there).
    tenant: Name | None = None
    #: Listen here and carry accepted connections into the tunnels.
    accept: Endpoint | None = None
    #: Take streams for this service from the tunnels and dial this target.
    connect: Endpoint | None = None
    #: Source networks that may use this service (the real client address, after PROXY protocol).
    #: Empty: every source not denied. Checked at accept, and on the connect side against the
    #: client address the OPEN carries (docs/operations.md §10).
    allow: list[Cidr] = Field(default_factory=list, max_length=4096)
    #: Source networks refused; a deny entry wins over an allow entry.
    deny: list[Cidr] = Field(default_factory=list, max_length=4096)
    #: Concurrent connections of this service on this gateway (opening and open; none: unlimited).
    max_connections: BoundedInt(1, 10_000_000) | None = None
    #: New connections per second of this service on this gateway, a token bucket holding one
    #: second's worth (at least 1); none: unlimited.
    max_rate: Rate | None = None
    #: Connect side: send the original client's address to the target in a PROXY protocol header
    #: ("v1" text or "v2" binary) before any byte of the client's; none: no header.
    proxy_protocol: Literal["v1", "v2"] | None = None
    #: Accept side: every connection starts with a PROXY protocol header (v1 or v2) from a load
    #: balancer in ``trusted_proxies``; the client address it names is the one ACLs, logs and the
    #: target see. Connections from elsewhere, and ones without a valid header, are refused.
    accept_proxy_protocol: StrictBool = False
    #: The load balancers whose PROXY headers are believed (required with accept_proxy_protocol).
    trusted_proxies: list[Cidr] = Field(default_factory=list, max_length=4096)

    @property
    def direction(self) -> Literal["accept", "connect"]:
        return "accept" if self.accept is not None else "connect"

    @property
    def endpoint(self) -> Endpoint:
        """The one endpoint this service has (accept or connect)."""
        endpoint = self.accept if self.accept is not None else self.connect
        assert endpoint is not None, "validated configs have exactly one of accept/connect"
        return endpoint


class Config(BaseModel):
    """A whole, validated gateway configuration. Build it with :func:`intercloud.config.load_config`."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    #: The file this configuration was loaded from.
    source: Path
    gateway: GatewayConfig
    tls: TlsConfig = Field(default_factory=TlsConfig)
    tunnel: TunnelConfig = Field(default_factory=TunnelConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    #: The ``[[service]]`` tables, in file order.
    services: list[Service] = Field(default_factory=list)
    #: The ``[[tenant]]`` tables (cloud). Empty: one default tenant.
    tenants: list[Tenant] = Field(default_factory=list)
    #: Non-fatal findings as (key path, message), e.g. a certificate that expires soon.
    warnings: list[tuple[str, str]] = Field(default_factory=list)

    @property
    def accept_services(self) -> list[Service]:
        return [s for s in self.services if s.accept is not None]

    @property
    def connect_services(self) -> list[Service]:
        return [s for s in self.services if s.connect is not None]

    def service(self, name: str) -> Service | None:
        """The service called ``name``, or None."""
        return next((s for s in self.services if s.name == name), None)
