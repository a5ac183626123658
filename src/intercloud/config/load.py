"""Loading a gateway's TOML file and validating it as a whole.

Validation runs in two passes and reports every problem it finds, each with its key path:

1. Each section (``[gateway]``, ``[tls]``, ``[tunnel]``, every ``[[service]]``) is validated on
   its own by the pydantic models in :mod:`.model`: types, syntax, bounds, unknown keys. A broken
   section does not stop the others from being checked.
2. Rules that relate keys to each other (role-specific keys, TLS files and their contents,
   duplicate names, conflicting listeners, ...) run on the sections that passed step 1. A rule
   whose inputs are broken is skipped, since its input already has a problem reported.

Messages never contain secret values: pydantic is told to hide inputs, and the few messages
that quote a value quote only values that cannot be secret (or redact them, see ``ProxyUrl``).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import BaseModel, ValidationError

from .. import certs
from ..transport.tls import certificate_names
from .model import (
    ClusterConfig,
    Config,
    Tenant,
    GatewayConfig,
    HostPort,
    Service,
    TlsConfig,
    TunnelConfig,
    WsUrl,
    default_node_id,
)
from .units import format_duration, format_size

__all__ = ["ConfigError", "Problem", "load_config", "parse_config"]

#: (key path, message), e.g. ("tunnel.ping_timeout", "must be longer than ...").
Problem = tuple[str, str]

#: A certificate that expires within this time gets a warning.
EXPIRY_WARNING = _dt.timedelta(days=30)

#: Tables and arrays nested deeper than this are refused. The deepest a valid file needs is 3
#: (``tenant[0].client_cn[0]``); a limit keeps a hostile or broken file from exhausting the
#: parser's recursion (tomllib raises RecursionError at ~300 levels), and the error names the key.
MAX_NESTING = 32

#: A configuration file larger than this is refused before it is parsed: a real one is a few KiB,
#: and it is parsed again on every SIGHUP.
MAX_CONFIG_BYTES = 4 << 20

_SECTIONS: dict[str, type[BaseModel]] = {
    "gateway": GatewayConfig,
    "tls": TlsConfig,
    "tunnel": TunnelConfig,
    "cluster": ClusterConfig,
    "service": Service,
    "tenant": Tenant,
}


class ConfigError(Exception):
    """The configuration file is missing, unreadable, not TOML, or invalid.

    ``problems`` lists every problem found as (key path, message); the key path is ``""`` for
    problems with the file as a whole. ``str()`` gives a multi-line report for humans.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        problems: Iterable[Problem],
        warnings: Iterable[Problem] = (),
    ) -> None:
        self.source = Path(source)
        self.problems: list[Problem] = list(problems)
        self.warnings: list[Problem] = list(warnings)
        super().__init__(self._report())

    def _report(self) -> str:
        n = len(self.problems)
        lines = [f"{self.source}: invalid configuration ({n} problem{'' if n == 1 else 's'}):"]
        for key, message in self.problems:
            lines.append(f"  {key}: {message}" if key else f"  {message}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._report()


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the TOML configuration at ``path``.

    Relative file paths inside it (``tls.cert`` ...) are resolved against the file's directory.
    Raises :class:`ConfigError` listing every problem found.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(path, [("", f"file not found: {path.absolute()}; check the path")]) from None
    except IsADirectoryError:
        raise ConfigError(path, [("", f"{path.absolute()} is a directory; give the path of a .toml file")]) from None
    except PermissionError:
        raise ConfigError(
            path, [("", f"cannot read {path.absolute()}: permission denied; make it readable by this user")]
        ) from None
    except OSError as exc:
        raise ConfigError(path, [("", f"cannot read {path.absolute()}: {exc.strerror or exc}")]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, [("", f"{path.absolute()} is larger than {format_size(MAX_CONFIG_BYTES)}; "
                                      "a gateway configuration is a few KiB: check that this is the right file")])

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, [("", f"line {line}: not valid UTF-8 text (TOML files must be UTF-8)")]) from None

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [("", _toml_error_message(exc))]) from None
    except RecursionError:  # tomllib recurses once per nesting level
        line, key = _nesting_site(text, MAX_NESTING)
        raise ConfigError(path, [(key, _too_deep_message(line))]) from None

    return parse_config(raw, source=path.absolute(), base_dir=path.absolute().parent, display_source=path)


