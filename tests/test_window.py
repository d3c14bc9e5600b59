"""The serpentine window (docs/DESIGN.md's worked example, verbatim) and capacity sizing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snakenode.snake.window import (
    BACKWARD,
    FORWARD,
    Window,
    WindowError,
    check_capacity,
    check_sequence,
    estimate,
    first_window,
    largest_size,
    next_window,
    size_window,
)


def spans(windows: list[Window]) -> list[tuple[int, int]]:
    return [(w.start, w.end) for w in windows]


def walk(sizes: list[int], blocks: int) -> list[Window]:
    out: list[Window] = []
    prev = None
    for s in sizes:
        prev = next_window(prev, s, blocks)
        out.append(prev)
    return out


# ---------------------------------------------------------------------------------------------- policy


def test_design_worked_example_verbatim() -> None:
    # docs/DESIGN.md: 8 blocks, window sizes chosen by successive nodes 2, 3, 2, 3, 1, 2, 3:
    # [0,2) -> [2,5) -> [5,7) -> [5,8) (clamped at the end; direction turns) -> [4,5) -> [2,4) -> [0,3)
    # (clamped at the start; direction turns again).
    windows = walk([2, 3, 2, 3, 1, 2, 3], 8)
    assert spans(windows) == [(0, 2), (2, 5), (5, 7), (5, 8), (4, 5), (2, 4), (0, 3)]
    assert [w.dir for w in windows] == [FORWARD, FORWARD, FORWARD, BACKWARD, BACKWARD, BACKWARD, FORWARD]
    assert check_sequence(windows, 8) == []
    # and after the second turn the window runs forward again from where it ended
    assert (next_window(windows[-1], 2, 8).start, next_window(windows[-1], 2, 8).end) == (3, 5)


@pytest.mark.parametrize("sizes,blocks,expected", [
    # one block at a time: down the model, turn at the end, back up, turn at the start
    ([1] * 8, 4, [(0, 1, FORWARD), (1, 2, FORWARD), (2, 3, FORWARD), (3, 4, BACKWARD), (2, 3, BACKWARD),
                  (1, 2, BACKWARD), (0, 1, FORWARD), (1, 2, FORWARD)]),
    # a window as large as the model takes all of it; the next one starts over from the start
    ([2, 5, 1, 2], 4, [(0, 2, FORWARD), (0, 4, BACKWARD), (0, 1, FORWARD), (1, 3, FORWARD)]),
    # windows that cannot step without leaving the model bounce between the two ends
    ([3, 3, 3, 3], 4, [(0, 3, FORWARD), (1, 4, BACKWARD), (0, 3, FORWARD), (1, 4, BACKWARD)]),
])
def test_worked_walks(sizes: list[int], blocks: int, expected: list[tuple[int, int, int]]) -> None:
    windows = walk(sizes, blocks)
    assert [(w.start, w.end, w.dir) for w in windows] == expected
    assert check_sequence(windows, blocks) == []


def test_first_window_and_clamping() -> None:
    assert first_window(2, 8) == Window(0, 2, FORWARD)
    assert first_window(8, 8) == Window(0, 8, BACKWARD)      # touches the end: turns at once
    assert first_window(20, 8) == Window(0, 8, BACKWARD)     # larger than the model: whole model
    assert next_window(Window(0, 8, BACKWARD), 3, 8) == Window(0, 3, FORWARD)
    assert next_window(Window(4, 2, FORWARD), 2, 8) == Window(6, 2, BACKWARD)   # exact end also turns
    assert next_window(Window(2, 2, BACKWARD), 2, 8) == Window(0, 2, FORWARD)   # exact start also turns
    assert first_window(1, 1) == Window(0, 1, BACKWARD)
    assert next_window(first_window(1, 1), 1, 1) == Window(0, 1, FORWARD)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_sizes_rejected(bad: object) -> None:
    with pytest.raises(WindowError, match="size"):
        next_window(None, bad, 8)  # type: ignore[arg-type]


def test_previous_window_must_fit() -> None:
    with pytest.raises(WindowError, match="past the last block"):
        next_window(Window(6, 3), 1, 8)
    with pytest.raises(WindowError, match="at least one block"):
        first_window(1, 0)


def test_window_codecs_are_strict() -> None:
    w = Window(2, 3, BACKWARD)
    assert Window.from_dict(w.to_dict()) == w
    assert w.to_log() == {"start": 2, "end": 5, "dir": -1}
    assert Window.from_log(w.to_log()) == w
    for bad in ({"start": 0, "size": 1}, {"start": 0, "size": 1, "dir": 1, "x": 0},
                {"start": True, "size": 1, "dir": 1}, {"start": 0, "size": 0, "dir": 1},
                {"start": -1, "size": 1, "dir": 1}, {"start": 0, "size": 1, "dir": 0}, [0, 1, 1]):
        with pytest.raises(WindowError):
            Window.from_dict(bad)
    with pytest.raises(WindowError):
        Window.from_log({"start": 3, "end": 3, "dir": 1})


def test_check_sequence_names_the_broken_hop() -> None:
    good = walk([2, 3, 2, 3, 1, 2, 3], 8)
    gap = [*good[:2], Window(6, 2, BACKWARD), *good[3:]]
    problems = check_sequence(gap, 8)
    assert problems and problems[0].startswith("hop 2: window [6,8)<") and "[5,7)>" in problems[0]
    assert check_sequence([Window(1, 2)], 8) == ["hop 0: window [1,3)>, but the policy gives [0,2)> "
                                                 "as the first window"]
    assert check_sequence([Window(1, 2), Window(3, 2)], 8, from_first=False) == []
    wrong_dir = [*good[:3], Window(5, 3, FORWARD)]
    assert "hop 3" in check_sequence(wrong_dir, 8)[0]
    assert "past the last block" in check_sequence([Window(7, 2)], 8)[0]
    assert check_sequence(good[3:], 8, from_first=False, first_hop=3) == []
    assert check_sequence([], 8) == []


@settings(max_examples=60, deadline=None)
@given(blocks=st.integers(1, 16), sizes=st.lists(st.integers(1, 20), min_size=1, max_size=40))
def test_serpentine_properties(blocks: int, sizes: list[int]) -> None:
    windows = walk(sizes, blocks)
    for s, w in zip(sizes, windows, strict=True):
        assert 0 <= w.start < w.end <= blocks          # in range, contiguous, never empty
        assert w.size == min(s, blocks)                # shifted at the ends, never shrunk
    for prev, w in zip(windows, windows[1:], strict=False):
        # consecutive windows touch or overlap: no block is skipped on the way
        assert w.start <= prev.end and prev.start <= w.end
    # Sweeps: the window that turns belongs to both sweeps it joins; each sweep covers every block.
    turns = [i for i, (a, b) in enumerate(zip([FORWARD, *[w.dir for w in windows]], [w.dir for w in windows],
                                               strict=False)) if a != b]
    bounds = [0, *turns]
    for a, b in zip(bounds, bounds[1:], strict=False):
        covered = set().union(*(set(w.blocks()) for w in windows[a:b + 1]))
        assert covered == set(range(blocks)), (a, b, windows)


# ---------------------------------------------------------------------------------------------- sizing


def profile(train_mb: list[float], step_s: list[float] | None = None, **extra: object) -> dict:
    n = len(train_mb)
    blocks = [{"train_mb": m, "step_s": s} for m, s in zip(train_mb, step_s or [0.01] * n, strict=True)]
    p = {"fixed_mb": 100.0, "blocks": blocks, "stem": {"train_mb": 5.0, "step_s": 0.002},
         "head": {"train_mb": 7.0, "step_s": 0.003}, "frozen_step_s": 0.05, "steps_per_epoch": 10}
    p.update(extra)
    return p


def test_estimate_sums_the_trained_layers() -> None:
    p = profile([10, 20, 30, 40], [0.1, 0.2, 0.3, 0.4])
    mem, hop_s = estimate(p, 1, 2, train_stem=True, train_head=True, epochs=2)
    assert mem == pytest.approx(100 + 20 + 30 + 5 + 7)
    assert hop_s == pytest.approx(2 * 10 * (0.05 + 0.2 + 0.3 + 0.002 + 0.003))
    mem, hop_s = estimate(p, 3, 1, train_stem=False, train_head=False, epochs=1, max_steps=4)
    assert (mem, hop_s) == (pytest.approx(140), pytest.approx(4 * (0.05 + 0.4)))
    with pytest.raises(WindowError, match="does not fit"):
        estimate(p, 3, 2, True, True, 1)


def test_estimate_charges_frozen_blocks_the_backward_pass_crosses() -> None:
    # The optional pass_mb/pass_s: frozen blocks between the first trained layer and the head keep
    # activations, so an early window costs more than a late one of the same size.
    p = profile([10, 10, 10, 10])
    for b in p["blocks"]:
        b.update(pass_mb=50.0, pass_s=0.5)
    early, _ = estimate(p, 0, 1, train_stem=False, train_head=True, epochs=1)
    late, _ = estimate(p, 3, 1, train_stem=False, train_head=True, epochs=1)
    assert early == pytest.approx(100 + 10 + 7 + 3 * 50) and late == pytest.approx(100 + 10 + 7)
    stem_on, _ = estimate(p, 3, 1, train_stem=True, train_head=True, epochs=1)
    assert stem_on == pytest.approx(100 + 10 + 5 + 7 + 3 * 50)


def test_largest_size_evaluates_each_size_where_the_serpentine_puts_it() -> None:
    p = profile([10, 10, 10, 10, 500, 10, 10, 10])     # block 4 is dear
    prev = Window(0, 2, FORWARD)
    # size 3 -> [2,5) contains block 4; size 2 -> [2,4) does not
    assert largest_size(p, prev, 8, budget_mb=200, hop_time_s=60, min_blocks=1, max_blocks=3) == 2
    # Near the end the start depends on the size: after [5,7), size 3 is clamped to [5,8) (not [7,10)),
    # size 2 to [6,8).
    p2 = profile([10, 10, 10, 10, 10, 500, 10, 10])
    assert largest_size(p2, Window(5, 2, FORWARD), 8, 200, 60, 1, 3) == 2
    sizing = size_window(p2, Window(5, 2, FORWARD), 8, 200, 60, 1, 3)
    assert sizing.window == Window(6, 2, BACKWARD) and sizing.reason == "ok"
    assert sizing.mem_mb == pytest.approx(100 + 20 + 12)
    # first hop
    assert largest_size(p, None, 8, 10_000, 60, 1, 3) == 3


def test_largest_size_none_when_even_min_blocks_do_not_fit() -> None:
    p = profile([10] * 4, [1.0] * 4)
    assert largest_size(p, None, 4, budget_mb=110, hop_time_s=1e9, min_blocks=1, max_blocks=2) is None
    s = size_window(p, None, 4, 110, 1e9, 1, 2)
    assert (s.size, s.reason, s.mem_mb) == (None, "memory", pytest.approx(122))
    # time: 10 steps x (0.05 + 1 + 0.005) per block = ~10.55 s for one block, ~20.55 s for two
    s = size_window(p, None, 4, 1e9, 15.0, 1, 2)
    assert (s.size, s.reason) == (1, "ok")
    s = size_window(p, None, 4, 1e9, 5.0, 1, 2)
    assert (s.size, s.reason) == (None, "time")
    # min_blocks above the model depth is clamped to the model
    assert largest_size(p, None, 4, 1e9, 1e9, min_blocks=6, max_blocks=9) == 4


def test_capacity_profile_is_checked() -> None:
    p = profile([10] * 4)
    check_capacity(p, 4)
    with pytest.raises(WindowError, match="measure the capacity again"):
        check_capacity(p, 5)
    for key, bad in (("fixed_mb", -1), ("fixed_mb", float("nan")), ("steps_per_epoch", 1.5),
                     ("blocks", []), ("stem", None), ("frozen_step_s", True)):
        q = dict(p)
        q[key] = bad
        with pytest.raises(WindowError, match=key):
            check_capacity(q)
    with pytest.raises(WindowError, match=r"blocks\[1\].train_mb"):
        check_capacity({**p, "blocks": [{"train_mb": 1, "step_s": 0}, {"step_s": 0}]})
