"""protocol §10.5: a RESUME handed to a tunnel that closed since it was picked is refused at once.

A relaying member picks the tunnel to the far end in the RESUME's callback and sends from a task that
runs later; when a break resets every tunnel, that tunnel can close in between. Sent anyway, the RESUME
went nowhere and nothing answered it: the relay refused only after connect_timeout + 2 s, long after the
resuming end's parked stream (deadline ping_timeout after a reset, §10.4) had been reset
(tests/e2e/test_resume_netns.py, the reset break, lost ~12 of 100 streams one run in four)."""

from __future__ import annotations

from intercloud.protocol.frames import Reason
from intercloud.tunnel.bridge import BridgeEnd
from intercloud.tunnel.tunnel import Tunnel

from .test_liveness import gateway


class _GoneTransport:
    close_handshake = None  # the peer just went away


async def test_resume_on_a_closed_tunnel_is_refused_at_once() -> None:
    tunnel = Tunnel(gateway(), client=True, url="ws://127.0.0.1:9/intercloud")
    tunnel.on_ws_disconnected(_GoneTransport())
    assert tunnel.done.done()
    inner, outer = BridgeEnd.pair("serviceA", "", target="onprem1")
    fut = tunnel.resume(outer, bytes(16), ("onprem1", "0123456789abcdef"), 0, attach=True)
    assert fut.done(), "a RESUME on a closed tunnel waits for an answer that cannot come"
    code, text = fut.result()
    assert code == Reason.ABORTED and "closed" in text, (code, text)
    assert outer.tunnel is None and not tunnel.streams, "the relay end was attached to a closed tunnel"
