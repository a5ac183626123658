"""Loading a gateway's TOML file and validating it as a whole.

Validation runs in two passes and reports every problem it finds, each with its key path:

1. Each section (``[gateway]``, ``[tls]``, ``[tunnel]``, every ``[[service]]``) is validated on
   its own by the pydantic models in :mod:`.model`: types, syntax, bounds, unknown keys. A broken
   section does not stop the others from being checked.
2. Rules that relate keys to each other (role-specific keys, TLS files and their contents,
   duplicate names, conflicting listeners, ...), in :mod:`.rules`, run on the sections that passed
   step 1. A rule whose inputs are broken is skipped, since its input already has a problem
   reported.

Messages never contain secret values: pydantic is told to hide inputs, and the few messages
that quote a value quote only values that cannot be secret (or redact them, see ``ProxyUrl``).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .model import (
    ClusterConfig,
    Config,
    GatewayConfig,
    Service,
    Tenant,
    TlsConfig,
    TunnelConfig,
)
from .rules import Problem, Rules
from .units import format_size

__all__ = ["ConfigError", "Problem", "load_config", "parse_config"]

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


class _Checker(Rules):
    """Validates one configuration section by section, then runs the cross-key rules (:class:`Rules`)."""

    def __init__(self, base_dir: Path) -> None:
        super().__init__()
        self.base_dir = base_dir

    # -- sections ----------------------------------------------------------------------------

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
            self._check_tls_crl(role, tls)
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
