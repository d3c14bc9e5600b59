"""The peer table: who we know, who is alive, what they advertise. Pure state; time is passed in.

A peer is *live* (listed by `snakenode peers`) while we hold a connection to it that answers pings.
A crashed peer drops out when its connection closes; a frozen or cut-off one when it misses
`ping_misses` consecutive pings (libp2p alone never notices it). Profiles carry a sequence number so a
late gossip copy of an old profile never resurrects a peer or overwrites newer data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

# Dial backoff for peers we learned of but cannot reach: 0.5 s doubling to 30 s, with jitter so a
# restarted network does not redial in lockstep.
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
RECENT_S = 600.0  # a peer seen alive this recently stays a dial candidate (healing after partitions)


@dataclass
class PeerEntry:
    peer_id: str
    addrs: list[str] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    profile_seq: int = -1
    profile_at: float = 0.0
    connected: bool = False
    down: bool = False
    down_reason: str = ""
    last_seen: float = 0.0
    rtt_ms: float | None = None
    misses: int = 0
    dial_failures: int = 0
    next_dial: float = 0.0
    is_bootstrap: bool = False

    @property
    def role(self) -> str:
        return str((self.profile or {}).get("role", "bootstrap" if self.is_bootstrap else "node"))

    @property
    def live(self) -> bool:
        return self.connected and not self.down


def jitter(peer_id: str, attempt: int) -> float:
    """Deterministic jitter in [0.8, 1.2) per (peer, attempt): reproducible, yet spread across peers."""
    h = hashlib.sha256(f"{peer_id}:{attempt}".encode()).digest()
    return 0.8 + 0.4 * (h[0] / 256)


def backoff(peer_id: str, failures: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** max(0, failures - 1)) * jitter(peer_id, failures)


class PeerTable:
    def __init__(self, self_id: str, ping_misses: int = 2, profile_ttl_s: float = 60.0) -> None:
        self.self_id = self_id
        self.ping_misses = ping_misses
        self.profile_ttl_s = profile_ttl_s
        self.entries: dict[str, PeerEntry] = {}

    def get(self, peer_id: str) -> PeerEntry:
        entry = self.entries.get(peer_id)
        if entry is None:
            entry = self.entries[peer_id] = PeerEntry(peer_id)
        return entry

    # --- events -------------------------------------------------------------------------------
    def on_profile(self, profile: dict[str, Any], now: float) -> str:
        """Returns "new", "updated" or "stale" (an older or repeated copy, ignored)."""
        pid = profile["peer_id"]
        if pid == self.self_id:
            return "stale"
        entry = self.get(pid)
        seq = int(profile.get("seq", 0))
        if seq <= entry.profile_seq:
            return "stale"
        fresh = entry.profile is None
        entry.profile = profile
        entry.profile_seq = seq
        entry.profile_at = now
        entry.last_seen = now
        if profile.get("addrs"):
            entry.addrs = list(profile["addrs"])
        if entry.down and not entry.connected:
            # A newer profile is a sign of life (e.g. a SIGCONT'd peer): let the dialer try again now.
            entry.down = False
            entry.down_reason = ""
            entry.next_dial = now
            entry.dial_failures = 0
        return "new" if fresh else "updated"

    def on_connected(self, peer_id: str, now: float) -> None:
        if peer_id == self.self_id:
            return
        entry = self.get(peer_id)
        entry.connected = True
        entry.down = False
        entry.down_reason = ""
        entry.misses = 0
        entry.dial_failures = 0
        entry.last_seen = now

    def on_disconnected(self, peer_id: str, now: float) -> bool:
        """Returns True when this takes a live peer out of the table."""
        entry = self.entries.get(peer_id)
        if entry is None:
            return False
        was_live = entry.live
        entry.connected = False
        entry.misses = 0
        entry.next_dial = now + backoff(peer_id, 1)
        if was_live:
            entry.down = True
            entry.down_reason = "disconnected"
        return was_live

    def on_ping_ok(self, peer_id: str, rtt_ms: float, now: float) -> None:
        entry = self.entries.get(peer_id)
        if entry is None:
            return
        entry.misses = 0
        entry.rtt_ms = rtt_ms if entry.rtt_ms is None else 0.7 * entry.rtt_ms + 0.3 * rtt_ms
        entry.last_seen = now

    def on_ping_miss(self, peer_id: str, now: float) -> bool:
        """Count a miss; True when the peer just crossed the threshold and must be cut off."""
        entry = self.entries.get(peer_id)
        if entry is None or entry.down:
            return False
        entry.misses += 1
        if entry.misses >= self.ping_misses:
            entry.down = True
            entry.connected = False  # the caller disconnects it: only a fresh sign of life brings it back
            entry.down_reason = "unresponsive"
            entry.next_dial = now + backoff(peer_id, 1)
            return True
        return False

    def on_dial_failed(self, peer_id: str, now: float) -> float:
        entry = self.get(peer_id)
        entry.dial_failures += 1
        delay = backoff(peer_id, entry.dial_failures)
        entry.next_dial = now + delay
        return delay

    def mark_bootstrap(self, peer_id: str, addr: str) -> None:
        entry = self.get(peer_id)
        entry.is_bootstrap = True
        if addr not in entry.addrs:
            entry.addrs.append(addr)

    # --- queries ------------------------------------------------------------------------------
    def live(self) -> list[PeerEntry]:
        return sorted((e for e in self.entries.values() if e.live), key=lambda e: e.peer_id)

    def live_ids(self) -> set[str]:
        return {e.peer_id for e in self.entries.values() if e.live}

    def is_live(self, peer_id: str) -> bool:
        e = self.entries.get(peer_id)
        return bool(e and e.live)

    def to_dial(self, now: float, max_peers: int) -> list[PeerEntry]:
        """Known peers worth dialing now: fresh profile or bootstrap, not connected, backoff elapsed."""
        connected = sum(1 for e in self.entries.values() if e.connected)
        room = max(0, max_peers - connected)
        out = []
        for e in sorted(self.entries.values(), key=lambda e: (not e.is_bootstrap, e.peer_id)):
            if len(out) >= room:
                break
            if e.connected or not e.addrs or now < e.next_dial:
                continue
            fresh = e.profile is not None and now - e.profile_at < self.profile_ttl_s
            # A peer that was live recently is worth redialing even when its profile went stale: after a
            # load spike or a partition, gossip may have stopped reaching us before the links came back.
            recent = now - e.last_seen < RECENT_S
            if e.is_bootstrap or fresh or recent:
                out.append(e)
        return out

    def expire(self, now: float) -> list[str]:
        """Forget peers whose profile has not been refreshed within the TTL and that are not connected."""
        gone = [
            pid for pid, e in self.entries.items()
            if not e.connected and not e.is_bootstrap and (e.profile is None or now - e.profile_at > self.profile_ttl_s)
            and now - e.last_seen > max(self.profile_ttl_s, RECENT_S)
        ]
        for pid in gone:
            del self.entries[pid]
        return gone

    def view_all(self, now: float) -> list[dict[str, Any]]:
        """Every entry, live or not, with its liveness bookkeeping (`snakenode peers --all`)."""
        return [{
            "peer_id": e.peer_id, "role": e.role, "addrs": e.addrs, "live": e.live, "connected": e.connected,
            "down_reason": e.down_reason or None, "has_profile": e.profile is not None,
            "profile_age_s": round(now - e.profile_at, 3) if e.profile is not None else None,
            "last_seen_s": round(max(0.0, now - e.last_seen), 3), "misses": e.misses,
            "dial_failures": e.dial_failures, "next_dial_in_s": round(max(0.0, e.next_dial - now), 3),
            "bootstrap": e.is_bootstrap,
        } for e in sorted(self.entries.values(), key=lambda e: e.peer_id)]

    def view(self, now: float) -> list[dict[str, Any]]:
        """The `snakenode peers --json` rows: live peers with a profile, never ourselves."""
        rows = []
        for e in self.live():
            if e.profile is None:
                continue
            rows.append({
                "peer_id": e.peer_id,
                "role": e.role,
                "addrs": e.addrs,
                "last_seen_s": round(max(0.0, now - e.last_seen), 3),
                "rtt_ms": None if e.rtt_ms is None else round(e.rtt_ms, 2),
                "profile": e.profile,
            })
        return rows
