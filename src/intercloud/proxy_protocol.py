"""The PROXY protocol, versions 1 and 2 (haproxy.org's proxy-protocol.txt): the header a load balancer
puts in front of a TCP connection to say whose it is, and the one we put in front of a target
connection (docs/operations.md §10.1). Pure functions, no sockets.

Hand-written (about 150 lines) rather than a PyPI package: the ones there are unmaintained or
asyncio-server frameworks of their own, and every value here comes from the network, so each limit
and each refusal message is ours to state (what was wrong, how long, which byte).

Receiving: ``parse(buffer)`` answers ``None`` while the header is incomplete, a ``Header`` once it is
whole (with the number of bytes it took, so the rest is the client's first data), and raises
``ProxyHeaderError`` for anything else: no signature, a v1 line longer than the protocol's 107 bytes,
a v2 header longer than ``MAX_V2`` or with malformed TLVs, addresses that do not parse. Unknown TLVs
are skipped, as the protocol says; the CRC32C TLV is not checked (a trusted proxy on a TCP connection
has nothing to gain from a bad one).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

V1_MAX = 107  # "PROXY UNKNOWN" plus two IPv6 addresses and ports, CRLF included (spec §2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest v2 header we take (16-byte prefix, addresses, TLVs). The protocol allows 65,551; load
#: balancers send a few hundred at most (AWS: a VPC endpoint id, Azure: a link id, TLS: a few names),
#: and a connection's unparsed header is memory a stranger's load balancer makes us hold.
MAX_V2 = 4096
_V2_FAMILIES = {0x11: 4, 0x21: 6}  # TCP over IPv4, TCP over IPv6
_V2_PROXY, _V2_LOCAL = 0x21, 0x20  # version 2 + command


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY header we accept; the message says what was wrong (safe to log)."""


@dataclass(frozen=True, slots=True)
class Header:
    version: int  # 1 or 2
    length: int  # bytes the header took
    #: the original client and the address it connected to; None when the header carries none
    #: (v1 UNKNOWN, v2 LOCAL: a health check from the proxy itself, or a family other than TCP)
    source: tuple[Address, int] | None = None
    destination: tuple[Address, int] | None = None
    tlvs: tuple[int, ...] = field(default=())  # the TLV types seen (skipped)

    @property
    def client(self) -> str | None:
        """The source as stream texts carry it ("ip:port", IPv6 unbracketed); None without one."""
        if self.source is None:
            return None
        return f"{self.source[0]}:{self.source[1]}"


def parse(buf: bytes | bytearray | memoryview) -> Header | None:
    """The header at the start of ``buf``; None when more bytes are needed to decide."""
    buf = bytes(buf[:max(V1_MAX, MAX_V2)])
    if not buf:
        return None
    if buf[0] == 0x0D:  # v2 starts with CR
        if not V2_SIGNATURE.startswith(buf[:12]):
            raise ProxyHeaderError(f"not a PROXY header: {_show(buf[:12])} is neither 'PROXY ' (v1) "
                                   "nor the v2 signature")
        return _parse_v2(buf) if len(buf) >= 16 else None
    if not b"PROXY ".startswith(buf[:6]):
        raise ProxyHeaderError(f"not a PROXY header: it starts with {_show(buf[:12])}, not 'PROXY ' (v1) "
                               "or the v2 signature")
    return _parse_v1(buf)


def _parse_v1(buf: bytes) -> Header | None:
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX or b"\n" in buf[:V1_MAX]:
            raise ProxyHeaderError(f"PROXY v1 line not ended by CRLF within {V1_MAX} bytes (the protocol's "
                                   "longest); a malformed or oversized header")
        return None
    line = buf[:end]
    try:
        words = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line holds bytes that are not ASCII") from None
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return Header(1, end + 2)  # the rest of an UNKNOWN line is to be ignored (spec §2.1)
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"PROXY v1 line {_show(line[:60])} is not "
                               "'PROXY TCP4|TCP6 SRC DST SPORT DPORT' or 'PROXY UNKNOWN'")
    version = 4 if words[1] == "TCP4" else 6
    src, dst = _v1_address(words[2], version), _v1_address(words[3], version)
    return Header(1, end + 2, (src, _v1_port(words[4])), (dst, _v1_port(words[5])))


