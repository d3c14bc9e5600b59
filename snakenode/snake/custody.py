"""Chain of custody: who handed the snake to whom, signed hop by hop.

Fencing (state.py) orders claims, but a claim alone proves nothing: anyone can compute a lineage. A
custody link is the hand-over's certificate: the peer that held the parent lineage (the submitter for hop
0; the job's coordinator for any hop of a CS job) signs the child lineage with its Ed25519 key. Because a
lineage is sha256(parent, hop, attempt, holder) (state.lineage_next), one signature binds all four, and a
chain of links back to the job's genesis lineage proves that every holder was handed the snake by the one
before it — a stranger cannot mint a hop, a progress record or a completion out of nowhere, and a trusted
submitter's key is the only root.

Signed bytes: `CUSTODY_DOMAIN || raw32(lineage)` (the domain keeps these signatures apart from job and
peer-record signatures made with the same key).

`Custody` is one job's store of verified links (pure: no I/O; the daemon persists and fetches). A link is
accepted only when its parent is already known (genesis or a verified link) and its signer may sign for
that parent; chains are therefore checked parent first and a gap is reported as the missing lineage, which
the caller fetches from the peer that presented the link (`get_custody` in docs/PROTOCOL.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from snakenode.identity import Identity, verify
from snakenode.snake.state import MAX_ATTEMPT, MAX_HOP, StateError, genesis_lineage, lineage_next
from snakenode.wire import PEER_ID_RE

CUSTODY_DOMAIN = b"snakenode/custody/1\0"
MAX_CHAIN = 200_000  # links in one `custody` answer (about 45 MB at most; a job of that many hops is unusual)
TAIL = 2             # links a Propose carries: the parent's and the proposed one


class CustodyError(ValueError):
    """A link that does not decode or does not verify; the message says which and why."""


def message(lineage: str) -> bytes:
    return CUSTODY_DOMAIN + bytes.fromhex(lineage)


@dataclass(frozen=True)
class Link:
    parent: str   # parent lineage, 64 hex
    hop: int
    attempt: int
    holder: str   # the peer handed the hop
    signer: str   # the peer that handed it
    sig: bytes

    @property
    def lineage(self) -> str:
        return lineage_next(self.parent, self.hop, self.attempt, self.holder)

    def to_wire(self) -> list[Any]:
        return [bytes.fromhex(self.parent), self.hop, self.attempt, self.holder, self.signer, self.sig]

    @classmethod
    def from_wire(cls, obj: Any) -> Link:
        """Strict decoding (types, sizes, ranges); the signature is `Custody.add`'s to check."""
        if not isinstance(obj, list | tuple) or len(obj) != 6:
            raise CustodyError("a custody link is a list [parent, hop, attempt, holder, signer, sig]")
        parent, hop, attempt, holder, signer, sig = obj
        if not isinstance(parent, bytes) or len(parent) != 32:
            raise CustodyError("custody link parent must be 32 bytes")
        if type(hop) is not int or not 0 <= hop <= MAX_HOP:
            raise CustodyError("custody link hop out of range")
        if type(attempt) is not int or not 0 <= attempt <= MAX_ATTEMPT:
            raise CustodyError("custody link attempt out of range")
        for name, v in (("holder", holder), ("signer", signer)):
            if not isinstance(v, str) or not PEER_ID_RE.match(v):
                raise CustodyError(f"custody link {name} must be a peer id")
        if not isinstance(sig, bytes) or len(sig) != 64:
            raise CustodyError("custody link sig must be 64 bytes (Ed25519)")
        return cls(parent.hex(), hop, attempt, holder, signer, sig)

    def to_json(self) -> dict[str, Any]:
        return {"parent": self.parent, "hop": self.hop, "attempt": self.attempt, "holder": self.holder,
                "signer": self.signer, "sig": self.sig.hex()}

    @classmethod
    def from_json(cls, d: Any) -> Link:
        try:
            return cls.from_wire([bytes.fromhex(d["parent"]), d["hop"], d["attempt"], d["holder"], d["signer"],
                                  bytes.fromhex(d["sig"])])
        except (KeyError, TypeError, ValueError) as exc:
            raise CustodyError(f"bad stored custody link: {exc}") from None


def sign(identity: Identity, parent: str, hop: int, attempt: int, holder: str) -> Link:
    lineage = lineage_next(parent, hop, attempt, holder)
    return Link(parent, hop, attempt, holder, identity.peer_id, identity.sign(message(lineage)))


class Custody:
    """One job's verified links, by lineage."""

    def __init__(self, job_id: str, submitter: str, coordinator: str | None = None) -> None:
        self.job_id = job_id
        self.genesis = genesis_lineage(job_id)
        self.submitter = submitter
        self.coordinator = coordinator
        self.links: dict[str, Link] = {}

    def known(self, lineage: str) -> bool:
        return lineage == self.genesis or lineage in self.links

    def signers_for(self, parent: str) -> set[str]:
        """Who may hand on the snake from `parent`: its holder (the submitter for genesis), and the
        coordinator of a CS job (it plans every hop, and a fallback carries on from its links)."""
        out = {self.submitter} if parent == self.genesis else {self.links[parent].holder}
        if self.coordinator:
            out.add(self.coordinator)
        return out

    def check(self, link: Link) -> str | None:
        """Why `link` cannot be accepted now, or None. Its parent must be known already."""
        try:
            lineage = link.lineage
        except StateError as exc:
            return f"custody link does not form a lineage: {exc}"
        if link.hop == 0 and link.parent != self.genesis:
            return "custody link of hop 0 must start at the job's genesis lineage"
        if link.parent == self.genesis and link.hop != 0:
            return "only hop 0 starts at the job's genesis lineage"
        if link.parent != self.genesis and link.hop != self.links[link.parent].hop + 1:
            return f"custody link of hop {link.hop} does not follow its parent's hop {self.links[link.parent].hop}"
        allowed = self.signers_for(link.parent)
        if link.signer not in allowed:
            return (f"hop {link.hop} was signed by {link.signer}, which did not hold the hop before "
                    f"(allowed: {sorted(allowed)})")
        if not verify(link.signer, message(lineage), link.sig):
            return f"the custody signature of hop {link.hop} does not verify"
        return None

    def add(self, links: Iterable[Link]) -> tuple[list[Link], str | None, str | None]:
        """Verify and keep `links` (parent first). Returns (links new here, problem, missing parent):
        stops at the first link that fails (problem) or whose parent is unknown (missing)."""
        added: list[Link] = []
        for link in links:
            try:
                lineage = link.lineage
            except StateError as exc:
                return added, f"custody link does not form a lineage: {exc}", None
            if lineage in self.links:
                continue
            if not self.known(link.parent):
                return added, None, link.parent
            problem = self.check(link)
            if problem is not None:
                return added, problem, None
            self.links[lineage] = link
            added.append(link)
        return added, None, None

    def chain(self, lineage: str, limit: int = MAX_CHAIN) -> list[Link]:
        """The known links ending at `lineage`, parent first, at most `limit` (the newest)."""
        out: list[Link] = []
        while lineage in self.links and len(out) < limit:
            link = self.links[lineage]
            out.append(link)
            lineage = link.parent
        out.reverse()
        return out
