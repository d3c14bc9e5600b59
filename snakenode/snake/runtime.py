"""A node's record of one job, in memory and under HOME/jobs/<job_id>/ (survives restarts).

Files: `job.msgpack` (the signed job as received), `meta.json` (joined or why not, the model's layer
schema, completion), `checkpoint.json` (what this node holds of the snake: phase, job_state, model state,
and the baton it keeps for its successor), `hoplog.jsonl` (this node's own events), `seen.jsonl`
(events other nodes published on the progress topic) and `custody.jsonl` (verified hand-over certificates,
snake/custody.py, appended as they are verified). Layers themselves live in the content-addressed
store; a checkpoint names them by hash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from snakenode.home import write_json_atomic
from snakenode.layers import bundle as bundle_mod
from snakenode.snake import hoplog
from snakenode.snake.custody import Custody, CustodyError, Link
from snakenode.snake.job import SignedJob
from snakenode.snake.phases import Phase
from snakenode.snake.state import Claim, JobState, compare_claims


def _read(path: Path) -> list[dict[str, Any]]:
    return hoplog.read_log(path) if path.exists() else []


@dataclass
class Baton:
    """What a predecessor keeps after handing off: its finished state, the successor's, the model."""

    base: JobState | None  # None when this node only started the job (hop 0 proposed by the origin)
    proposed: JobState
    successor: str
    model: dict[str, str]
    lease_deadline: float = 0.0
    released: bool = False
    retrying: bool = False  # the predecessor decided to retry: a late lease or resume is refused
    event: trio.Event = field(default_factory=trio.Event)