def _v1_address(text: str, version: int) -> Address:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 address {_show(text.encode()[:45])} is not an IP address") from None
    if addr.version != version:
        raise ProxyHeaderError(f"PROXY v1 address {addr} is not IPv{version} as the line's TCP{version} says")
    return addr


def _v1_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1 port {_show(text.encode()[:8])} is not a number 0-65535")
    return int(text)


def _parse_v2(buf: bytes) -> Header | None:
    ver_cmd, family, size = buf[12], buf[13], struct.unpack_from("!H", buf, 14)[0]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {ver_cmd >> 4}, not 2")
    if ver_cmd not in (_V2_PROXY, _V2_LOCAL):
        raise ProxyHeaderError(f"PROXY v2 header with command {ver_cmd & 0xF}, neither LOCAL (0) nor PROXY (1)")
    if 16 + size > MAX_V2:
        raise ProxyHeaderError(f"PROXY v2 header of {16 + size} bytes is longer than this gateway takes "
                               f"({MAX_V2}); check the load balancer's TLV settings")
    if len(buf) < 16 + size:
        return None
    body = buf[16:16 + size]
    version = _V2_FAMILIES.get(family)
    src = dst = None
    rest = body
    if version is not None:
        alen = 12 if version == 4 else 36
        if size < alen:
            raise ProxyHeaderError(f"PROXY v2 header of family 0x{family:02x} holds {size} bytes, "
                                   f"fewer than its addresses take ({alen})")
        n = alen // 2 - 2
        cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        sport, dport = struct.unpack_from("!HH", body, 2 * n)
        src, dst = (cls(body[:n]), sport), (cls(body[n:2 * n]), dport)
        rest = body[alen:]
    elif family >> 4 > 3 or family & 0xF > 2:
        raise ProxyHeaderError(f"PROXY v2 header with unknown address family/protocol 0x{family:02x}")
    # else AF_UNSPEC, UDP or AF_UNIX: no client address we can use; the connection's own peer stands
    if ver_cmd == _V2_LOCAL:
        src = dst = None  # the proxy's own connection (health check): the addresses are to be ignored
    return Header(2, 16 + size, src, dst, _tlvs(rest) if version is not None else ())


def _tlvs(data: bytes) -> tuple[int, ...]:
    types = []
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyHeaderError(f"PROXY v2 TLV at offset {i} is cut short ({len(data) - i} bytes left, a TLV "
                                   "takes at least 3)")
        kind, size = data[i], struct.unpack_from("!H", data, i + 1)[0]
        if i + 3 + size > len(data):
            raise ProxyHeaderError(f"PROXY v2 TLV 0x{kind:02x} at offset {i} claims {size} bytes, only "
                                   f"{len(data) - i - 3} are left in the header")
        types.append(kind)
        i += 3 + size
    return tuple(types)


def _show(raw: bytes) -> str:
    """Hostile bytes for a log line: printable ASCII as is, the rest escaped."""
    return repr(bytes(raw))[1:]


# --- sending ------------------------------------------------------------------------------
def build(version: str, source: tuple[Address, int] | None, destination: tuple[Address, int] | None) -> bytes:
    """The header to write to a target before any byte of the client's (``version`` "v1" or "v2").
    Without a source (a client we know no address of) it says so: v1 UNKNOWN, v2 LOCAL. Source and
    destination of different families are both sent as IPv6 (IPv4-mapped), as the protocol needs one
    family."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n" if version == "v1" else V2_SIGNATURE + bytes((_V2_LOCAL, 0, 0, 0))
    (src, sport), (dst, dport) = source, destination
    if src.version != dst.version:
        src, dst = _as_v6(src), _as_v6(dst)
    if version == "v1":
        return f"PROXY TCP{src.version} {src} {dst} {sport} {dport}\r\n".encode()
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(body)) + body


def _as_v6(addr: Address) -> ipaddress.IPv6Address:
    return addr if addr.version == 6 else ipaddress.IPv6Address(f"::ffff:{addr}")


def address(text: str) -> tuple[Address, int] | None:
    """("ip", port) of a stream's client text ("ip:port", IPv6 bare or bracketed); None for no address."""
    host, _, port = text.rpartition(":")
    try:
        addr = ipaddress.ip_address(host.strip("[]").split("%")[0])
        number = int(port)
    except ValueError:
        return None
    if not 0 <= number <= 65535:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr, number
