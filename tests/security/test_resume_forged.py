"""Forged RESUMEs are refused (protocol §10.2, §10.5) and never touch the stream they aim at.

A cloud with two tenants, red (certificates red1, red2) and blue (blue1), each with a service the cloud
connects to an echo server. Raw on-prem clients (tests/support/raw_onprem.py: real certificates, the
WebSocket upgrade, HELLO with ``"resume": true``) open streams on it. As the opening end, a client
learns its stream's resume token honestly, from the cloud's OPEN_OK (§10.2), and so can present it,
or a variation of it, where it does not belong:

- a wrong token (random), and the right token naming another incarnation of the cloud;
- a live stream's token again (a replay): from its own tunnel (BUSY: it is attached there), from
  another instance of the same node id and from another node of the same tenant (NOT_RESUMABLE);
- the token of red's stream on a tunnel of tenant blue;
- the token of a stream that finished.

Each is answered OPEN_FAIL NOT_RESUMABLE (BUSY for the live stream on its own tunnel), logged as
``stream.resume_refused``, counted, and the targeted stream keeps carrying bytes exactly. The answer to
a token that belongs to another tenant or gateway reads like the answer to an unknown token (it named
the owner's node id and incarnation, or told another tenant that the token exists; fixed in resume.py). The second
test does the same while the stream is parked (its tunnel dropped), where an accepted forgery would
take the stream over, and then lets its owner resume it: every byte arrives once, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl

import pytest

from intercloud.certs import init_certs
from intercloud.protocol.frames import Reason
from tests.support import raw_onprem
from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import wait_until

L = "127.0.0.1"
KiB = 1024


class Cloud:
    def __init__(self, tmp_path, gateways, echo: EchoServer):
        self.certs = tmp_path / "certs"
        init_certs(self.certs, cloud=["cloud1"], onprem=["red1", "red2", "blue1"])
        self.tunnel, admin = free_ports(2)
        self.url = f"wss://localhost:{self.tunnel}/intercloud"
        # ping_timeout 6 s: a dropped tunnel's streams stay parked min(ping_timeout, resume_timeout) = 6 s
        # (protocol §10.4), the time the parked test has for its forgeries and the owner's resume
        text = (f'[gateway]\nrole = "cloud"\nnode_id = "cloud1"\nadmin = "{L}:{admin}"\n\n'
                f'[tls]\ncert = "{self.certs}/cloud1.pem"\nkey = "{self.certs}/cloud1.key"\n'
                f'ca = "{self.certs}/ca.pem"\n\n'
                f'[tunnel]\nlisten = "wss://{L}:{self.tunnel}/intercloud"\nping_interval = "1s"\n'
                f'ping_timeout = "6s"\nresume_timeout = "30s"\n\n'
                '[[tenant]]\nname = "red"\nclient_cn = ["red1", "red2"]\n\n'
                '[[tenant]]\nname = "blue"\nclient_cn = ["blue1"]\n\n'
                f'[[service]]\nname = "redecho"\ntenant = "red"\nconnect = "tcp://{L}:{echo.port}"\n\n'
                f'[[service]]\nname = "blueecho"\ntenant = "blue"\nconnect = "tcp://{L}:{echo.port}"\n')
        self.gw = gateways("cloud1", text)

    def ctx(self, cert: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        ctx.load_cert_chain(str(self.certs / f"{cert}.pem"), str(self.certs / f"{cert}.key"))
        return ctx

    async def client(self, cert: str, incarnation: str) -> raw_onprem.RawOnprem:
        return await raw_onprem.connect(self.url, self.ctx(cert), cert, incarnation)


@pytest.fixture
def cloud(tmp_path, gateways):
    with EchoServer() as echo:
        yield Cloud(tmp_path, gateways, echo)


async def _echo(c: raw_onprem.RawOnprem, s, payload: bytes, upto: int) -> None:
    """Send ``payload`` on ``s`` and wait for its echo: ``upto`` bytes received in all, checked exactly."""
    await c.send_data(s, payload)
    got = await c.wait_rx(s, upto)
    assert len(got) == upto, (len(got), upto)


def _refusal(result: tuple, want: int, what: str) -> str:
    assert result[0] == "fail", f"{what}: the forged RESUME was ACCEPTED: {result}"
    assert result[1] == want, f"{what}: answered {Reason.name_of(result[1])} {result[2]!r}, want {Reason.name_of(want)}"
    return result[2]


def _refused_lines(gw, since: int) -> list[dict]:
    return [r for r in gw.log_lines(since) if r.get("event") == "stream.resume_refused"]


def test_forged_resumes_are_refused_and_the_live_stream_is_untouched(cloud):
    gw = cloud.gw
    rng = random.Random(15)
    sent = rng.randbytes(768 * KiB)  # what the target stream carries, in three parts

    async def run() -> list[tuple[str, int, str]]:
        a = await cloud.client("red1", "aaaa000000000001")
        target = a.open("redecho")
        ok = await a.answer(target)
        assert ok[0] == "ok", ok
        token, node, cloud_inc = raw_onprem.identity(ok[1])
        assert node == "cloud1"
        await _echo(a, target, sent[:256 * KiB], 256 * KiB)

        # a stream that finishes: FIN both ways, the cloud forgets it (protocol §4.3, §10.7)
        done = a.open("redecho")
        ok2 = await a.answer(done)
        done_token = raw_onprem.identity(ok2[1])[0]
        await _echo(a, done, b"short-lived", len(b"short-lived"))
        a.fin(done)
        await a.wait_fin(done)
        await asyncio.to_thread(gw.wait_log, lambda r: r["event"] == "stream.closed" and r["service"] == "redecho"
                                and r["stream"] == done.sid, 10)

        a2 = await cloud.client("red1", "aaaa000000000002")  # the same node id, another instance
        r2 = await cloud.client("red2", "bbbb000000000001")  # another node of the same tenant
        blue = await cloud.client("blue1", "cccc000000000001")  # another tenant
        far = ["cloud1", cloud_inc]

        def body(tok: bytes, service: str = "redecho", far_=far, offset: int = 256 * KiB) -> dict:
            return {"service": service, "token": tok.hex(), "far": far_, "offset": offset}

        forgeries = [  # (who, RESUME body, expected refusal, what)
            (a, body(os.urandom(16)), Reason.NOT_RESUMABLE, "wrong token"),
            (a, body(token, far_=["cloud1", "0123456789abcdef"]), Reason.NOT_RESUMABLE, "another cloud incarnation"),
            (a, body(token), Reason.BUSY, "replay of the live token on its own tunnel"),
            (a2, body(token), Reason.NOT_RESUMABLE, "replay from another instance of red1"),
            (r2, body(token), Reason.NOT_RESUMABLE, "replay from red2 (same tenant)"),
            (blue, body(token), Reason.NOT_RESUMABLE, "red's token on blue's tunnel"),
            (blue, body(token, service="blueecho"), Reason.NOT_RESUMABLE, "red's token as blue's service"),
            (a, body(done_token, offset=11), Reason.NOT_RESUMABLE, "token of a finished stream"),
        ]
        texts = []
        for who, b, want, what in forgeries:
            s = who.resume(b)
            texts.append((what, want, _refusal(await who.answer(s), want, what)))
            # between two forgeries the target stream still carries bytes, exactly
        await _echo(a, target, sent[256 * KiB:512 * KiB], 512 * KiB)

        # and to its end: the rest, FIN both ways
        await _echo(a, target, sent[512 * KiB:], len(sent))
        a.fin(target)
        await a.wait_fin(target)
        assert bytes(target.rx) == sent, "the target stream's echo differs from what was sent"
        assert target.rst is None
        for c in (a, a2, r2, blue):
            assert c.close is None, f"{c.node}: the cloud closed the tunnel: {c.close}"
            c.ws.disconnect()
        return texts

    mark = gw.log_mark()
    texts = asyncio.run(run())
    lines = wait_until(lambda: (r := _refused_lines(gw, mark)) and len(r) >= len(texts) and r, 10,
                       what=f"{len(texts)} stream.resume_refused lines")
    assert len(lines) == len(texts), lines
    for (what, want, _text), rec in zip(texts, lines):
        assert rec["reason"] == Reason.name_of(want), (what, rec)
    # A forger learns nothing about whose the token is: another tenant's (or gateway's) live stream
    # gets the same answer as a token that never existed; the cloud's log says which it was.
    told = {what: text for what, _want, text in texts}
    for (what, _want, _text), rec in zip(texts, lines):
        if what.startswith(("replay from", "red's token")):
            assert told[what] == told["wrong token"], (what, told[what])
            assert "belongs to" in rec["detail"], rec
    assert {r["tenant"] for r in lines} == {"red", "blue"}, lines
    st = gw.status()
    assert st["resume"]["refused"] == len(texts) and st["resume"]["resumed"] == 0, st["resume"]
    assert st["resume"]["parked_total"] == 0, st["resume"]
    assert "Traceback" not in gw.log_text()
    for what, want, text in texts:
        print(f"  {what}: {Reason.name_of(want)} {text}")


def test_forged_resumes_of_a_parked_stream_are_refused_and_its_owner_resumes_it(cloud):
    """The stream's tunnel drops: the cloud parks it (protocol §10.4). Forgeries from every other
    identity are refused; then its owner (same node id and incarnation, a new tunnel) resumes it and
    the echo completes byte-exact, with the bytes lost in the break replayed."""
    gw = cloud.gw
    sent = random.Random(16).randbytes(1024 * KiB)

    async def run() -> dict:
        a = await cloud.client("red1", "dddd000000000001")
        s = a.open("redecho")
        ok = await a.answer(s)
        token, _node, cloud_inc = raw_onprem.identity(ok[1])
        await _echo(a, s, sent[:384 * KiB], 384 * KiB)
        # 128 KiB more leave, then the tunnel drops before (all of) their echo is back
        await a.send_data(s, sent[384 * KiB:512 * KiB])
        mark = gw.log_mark()
        a.abort()
        await asyncio.to_thread(gw.wait_log, lambda r: r["event"] == "stream.parked" and r["service"] == "redecho",
                                10, mark)
        held_here = len(s.rx)  # what we hold: the cloud replays from here
        far = ["cloud1", cloud_inc]
        # (not another instance of red1: a tunnel from red1 with another incarnation tells the cloud that
        # the stream's far end restarted, and the parked stream is reset at once, protocol §10.4)
        others = [await cloud.client("red2", "eeee000000000001"), await cloud.client("blue1", "ffff000000000001")]
        for c in others:
            for service in ("redecho", "blueecho"):
                r = await c.answer(c.resume({"service": service, "token": token.hex(), "far": far,
                                             "offset": held_here}))
                _refusal(r, Reason.NOT_RESUMABLE, f"{c.node}/{c.incarnation} resuming a parked {service}")
        wrong = await others[0].answer(others[0].resume({"service": "redecho", "token": os.urandom(16).hex(),
                                                         "far": far, "offset": 0}))
        _refusal(wrong, Reason.NOT_RESUMABLE, "wrong token while parked")
        assert gw.status()["resume"]["parked"] == 1, "a refused RESUME touched the parked stream"

        # the owner comes back on a new tunnel (same node id and incarnation) and resumes
        back = await cloud.client("red1", "dddd000000000001")
        r = back.resume({"service": "redecho", "token": token.hex(), "far": far, "offset": held_here})
        ans = await back.answer(r)
        assert ans[0] == "ok", f"the owner's RESUME was refused: {ans}"
        offset = json.loads(ans[1])["offset"]
        assert 384 * KiB <= offset <= 512 * KiB, offset
        r.rx[:0] = s.rx  # the stream so far: what came on the old tunnel, then the replay and the rest
        await back.send_data(r, sent[offset:512 * KiB])  # our replay: what the cloud lacks
        await _echo(back, r, sent[512 * KiB:], len(sent))
        back.fin(r)
        await back.wait_fin(r)
        assert bytes(r.rx) == sent, "the resumed stream's echo differs from what was sent"
        for c in (*others, back):
            assert c.close is None, f"{c.node}: the cloud closed the tunnel: {c.close}"
            c.ws.disconnect()
        return {"held": held_here, "offset": offset}

    mark = gw.log_mark()
    info = asyncio.run(run())
    refused = _refused_lines(gw, mark)
    assert len(refused) == 5 and all(r["reason"] == "NOT_RESUMABLE" for r in refused), refused
    resumed = gw.wait_log(lambda r: r["event"] == "stream.resumed", since=mark)
    st = gw.status()["resume"]
    assert st["resumed"] == 1 and st["failed"] == 0 and st["parked"] == 0, st
    print(f"\nparked stream: we held {info['held']} bytes, the cloud {info['offset']}; resumed after "
          f"{resumed['gap'] * 1e3:.0f} ms, {resumed['bytes_replayed']} bytes replayed by the cloud")
