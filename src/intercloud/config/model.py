"""The configuration model: value types and the frozen pydantic models of one gateway's TOML file.

Everything here validates a single key (types, syntax, bounds). Rules that relate several keys
(role-specific keys, TLS files, duplicate services, ...) live in :mod:`intercloud.config.load`,
which runs them after this module has parsed every section, so that one run reports all problems.

Value types parsed from strings (:class:`HostPort`, :class:`Endpoint`, :class:`WsUrl`,
:class:`ProxyUrl`, :class:`Secret`) are small immutable classes that work with pydantic and
serialize back to their string form, so ``model_dump(mode="json")`` yields a config-like dict.
Secrets serialize as ``"***"``: a status endpoint that dumps the config cannot leak them.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainValidator,
    PrivateAttr,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from .units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "NAME_PATTERN",
    "Config",
    "Endpoint",
    "GatewayConfig",
    "HostPort",
    "ProxyUrl",
    "Secret",
    "Service",
    "TlsConfig",
    "TunnelConfig",
    "WsUrl",
    "default_node_id",
    "is_loopback_host",
]

#: Names of nodes and services: safe as file names, DNS labels, metric label values and log words.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ -"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def invalid(message: str) -> PydanticCustomError:
    """A pydantic error whose message is exactly ``message`` (no "Value error, " prefix).

    The message goes through the context rather than the template so that braces in it are safe.
    """
    return PydanticCustomError("intercloud", "{reason}", {"reason": message})


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Secret
# ---------------------------------------------------------------------------------------------


class Secret:
    """A string that must never be shown: passwords, tokens.

    ``str()``, ``repr()``, f-strings and pydantic serialization all give ``***``; only
    :meth:`reveal` returns the value, so every place that really uses the secret is greppable.
    Comparison is constant-time.
    """

    __slots__ = ("_value",)
    MASK: ClassVar[str] = "***"

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        """Return the secret value. Use it only where the value is sent or compared."""
        return self._value

    def __str__(self) -> str:
        return self.MASK

    def __repr__(self) -> str:
        return self.MASK

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return hmac.compare_digest(self._value.encode(), other._value.encode())
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> Any:
        # Pickling keeps the value (e.g. for multiprocessing); it is not a display path.
        return (Secret, (self._value,))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def validate(value: object) -> Secret:
            if isinstance(value, Secret):
                return value
            if not isinstance(value, str):
                raise invalid(f"expected a string, got a {_kind(value)}")
            if not value:
                raise invalid("must not be empty")
            return cls(value)

        return core_schema.no_info_plain_validator_function(
            validate,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda _v: cls.MASK),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "writeOnly": True, "format": "password"}


# ---------------------------------------------------------------------------------------------
# String-parsed value types
# ---------------------------------------------------------------------------------------------


class _Parsed:
    """Mixin: a value class built from one string by ``parse``; pydantic validates with it.

    Subclasses define ``parse(text) -> instance`` raising ValueError with a message that does not
    need the key path (the loader adds it), and ``EXAMPLE`` for type errors.
    """

    EXAMPLE: ClassVar[str] = ""

    @classmethod
    def parse(cls, text: str) -> Self:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def validate(value: object) -> Any:
            if isinstance(value, cls):
                return value
            if not isinstance(value, str):
                raise invalid(f"expected a string like {cls.EXAMPLE!r}, got a {_kind(value)}")
            try:
                return cls.parse(value)
            except ValueError as exc:
                raise invalid(str(exc)) from None

        return core_schema.no_info_plain_validator_function(
            validate, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "examples": [cls.EXAMPLE]}


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def is_ip_literal(host: str) -> bool:
    """An IPv4 or IPv6 address (without brackets), not a name to resolve."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_host(host: str, text: str) -> str:
    """Validate a host name or IP literal (without brackets); return it in canonical form."""
    if not host:
        raise ValueError(f"missing host in {text!r}")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ":" in host:
        raise ValueError(f"invalid IPv6 address {host!r} in {text!r}")
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"invalid host name {host!r} in {text!r}")
    return host.lower()


