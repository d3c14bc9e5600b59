"""Chain of custody (snakenode/snake/custody.py): who may hand the snake on, on hand-made chains."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from snakenode import wire
from snakenode.identity import Identity
from snakenode.snake import custody
from snakenode.snake.custody import Custody, CustodyError, Link
from snakenode.snake.messages import Propose, decode_links
from snakenode.snake.state import genesis_lineage, lineage_next, start_job

pytestmark = pytest.mark.timeout(30)

JOB = "0123456789abcdef"


def ident() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


@pytest.fixture()
def people() -> dict[str, Identity]:
    return {name: ident() for name in ("sub", "a", "b", "c", "coord", "eve")}


def chain3(p: dict[str, Identity]) -> list[Link]:
    """sub hands hop 0 to a, a hands hop 1 to b, b hands hop 2 to c."""
    g = genesis_lineage(JOB)
    l0 = custody.sign(p["sub"], g, 0, 0, p["a"].peer_id)
    l1 = custody.sign(p["a"], l0.lineage, 1, 0, p["b"].peer_id)
    l2 = custody.sign(p["b"], l1.lineage, 2, 0, p["c"].peer_id)
    return [l0, l1, l2]


def test_an_honest_chain_verifies_and_its_tail_comes_back(people: dict[str, Identity]) -> None:
    c = Custody(JOB, people["sub"].peer_id)
    links = chain3(people)
    assert c.add(links) == (links, None, None)
    assert c.known(links[-1].lineage)
    assert c.chain(links[-1].lineage) == links
    assert c.chain(links[-1].lineage, custody.TAIL) == links[1:]
    assert c.add(links) == ([], None, None)  # idempotent


def test_a_stranger_cannot_sign_a_hop_it_never_held(people: dict[str, Identity]) -> None:
    c = Custody(JOB, people["sub"].peer_id)
    l0, l1, _ = chain3(people)
    c.add([l0, l1])
    forged = custody.sign(people["eve"], l1.lineage, 2, 0, people["eve"].peer_id)
    added, problem, missing = c.add([forged])
    assert added == [] and missing is None
    assert problem is not None and "did not hold the hop before" in problem
    assert not c.known(forged.lineage)


def test_only_the_submitter_starts_the_chain(people: dict[str, Identity]) -> None:
    c = Custody(JOB, people["sub"].peer_id)
    own = custody.sign(people["eve"], genesis_lineage(JOB), 0, 0, people["eve"].peer_id)
    assert "did not hold" in (c.add([own])[1] or "")


def test_a_signature_over_other_bytes_is_refused(people: dict[str, Identity]) -> None:
    c = Custody(JOB, people["sub"].peer_id)
    l0 = chain3(people)[0]
    bad = Link(l0.parent, l0.hop, l0.attempt, l0.holder, l0.signer, people["sub"].sign(b"something else"))
    assert "does not verify" in (c.add([bad])[1] or "")
    # The same link moved to another holder (a stolen certificate) no longer matches its signature.
    moved = Link(l0.parent, l0.hop, l0.attempt, people["eve"].peer_id, l0.signer, l0.sig)
    assert "does not verify" in (c.add([moved])[1] or "")


def test_a_gap_names_the_missing_parent(people: dict[str, Identity]) -> None:
    c = Custody(JOB, people["sub"].peer_id)
    l0, l1, l2 = chain3(people)
    added, problem, missing = c.add([l2])
    assert (added, problem, missing) == ([], None, l1.lineage)
    assert c.add([l0, l1, l2])[1:] == (None, None)


def test_hops_must_follow_their_parent(people: dict[str, Identity]) -> None:
    c = Custody(JOB, people["sub"].peer_id)
    l0 = chain3(people)[0]
    c.add([l0])
    skip = custody.sign(people["a"], l0.lineage, 5, 0, people["b"].peer_id)
    assert "does not follow" in (c.add([skip])[1] or "")
    late0 = custody.sign(people["sub"], genesis_lineage(JOB), 3, 0, people["a"].peer_id)
    assert "genesis" in (c.add([late0])[1] or "")


def test_the_coordinator_of_a_cs_job_signs_every_hop(people: dict[str, Identity]) -> None:
    g = genesis_lineage(JOB)
    co = people["coord"]
    l0 = custody.sign(co, g, 0, 0, people["a"].peer_id)
    l1 = custody.sign(co, l0.lineage, 1, 0, people["b"].peer_id)
    # ... and after a fallback to P2P the holder of hop 1 carries on itself.
    l2 = custody.sign(people["b"], l1.lineage, 2, 0, people["c"].peer_id)
    cs = Custody(JOB, people["sub"].peer_id, co.peer_id)
    assert cs.add([l0, l1, l2]) == ([l0, l1, l2], None, None)
    p2p = Custody(JOB, people["sub"].peer_id)
    assert "did not hold" in (p2p.add([l0])[1] or "")


def test_retries_and_self_hops(people: dict[str, Identity]) -> None:
    c = Custody(JOB, people["sub"].peer_id)
    l0 = chain3(people)[0]
    c.add([l0])
    retry = [custody.sign(people["a"], l0.lineage, 1, k, people["b"].peer_id) for k in range(3)]
    self_hop = custody.sign(people["a"], l0.lineage, 1, 3, people["a"].peer_id)
    assert c.add([*retry, self_hop])[1:] == (None, None)
    assert len({x.lineage for x in retry}) == 3


def test_wire_and_disk_forms_are_strict(people: dict[str, Identity]) -> None:
    links = chain3(people)
    msg = wire.unpackb(wire.packb({"custody": [x.to_wire() for x in links]}))
    assert decode_links(wire.Fields(msg, "m"), "custody", 8) == links
    assert [Link.from_json(x.to_json()) for x in links] == links
    good = links[0].to_wire()
    for bad in ([], good[:5], [b"x" * 31, *good[1:]], [good[0], -1, *good[2:]], [*good[:3], "nope", *good[4:]],
                [*good[:5], b"s" * 63], "text"):
        with pytest.raises(CustodyError):
            Link.from_wire(bad)
    with pytest.raises(wire.WireError, match="at most 1"):
        decode_links(wire.Fields(msg, "m"), "custody", 1)


def test_propose_carries_the_tail(people: dict[str, Identity]) -> None:
    s = start_job(JOB, [people["a"].peer_id], people["a"].peer_id, 1, 4)
    link = custody.sign(people["sub"], s.parent_lineage, s.hop, s.attempt, s.holder)
    assert link.lineage == s.lineage == lineage_next(genesis_lineage(JOB), 0, 0, people["a"].peer_id)
    p = Propose(JOB, b"job", s, 1, {}, None, [link])
    got = Propose.from_wire(wire.Fields(wire.unpackb(wire.packb(p.to_wire())), "propose"))
    assert got.custody == [link]
