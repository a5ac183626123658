"""Sans-I/O protocol connection: one tunnel's frames in, events and frames out.

No sockets, no clock (docs/protocol.md). The tunnel driver feeds every received WebSocket
message to :meth:`Connection.receive` and puts every ``bytes`` this class returns on the wire.

All stream state transitions are in ``_TRANSITIONS`` (protocol §4.2); a pair missing from it is a
protocol error when it comes from the peer and a ``LocalProtocolError`` (a bug) when it comes
from this side.
"""

from __future__ import annotations

from . import frames, peer_input
from .announce import HELLO_MAX, _MEMBERS_SLACK, _entry_parts, _parse_hello, _services
from .events import (  # noqa: F401  (re-exported: the events are part of this module's interface)
    PROTOCOL_VERSION, Acked, CreditAvailable, Data, Event, GoAway, Hello, LocalProtocolError, Members, OpenAccepted,
    OpenRefused, Ping, Pong, ProtocolError, RemoteFin, RemoteReset, ServicesChanged, State, StreamOpened,
    RECV, SEND, _TRANSITIONS, transition,
)
from .frames import HEADER, HEADER_SIZE, FrameError, FrameType, Reason

S = State
F = FrameType


class _Stream:
    __slots__ = ("state", "send_credit", "recv_allowed", "owed", "early", "grant", "threshold")

    def __init__(self, state: State, send_credit: int, recv_allowed: int, early: int = 0):
        self.state = state
        self.send_credit = send_credit  # bytes we may still send (protocol §6.1)
        self.recv_allowed = recv_allowed  # bytes the peer may still send us
        self.owed = 0  # delivered bytes whose credit we have not returned yet (§6.2)
        self.early = early  # while opening: early-data bytes still allowed (§4.5)
        # recv_allowed + bytes received and not yet returned: at most this much of the stream can sit
        # in our memory. It starts at the window we announced and grows from the budget (§6.4).
        self.grant = recv_allowed
        self.threshold = max(1, recv_allowed // 4)  # return credit in batches of this (§6.2)


class Connection:
    """Protocol state of one tunnel.

    ``client`` is True on the dialing side (odd stream ids, protocol §4.1). ``window``,
    ``max_frame``, ``max_streams`` and ``early_data`` are what *this* side grants the peer (sent in
    HELLO); ``early_data`` 0 means DATA before our OPEN_OK is a protocol error (§4.5).

    With a ``budget`` (protocol §6.4) each stream starts with ``initial_window`` (announced in HELLO
    instead of ``window``) and grows up to ``window`` with credit taken from the budget; ``sink``
    then sends the WINDOW frames that grow waiting streams when the budget frees. Without one, every
    stream gets ``window`` at once.
    """

    def __init__(self, *, client: bool, window: int, max_frame: int, max_streams: int, early_data: int = 0,
                 initial_window: int | None = None, budget=None, sink=None):
        self.client = client
        self.window = window  # the largest grant of one stream
        self.initial_window = min(window, initial_window) if budget is not None and initial_window else window
        self.budget = budget
        self.sink = sink  # frames produced outside receive()/delivered(): budget grants
        window = self.initial_window
        self.max_frame = max_frame
        self.max_streams = max_streams
        self.early_data = min(early_data, window)
        self.resume = False  # this side announced resume (protocol §10.1): the tunnel sets it with its HELLO
        self.peer: Hello | None = None
        self.hello_sent = False
        self.goaway_sent = False
        self.goaway_received = False
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if client else 2
        self._peer_last_id = 0  # highest id the peer has opened
        self._parts: dict[str, dict] = {}  # MEMBERS entries arriving in parts (§5.5), by node id

    # --- introspection ---------------------------------------------------------------
    def state(self, stream_id: int) -> State:
        st = self._streams.get(stream_id)
        return st.state if st else (S.CLOSED if self._was_opened(stream_id) else S.IDLE)

    def credit(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        return st.send_credit if st else 0

    def send_limit(self, stream_id: int) -> int:
        """Largest DATA payload this side may send now: credit capped by the peer's max_frame, and
        before OPEN_OK by what is left of the early data the peer accepts (§4.5)."""
        st = self._streams.get(stream_id)
        if st is None or self.peer is None:
            return 0
        if st.state is S.OPENING_OUT:
            return min(st.send_credit, self.peer.max_frame, st.early)
        return min(st.send_credit, self.peer.max_frame)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def _was_opened(self, sid: int) -> bool:
        if sid == 0:
            return False
        if (sid % 2 == 1) == self.client:
            return sid < self._next_id
        return sid <= self._peer_last_id

    # --- sending ---------------------------------------------------------------------
    def hello(self, node_id: str, role: str, services: list[str], incarnation: str, **extra) -> bytes:
        if self.hello_sent:
            raise LocalProtocolError("HELLO sent twice")
        self.hello_sent = True
        body = {
            "version": PROTOCOL_VERSION,
            "node_id": node_id,
            "role": role,
            "services": sorted(services),
            "window": self.initial_window,  # §6.4: grants grow from there up to self.window
            "max_frame": self.max_frame,
            "max_streams": self.max_streams,
            "incarnation": incarnation,
            **extra,
        }
        if self.early_data:
            body["early_data"] = self.early_data
        frame = frames.encode(F.HELLO, 0, frames.encode_json(body))
        if len(frame) > HELLO_MAX:  # §5.5: the tables follow in MEMBERS once the peer is admitted
            body.pop("members", None)
            if body.get("link") == "peer":
                body["services"] = []
            frame = frames.encode(F.HELLO, 0, frames.encode_json(body))
        return frame

    def _send(self, sid: int, ftype: FrameType) -> _Stream:
        st = self._streams.get(sid)
        if st is None:
            raise LocalProtocolError(f"{ftype.name} on stream {sid}, which is not open")
        nxt = _TRANSITIONS.get((st.state, SEND, ftype))
        if nxt is None:
            raise LocalProtocolError(f"cannot send {ftype.name} on stream {sid} in state {st.state.name}")
        if nxt is S.CLOSED:
            del self._streams[sid]
            self._release(sid, st)
        st.state = nxt
        return st

    def open_stream(self, service: str, client_addr: str, relayed: bool = False) -> tuple[int, bytes]:
        if self.peer is None:
            raise LocalProtocolError("OPEN before the peer's HELLO")
        if self.goaway_received:
            raise LocalProtocolError("OPEN after the peer's GOAWAY")
        sid = self._next_id
        if sid > frames.MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted on this tunnel; open a new tunnel")
        self._next_id += 2
        self._streams[sid] = _Stream(S.OPENING_OUT, self.peer.window, self.initial_window,
                                     min(self.peer.early_data, self.peer.window))
        flags = frames.FLAG_RELAYED if relayed else 0
        return sid, frames.HEADER.pack(F.OPEN, flags, sid) + frames.encode_open(service, client_addr)

    def resume_stream(self, service: str, token: bytes, far: tuple[str, str], offset: int,
                      relayed: bool = False) -> tuple[int, bytes]:
        """RESUME a parked stream on a new id (protocol §10.5); answered like OPEN."""
        if self.peer is None or self.goaway_received:
            raise LocalProtocolError("RESUME before the peer's HELLO or after its GOAWAY")
        sid = self._next_id
        if sid > frames.MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted on this tunnel; open a new tunnel")
        self._next_id += 2
        self._streams[sid] = _Stream(S.OPENING_OUT, self.peer.window, self.initial_window, 0)
        body = frames.encode_json({"service": service, "token": token.hex(), "far": list(far), "offset": offset})
        return sid, frames.HEADER.pack(F.RESUME, frames.FLAG_RELAYED if relayed else 0, sid) + body

    def open_ok(self, sid: int, payload: bytes = b"") -> bytes:
        self._send(sid, F.OPEN_OK)
        return frames.encode(F.OPEN_OK, sid, payload)

    def ack(self, sid: int, held: int) -> bytes | None:
        """ACK ``held`` bytes of stream ``sid`` (protocol §10.3); None once the stream is gone."""
        st = self._streams.get(sid)
        if st is None or (st.state, SEND, F.ACK) not in _TRANSITIONS:
            return None
        return frames.HEADER.pack(F.ACK, 0, sid) + frames.encode_ack(held)

    def open_fail(self, sid: int, code: int, text: str) -> bytes:
        self._send(sid, F.OPEN_FAIL)
        return frames.encode(F.OPEN_FAIL, sid, frames.encode_reason(code, text))

    def send_data(self, sid: int, n: int) -> None:
        """Account for ``n`` payload bytes about to be sent as DATA (caller packs the frame)."""
        st = self._send(sid, F.DATA)
        if n <= 0 or n > st.send_credit or (self.peer and n > self.peer.max_frame):
            raise LocalProtocolError(
                f"DATA of {n} bytes on stream {sid} exceeds credit {st.send_credit}"
            )
        if st.state is S.OPENING_OUT:
            if n > st.early:
                raise LocalProtocolError(
                    f"early DATA of {n} bytes on stream {sid} exceeds what the peer accepts ({st.early} left)")
            st.early -= n
        st.send_credit -= n

    def data(self, sid: int, payload: bytes | bytearray | memoryview) -> bytes:
        """Convenience (tests, control paths): account and encode a DATA frame."""
        self.send_data(sid, len(payload))
        return frames.encode(F.DATA, sid, payload)

    def delivered(self, sid: int, n: int) -> bytes | None:
        """``n`` received bytes reached the local socket; maybe return credit (protocol §6.2)."""
        st = self._streams.get(sid)
        if st is None or st.state not in (S.OPEN, S.HALF_CLOSED_LOCAL):
            return None  # peer finished sending: it needs no more credit
        st.owed += n
        if st.owed < st.threshold:
            return None
        inc, st.owed = st.owed, 0
        if self.budget is not None:  # once per quarter grant, not per write (docs/performance.md)
            inc = self._rebalance(sid, st, inc)
            if not inc:
                return None
        st.recv_allowed += inc
        return frames.encode(F.WINDOW, sid, frames.encode_window(inc))

    # --- process-wide buffer budget (protocol §6.4) ------------------------------------
    def _rebalance(self, sid: int, st: _Stream, inc: int) -> int:
        """Stream ``sid`` returns ``inc`` delivered bytes of credit: grow it by a doubling from the
        budget, or queue it for one; while others wait, shrink it to a fair share instead. Returns
        the credit to send."""
        b = self.budget
        extra = st.grant - self.initial_window
        waiting = b.waiting
        if waiting and (len(waiting) > 1 or (self, sid) not in waiting):  # others wait, not just this one
            fair = b.fair_share()
            if extra > fair:
                b.forget(self, sid)  # above its share it waits no more
                cut = min(inc, extra - fair)
                st.grant -= cut
                st.threshold = max(1, st.grant // 4)
                b.release(cut, extra - cut)  # waiting streams are served from it now
                return inc - cut
            if st.grant < self.window:
                b.wait(self, sid)
            return inc
        if st.grant < self.window and not waiting:
            got = b.take(min(st.grant, self.window - st.grant), extra)
            if got:
                st.grant += got
                st.threshold = max(1, st.grant // 4)
                return inc + got
            b.wait(self, sid)
        return inc

    def budget_grant(self, sid: int, free: int) -> bool:
        """The budget serves stream ``sid`` from its queue: grow it by its next step, at most ``free``,
        sending the WINDOW through ``sink``. True when the budget cut the step short."""
        st = self._streams.get(sid)
        if st is None or st.state not in (S.OPEN, S.HALF_CLOSED_LOCAL) or st.grant >= self.window:
            return False
        want = min(st.grant, self.window - st.grant)
        got = self.budget.take(min(want, free), st.grant - self.initial_window)
        if got <= 0:
            return True
        st.grant += got
        st.threshold = max(1, st.grant // 4)
        st.recv_allowed += got
        if self.sink is not None:
            self.sink(frames.encode(F.WINDOW, sid, frames.encode_window(got)))
        return got < want

    def _release(self, sid: int, st: _Stream) -> None:
        """Stream ``sid`` is gone: it waits no more and its grant beyond the initial window goes back."""
        b = self.budget
        if b is None:
            return
        b.forget(self, sid)
        extra = st.grant - self.initial_window
        if extra > 0:
            st.grant = self.initial_window
            b.release(extra, 0)

    @property
    def granted(self) -> int:
        """Credit granted beyond the initial windows on this tunnel (status)."""
        return sum(st.grant - self.initial_window for st in self._streams.values())

    def fin(self, sid: int) -> bytes:
        self._send(sid, F.FIN)
        return frames.encode(F.FIN, sid)

    def reset(self, sid: int, code: int, text: str) -> bytes | None:
        """Abort a stream. Returns None if it is already gone (nothing to send)."""
        if sid not in self._streams:
            return None
        self._send(sid, F.RST)
        return frames.encode(F.RST, sid, frames.encode_reason(code, text))

    def ping(self, payload: bytes) -> bytes:
        return frames.encode(F.PING, 0, payload)

    def goaway(self, code: int, text: str) -> bytes:
        self.goaway_sent = True
        return frames.encode(F.GOAWAY, 0, frames.encode_reason(code, text))

    def members(self, members: list) -> list[bytes]:
        """MEMBERS frames for ``members`` (§5.5): each within the peer's max_frame and 256 entries; an
        entry whose routes alone do not fit goes in parts marked ``"more": true``."""
        limit = (self.peer.max_frame if self.peer is not None else HELLO_MAX) - _MEMBERS_SLACK
        out: list[bytes] = []
        batch: list[bytes] = []
        size = 2  # "[" and "]"
        for entry in members:
            for part in _entry_parts(entry, limit):
                if batch and (size + len(part) + 1 > limit or len(batch) >= peer_input.MAX_MEMBERS):
                    out.append(frames.encode(F.MEMBERS, 0, b"[" + b",".join(batch) + b"]"))
                    batch, size = [], 2
                batch.append(part)
                size += len(part) + 1
        if batch or not out:
            out.append(frames.encode(F.MEMBERS, 0, b"[" + b",".join(batch) + b"]"))
        return out

    def services(self, names: list[str]) -> bytes:
        """protocol §3.3: this side now connects these services (after a reload)."""
        return frames.encode(F.SERVICES, 0, frames.encode_json(sorted(names)))

    def abort_all(self) -> list[int]:
        """The tunnel is gone: forget every stream and return their ids."""
        streams = list(self._streams.items())
        self._streams.clear()
        for sid, st in streams:
            self._release(sid, st)
        return [sid for sid, _ in streams]

    # --- receiving -------------------------------------------------------------------
    def receive(self, message: bytes | bytearray | memoryview) -> tuple[Event | None, bytes | None]:
        """Process one WebSocket message. Returns (event or None, reply frame or None).

        Raises ProtocolError when the peer broke the protocol; the tunnel must close.
        """
        if len(message) < HEADER_SIZE:
            raise ProtocolError(f"frame of {len(message)} bytes is shorter than the 6-byte header")
        ftype, flags, sid = HEADER.unpack_from(message, 0)
        if ftype == F.DATA:  # hot path first
            return self._recv_data(sid, message), None
        try:
            ft = FrameType(ftype)
        except ValueError:
            raise ProtocolError(f"unknown frame type 0x{ftype:02x}", sid) from None
        payload = bytes(message[HEADER_SIZE:])
        try:
            if self.peer is None and ft is not F.HELLO:
                raise ProtocolError(f"{ft.name} before HELLO: the first frame must be HELLO")
            if ft in frames.CONNECTION_TYPES:
                if sid != 0:
                    raise ProtocolError(f"{ft.name} with stream id {sid}; it must use stream 0", sid)
                return self._recv_connection(ft, payload)
            if sid == 0:
                raise ProtocolError(f"{ft.name} on stream 0; stream frames need a stream id")
            if ft is F.OPEN or ft is F.RESUME:
                return self._recv_open(sid, payload, bool(flags & frames.FLAG_RELAYED), ft is F.RESUME)
            return self._recv_stream(ft, sid, payload)
        except FrameError as exc:
            raise ProtocolError(f"malformed {ft.name}: {exc}", sid) from None

    def _recv_connection(self, ft: FrameType, payload: bytes) -> tuple[Event | None, bytes | None]:
        if ft is F.HELLO:
            if self.peer is not None:
                raise ProtocolError("second HELLO on the tunnel")
            self.peer = _parse_hello(payload)
            return self.peer, None
        if ft is F.PING:
            if len(payload) > 64:
                raise ProtocolError(f"PING payload of {len(payload)} bytes (max 64)")
            return Ping(payload), frames.encode(F.PONG, 0, payload)
        if ft is F.PONG:
            return Pong(payload), None
        if ft is F.GOAWAY:
            self.goaway_received = True
            return GoAway(*frames.decode_reason(payload)), None
        try:
            if ft is F.SERVICES:  # the gateway re-admits the tunnel with them (protocol §5.3)
                names = _services(frames.decode_json(payload, "SERVICES"), "SERVICES",
                                  self.peer.extra.get("link") == "peer")
                self.peer.services = names
                return ServicesChanged(names), None
            entries = peer_input.members(frames.decode_json(payload, "MEMBERS"), "MEMBERS")
            return Members(self._assemble(entries)), None
        except peer_input.Invalid as exc:
            raise ProtocolError(str(exc)) from None

    def _assemble(self, entries: list[dict]) -> list[dict]:
        """Whole entries from MEMBERS parts (§5.5): a part marked ``more`` is held until its last part."""
        done = []
        for e in entries:
            held = self._parts.pop(e["node_id"], None)
            if held is not None:
                if held["incarnation"] != e["incarnation"]:
                    raise peer_input.Invalid(f"MEMBERS part for {e['node_id']} incarnation "
                                             f"{peer_input.shown(e['incarnation'])} while "
                                             f"{held['incarnation']}'s parts were in progress")
                routes = held["services"] + e.get("services", [])
                if len(routes) > peer_input.MAX_ROUTES:
                    raise peer_input.Invalid(f"MEMBERS parts for {e['node_id']} add up to {len(routes)} "
                                             f"routes (at most {peer_input.MAX_ROUTES})")
                e = {**e, "services": routes}
            if e.pop("more", False):
                if len(self._parts) >= peer_input.MAX_MEMBERS:
                    raise peer_input.Invalid(f"MEMBERS parts in progress for more than {peer_input.MAX_MEMBERS} members")
                e.setdefault("services", [])
                self._parts[e["node_id"]] = e
            else:
                done.append(e)
        return done

    def _recv_stream(self, ft: FrameType, sid: int, payload: bytes) -> tuple[Event | None, bytes | None]:
        st = self._streams.get(sid)
        if st is None:
            if self._was_opened(sid):
                return None, None  # raced with our RST or a finished stream (protocol §4.3)
            raise ProtocolError(f"{ft.name} for stream {sid}, which was never opened", sid)
        nxt = _TRANSITIONS.get((st.state, RECV, ft))
        if nxt is None:
            raise ProtocolError(f"{ft.name} on stream {sid} in state {st.state.name}", sid)
        if ft is F.WINDOW:
            inc = frames.decode_window(payload)
            st.send_credit += inc
            if st.send_credit > 2**31:
                raise ProtocolError(f"WINDOW on stream {sid} grows credit beyond 2^31", sid)
            event: Event = CreditAvailable(sid, st.send_credit)
        elif ft is F.FIN:
            if payload:
                raise ProtocolError(f"FIN on stream {sid} with a payload", sid)
            event = RemoteFin(sid, nxt is S.CLOSED)
        elif ft is F.RST:
            event = RemoteReset(sid, *frames.decode_reason(payload))
        elif ft is F.ACK:
            event = Acked(sid, frames.decode_ack(payload))
        elif ft is F.OPEN_OK:
            if len(payload) > 256:  # a resume identity or answer (§10.2, §10.5) is far smaller
                raise ProtocolError(f"OPEN_OK on stream {sid} with a payload of {len(payload)} bytes", sid)
            event = OpenAccepted(sid, payload)
        else:  # OPEN_FAIL
            event = OpenRefused(sid, *frames.decode_reason(payload))
        if nxt is S.CLOSED:
            del self._streams[sid]
            self._release(sid, st)
        st.state = nxt
        return event, None

    def _recv_open(self, sid: int, payload: bytes, relayed: bool, resuming: bool = False
                   ) -> tuple[Event | None, bytes | None]:
        what = "RESUME" if resuming else "OPEN"
        if (sid % 2 == 1) != (not self.client):
            raise ProtocolError(f"{what} with stream id {sid} of the wrong parity for this peer", sid)
        if sid <= self._peer_last_id:
            raise ProtocolError(f"{what} reuses stream id {sid} (last opened {self._peer_last_id})", sid)
        resume = None
        try:  # a service name is looked up, a client address only logged: both checked (§5.3)
            if resuming:
                if not (self.peer.extra.get("resume") and self.resume):
                    raise peer_input.Invalid("RESUME without resume announced in both HELLOs (protocol §10.1)")
                resume = peer_input.resume(frames.decode_json(payload, "RESUME"))
                service, client = resume.pop("service"), ""
            else:
                service, client = frames.decode_open(payload)
            peer_input.name(service.partition("/")[2] if relayed else service, f"{what} service")
            if relayed:
                peer_input.name(service.partition("/")[0], f"{what} tenant")
            peer_input.client(client)
        except peer_input.Invalid as exc:
            raise ProtocolError(str(exc), sid) from None
        self._peer_last_id = sid
        assert self.peer is not None
        if self.goaway_sent:
            return None, frames.encode(
                F.OPEN_FAIL, sid, frames.encode_reason(Reason.DRAINING, "gateway is draining")
            )
        if len(self._streams) >= self.max_streams:  # protocol §4.4
            return None, frames.encode(
                F.OPEN_FAIL, sid,
                frames.encode_reason(Reason.LIMIT, f"tunnel stream limit {self.max_streams} reached"),
            )
        self._streams[sid] = _Stream(S.OPENING_IN, self.peer.window, self.initial_window,
                                     0 if resuming else self.early_data)
        return StreamOpened(sid, service, client, relayed, resume), None

    def _recv_data(self, sid: int, message) -> Data | None:
        st = self._streams.get(sid)
        if st is None:
            if sid != 0 and self._was_opened(sid):
                return None  # protocol §4.3
            raise ProtocolError(f"DATA for stream {sid}, which was never opened", sid)
        n = len(message) - HEADER_SIZE
        if st.state is not S.OPEN and st.state is not S.HALF_CLOSED_LOCAL:
            if st.state is not S.OPENING_IN or not self.early_data:
                raise ProtocolError(f"DATA on stream {sid} in state {st.state.name}", sid)
            if n > st.early:  # §4.5
                raise ProtocolError(
                    f"peer sent {n} bytes of early data on stream {sid} before OPEN_OK with only {st.early} "
                    f"of the {self.early_data} announced left", sid)
            st.early -= n
        if n <= 0:
            raise ProtocolError(f"empty DATA on stream {sid}", sid)
        if n > self.max_frame:
            raise ProtocolError(f"DATA of {n} bytes on stream {sid} exceeds max_frame {self.max_frame}", sid)
        if n > st.recv_allowed:
            raise ProtocolError(
                f"peer exceeded flow-control window on stream {sid}: sent {n} bytes with "
                f"{st.recv_allowed} credit left", sid)
        st.recv_allowed -= n
        mv = message if isinstance(message, memoryview) else memoryview(message)
        return Data(sid, mv[HEADER_SIZE:])
