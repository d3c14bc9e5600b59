"""The worker process and its trio client: RPC ops end to end, errors, cancel, crash, and a killed daemon
leaving no worker behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from snakenode.train import data as D
from snakenode.train.client import WorkerClient, WorkerError

JOB = {"model": "mlp", "model_args": {"hidden": 64}, "seed": 7, "train": {"epochs": 1, "batch": 32, "lr": 0.05}}
DATA = D.DataSpec.from_flags("digits", "iid", "0/4", 1).to_dict()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _wait_gone(pid: int, timeout: float) -> bool:
    with trio.move_on_after(timeout):
        while not _gone(pid):
            await trio.sleep(0.05)
        return True
    return False


@pytest.mark.timeout(90)
async def test_worker_ops_end_to_end(tmp_path: Path) -> None:
    c = WorkerClient(tmp_path, threads=1, nice=5)
    try:
        ping = await c.call("ping")
        assert ping["pid"] == c.pid and ping["threads"] == 1
        assert psutil.Process(c.pid).nice() >= 5
        init = await c.call("model_init", {"job": JOB})
        assert init["blocks"] == 4 and set(init["state"]) == {e["name"] for e in init["layers"]}
        events: list[tuple[str, dict[str, Any]]] = []

        async def on_event(name: str, data: dict[str, Any]) -> None:
            events.append((name, data))

        t0 = time.monotonic()
        hop = await c.call("train_hop", {"job": JOB, "state": init["state"], "window": [0, 2], "train_stem": True,
                                         "train_head": True, "data": DATA, "reference_hist": None,
                                         "max_time_s": None}, on_event=on_event)
        first = time.monotonic() - t0
        assert set(hop["changed"]) == {"stem", "blocks.0", "blocks.1", "head"}
        assert hop["metrics_after"]["loss"] < hop["metrics_before"]["loss"]
        assert events and events[-1][0] == "epoch" and "loss" in events[-1][1]
        t0 = time.monotonic()
        hop2 = await c.call("train_hop", {"job": JOB, "state": hop["state"], "window": [2, 4], "train_stem": False,
                                          "train_head": True, "data": DATA, "reference_hist": [1] * 10,
                                          "max_time_s": None})
        warm = time.monotonic() - t0
        assert warm < 1.0, (first, warm)                 # a warm digits hop is far below 2 s
        assert set(hop2["changed"]) == {"blocks.2", "blocks.3", "head"}
        for key in ("samples", "samples_per_s", "peak_rss_mb", "kd", "t_train_s"):
            assert key in hop2
        ev = await c.call("evaluate", {"job": JOB, "state": hop2["state"], "data": DATA, "split": "test"})
        assert ev["samples"] == 359 and ev["accuracy"] > 0.3, ev  # two 1-epoch hops: 0.415 seen; chance is 0.1
        cap = await c.call("capacity", {"job": JOB, "data": DATA})
        assert set(cap) >= {"fixed_mb", "blocks", "stem", "head", "frozen_step_s", "steps_per_epoch"}
        assert len(cap["blocks"]) == 4 and all(b["train_mb"] > 0 and b["step_s"] >= 0 for b in cap["blocks"])
        assert list((tmp_path / "cache").glob("capacity-*.json"))      # cached in HOME by the worker
        bench = await c.call("benchmark", {"seconds": 0.3})
        assert bench["workload"] == "mlp-ref-v1" and bench["samples_per_s"] > 1000
        with pytest.raises(WorkerError) as e:
            await c.call("train_hop", {"job": JOB, "state": hop2["state"], "window": [3, 9], "data": DATA})
        assert e.value.kind == "bad_args" and "window" in e.value.message
        with pytest.raises(WorkerError, match="unknown op"):
            await c.call("fly")
        assert (await c.call("ping"))["pid"] == ping["pid"]            # errors do not restart the worker
    finally:
        await c.aclose()
    assert c.pid is None and _gone(ping["pid"])


@pytest.mark.timeout(60)
async def test_cancel_and_crash_restart(tmp_path: Path) -> None:
    c = WorkerClient(tmp_path, threads=1)
    try:
        pid1 = (await c.call("ping"))["pid"]
        result: dict[str, Any] = {}

        async def long_call() -> None:
            try:
                await c.call("benchmark", {"seconds": 60})
            except WorkerError as e:
                result["kind"] = e.kind

        async with trio.open_nursery() as n:
            n.start_soon(long_call)
            while not c.busy:
                await trio.sleep(0.01)
            await c.cancel()
        assert result["kind"] == "cancelled"
        assert await _wait_gone(pid1, 5)
        pid2 = (await c.call("ping"))["pid"]
        assert pid2 != pid1
        # a crash mid-call surfaces as worker_died, promptly, and the next call restarts the worker
        async with trio.open_nursery() as n:
            n.start_soon(long_call)
            while not c.busy:
                await trio.sleep(0.01)
            os.kill(pid2, signal.SIGKILL)
        assert result["kind"] == "worker_died"
        assert (await c.call("ping"))["pid"] not in (pid1, pid2)
        # a caller's timeout (trio cancellation) stops the worker instead of leaving it busy
        pid3 = c.pid
        assert pid3 is not None
        with trio.move_on_after(0.5):
            await c.call("benchmark", {"seconds": 60})
        assert await _wait_gone(pid3, 5)
        assert (await c.call("ping"))["pid"] != pid3
    finally:
        await c.aclose()


PARENT = textwrap.dedent("""
    import sys, trio
    from snakenode.train.client import WorkerClient

    async def main():
        c = WorkerClient(sys.argv[1], threads=1)
        r = await c.call("ping")
        print(r["pid"], flush=True)
        await trio.sleep_forever()

    trio.run(main)
""")


@pytest.mark.timeout(60)
async def test_killed_daemon_leaves_no_worker(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = await trio.to_thread.run_sync(parent.stdout.readline)
        worker_pid = int(line)
        assert psutil.Process(worker_pid).ppid() == parent.pid
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert await _wait_gone(worker_pid, 5), "the worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.timeout(90)
async def test_model_init_identical_across_processes(tmp_path: Path) -> None:
    """Layer versions are content hashes: two workers must build bit-identical initial layers."""
    jobs = [JOB, {"model": "llama-tiny", "seed": 3}, {"model": "vgg11", "model_args": {"width": 0.25}, "seed": 2}]
    states: dict[int, list[dict[str, str]]] = {}

    async def run(i: int) -> None:
        c = WorkerClient(tmp_path / f"n{i}", threads=1)
        try:
            states[i] = [(await c.call("model_init", {"job": j}))["state"] for j in jobs]
        finally:
            await c.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(run, 0)
        n.start_soon(run, 1)
    assert states[0] == states[1]
    assert len({tuple(sorted(s.values())) for s in states[0]}) == 3