@dataclass
class JobRun:
    job_id: str
    signed: SignedJob
    dir: Path
    joined: bool = False
    join_reason: str = ""
    schema: dict[str, bundle_mod.LayerEntry] = field(default_factory=dict)
    blocks: int = 0
    init_state: dict[str, str] = field(default_factory=dict)
    ready: trio.Event = field(default_factory=trio.Event)
    # What this node holds of the snake.
    phase: Phase = Phase.IDLE  # snake/phases.py
    state: JobState | None = None  # the hop this node holds (or last held)
    model: dict[str, str] = field(default_factory=dict)  # layer -> hash of that hop's model
    baton: Baton | None = None
    highest: Claim | None = None  # the highest claim seen anywhere for this job (fencing)
    completed: dict[str, Any] | None = None
    origin: bool = False  # this node submitted the job
    lock: trio.Lock = field(default_factory=trio.Lock)
    capacity: dict[str, Any] | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    seen_keys: set[tuple[Any, ...]] = field(default_factory=set)
    error: str = ""
    scope: trio.CancelScope | None = None
    parents: dict[str, str] = field(default_factory=dict)  # lineage -> parent lineage, from records seen
    attempts: dict[int, int] = field(default_factory=dict)  # hop -> highest attempt committed anywhere
    fallback: bool = False  # a CS job that carried on in P2P mode after losing its coordinator
    incoming_loss: float | None = None  # local validation loss of the last model this node accepted
    custody: Custody = field(init=False, repr=False)  # verified hand-over certificates (snake/custody.py)

    def __post_init__(self) -> None:
        coord = self.signed.spec.get("coordinator") if self.signed.spec.get("mode") == "cs" else None
        self.custody = Custody(self.job_id, self.signed.submitter, coord or None)

    @property
    def spec(self) -> dict[str, Any]:
        return self.signed.spec

    # --- custody --------------------------------------------------------------------------------
    @property
    def custody_path(self) -> Path:
        return self.dir / "custody.jsonl"

    def add_custody(self, links: list[Link]) -> tuple[str | None, str | None]:
        """Verify and keep links (parent first), appending the new ones to custody.jsonl.
        Returns (problem, missing parent lineage) as Custody.add does."""
        added, problem, missing = self.custody.add(links)
        if added:
            with open(self.custody_path, "a", encoding="utf-8") as fh:
                for link in added:
                    fh.write(json.dumps(link.to_json(), separators=(",", ":")) + "\n")
        return problem, missing

    def _load_custody(self) -> None:
        if not self.custody_path.exists():
            return
        links = []
        for line in self.custody_path.read_text(encoding="utf-8").splitlines():
            try:
                links.append(Link.from_json(json.loads(line)))
            except (CustodyError, json.JSONDecodeError):
                continue  # a torn last line after a crash: the link comes back with the next hand-over
        self.custody.add(links)

    # --- fencing --------------------------------------------------------------------------------
    def observe(self, claim: Claim) -> None:
        if self.highest is None or compare_claims(claim, self.highest) > 0:
            self.highest = claim
        if claim.attempt > self.attempts.get(claim.hop, -1):
            self.attempts[claim.hop] = claim.attempt

    def next_attempt(self, hop: int, at_least: int = 0) -> int:
        """An attempt number no node has used for `hop` yet (so the new attempt wins fencing)."""
        return max(at_least, self.attempts.get(hop, -1) + 1)

    def learn(self, rec: dict[str, Any]) -> None:
        if rec.get("parent_lineage"):
            self.parents[rec["lineage"]] = rec["parent_lineage"]

    def descends(self, lineage: str, ancestor: str, limit: int = 100_000) -> bool:
        """True when `lineage` is `ancestor` or a known descendant of it (same snake)."""
        for _ in range(limit):
            if lineage == ancestor:
                return True
            parent = self.parents.get(lineage)
            if parent is None:
                return False
            lineage = parent
        return False

    # --- files ----------------------------------------------------------------------------------
    @property
    def hoplog_path(self) -> Path:
        return self.dir / "hoplog.jsonl"

    @property
    def seen_path(self) -> Path:
        return self.dir / "seen.jsonl"

    def log(self, rec: dict[str, Any]) -> None:
        self.learn(rec)
        hoplog.append_record(self.hoplog_path, rec)

    def log_seen(self, rec: dict[str, Any]) -> bool:
        key = (rec.get("node"), rec.get("event"), rec.get("hop"), rec.get("attempt"), rec.get("lineage"),
               rec.get("t"))
        if key in self.seen_keys:
            return False
        self.seen_keys.add(key)
        self.learn(rec)
        hoplog.append_record(self.seen_path, rec)
        return True

    def records(self) -> list[dict[str, Any]]:
        return hoplog.merge(_read(self.hoplog_path), _read(self.seen_path))

    def save_meta(self) -> None:
        write_json_atomic(self.dir / "meta.json", {
            "job_id": self.job_id, "joined": self.joined, "join_reason": self.join_reason,
            "schema": [e.to_dict() for e in self.schema.values()], "blocks": self.blocks,
            "init_state": self.init_state, "completed": self.completed, "origin": self.origin,
            "incoming_loss": self.incoming_loss,
        })

    def save_checkpoint(self) -> None:
        b = self.baton
        write_json_atomic(self.dir / "checkpoint.json", {
            "phase": str(self.phase),
            "state": None if self.state is None else self.state.to_dict(),
            "model": self.model,
            "baton": None if b is None or b.released else {
                "base": None if b.base is None else b.base.to_dict(), "proposed": b.proposed.to_dict(),
                "successor": b.successor, "model": b.model},
        })

    @classmethod
    def create(cls, jobs_dir: Path, signed: SignedJob) -> JobRun:
        d = jobs_dir / signed.job_id
        d.mkdir(parents=True, exist_ok=True)
        (d / "job.msgpack").write_bytes(signed.encode())
        return cls(signed.job_id, signed, d)

    @classmethod
    def load(cls, d: Path) -> JobRun:
        signed = SignedJob.decode((d / "job.msgpack").read_bytes())
        run = cls(signed.job_id, signed, d)
        run._load_custody()
        try:
            meta = json.loads((d / "meta.json").read_text())
            run.joined = bool(meta.get("joined"))
            run.join_reason = str(meta.get("join_reason", ""))
            run.schema = bundle_mod.schema_map(meta.get("schema") or [])
            run.blocks = int(meta.get("blocks") or 0)
            run.init_state = dict(meta.get("init_state") or {})
            run.completed = meta.get("completed")
            run.origin = bool(meta.get("origin"))
            loss = meta.get("incoming_loss")
            run.incoming_loss = float(loss) if isinstance(loss, int | float) else None
        except (FileNotFoundError, json.JSONDecodeError, bundle_mod.BundleError, ValueError, TypeError):
            pass
        try:
            cp = json.loads((d / "checkpoint.json").read_text())
            run.phase = Phase.parse(cp.get("phase", "idle"))
            run.state = JobState.from_dict(cp["state"]) if cp.get("state") else None
            run.model = dict(cp.get("model") or {})
            b = cp.get("baton")
            if b:
                run.baton = Baton(JobState.from_dict(b["base"]) if b.get("base") else None,
                                  JobState.from_dict(b["proposed"]), str(b["successor"]), dict(b["model"]))
        except (FileNotFoundError, json.JSONDecodeError, ValueError, TypeError, KeyError):
            pass
        if run.state is not None:
            run.observe(run.state.claim)
        for rec in _read(run.hoplog_path):
            run.learn(rec)
        for rec in _read(run.seen_path):
            run.learn(rec)
            run.seen_keys.add((rec.get("node"), rec.get("event"), rec.get("hop"), rec.get("attempt"),
                               rec.get("lineage"), rec.get("t")))
        return run

    def referenced_hashes(self) -> set[str]:
        out = set(self.model.values()) | set(self.init_state.values())
        if self.baton is not None and not self.baton.released:
            out |= set(self.baton.model.values())
        if self.completed:
            out |= set((self.completed.get("model") or {}).values())
        return out
