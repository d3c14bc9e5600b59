"""The node's pure decision parts, without a network: the hand-off's retry policy (snake/retry.py), the
poisoning guard's verdicts (snake/guard.py), the request handler tables (snake/rpc.py), the mode policies
(snake/modes.py), and the test fault specs that are refused because they would do nothing (faults.py).
The network tests (tests/test_snake_p2p.py, test_snake_cs.py) drive the same code end to end."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from snakenode import faults, wire
from snakenode.identity import Identity
from snakenode.snake import guard, job, retry
from snakenode.snake import state as st
from snakenode.snake.modes import CSMode, Modes, P2PMode
from snakenode.snake.phases import HOLDING, Phase
from snakenode.snake.retry import Next, Tries
from snakenode.snake.rpc import HandlerTable, RegistrationError


def peer(i: int) -> str:
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)).peer_id


A, B, C, D = (peer(i) for i in range(1, 5))
JOB = "00000000deadbeef"
SPEC = job.validate_spec({"model": "mlp", "dataset": "digits", "laps": 3})


def holding(holder: str, members: list[str]) -> st.JobState:
    """`holder` just finished hop 0 of a lap over `members`."""
    return st.finish_hop(st.start_job(JOB, members, holder, 1, 4), metric=None, members=members)


# ------------------------------------------------------------------------------------------- retry policy


def eligible(ranked: list[str], t: Tries) -> list[str]:
    """What routing.rank leaves of `ranked` given the exclusions (it drops every excluded peer)."""
    return [p for p in ranked if p not in t.excluded]


def test_halt_stops_on_completion_before_supersession() -> None:
    assert retry.halt(finished=False, rival_ahead=False) is None
    assert retry.halt(finished=True, rival_ahead=False) is Next.STOP
    assert retry.halt(finished=False, rival_ahead=True) is Next.SUPERSEDED
    assert retry.halt(finished=True, rival_ahead=True) is Next.STOP


def test_route_proposes_waits_or_takes_the_hop_itself() -> None:
    assert retry.route([B, C], lap_remaining=[B, C], me=A) is Next.PROPOSE
    assert retry.route([], lap_remaining=[B, C], me=A) is Next.WAIT  # members exist but none is eligible now
    assert retry.route([], lap_remaining=[A], me=A) is Next.SELF_HOP  # the lap's last member: self-hop
    assert retry.route([], lap_remaining=[A, B], me=A) is Next.WAIT
    assert retry.route([], lap_remaining=None, me=A) is Next.WAIT  # hop 0 of a non-training submitter
    assert retry.route([A], lap_remaining=[A], me=A) is Next.PROPOSE  # a candidate always comes first


def test_a_decline_moves_on_to_the_next_candidate() -> None:
    t = retry.proposing(Tries(), attempt=0)
    t = retry.declined(t, B, "busy")
    assert t.excluded == {B: "declined"} and t.attempt == 0, "a plain decline reserves nothing: same attempt"
    assert eligible([B, C], t) == [C]
    t = retry.proposing(t, attempt=0)
    assert t.attempt == 0 and t.waited == 0.0


def test_a_timeout_or_stale_decline_fences_the_attempt() -> None:
    t = retry.declined(Tries(attempt=2), B, None)
    assert t.excluded == {B: "timeout"} and t.attempt == 3, "a lost Accept may have reserved the candidate"
    t = retry.declined(Tries(attempt=2), C, "stale")
    assert t.excluded == {C: "declined"} and t.attempt == 3


def test_all_declined_waits_then_soft_exclusions_expire() -> None:
    t = Tries()
    for cand in (B, C, D):
        t = retry.declined(retry.proposing(t, t.attempt), cand, "busy")
    assert eligible([B, C, D], t) == []
    assert retry.route(eligible([B, C, D], t), lap_remaining=[B, C, D], me=A) is Next.WAIT
    ticks = 0
    while eligible([B, C, D], t) == []:
        t = retry.waited(t, 0.5)
        ticks += 1
        assert ticks < 100
    assert ticks * 0.5 == retry.SOFT_EXCLUSION_S and t.waited == 0.0
    assert eligible([B, C, D], t) == [B, C, D]


def test_a_lost_successor_stays_excluded() -> None:
    t = retry.successor_lost(Tries(attempt=0), B, proposal_attempt=4)
    assert t.attempt == 5 and t.excluded == {B: "failed"}
    t = retry.declined(t, C, "busy")
    for _ in range(20):
        t = retry.waited(t, 0.5)
    assert t.excluded == {B: "failed"}, "soft exclusions expire, a lost successor does not"


def test_transfer_failures_exclude_after_the_second() -> None:
    t = retry.transfer_failed(Tries(), B, proposal_attempt=0)
    assert t.attempt == 1 and B not in t.excluded and t.transfer_failures == {B: 1}
    t = retry.transfer_failed(t, B, proposal_attempt=1)
    assert t.attempt == 2 and t.excluded == {B: "transfer"} and t.transfer_failures == {B: 2}


def test_a_poison_refusal_routes_on_as_a_new_attempt() -> None:
    t = retry.poison_refused(Tries(), B, proposal_attempt=3)
    assert t.attempt == 4 and t.excluded == {B: "declined"}


def test_a_dropped_member_leaves_this_node_the_hop() -> None:
    """A lap member dropped after declining (lap.max_declines) closes the lap; with nobody else alive the
    next lap is this node alone, and the policy says: take the hop here."""
    spec = {**SPEC, "lap": {**SPEC["lap"], "max_declines": 1}}
    base = holding(A, [A, B])
    assert st.lap_remaining(base) == [B]
    t = retry.declined(Tries(), B, "busy")
    base = st.record_decline(base, B, spec=spec, members=[A])
    assert B in base.dropped or base.lap == 1
    assert st.lap_remaining(base) == [A]
    assert retry.route(eligible([B], t), lap_remaining=st.lap_remaining(base), me=A) is Next.SELF_HOP


# ------------------------------------------------------------------------------------------------- guard


def test_guard_layer_verdict() -> None:
    assert guard.layer_verdict("blocks.0", 1.5, 10.0) is None
    assert guard.layer_verdict("blocks.0", 10.0, 10.0) is None, "the bound itself is allowed"
    why = guard.layer_verdict("blocks.0", 50.0, 10.0)
    assert why is not None and "blocks.0 moved 50x" in why and "limit 10" in why


def test_guard_loss_verdict() -> None:
    # Lap 0: never refused; the loss becomes the reference.
    assert guard.loss_verdict(0, 100.0, 1.0, 4.0) == guard.LossVerdict(None, 100.0)
    # From lap 1: over factor x the previous incoming loss is refused and the reference stays.
    v = guard.loss_verdict(1, 4.5, 1.0, 4.0)
    assert v.why is not None and "validation loss 4.5" in v.why and v.reference == 1.0
    assert guard.loss_verdict(1, 3.9, 1.0, 4.0) == guard.LossVerdict(None, 3.9)
    # No reference yet: accepted, and it becomes the reference.
    assert guard.loss_verdict(2, 50.0, None, 4.0) == guard.LossVerdict(None, 50.0)
    # A NaN loss neither refuses nor replaces the reference.
    assert guard.loss_verdict(3, float("nan"), 1.0, 4.0) == guard.LossVerdict(None, 1.0)


# --------------------------------------------------------------------------------------------- rpc table


class _Frames:
    """A stream stand-in that records the frames written to it."""

    def __init__(self) -> None:
        self.peer = A
        self.written: list[dict[str, Any]] = []

    async def write_frame(self, obj: dict[str, Any]) -> None:
        self.written.append(obj)


async def test_rpc_table_dispatches_to_the_owner() -> None:
    table = HandlerTable("/snake/state/1.0.0", "state", 1024)

    async def ping(io: Any, f: wire.Fields) -> dict[str, Any]:
        return {"t": "pong", "n": f.int("n") + 1, "from": io.peer}

    async def streams_itself(io: Any, f: wire.Fields) -> None:
        await io.write_frame({"t": "first"})
        await io.write_frame({"t": "second"})

    table.register("ping", ping)
    table.register("many", streams_itself)
    assert table.kinds() == ["many", "ping"]
    io = _Frames()
    await table.dispatch(io, "ping", wire.Fields({"t": "ping", "n": 1}, "ping"))
    await table.dispatch(io, "many", wire.Fields({"t": "many"}, "many"))
    assert io.written == [{"t": "pong", "n": 2, "from": A}, {"t": "first"}, {"t": "second"}]


async def test_rpc_table_refuses_unknown_kinds_and_double_owners() -> None:
    table = HandlerTable("/snake/state/1.0.0", "state", 1024)

    async def h(io: Any, f: wire.Fields) -> dict[str, Any]:
        return {"t": "ok"}

    table.register("lease", h)
    with pytest.raises(RegistrationError, match="'lease' already has a handler"):
        table.register("lease", h)
    io = _Frames()
    with pytest.raises(wire.WireError, match="unknown state message 'nope'") as info:
        await table.dispatch(io, "nope", wire.Fields({"t": "nope"}, "nope"))
    assert info.value.kind == "unexpected" and io.written == []


# ------------------------------------------------------------------------------------------ mode policies


def run_of(mode: str, coordinator: str = "", fallback: str = "none", fell_back: bool = False) -> Any:
    return SimpleNamespace(job_id=JOB, spec={"mode": mode, "coordinator": coordinator, "fallback": fallback},
                           fallback=fell_back)


def test_p2p_policy() -> None:
    p2p = P2PMode()
    state = st.after_hop(holding(A, [A, B]), B, 1, spec=SPEC, attempt=0)
    r = run_of("p2p")
    assert p2p.lease_target(r, state) == A, "the baton rests with the previous holder"
    assert p2p.may_assign(r, C) is None and not p2p.hands_back(r) and not p2p.assigns(r)
    assert p2p.releases_predecessor(r)
    assert Modes(A, lambda p: True).of(r) is not None and Modes(A, lambda p: True).of(r).name == "p2p"


def test_cs_policy_on_a_node_and_on_the_coordinator() -> None:
    live = {D}
    cs = CSMode(B, lambda p: p in live)
    state = st.after_hop(holding(A, [A, B]), B, 1, spec=SPEC, attempt=0)
    node_run = run_of("cs", coordinator=D)
    assert cs.lease_target(node_run, state) == D, "the baton rests with the coordinator"
    assert cs.may_assign(node_run, D) is None
    why = cs.may_assign(node_run, A)
    assert why is not None and "only its coordinator" in why
    assert cs.hands_back(node_run) and not cs.assigns(node_run) and cs.releases_predecessor(node_run)
    coord = CSMode(D, lambda p: True)
    assert coord.assigns(node_run) and not coord.releases_predecessor(node_run)
    modes = Modes(D, lambda p: True)
    assert modes.coordinates(node_run) and not modes.coordinates(run_of("p2p", coordinator=D))


def test_cs_fallback_to_p2p_once_the_coordinator_is_gone() -> None:
    live: set[str] = {D}
    cs = CSMode(B, lambda p: p in live)
    r = run_of("cs", coordinator=D, fallback="p2p")
    assert cs.may_assign(r, A) is not None and not r.fallback, "the coordinator is alive: it gives the orders"
    live.clear()
    assert cs.may_assign(r, A) is None and r.fallback, "gone, and the job allows P2P: follow the holders"
    state = st.after_hop(holding(A, [A, B]), B, 1, spec=SPEC, attempt=0)
    assert cs.lease_target(r, state) == A and not cs.hands_back(r)
    strict = run_of("cs", coordinator=D, fallback="none")
    assert cs.may_assign(strict, A) is not None and not strict.fallback


def test_phases_are_their_wire_names() -> None:
    assert Phase.parse("handing_off") is Phase.HANDING_OFF and Phase.parse("from-the-future") is Phase.IDLE
    assert f"{Phase.BATON}" == "baton" and Phase.TRAINING in HOLDING and Phase.BATON not in HOLDING


# ------------------------------------------------------------------------------------------- fault specs


def test_faults_that_would_do_nothing_are_refused() -> None:
    for ok in ("decline@accept", "hang@accept", "break@send", "break@recv", "poison@handoff", "exit@assign",
               "stop@upload:hop=2", "raise@handler"):
        faults.parse(ok)
    for bad in ("decline@send", "hang@recv", "poison@train", "break@accept", "decline@assign"):
        with pytest.raises(faults.FaultSpecError, match="does nothing at"):
            faults.parse(bad)


# ------------------------------------------------------------------------------------------ import rules


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any level (functions and TYPE_CHECKING blocks included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


SNAKE = Path(__file__).resolve().parent.parent / "snakenode" / "snake"


def test_the_snake_package_never_imports_the_daemon() -> None:
    offenders = {p.name for p in SNAKE.glob("*.py") if any(m.startswith("snakenode.daemon") for m in _imports(p))}
    assert not offenders, f"{sorted(offenders)} import the daemon: take what you need from snake/context.py"


def test_pure_decision_modules_import_neither_trio_nor_net() -> None:
    for name in ("retry", "guard", "modes", "state", "routing", "window"):
        bad = {m for m in _imports(SNAKE / f"{name}.py")
               if m.split(".")[0] in ("trio", "libp2p") or m.startswith("snakenode.net")}
        assert not bad, f"snake/{name}.py imports {sorted(bad)}: pure decisions take their inputs as arguments"


async def test_fault_seams_act_only_when_armed(tmp_path: Path) -> None:
    import numpy as np

    from snakenode.layers import bundle as bundle_mod
    from snakenode.layers.store import LayerStore

    assert await faults.Faults("decline@accept").at_accept(0.0, hop=1) is True
    assert await faults.Faults("hang@accept").at_accept(0.01, hop=1) is False, "hang stalls, then answers"
    assert await faults.Faults("").at_accept(0.0, hop=1) is False
    store = LayerStore(tmp_path / "store")
    h = store.put_bytes(bundle_mod.encode_blob({"w": np.ones(4, dtype=np.float32), "n": np.arange(2)}))
    assert await faults.Faults("").at_handoff({"head": h}, store, hop=0) is None
    poisoned = await faults.Faults("poison@handoff").at_handoff({"head": h}, store, hop=0)
    assert poisoned is not None and poisoned["head"] != h
    tensors = bundle_mod.decode_blob(store.get_bytes(poisoned["head"]), "head")
    assert tensors["w"].tolist() == [1000.0] * 4 and tensors["n"].tolist() == [0, 1], "floats scaled, ints kept"


async def test_the_assign_and_upload_fault_phases_fire_where_cs_acts() -> None:
    """assign = the coordinator hands a hop out (instead of `propose`), upload = a CS node gives its trained
    hop back: both fire before any stream is opened (raise shows the spot without a network)."""
    from snakenode.counters import Counters
    from snakenode.snake.handoff import Handoff
    from snakenode.snake.uplink import Uplink

    run = SimpleNamespace(job_id=JOB, spec={"mode": "cs", "coordinator": D, "fallback": "none"}, fallback=False,
                          signed=SimpleNamespace(encode=lambda: b""), custody=SimpleNamespace(chain=lambda *a: []))
    hop = SimpleNamespace(hop=3, attempt=0, lineage="0" * 64, window=SimpleNamespace(size=1))
    for me, armed, fires in ((D, "raise@assign:hop=3", True), (D, "raise@propose:hop=3", False),
                             (A, "raise@propose:hop=3", True), (A, "raise@assign:hop=3", False)):
        # No host: a proposal that gets past its fault phase fails at opening the stream (counted).
        ctx = SimpleNamespace(counters=Counters(), faults=faults.Faults(armed), svc=SimpleNamespace(host=None))
        handoff = Handoff(ctx, None, None, None, Modes(me, lambda p: True), None, None)  # type: ignore[arg-type]
        if fires:
            with pytest.raises(RuntimeError, match="injected fault"):
                await handoff.propose(run, B, hop, {})  # type: ignore[arg-type]
        else:
            assert await handoff.propose(run, B, hop, {}) == (None, 0, None)  # type: ignore[arg-type]
            assert ctx.faults.items[0].fired == 0 and ctx.counters.snapshot()["snake.propose.failed"] == 1
    ctx = SimpleNamespace(counters=Counters(), faults=faults.Faults("raise@upload:hop=3"))
    with pytest.raises(RuntimeError, match="injected fault at upload"):
        await Uplink(ctx, None, None)._upload(run, D, hop, {}, None)  # type: ignore[arg-type]
