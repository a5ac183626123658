"""What a gateway announces and how big it may be (protocol §5): HELLO parsed and checked field by
field, MEMBERS cut to the peer's max_frame with large route sets in parts (§5.5), and the WebSocket
frame limit that lets control frames through whatever max_frame is."""

from __future__ import annotations

from . import frames, peer_input
from .events import PROTOCOL_VERSION, Hello, ProtocolError
from .frames import HEADER_SIZE


HELLO_MAX = 16 * 1024  # the smallest max_frame a gateway accepts (config): any peer takes a HELLO this big
CONTROL_MAX = 256 * 1024  # every gateway takes control frames (HELLO, SERVICES, MEMBERS) this big (§5.5)


def ws_frame_limit(max_frame: int) -> int:
    """The largest WebSocket frame to accept: DATA up to ``max_frame`` (checked per frame, §6), control
    frames up to CONTROL_MAX whatever max_frame is (1,024 service names fit), plus the frame header."""
    return max(max_frame, CONTROL_MAX) + HEADER_SIZE + 64
_MEMBERS_SLACK = 64  # frame header and the "more" marker, with room to spare


def _entry_parts(entry: dict, limit: int) -> list[bytes]:
    """One MEMBERS entry, encoded; in parts of at most ``limit`` bytes when its routes do not fit
    (§5.5). Every part repeats node_id, incarnation and url; all but the last say ``more``."""
    whole = frames.encode_json(entry)
    routes = entry.get("services") or []
    if len(whole) <= limit or not routes:
        return [whole]
    head = {k: v for k, v in entry.items() if k != "services"}
    room = limit - len(frames.encode_json({**head, "services": [], "more": True}))
    parts, chunk, size = [], [], 0
    for r in routes:
        cost = len(r) + 3  # quotes and comma
        if chunk and size + cost > room:
            parts.append(chunk)
            chunk, size = [], 0
        chunk.append(r)
        size += cost
    parts.append(chunk)
    return [frames.encode_json({**head, "services": c, **({"more": True} if i < len(parts) - 1 else {})})
            for i, c in enumerate(parts)]


def _parse_hello(payload: bytes) -> Hello:
    """The peer's HELLO, every field checked (protocol §5.3): a violation is a ProtocolError whose
    message shows the value escaped and capped, never raw."""
    body = frames.decode_json(payload, "HELLO")
    if not isinstance(body, dict):
        raise ProtocolError("HELLO payload is not a JSON object")
    version = body.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks protocol version {peer_input.shown(version)}; "
                            f"this gateway speaks {PROTOCOL_VERSION}")
    try:
        ints = {k: body[k] for k in ("window", "max_frame", "max_streams")}
        ints["early_data"] = body.get("early_data", 0)
        for k, v in ints.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise ProtocolError(f"HELLO {k} {peer_input.shown(v)} is not an integer")
        hello = Hello(
            node_id=peer_input.name(body["node_id"], "HELLO node_id"),
            role=str(body["role"]) if body["role"] in ("cloud", "onprem") else "",
            services=_services(body.get("services", []), "HELLO services", body.get("link") == "peer"),
            incarnation=peer_input.incarnation(body.get("incarnation"), "HELLO incarnation"),
            **ints,
        )
        extra: dict = {}
        if "members" in body:
            extra["members"] = peer_input.members(body["members"], "HELLO members")
        if "advertise" in body:
            extra["advertise"] = peer_input.url(body["advertise"], "HELLO advertise")
        if body.get("resume") is True:  # protocol §10.1
            extra["resume"] = True
        if "link" in body:
            if body["link"] != "peer":
                raise peer_input.Invalid(f"HELLO link {peer_input.shown(body['link'])} is not \"peer\"")
            extra["link"] = "peer"
    except KeyError as exc:
        raise ProtocolError(f"HELLO lacks the field {exc.args[0]!r}") from None
    except peer_input.Invalid as exc:
        raise ProtocolError(str(exc)) from None
    if not hello.role:
        raise ProtocolError(f"HELLO role {peer_input.shown(body['role'])} is neither 'cloud' nor 'onprem'")
    if not (1 <= hello.window <= 2**31 and 1024 <= hello.max_frame <= 16 * 2**20 and hello.max_streams >= 1
            and 0 <= hello.early_data <= 2**31):
        raise ProtocolError(
            f"HELLO limits out of range: window={hello.window} max_frame={hello.max_frame} "
            f"max_streams={hello.max_streams} early_data={hello.early_data}")
    hello.extra = extra  # keys a receiver does not know are ignored (§5.1), and not kept
    return hello


def _services(value: object, field: str, peer_link: bool) -> list[str]:
    """Service names; on a peer link the routes a member carries, "tenant/service" (protocol §3.2)."""
    if peer_link:
        return peer_input.names(value, field, peer_input.MAX_ROUTES, peer_input.ROUTE)
    return peer_input.names(value, field)
