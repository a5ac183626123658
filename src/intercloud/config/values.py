"""Value types of the configuration: secrets, and the endpoints and URLs parsed from one string.

Everything here validates a single value (syntax, bounds); the section models in
:mod:`intercloud.config.model` use these types for their keys.

Value types parsed from strings (:class:`HostPort`, :class:`Endpoint`, :class:`WsUrl`,
:class:`ProxyUrl`, :class:`Secret`) are small immutable classes that work with pydantic and
serialize back to their string form, so ``model_dump(mode="json")`` yields a config-like dict.
Secrets serialize as ``"***"``: a status endpoint that dumps the config cannot leak them.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self
from urllib.parse import unquote, urlsplit

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

__all__ = [
    "Endpoint",
    "HostPort",
    "ProxyUrl",
    "Secret",
    "WsUrl",
    "invalid",
    "is_ip_literal",
    "is_loopback_host",
]


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