def parse_config(
    data: Mapping[str, Any],
    *,
    source: str | os.PathLike[str] = "<config>",
    base_dir: str | os.PathLike[str] | None = None,
    display_source: str | os.PathLike[str] | None = None,
) -> Config:
    """Validate an already parsed TOML document (a dict) and return the :class:`Config`.

    ``base_dir`` anchors relative file paths (default: the current directory). Useful for tests
    and for tools that build configurations in memory. Raises :class:`ConfigError`.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    shown = display_source if display_source is not None else source
    deep = _too_deep(data, MAX_NESTING)
    if deep is not None:  # before pydantic, which recurses into whatever it is given
        raise ConfigError(shown, [(deep, _too_deep_message(None))])
    checker = _Checker(base)
    try:
        config = checker.run(data, Path(source))
    except RecursionError:  # defence in depth: the nesting limit above should make this unreachable
        raise ConfigError(shown, [("", f"values nested too deeply to validate (limit {MAX_NESTING} levels); "
                                       "no intercloud key takes more than 3")]) from None
    if checker.problems:
        raise ConfigError(display_source if display_source is not None else source, checker.problems, checker.warnings)
    assert config is not None
    return config


def _too_deep_message(line: int | None) -> str:
    where = f"line {line}: " if line else ""
    return (f"{where}tables or arrays nested more than {MAX_NESTING} levels deep; no intercloud key takes "
            "more than 3 (e.g. tenant[0].client_cn[0]): look for a runaway '{' or '['")


def _too_deep(data: Any, limit: int) -> str | None:
    """Key path of the first table or array nested deeper than ``limit``, or None. Iterative, so a
    hostile depth cannot exhaust the stack here."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, Mapping):
            children = [(v, _key_path(path, [str(k)]), depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            children = [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        else:
            continue
        if depth > limit:
            return _short_path(path)
        stack.extend(children)
    return None


def _short_path(path: str, keep: int = 4) -> str:
    """``a.b.c.d.e.f`` -> ``a.b.c.d...``: enough to find the key, not a screenful of ``.a.a.a``."""
    parts = re.split(r"(?=[.\[])", path)
    return path if len(parts) <= keep else "".join(parts[:keep]) + "..."


def _nesting_site(text: str, limit: int) -> tuple[int | None, str]:
    """(line, key) where brackets in ``text`` first nest deeper than ``limit``, for the message when
    tomllib itself ran out of stack. A rough TOML lexer (strings, comments, headers, keys): the file
    is already known to be broken, so a best-effort location is all this has to give."""
    depth, line, i, n = 0, 1, 0, len(text)
    table, key, line_start = "", "", 0
    while i < n:
        c = text[i]
        if c == "\n":
            line, i, line_start = line + 1, i + 1, i + 1
            continue
        if c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith(('"' * 3, "'" * 3), i):  # multi-line string
            j = text.find(text[i:i + 3], i + 3)
            j = n if j < 0 else j + 3
            line += text.count("\n", i, j)
            i = j
            continue
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if (c == '"' and text[j] == "\\") else 1
            i = j + 1
            continue
        if depth == 0 and c == "[" and not text[line_start:i].strip():  # a [table] or [[table]] header
            j = text.find("\n", i)
            j = n if j < 0 else j
            table = text[i:j].split("#", 1)[0].strip().strip("[]").strip()
            i = j
            continue
        if depth == 0 and c == "=":
            key = text[line_start:i].strip().strip("\"'")
        elif c in "[{":
            depth += 1
            if depth > limit:
                return line, _short_path(".".join(p for p in (table, key) if p))
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return None, ""


def _toml_error_message(exc: tomllib.TOMLDecodeError) -> str:
    """'Expected ... (at line 3, column 7)' -> 'TOML syntax error at line 3, column 7: Expected ...'."""
    message = str(exc)
    m = re.fullmatch(r"(?s)(.*?)\s*\(at (line \d+, column \d+|end of document)\)", message)
    if m:
        return f"TOML syntax error at {m.group(2)}: {m.group(1)}"
    return f"TOML syntax error: {message}"


# ---------------------------------------------------------------------------------------------
# Translating pydantic errors
# ---------------------------------------------------------------------------------------------


def _key_path(prefix: str, loc: Iterable[int | str]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path


def _fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _unknown_key_message(key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (valid keys {where}: {', '.join(valid)})"


def _translate(err: Mapping[str, Any], model: type[BaseModel], where: str) -> str:
    """One pydantic error -> one message in this project's words.

    Input values are not quoted, except for the closed set of literal choices (``role``).
    """
    kind = err["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return _unknown_key_message(str(err["loc"][-1]), _fields(model), where)
    if kind == "literal_error":
        expected = (err.get("ctx") or {}).get("expected", "")
        got = err.get("input")
        got_text = f", got {got!r}" if isinstance(got, str) and len(got) <= 64 else ""
        return f"must be {expected}{got_text}"
    if kind == "bool_type":
        return "expected true or false"
    if kind in ("string_type", "str_type"):
        return "expected a string"
    if kind == "list_type":
        return 'expected an array, e.g. ["...", "..."]'
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "expected a table"
    return str(err["msg"])


# ---------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------


class _Checker:
    """Collects problems and warnings while validating one configuration."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
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

    def _section(self, model: type[BaseModel], raw: Any, prefix: str, table_hint: str) -> Any:
        """Validate one table; record its problems and return the model, or None.

        If some keys are invalid, the table is validated once more without them (defaults in
        their place) so that cross-key rules can still check the rest; those keys are marked
        broken so that no rule draws conclusions from the stand-in defaults. Such a partial
        model is only used for checking: a config with problems is never returned.
        """
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.problem(prefix, f"expected a table ({table_hint}), got a {type(raw).__name__}")
            self._broken.add(prefix)
            return None
        context = {"base_dir": self.base_dir}
        try:
            return model.model_validate(raw, context=context)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        drop: set[str] = set()
        for err in errors:
            self.problem(_key_path(prefix, err["loc"]), _translate(err, model, f"in {table_hint}"))
            if err["loc"]:
                field = str(err["loc"][0])
                drop.add(field)
                if err["type"] != "extra_forbidden":
                    self._broken.add(f"{prefix}.{field}")
            else:  # a model-level error: nothing in this table can be trusted
                self._broken.add(prefix)
                return None
        try:
            return model.model_validate({k: v for k, v in raw.items() if k not in drop}, context=context)
        except ValidationError:
            return None  # e.g. a required key was among the broken ones

    # -- driver ------------------------------------------------------------------------------

    def run(self, data: Mapping[str, Any], source: Path) -> Config | None:
        for key in data:
            if key not in _SECTIONS:
                self.problem(key, self._top_level_unknown(key))

        gateway: GatewayConfig | None = self._section(GatewayConfig, data.get("gateway"), "gateway", "[gateway]")
        tls: TlsConfig | None = self._section(TlsConfig, data.get("tls"), "tls", "[tls]")
        tunnel: TunnelConfig | None = self._section(TunnelConfig, data.get("tunnel"), "tunnel", "[tunnel]")
        cluster: ClusterConfig | None = self._section(ClusterConfig, data.get("cluster"), "cluster", "[cluster]")
        services = self._services(data.get("service"))
        tenants = self._tenants(data.get("tenant"))

        role = gateway.role if gateway is not None else None
        if role is not None and tenants is not None and services is not None and tls is not None:
            self._check_tenants(role, tenants, services, tls)
        if role is not None and cluster is not None and tls is not None and tunnel is not None:
            self._check_cluster(role, cluster, tls, tunnel)
        if gateway is not None:
            self._check_gateway(gateway)
        if role is not None and tunnel is not None:
            self._check_role_tunnel(role, tunnel)
        if tunnel is not None:
            self._check_tunnel(tunnel)
        if role is not None and tunnel is not None and tls is not None:
            self._check_transport_security(role, tunnel, tls)
        if tls is not None:
            self._check_tls_files(role, tls)
        if gateway is not None:
            gateway = self._node_identity(gateway, tls)
        if role is not None and tls is not None:
            self._check_tls_role_keys(role, tls)
        if services is not None:
            self._check_services(services)
        self._check_listeners(
            gateway,
            tunnel.listen if (tunnel is not None and role == "cloud") else None,
            services or [],
            cluster.listen if (cluster is not None and role == "cloud") else None,
        )

        if (self.problems or gateway is None or tls is None or tunnel is None or services is None
                or cluster is None or tenants is None):
            return None
        valid_services = [s for s in services if s is not None]
        return Config(
            source=source,
            gateway=gateway,
            tls=tls,
            tunnel=tunnel,
            cluster=cluster,
            services=valid_services,
            tenants=[t for t in tenants if t is not None],
            warnings=self.warnings,
        )

    def _top_level_unknown(self, key: str) -> str:
        # A key that belongs in a section but was written at the top level is a common slip
        # (e.g. `role = "cloud"` above `[gateway]`); name the section it belongs to.
        owners = [name for name, model in _SECTIONS.items() if key in model.model_fields]
        if owners:
            table = f"[[{owners[0]}]]" if owners[0] in ("service", "tenant") else f"[{owners[0]}]"
            return f"unknown top-level key; did you mean {owners[0]}.{key} (put it under {table})?"
        if key == "services":
            return "unknown top-level key; services are written as [[service]] tables (singular, double brackets)"
        close = difflib.get_close_matches(key, list(_SECTIONS), n=1, cutoff=0.6)
        hint = f"; did you mean [{close[0]}]?" if close else ""
        return f"unknown section{hint} (valid: [gateway], [tls], [tunnel], [cluster], [[service]], [[tenant]])"

    def _tenants(self, raw: Any) -> list[Tenant | None] | None:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.problem("tenant", "write each tenant as a [[tenant]] table (double brackets)")
            return None
        return [self._section(Tenant, item, f"tenant[{i}]", "[[tenant]]") for i, item in enumerate(raw)]

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

    def _services(self, raw: Any) -> list[Service | None] | None:
        if raw is None:
            return []
        if isinstance(raw, dict):
            self.problem(
                "service",
                "write each service as a [[service]] table (double brackets); [service] defines a single plain table",
            )
            return None
        if not isinstance(raw, list):
            self.problem("service", f"expected [[service]] tables, got a {type(raw).__name__}")
            return None
        return [self._section(Service, item, f"service[{i}]", "[[service]]") for i, item in enumerate(raw)]

    # -- rules -------------------------------------------------------------------------------

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
        """[cluster] rules (DESIGN §3.2): peer links are authenticated by their own CA and names."""
        if role != "cloud":
            if cl.enabled or cl.advertise is not None:
                self.problem("cluster", "only cloud gateways form a cluster; remove [cluster] from an on-prem config")
            return
        if "allow_members" in tunnel.model_fields_set:
            self.problem("tunnel.allow_members", "allow_members is an on-prem setting; remove it from a cloud config")
        if not cl.enabled:
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
