"""The member table of a cloud cluster (docs/ha.md §2). Pure: no I/O, the clock is passed in.

Rules:
- a member's own word about itself wins (it is heard directly on a peer link);
- a member is forgotten only on its own GOAWAY or when nobody has heard of it for ``ttl`` seconds,
  never because another member's list omits it;
- a new incarnation of a known node id replaces the old one (the member restarted).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Member:
    node_id: str
    incarnation: str
    url: str | None  # advertised tunnel URL, if the member has one
    services: frozenset[str] = frozenset()  # services it can route to its own on-prem tunnels
    last_heard: float = 0.0

    def wire(self, now: float) -> dict:
        return {"node_id": self.node_id, "incarnation": self.incarnation, "url": self.url,
                "services": sorted(self.services), "age": round(max(0.0, now - self.last_heard), 3)}


@dataclass
class MemberTable:
    self_id: str
    ttl: float
    members: dict[str, Member] = field(default_factory=dict)

    def set_self(self, incarnation: str, url: str | None, services: frozenset[str], now: float) -> bool:
        return self._put(Member(self.self_id, incarnation, url, services, now), direct=True)

    def heard(self, entry: dict, now: float, *, direct: bool) -> bool:
        """Merge one wire entry. ``direct``: it came from that member itself. Returns True when the
        member set or a member's route set changed (the caller pushes MEMBERS)."""
        try:
            m = Member(str(entry["node_id"]), str(entry["incarnation"]), entry.get("url") or None,
                       frozenset(str(s) for s in entry.get("services", ())),
                       now - (0.0 if direct else min(float(entry.get("age", 0.0)), self.ttl)))
        except (KeyError, TypeError, ValueError):
            return False
        if m.node_id == self.self_id:
            return False  # nobody else speaks for us
        return self._put(m, direct=direct)

    def _put(self, m: Member, *, direct: bool) -> bool:
        old = self.members.get(m.node_id)
        if old is None:
            self.members[m.node_id] = m
            return True
        if old.incarnation != m.incarnation:
            if not direct and m.last_heard <= old.last_heard:
                return False  # stale hearsay about an older life of the member
            self.members[m.node_id] = m
            return True
        changed = direct and (old.url != m.url or old.services != m.services)
        if direct:
            old.url, old.services = m.url, m.services
        old.last_heard = max(old.last_heard, m.last_heard)
        return changed

    def forget(self, node_id: str, incarnation: str | None = None) -> bool:
        """The member said GOAWAY (drain): drop it now."""
        m = self.members.get(node_id)
        if m is None or node_id == self.self_id or (incarnation and m.incarnation != incarnation):
            return False
        del self.members[node_id]
        return True

    def refresh(self, node_id: str, now: float) -> None:
        m = self.members.get(node_id)
        if m is not None:
            m.last_heard = now

    def expire(self, now: float) -> list[str]:
        gone = [n for n, m in self.members.items() if n != self.self_id and now - m.last_heard > self.ttl]
        for n in gone:
            del self.members[n]
        return gone

    def wire(self, now: float) -> list[dict]:
        return [m.wire(now) for m in sorted(self.members.values(), key=lambda m: m.node_id)]

    def routes(self, service: str) -> list[str]:
        """Members other than us that can route ``service`` to an on-prem gateway."""
        return [n for n, m in self.members.items() if n != self.self_id and service in m.services]
