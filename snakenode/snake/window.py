"""The serpentine (boustrophedon) training window and its sizing from a node's capacity.

The window is the contiguous run of blocks one hop trains. It slides along the depth: the next window
starts where the last one ended, is clamped (shifted back, never shrunk) at the last block, and from there
runs back towards block 0, where it is clamped again and turns once more. So every block is trained in
every sweep, and the window a hop gets depends only on the previous window and the size the new holder
can afford. docs/DESIGN.md's worked example (8 blocks, sizes 2, 3, 2, 3, 1, 2, 3):

    [0,2) -> [2,5) -> [5,7) -> [5,8) (clamped, turns) -> [4,5) -> [2,4) -> [0,3) (clamped, turns)

`Window.dir` is the direction the *next* window moves in: a window that touches the last block already
carries `dir = -1`, one that touches block 0 while running back carries `dir = +1`. The window that turns
belongs to both sweeps it joins.

Sizing is pure arithmetic over a *capacity profile* (ARCHITECTURE.md, measured by train/capacity.py):
no clock, no I/O, so the holder, the receiver and the CS coordinator all reach the same answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FORWARD = 1
BACKWARD = -1


class WindowError(ValueError):
    """A window or capacity profile that breaks the policy or the schema. The message names the field."""


@dataclass(frozen=True)
class Window:
    """Blocks [start, start + size) trained by one hop; `dir` is where the next window goes (+1 / -1)."""

    start: int
    size: int
    dir: int = FORWARD

    def __post_init__(self) -> None:
        for name in ("start", "size", "dir"):
            if type(getattr(self, name)) is not int:
                raise WindowError(f"window.{name} must be an integer, got {getattr(self, name)!r}")
        if self.start < 0 or self.size < 1:
            raise WindowError(f"window must have start >= 0 and size >= 1, got start={self.start} "
                              f"size={self.size}")
        if self.dir not in (FORWARD, BACKWARD):
            raise WindowError(f"window.dir must be 1 or -1, got {self.dir}")

    @property
    def end(self) -> int:
        return self.start + self.size

    def blocks(self) -> range:
        return range(self.start, self.end)

    def fits(self, blocks: int) -> bool:
        return self.end <= blocks

    def to_dict(self) -> dict[str, int]:
        """The job_state form `{start, size, dir}`."""
        return {"start": self.start, "size": self.size, "dir": self.dir}

    @classmethod
    def from_dict(cls, d: Any) -> Window:
        """Strict inverse of `to_dict` (the window arrives from the network inside job_state)."""
        if not isinstance(d, Mapping) or set(d) != {"start", "size", "dir"}:
            raise WindowError(f"window must be a map with keys dir, size, start; got {d!r:.200}")
        return cls(d["start"], d["size"], d["dir"])

    def to_log(self) -> dict[str, int]:
        """The hop-log form `{start, end, dir}` (end exclusive)."""
        return {"start": self.start, "end": self.end, "dir": self.dir}

    @classmethod
    def from_log(cls, d: Any) -> Window:
        if not isinstance(d, Mapping) or set(d) != {"start", "end", "dir"}:
            raise WindowError(f"log window must be a map with keys dir, end, start; got {d!r:.200}")
        start, end = d["start"], d["end"]
        if type(start) is not int or type(end) is not int:
            raise WindowError(f"log window start/end must be integers, got {d!r:.200}")
        return cls(start, end - start, d["dir"])

    def __str__(self) -> str:
        return f"[{self.start},{self.end}){'>' if self.dir == FORWARD else '<'}"


def _check_blocks(blocks: int) -> None:
    if type(blocks) is not int or blocks < 1:
        raise WindowError(f"a model needs at least one block, got blocks={blocks!r}")


def next_window(prev: Window | None, size: int, blocks: int) -> Window:
    """The window after `prev` for a holder that takes `size` blocks (None = the job's first hop).

    A `size` above `blocks` is clamped to `blocks`; the window is shifted, never shrunk, at either end.
    """
    _check_blocks(blocks)
    if type(size) is not int or size < 1:
        raise WindowError(f"window size must be an integer >= 1, got {size!r}")
    size = min(size, blocks)
    if prev is None:
        start, direction = 0, FORWARD
    elif not prev.fits(blocks):
        raise WindowError(f"previous window {prev} runs past the last block ({blocks} blocks)")
    elif prev.dir == FORWARD:
        start, direction = prev.end, FORWARD
    else:
        start, direction = prev.start - size, BACKWARD
    if direction == FORWARD:
        if start + size >= blocks:  # reaches the last block: clamp there and turn
            return Window(blocks - size, size, BACKWARD)
        return Window(start, size, FORWARD)
    if start <= 0:  # reaches block 0: clamp there and turn
        return Window(0, size, FORWARD)
    return Window(start, size, BACKWARD)


def first_window(size: int, blocks: int) -> Window:
    """The first hop's window: [0, size), turning at once if it already reaches the last block."""
    return next_window(None, size, blocks)


def check_sequence(windows: Sequence[Window], blocks: int, *, from_first: bool = True,
                   first_hop: int = 0) -> list[str]:
    """Problems with a list of consecutive hop windows; [] when they follow the serpentine policy.

    Each window must be the one `next_window` gives for its own size after its predecessor. With
    `from_first` the list must start at the job's first hop; without it, only the steps are checked
    (a log that starts mid-job). `first_hop` numbers the hops in the messages.
    """
    _check_blocks(blocks)
    problems: list[str] = []
    prev: Window | None = None
    for i, w in enumerate(windows):
        hop = first_hop + i
        if not w.fits(blocks):
            problems.append(f"hop {hop}: window {w} runs past the last block ({blocks} blocks)")
        elif i == 0 and not from_first:
            pass
        else:
            expected = next_window(prev, w.size, blocks)
            if expected != w:
                after = "as the first window" if prev is None else f"after {prev}"
                problems.append(f"hop {hop}: window {w}, but the policy gives {expected} {after}")
        prev = w
    return problems


# ---------------------------------------------------------------------------------------------- sizing


@dataclass(frozen=True)
class Sizing:
    """The outcome of sizing: the chosen size (None = not even min_blocks fits), and why."""

    size: int | None
    reason: str                 # "ok", "memory" or "time": what stopped the smallest candidate
    mem_mb: float               # estimate for the chosen size (or the smallest candidate when None)
    hop_s: float
    window: Window | None


def _num(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise WindowError(f"capacity profile: {where} must be a finite number >= 0, got {value!r:.80}")
    return float(value)


def _part(d: Any, where: str) -> tuple[float, float, float, float]:
    """(train_mb, step_s, pass_mb, pass_s) of one layer; the pass_* keys are optional (0)."""
    if not isinstance(d, Mapping):
        raise WindowError(f"capacity profile: {where} must be a map with train_mb and step_s")
    return (_num(d.get("train_mb"), f"{where}.train_mb"), _num(d.get("step_s"), f"{where}.step_s"),
            _num(d.get("pass_mb", 0), f"{where}.pass_mb"), _num(d.get("pass_s", 0), f"{where}.pass_s"))


def check_capacity(profile: Any, blocks: int | None = None) -> None:
    """Raise WindowError unless `profile` follows the capacity profile schema (and has `blocks` blocks)."""
    if not isinstance(profile, Mapping):
        raise WindowError("capacity profile must be a map (see ARCHITECTURE.md, 'Capacity profile')")
    _num(profile.get("fixed_mb"), "fixed_mb")
    _num(profile.get("frozen_step_s"), "frozen_step_s")
    spe = profile.get("steps_per_epoch")
    if type(spe) is not int or spe < 0:
        raise WindowError(f"capacity profile: steps_per_epoch must be an integer >= 0, got {spe!r:.80}")
    parts = profile.get("blocks")
    if not isinstance(parts, Sequence) or isinstance(parts, str | bytes) or not parts:
        raise WindowError("capacity profile: blocks must be a non-empty list of {train_mb, step_s}")
    if blocks is not None and len(parts) != blocks:
        raise WindowError(f"capacity profile has {len(parts)} blocks but the model has {blocks}: "
                          f"measure the capacity again for this job's model")
    for i, b in enumerate(parts):
        _part(b, f"blocks[{i}]")
    _part(profile.get("stem"), "stem")
    _part(profile.get("head"), "head")


def estimate(profile: Mapping[str, Any], start: int, size: int, train_stem: bool, train_head: bool,
             epochs: int, max_steps: int = 0) -> tuple[float, float]:
    """(training memory MB, hop seconds) of training blocks [start, start+size) on this node.

    Memory = fixed_mb + train_mb of every trained layer + pass_mb of every frozen block that the backward
    pass runs through (those between the first trained layer and the head keep their activations).
    Time per batch = frozen_step_s + step_s of every trained layer + pass_s of those frozen blocks; a hop
    runs epochs x steps_per_epoch batches, capped by `max_steps` when > 0. `pass_mb`/`pass_s` are optional
    per-block keys (0 when the capacity measurement does not report them); they are what makes an early
    window dearer than a late one of the same size.
    """
    check_capacity(profile)
    parts = [_part(b, f"blocks[{i}]") for i, b in enumerate(profile["blocks"])]
    n = len(parts)
    if type(start) is not int or type(size) is not int or start < 0 or size < 1 or start + size > n:
        raise WindowError(f"window [{start},{start + size}) does not fit a model of {n} blocks")
    stem, head = _part(profile["stem"], "stem"), _part(profile["head"], "head")
    mem = _num(profile["fixed_mb"], "fixed_mb")
    step = _num(profile["frozen_step_s"], "frozen_step_s")
    trained = [parts[i] for i in range(start, start + size)]
    if train_stem:
        trained.append(stem)
    if train_head:
        trained.append(head)
    for train_mb, step_s, _, _ in trained:
        mem += train_mb
        step += step_s
    # The backward pass runs from the loss back to the earliest trained layer.
    first_trained = 0 if train_stem else start
    for i in range(first_trained, n):
        if not start <= i < start + size:
            mem += parts[i][2]
            step += parts[i][3]
    steps = max(int(epochs), 0) * int(profile["steps_per_epoch"])
    if max_steps > 0:
        steps = min(steps, max_steps)
    return mem, step * steps


def size_window(profile: Mapping[str, Any], prev_window: Window | None, blocks: int, budget_mb: float,
                hop_time_s: float, min_blocks: int, max_blocks: int, *, train_stem: bool = True,
                train_head: bool = True, epochs: int = 1, max_steps: int = 0) -> Sizing:
    """The largest size in min_blocks..max_blocks that fits both budgets, each size evaluated at the
    position the serpentine actually gives it after `prev_window` (the start depends on the size)."""
    _check_blocks(blocks)
    check_capacity(profile, blocks)
    hi = min(max_blocks, blocks)
    lo = max(1, min(min_blocks, hi))
    last: Sizing | None = None
    for size in range(hi, lo - 1, -1):
        w = next_window(prev_window, size, blocks)
        mem, hop_s = estimate(profile, w.start, w.size, train_stem, train_head, epochs, max_steps)
        if mem <= budget_mb and hop_s <= hop_time_s:
            return Sizing(size, "ok", mem, hop_s, w)
        last = Sizing(None, "memory" if mem > budget_mb else "time", mem, hop_s, None)
    assert last is not None
    return last


def largest_size(profile: Mapping[str, Any], prev_window: Window | None, blocks: int, budget_mb: float,
                 hop_time_s: float, min_blocks: int, max_blocks: int, *, train_stem: bool = True,
                 train_head: bool = True, epochs: int = 1, max_steps: int = 0) -> int | None:
    """The largest window size this node can take next (None: not even min_blocks fits; decline)."""
    return size_window(profile, prev_window, blocks, budget_mb, hop_time_s, min_blocks, max_blocks,
                       train_stem=train_stem, train_head=train_head, epochs=epochs,
                       max_steps=max_steps).size