def _format_host(host: str) -> str:
    """Host as it appears before ':port' (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host


def _parse_port(port_text: str, text: str, *, allow_zero: bool) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", port_text):
        raise ValueError(f"invalid port {port_text!r} in {text!r}; expected a number 1-65535")
    port = int(port_text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} out of range in {text!r}; expected {low}-65535")
    return port


def _split_host_port(hostport: str, text: str) -> tuple[str, str]:
    """Split 'host:port' / '[v6]:port' into (host, port text); the port must be present."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ValueError(f"missing ']' after IPv6 address in {text!r}")
        host, rest = hostport[1:end], hostport[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"missing port in {text!r}; write it as [{host}]:PORT")
        return host, rest[1:]
    host, sep, port = hostport.rpartition(":")
    if not sep:
        raise ValueError(f"missing port in {text!r}; write it as HOST:PORT")
    if ":" in host:
        raise ValueError(f"IPv6 addresses need brackets: write [{host}]:{port} instead of {text!r}")
    return host, port


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the name 'localhost' (which /etc/hosts maps to loopback)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


@dataclass(frozen=True, slots=True)
class HostPort(_Parsed):
    """``host:port`` (``[v6]:port`` for IPv6). Port 0 asks the OS for a free port."""

    host: str
    port: int
    EXAMPLE: ClassVar[str] = "127.0.0.1:9101"

    @classmethod
    def parse(cls, text: str) -> HostPort:
        text = text.strip()
        host, port = _split_host_port(text, text)
        if not host:
            raise ValueError(
                f"missing host in {text!r}; use 127.0.0.1:{port} for this machine only "
                f"or 0.0.0.0:{port} for all interfaces"
            )
        return cls(_check_host(host, text), _parse_port(port, text, allow_zero=True))

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def __str__(self) -> str:
        return f"{_format_host(self.host)}:{self.port}"


@dataclass(frozen=True, slots=True)
class Endpoint(_Parsed):
    """A TCP endpoint of a service, written ``tcp://host:port``."""

    host: str
    port: int
    EXAMPLE: ClassVar[str] = "tcp://127.0.0.1:5432"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        text = text.strip()
        scheme, sep, rest = text.partition("://")
        if not sep or scheme.lower() != "tcp":
            raise ValueError(f"expected 'tcp://HOST:PORT', got {text!r}")
        if "/" in rest or "?" in rest or "#" in rest:
            raise ValueError(f"a tcp:// endpoint has no path, got {text!r}; write tcp://HOST:PORT")
        host, port = _split_host_port(rest, text)
        return cls(_check_host(host, text), _parse_port(port, text, allow_zero=True))

    @property
    def address(self) -> HostPort:
        return HostPort(self.host, self.port)

    def __str__(self) -> str:
        return f"tcp://{_format_host(self.host)}:{self.port}"


