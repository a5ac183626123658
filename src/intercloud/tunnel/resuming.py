"""The resume operations of a Tunnel (docs/protocol.md §10.5, §10.6), a mixin of ``tunnel.Tunnel``:
send RESUME for a parked stream, attach it when the far end answers, answer a peer's RESUME.

``resume.Parking`` decides what to resume and where; these methods do it on one tunnel, inside the
tunnel's callbacks where timing matters (the far end's replay may share a read with its OPEN_OK).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..protocol import peer_input
from ..protocol.frames import FrameError, Reason, decode_json, encode_json

if TYPE_CHECKING:
    from .owner import StreamEnd
    from .stream import LocalStream


class ResumeOps:
    """Needs of the Tunnel: ``conn``, ``kind``, ``streams``, ``resuming``, ``pending_opens``, ``done``,
    ``peer_node``, ``_loop``, ``send_frame``, ``hold``, ``flush``."""

    def resume(self, end: StreamEnd, token: bytes, far: tuple[str, str], offset: int, attach: bool) -> asyncio.Future:
        """Send RESUME for a parked stream (protocol §10.5); the future resolves like open()'s. A parked
        ``end`` (attach False) is attached only when OPEN_OK arrives, in the same callback; a relay's
        fresh BridgeEnd (attach True) at once, as by open()."""
        if self.done.done():
            # Torn down since the caller picked it: a relaying member picks the tunnel in the RESUME's
            # callback and sends from a task that runs later (StreamDispatch._relay_resume), and a break
            # that resets every tunnel closes it in between. Sent now, the RESUME would go nowhere and
            # nothing would ever answer it (_teardown has run): the relay would refuse only after
            # connect_timeout + 2 s, and the resuming end's parked stream, whose deadline is ping_timeout
            # after a reset (§10.4), would be reset first (12 of 100 streams, one run in four, in
            # tests/e2e/test_resume_netns.py). Refuse at once: the resumer tries another path.
            fut = self._loop.create_future()
            fut.set_result((Reason.ABORTED, f"tunnel to {self.peer_node} closed: {self.done.result()}"))
            return fut
        relayed = self.kind == "peer"
        name = f"{end.tenant}/{end.service}" if relayed else end.service
        sid, frame = self.conn.resume_stream(name, token, far, offset, relayed=relayed)
        if attach:
            end.attach(self, sid)
            self.streams[sid] = end
        else:
            self.resuming[sid] = end
        fut = self._loop.create_future()
        self.pending_opens[sid] = fut
        self.send_frame(frame)
        return fut

    def cancel_resume(self, end: LocalStream, text: str) -> None:
        """Our RESUME for ``end`` got no answer in time: RST it; an answer after this is ignored."""
        for sid, e in list(self.resuming.items()):
            if e is end:
                del self.resuming[sid]
                self.pending_opens.pop(sid, None)
                frame = self.conn.reset(sid, Reason.TIMEOUT, text)
                if frame:
                    self.send_frame(frame)

    def _resumed(self, sid: int, end: LocalStream, payload: bytes) -> None:
        """OPEN_OK to our RESUME: the far end holds ``offset`` bytes; replay from there (§10.6)."""
        try:
            body = decode_json(payload, "OPEN_OK to RESUME")
            offset = body["offset"] if isinstance(body, dict) else None
        except (FrameError, KeyError):
            offset = None
        if not isinstance(offset, int) or isinstance(offset, bool) or not end.can_replay_from(offset):
            why = f"{self.peer_node} asked to resume from offset {peer_input.shown(offset)}, outside what was kept"
            frame = self.conn.reset(sid, Reason.PROTOCOL_ERROR, why)
            if frame:
                self.send_frame(frame)
            end.abort(Reason.PROTOCOL_ERROR, why, tell_peer=False)
            return
        self.streams[sid] = end
        parked_at = end.parking
        replayed = end.resume_on(self, sid, offset)
        if parked_at is not None:
            parked_at.resumed(end, self, replayed)

    def accept_resume(self, sid: int, end: LocalStream, offset: int) -> int:
        """Answer the peer's RESUME ``sid`` for the parked ``end`` (protocol §10.5): OPEN_OK with what we
        hold, then our replay from the peer's ``offset``. Returns the bytes replayed."""
        self.streams[sid] = end
        self.hold()
        self.send_frame(self.conn.open_ok(sid, encode_json({"offset": end.bytes_down})))
        replayed = end.resume_on(self, sid, offset)
        self.flush()
        return replayed

