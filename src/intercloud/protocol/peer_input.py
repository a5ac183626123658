"""What a peer may send in HELLO, SERVICES, MEMBERS and OPEN, checked before anything uses it
(protocol §5.3), and how a peer string is shown in a log line.

Every string a peer sends is hostile until checked here: it ends up in log lines, metric labels,
route tables and frames we forward to other gateways. So each field has a charset, a length and a
count; a violation is a ``ProtocolError`` whose message shows the offending value through
:func:`shown` (control characters escaped, capped), never raw.
"""

from __future__ import annotations

import re

# The config's name rule (config/fields.py NAME_PATTERN): node ids, service and tenant names.
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
ROUTE = re.compile(r"[A-Za-z0-9._-]{1,64}/[A-Za-z0-9._-]{1,64}")  # "tenant/service" on peer links
INCARNATION = NAME  # ours are 16 hex digits; any name is as safe
# A client address for the OPENED/CLOSED lines: "host:port", "[v6]:port", a relayed "member/host:port"
CLIENT = re.compile(r"[A-Za-z0-9._:\[\]/%-]{0,128}")
URL = re.compile(r"wss?://[\x21-\x7e]{1,2040}")

MAX_SERVICES = 1024  # services one gateway connects (HELLO, SERVICES)
MAX_MEMBERS = 256  # entries in one MEMBERS frame or HELLO members list
MAX_ROUTES = 4096  # routes ("tenant/service") one member announces
MAX_TEXT = 1000  # reason texts (GOAWAY, RST, OPEN_FAIL): encode_reason caps what we send the same way

_SHOWN = 64


def shown(value: object, cap: int = _SHOWN) -> str:
    """``value`` for a log line: quoted, control and non-ASCII characters escaped, at most ``cap``
    characters of it, with the full length when cut (a 200 KB node id stays a short line)."""
    text = value if isinstance(value, str) else repr(value)
    cut = text[:cap]
    out = cut.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in out)
    if len(text) > cap:
        return f"'{out}'... ({len(text)} characters)"
    return f"'{out}'"


class Invalid(ValueError):
    """A peer-supplied field broke its rule; the message names the field and shows the value."""


def name(value: object, field: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise Invalid(f"{field} {shown(value)} is not a name (1-64 of A-Z a-z 0-9 . _ -)")
    return value


def names(value: object, field: str, limit: int = MAX_SERVICES, pattern: re.Pattern = NAME) -> list[str]:
    if not isinstance(value, list):
        raise Invalid(f"{field} is not a JSON array")
    if len(value) > limit:
        raise Invalid(f"{field} lists {len(value)} entries (at most {limit})")
    for v in value:
        if not isinstance(v, str) or not pattern.fullmatch(v):
            rule = "tenant/service" if pattern is ROUTE else "1-64 of A-Z a-z 0-9 . _ -"
            raise Invalid(f"{field} entry {shown(v)} is not a valid name ({rule})")
    return value


def incarnation(value: object, field: str = "incarnation") -> str:
    if not isinstance(value, str) or not INCARNATION.fullmatch(value):
        raise Invalid(f"{field} {shown(value)} is not 1-64 of A-Z a-z 0-9 . _ -")
    return value


def url(value: object, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not URL.fullmatch(value):
        raise Invalid(f"{field} {shown(value)} is not a ws:// or wss:// URL of printable ASCII")
    return value


def member(entry: object, field: str) -> dict:
    """One MEMBERS entry (docs/ha.md §2): node_id, incarnation, url, services (routes), age."""
    if not isinstance(entry, dict):
        raise Invalid(f"{field} is not a JSON object")
    out = {"node_id": name(entry.get("node_id"), f"{field}.node_id"),
           "incarnation": incarnation(entry.get("incarnation"), f"{field}.incarnation"),
           "url": url(entry.get("url"), f"{field}.url")}
    if "services" in entry:
        out["services"] = names(entry["services"], f"{field}.services", MAX_ROUTES, ROUTE)
    if "more" in entry:  # the entry continues in a later part (protocol §5.5)
        if not isinstance(entry["more"], bool):
            raise Invalid(f"{field}.more {shown(entry['more'])} is not true or false")
        out["more"] = entry["more"]
    if "age" in entry:
        age = entry["age"]
        if not isinstance(age, (int, float)) or isinstance(age, bool) or not 0 <= age <= 1e9:
            raise Invalid(f"{field}.age {shown(age)} is not a number of seconds")
        out["age"] = age
    return out


def members(value: object, field: str = "members") -> list[dict]:
    if not isinstance(value, list):
        raise Invalid(f"{field} is not a JSON array")
    if len(value) > MAX_MEMBERS:
        raise Invalid(f"{field} lists {len(value)} members (at most {MAX_MEMBERS})")
    return [member(e, f"{field}[{i}]") for i, e in enumerate(value)]


def client(value: str) -> str:
    if not CLIENT.fullmatch(value):
        raise Invalid(f"OPEN client address {shown(value)} is not host:port")
    return value


def text(value: str) -> str:
    """A reason text (GOAWAY, RST, OPEN_FAIL, close reason): kept, but capped; escaped when shown."""
    return value[:MAX_TEXT]


def resume(value: object) -> dict:
    """A RESUME payload (protocol §10.5): service, token (32 hex digits), far [node, incarnation], offset."""
    if not isinstance(value, dict):
        raise Invalid("RESUME payload is not a JSON object")
    token = value.get("token")
    if not isinstance(token, str) or not re.fullmatch(r"[0-9a-f]{32}", token):
        raise Invalid(f"RESUME token {shown(token)} is not 32 lowercase hex digits")
    far = value.get("far")
    if not isinstance(far, list) or len(far) != 2:
        raise Invalid(f"RESUME far {shown(far)} is not [node_id, incarnation]")
    offset = value.get("offset")
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < 2**63:
        raise Invalid(f"RESUME offset {shown(offset)} is not an integer in 0..2^63")
    service = value.get("service")
    if not isinstance(service, str) or not 0 < len(service.encode()) < 256:
        raise Invalid(f"RESUME service {shown(service)} is not a name")
    return {"service": service, "token": bytes.fromhex(token),
            "far": (name(far[0], "RESUME far node_id"), incarnation(far[1], "RESUME far incarnation")),
            "offset": offset}
