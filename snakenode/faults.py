"""TEST-ONLY fault hooks: make a node crash, freeze or misbehave at a named protocol phase.

Off by default and only enabled by an explicit `--test-faults SPEC` flag (or SNAKENODE_TEST_FAULTS, which
the scenario runner sets), never from the config file. Faults land at the intended moment even when
bundles are small, which timers in a test cannot guarantee.

SPEC is a list of items separated by `;` or `,`:
  ACTION@PHASE[:KEY=VALUE[:KEY=VALUE...]]   e.g. exit@recv:after_bytes=100000, stop@train:hop=3
  rate=SIZE/s                                e.g. rate=1MB/s (bundle send rate limit)
ACTION: exit (SIGKILL itself: a crash with no cleanup), stop (SIGSTOP itself: a frozen process),
        raise (the handler or step raises RuntimeError), decline (answer every Propose with Decline),
        hang (stop answering at this phase, stay alive), break (send/recv: reset the bundle stream here),
        poison (handoff: scale every float weight of the model by 1000 before handing it on).
PHASE:  propose (a holder proposes a hop), accept (a node answers a proposal or an assignment), send, recv
        (bundle bytes), train (a hop starts training), handoff (a trained hop is about to be handed on),
        handler (a test-only protocol that raises), assign (a CS coordinator assigns a hop), upload (a CS
        node uploads its trained hop to the coordinator).
        exit, stop and raise work at every phase; decline and hang only at accept, break only at send and
        recv, poison only at handoff. Other pairs would silently do nothing and are refused when parsed.
KEYS:   hop=N (only at this hop), attempt=N, after_bytes=N (recv/send: once this many bundle bytes moved),
        times=N (fire at most N times, default 1; 0 = always), job=ID.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass, field
from typing import Any

import trio

from snakenode import logs
from snakenode.layers import bundle as bundle_mod
from snakenode.layers.store import LayerStore

log = logs.get("faults")

ACTIONS = ("exit", "stop", "raise", "decline", "hang", "break", "poison")
PHASES = ("propose", "accept", "send", "recv", "train", "handoff", "handler", "assign", "upload")
GENERIC = ("exit", "stop", "raise")
SUPPORTED = {
    "propose": GENERIC, "accept": (*GENERIC, "decline", "hang"), "send": (*GENERIC, "break"),
    "recv": (*GENERIC, "break"), "train": GENERIC, "handoff": (*GENERIC, "poison"), "handler": GENERIC,
    "assign": GENERIC, "upload": GENERIC,
}
INT_KEYS = ("hop", "attempt", "after_bytes", "times")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|kbit|Mbit|Gbit)?/s$", re.I)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}


class FaultSpecError(ValueError):
    pass


@dataclass
class Fault:
    action: str
    phase: str
    params: dict[str, Any] = field(default_factory=dict)
    fired: int = 0

    def matches(self, phase: str, ctx: dict[str, Any]) -> bool:
        if phase != self.phase:
            return False
        times = self.params.get("times", 1)
        if times and self.fired >= times:
            return False
        for key in ("hop", "attempt", "job"):
            if key in self.params and ctx.get(key) != self.params[key]:
                return False
        return not ("after_bytes" in self.params and ctx.get("bytes", 0) < self.params["after_bytes"])


def parse_rate(text: str) -> float:
    m = _SIZE.match(text.strip())
    if not m:
        raise FaultSpecError(f"bad rate {text!r}: use e.g. 1MB/s, 500KB/s or 8Mbit/s")
    return float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()]


def parse(spec: str) -> tuple[list[Fault], float | None]:
    faults: list[Fault] = []
    rate: float | None = None
    for raw in re.split(r"[;,]", spec or ""):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("rate="):
            rate = parse_rate(item[5:])
            continue
        head, _, tail = item.partition(":")
        action, at, phase = head.partition("@")
        if not at or action not in ACTIONS or phase not in PHASES:
            raise FaultSpecError(
                f"bad fault {item!r}: expected ACTION@PHASE[:KEY=VALUE] with ACTION in {', '.join(ACTIONS)} "
                f"and PHASE in {', '.join(PHASES)}"
            )
        if action not in SUPPORTED[phase]:
            raise FaultSpecError(f"bad fault {item!r}: {action} does nothing at {phase}; at {phase} use "
                                 f"{', '.join(SUPPORTED[phase])} (see `--test-faults` in docs/OPERATIONS.md)")
        params: dict[str, Any] = {}
        for kv in re.split(r"[:&]", tail) if tail else []:
            key, eq, value = kv.partition("=")
            if not eq:
                raise FaultSpecError(f"bad fault parameter {kv!r} in {item!r}: expected KEY=VALUE")
            if key in INT_KEYS:
                try:
                    params[key] = int(value)
                except ValueError:
                    raise FaultSpecError(f"fault parameter {key} must be an integer, got {value!r}") from None
            elif key == "job":
                params[key] = value
            else:
                raise FaultSpecError(f"unknown fault parameter {key!r} in {item!r}; known: {', '.join(INT_KEYS)}, job")
        faults.append(Fault(action, phase, params))
    return faults, rate


class Faults:
    def __init__(self, spec: str = "") -> None:
        self.spec = spec
        self.items, self.rate = parse(spec)

    @property
    def enabled(self) -> bool:
        return bool(self.items) or self.rate is not None

    def check(self, phase: str, **ctx: Any) -> str | None:
        """Fire the first matching fault: exit/stop act here; other actions are returned to the caller."""
        for f in self.items:
            if f.matches(phase, ctx):
                f.fired += 1
                log.warning("fault_injected", action=f.action, phase=phase, **{k: v for k, v in ctx.items()
                                                                                 if isinstance(v, int | str)})
                if f.action == "exit":
                    os.kill(os.getpid(), signal.SIGKILL)
                if f.action == "stop":
                    os.kill(os.getpid(), signal.SIGSTOP)
                    return None
                if f.action == "raise":
                    raise RuntimeError(f"injected fault at {phase}")
                return f.action
        return None

    def has(self, phase: str) -> bool:
        return any(f.phase == phase for f in self.items)

    # --- the seams the node calls: each is a no-op unless a fault of that phase is armed -------------------
    async def at_accept(self, hang_s: float, **ctx: Any) -> bool:
        """Before answering a proposal: True to decline it on purpose; `hang` stalls the answer `hang_s`."""
        action = self.check("accept", **ctx)
        if action == "hang":
            await trio.sleep(hang_s)
        return action == "decline"

    async def at_handoff(self, model: dict[str, str], store: LayerStore, **ctx: Any) -> dict[str, str] | None:
        """Before a trained hop is handed on: the poisoned model to send instead (poison), else None."""
        if self.check("handoff", **ctx) != "poison":
            return None
        return await trio.to_thread.run_sync(poisoned, model, store)

    async def raising_handler(self, io: Any) -> None:
        """The handler of /snake/test-raise/1.0.0 (registered only when a `handler` fault is armed)."""
        await io.read_exact(1)
        self.check("handler")
        raise RuntimeError("test handler reached its end without an injected fault")


TEST_RAISE_PROTOCOL = "/snake/test-raise/1.0.0"


def poisoned(model: dict[str, str], store: LayerStore) -> dict[str, str]:
    """TEST ONLY (poison@handoff): the model with every float weight scaled by 1000."""
    out = {}
    for name, h in model.items():
        tensors = bundle_mod.decode_blob(store.get_bytes(h), name)
        scaled = {k: (v * 1000).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()}
        out[name] = store.put_bytes(bundle_mod.encode_blob(scaled))
    return out
