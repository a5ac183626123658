"""``intercloud status [ADMIN_URL ...]``: a gateway's /api/status as tables in the terminal."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:9101"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("status", help="show a gateway's members, tunnels and services (admin endpoint)")
    p.add_argument("urls", nargs="*", metavar="ADMIN_URL",
                   help=f"admin endpoint(s), e.g. 127.0.0.1:9101 (default {DEFAULT_URL})")
    p.add_argument("--token", help="bearer token (gateway.admin_token)")
    p.add_argument("--json", action="store_true", help="print the raw status JSON")
    p.set_defaults(func=run)
    return p


def fetch(url: str, token: str | None = None, timeout: float = 3.0) -> dict:
    if "://" not in url:
        url = "http://" + url
    req = urllib.request.Request(url.rstrip("/") + "/api/status")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # admin endpoints are local
    with opener.open(req, timeout=timeout) as resp:
        return json.load(resp)


def _table(title: str, headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) if c is not None else "-" for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    out = [title, line(headers), "  " + "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells] or ["  (none)"]
    return "\n".join(out)


def render(st: dict) -> str:
    head = (f"{st['role']} gateway {st['node_id']}: {'READY' if st.get('ready') else 'NOT READY'}"
            f"{' (draining)' if st.get('draining') else ''}, up {st.get('uptime', 0):.0f}s")
    parts = [head, ""]
    if st["role"] == "cloud":
        parts.append(_table("Cluster members", ["member", "state", "routes", "url"], [
            [m["node_id"] + (" (this)" if m.get("self") else ""), "up" if m["up"] else "DOWN",
             ",".join(m.get("routes", [])), m.get("url")] for m in st.get("members", [])]))
    else:
        parts.append(_table("Cloud members", ["member", "state", "tunnels", "url"], [
            [m["node_id"], "up" if m["up"] else "DOWN", f"{m.get('tunnels', 0)}/{m.get('wanted', '?')}", m.get("url")]
            for m in st.get("members", [])]))
    targets = st.get("dial_targets", [])
    if any(t.get("address") or t.get("error") for t in targets):  # only when a name was looked up
        parts.append("")
        parts.append(_table("Dial targets" if st["role"] != "cloud" else "Peer dial targets", ["url", "address", "error"],
                            [[t["url"], t.get("address"), t.get("error")] for t in targets]))
    parts.append("")
    parts.append(_table("Tunnels", ["id", "peer", "tenant", "address", "age", "rtt ms", "streams", "tls", "tcp rtt ms",
                                    "retrans", "cc"], [
        [t["id"], t["peer_node"], t.get("tenant"), t["peer_addr"], f"{t['age']:.0f}s", t.get("rtt_ms"), t["streams"],
         t.get("tls"), (t.get("tcp") or {}).get("rtt_ms"), (t.get("tcp") or {}).get("retransmits"),
         (t.get("tcp") or {}).get("congestion")] for t in st.get("tunnels", [])]))
    parts.append("")
    parts.append(_table("Services", ["service", "tenant", "side", "endpoint", "routes"], [
        [s["name"], s.get("tenant"), s["side"], s["endpoint"], ",".join(s["routes"]) if "routes" in s else "-"]
        for s in st.get("services", [])]))
    if st.get("tenants"):
        parts.append("")
        parts.append(_table("Tenants", ["tenant", "tunnels", "streams", "limits"], [
            [t["name"], t["tunnels"], t["streams"], f"tunnels {t['max_tunnels'] or '-'}, streams {t['max_streams'] or '-'}"]
            for t in st["tenants"]]))
    c = st.get("counters", {})
    parts.append("")
    open_streams = st.get("streams_total", len(st.get("streams", [])))  # the list itself is one page
    parts.append(f"streams: {open_streams} open, {c.get('streams_opened', 0)} opened, "
                 f"{c.get('open_failures', 0)} open failures, {c.get('route_timeouts', 0)} route timeouts; "
                 f"bytes out {c.get('bytes_up', 0)}, in {c.get('bytes_down', 0)}")
    r = st.get("resume")
    if r:  # protocol §10
        parts.append(f"resume: {r['parked']} parked now, {r['resumed']} resumed, {r['failed']} failed, "
                     f"{r['refused']} refused, {r['bytes_replayed']} bytes replayed")
    events = st.get("events", [])[-5:]
    if events:
        parts.append("recent events:")
        parts += [f"  {e['event']} " + " ".join(f"{k}={v}" for k, v in e.items() if k not in ("ts", "event"))
                  for e in events]
    return "\n".join(parts)


def run(args) -> int:
    urls = args.urls or [DEFAULT_URL]
    rc = 0
    for i, url in enumerate(urls):
        try:
            st = fetch(url, args.token)
        except urllib.error.HTTPError as exc:
            print(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace').strip()}")
            rc = 1
            continue
        except (OSError, ValueError) as exc:
            print(f"{url}: cannot read status: {getattr(exc, 'reason', exc)}; is the gateway running with "
                  "gateway.admin set to this address?")
            rc = 1
            continue
        if i:
            print()
        print(json.dumps(st, indent=1) if args.json else render(st))
    return rc