@dataclass(frozen=True, slots=True)
class WsUrl(_Parsed):
    """A tunnel URL: ``wss://host[:port][/path]`` (or ``ws://`` for experiments).

    The port defaults to 443 (wss) / 80 (ws), the path to ``/intercloud``.
    """

    scheme: Literal["ws", "wss"]
    host: str
    port: int
    path: str = "/intercloud"
    EXAMPLE: ClassVar[str] = "wss://cloud.example.com:443/intercloud"
    DEFAULT_PATH: ClassVar[str] = "/intercloud"

    @classmethod
    def parse(cls, text: str) -> WsUrl:
        text = text.strip()
        try:
            parts = urlsplit(text)
        except ValueError as exc:
            raise ValueError(f"invalid URL {text!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("ws", "wss"):
            raise ValueError(f"expected a wss:// (or ws://) URL, got {text!r}")
        if parts.username is not None or parts.password is not None:
            # Do not echo the URL: it may contain a password.
            raise ValueError(
                "tunnel URLs cannot carry credentials (user:password@); gateways authenticate "
                "with TLS client certificates (tls.cert / tls.key)"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"a tunnel URL has no query or fragment, got {text!r}")
        netloc = parts.netloc
        if not netloc:
            raise ValueError(f"missing host in {text!r}")
        if netloc.startswith("["):
            end = netloc.find("]")
            if end < 0:
                raise ValueError(f"missing ']' after IPv6 address in {text!r}")
            host_text, rest = netloc[1:end], netloc[end + 1 :]
            if rest and not rest.startswith(":"):
                raise ValueError(f"unexpected {rest!r} after IPv6 address in {text!r}")
            port_text = rest[1:] if rest else None
        elif netloc.count(":") > 1:
            raise ValueError(f"IPv6 addresses need brackets, e.g. wss://[::1]:443/, got {text!r}")
        else:
            host_text, sep, port_text_ = netloc.partition(":")
            port_text = port_text_ if sep else None
        if port_text == "":
            raise ValueError(f"empty port in {text!r}; remove the ':' or give a port")
        host = _check_host(host_text, text)
        port = (443 if scheme == "wss" else 80) if port_text is None else _parse_port(port_text, text, allow_zero=True)
        return cls(scheme, host, port, parts.path or cls.DEFAULT_PATH)  # type: ignore[arg-type]

    @property
    def secure(self) -> bool:
        return self.scheme == "wss"

    @property
    def default_port(self) -> int:
        return 443 if self.scheme == "wss" else 80

    @property
    def hostport(self) -> HostPort:
        return HostPort(self.host, self.port)

    def __str__(self) -> str:
        port = "" if self.port == self.default_port else f":{self.port}"
        return f"{self.scheme}://{_format_host(self.host)}{port}{self.path}"


def _redact_userinfo(text: str) -> str:
    """Replace everything between '://' and the last '@' with '***' (for error messages)."""
    scheme, sep, rest = text.partition("://")
    if not sep or "@" not in rest:
        return text
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


@dataclass(frozen=True, slots=True)
class ProxyUrl(_Parsed):
    """An HTTP forward proxy reached with CONNECT: ``http://[user:password@]host:port``.

    The password is a :class:`Secret`; ``str()`` and ``repr()`` show ``http://user:***@host:port``.
    """

    host: str
    port: int
    username: str | None = None
    password: Secret | None = None
    EXAMPLE: ClassVar[str] = "http://proxy.example.com:3128"

    @classmethod
    def parse(cls, text: str) -> ProxyUrl:
        text = text.strip()
        shown = _redact_userinfo(text)  # every message below uses `shown`, never `text`
        try:
            parts = urlsplit(text)
            port_value = parts.port
        except ValueError:
            raise ValueError(f"invalid proxy URL {shown!r}; expected http://[USER:PASSWORD@]HOST:PORT") from None
        scheme = parts.scheme.lower()
        if scheme != "http":
            if scheme == "https":
                raise ValueError(
                    f"proxy URL {shown!r}: TLS to the proxy itself is not supported; use http://HOST:PORT "
                    "(the tunnel inside the CONNECT is still TLS end to end)"
                )
            raise ValueError(f"expected an http:// proxy URL like {cls.EXAMPLE!r}, got {shown!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"a proxy URL has no path, query or fragment, got {shown!r}")
        if not parts.hostname:
            raise ValueError(f"missing host in proxy URL {shown!r}")
        if port_value is None:
            raise ValueError(f"missing port in proxy URL {shown!r}; e.g. http://{_format_host(parts.hostname)}:3128")
        if not 1 <= port_value <= 65535:
            raise ValueError(f"port out of range in proxy URL {shown!r}; expected 1-65535")
        host = _check_host(parts.hostname, _redact_userinfo(text))
        username = unquote(parts.username) if parts.username else None
        password = Secret(unquote(parts.password)) if parts.password else None
        if password is not None and not username:
            raise ValueError(f"proxy URL {shown!r} has a password but no user name")
        return cls(host, port_value, username, password)

    def proxy_authorization(self) -> str | None:
        """Value of the ``Proxy-Authorization`` header (Basic), or None without credentials."""
        if self.username is None:
            return None
        password = self.password.reveal() if self.password else ""
        token = base64.b64encode(f"{self.username}:{password}".encode()).decode("ascii")
        return f"Basic {token}"

    @property
    def hostport(self) -> HostPort:
        return HostPort(self.host, self.port)

    def __str__(self) -> str:
        auth = ""
        if self.username is not None:
            auth = f"{self.username}:{Secret.MASK}@" if self.password else f"{self.username}@"
        return f"http://{auth}{_format_host(self.host)}:{self.port}"

    def __repr__(self) -> str:
        return f"ProxyUrl('{self}')"


# ---------------------------------------------------------------------------------------------
# Scalar validators: names, durations, sizes, bounded integers, paths
# ---------------------------------------------------------------------------------------------


def _validate_name(value: object) -> str:
    if not isinstance(value, str):
        raise invalid(f"expected a string, got a {_kind(value)}")
    if not NAME_PATTERN.fullmatch(value):
        raise invalid(f"invalid name {value!r}: use {_NAME_RULE}")
    return value


Name = Annotated[str, PlainValidator(_validate_name)]


def _validate_server_name(value: object) -> str:
    if not isinstance(value, str):
        raise invalid(f"expected a host name string, got a {_kind(value)}")
    try:
        return _check_host(value.strip(), value)
    except ValueError as exc:
        raise invalid(str(exc)) from None


ServerName = Annotated[str, PlainValidator(_validate_server_name)]


def Duration(*, gt: float | None = None, ge: float | None = None, le: float | None = None) -> Any:
    """Annotated float (seconds) parsed by :func:`parse_duration`, with bounds in readable units."""

    def validate(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if gt is not None and not seconds > gt:
            raise invalid(f"must be longer than {format_duration(gt)}, got {format_duration(seconds)}")
        if ge is not None and seconds < ge:
            raise invalid(f"must be at least {format_duration(ge)}, got {format_duration(seconds)}")
        if le is not None and seconds > le:
            raise invalid(f"must be at most {format_duration(le)}, got {format_duration(seconds)}")
        return seconds

    return Annotated[float, PlainValidator(validate)]


def Size(*, ge: int, le: int) -> Any:
    """Annotated int (bytes) parsed by :func:`parse_size`, bounded to ``ge..le``."""

    def validate(value: object) -> int:
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if not ge <= size <= le:
            raise invalid(f"must be between {format_size(ge)} and {format_size(le)}, got {format_size(size)}")
        return size

    return Annotated[int, PlainValidator(validate)]


def BoundedInt(ge: int, le: int) -> Any:
    """Annotated int that accepts only TOML integers (not floats, strings or booleans)."""

    def validate(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                value = int(value)
            else:
                raise invalid(
                    f"expected an integer, got {value!r}"
                    if isinstance(value, (int, float))
                    else f"expected an integer, got a {_kind(value)}"
                )
        if not ge <= value <= le:
            raise invalid(f"must be between {ge} and {le}, got {value}")
        return value

    return Annotated[int, PlainValidator(validate)]


def _resolve_path(value: object, info: ValidationInfo) -> Path:
    """A file path; relative paths are resolved against ``context['base_dir']`` (the config's directory)."""
    if isinstance(value, Path):
        path = value
    elif isinstance(value, str):
        if not value.strip():
            raise invalid("must not be empty; remove the key or give a file path")
        path = Path(value)
    else:
        raise invalid(f"expected a file path string, got a {_kind(value)}")
    path = path.expanduser()
    if not path.is_absolute():
        base = (info.context or {}).get("base_dir")
        path = Path(base) / path if base is not None else Path.cwd() / path
    return Path(os.path.normpath(path))


ConfigPath = Annotated[Path, PlainValidator(_resolve_path)]


def default_node_id(cert_names: list[str] | None = None) -> str | None:
    """The on-prem default node id, or None if there is no valid one.

    With a certificate (``cert_names``: its CN, then its DNS SANs) it is the first of those names that
    is a valid node id: the cloud admits only a node id that its certificate names (protocol §5.4), and
    cloned VMs, which share a host name, do not share a certificate. Without one (plain ws://), the
    host name."""
    if cert_names is not None:
        return next((n for n in cert_names if NAME_PATTERN.fullmatch(n)), None)
    name = socket.gethostname()
    return name if NAME_PATTERN.fullmatch(name) else None


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
    #: config.load, which knows the certificate).
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


class TunnelConfig(_Section):
    """``[tunnel]``: the WebSocket tunnels between on-prem and cloud gateways."""

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
    #: Bytes queued toward one tunnel before local readers are paused.
    max_tunnel_buffer: Size(ge=64 * KiB, le=1 * GiB) = 16 * MiB
    #: Redial backoff bounds (jittered exponential between them).
    reconnect_min: Duration(gt=0, le=3600) = 0.2
    reconnect_max: Duration(gt=0, le=86400) = 30.0

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
