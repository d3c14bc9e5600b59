"""Sending a model's layers to a peer, shared by the P2P hand-off (holder -> successor, snake/handoff.py)
and CS mode (coordinator -> node is the same hand-off; node -> coordinator is the upload,
snake/uplink.py): which layers to send, whether to offer the fast bulk lane, and the send itself.

With a lane offer from the receiver and at least lane_min_mb actually planned, the bytes go over the lane
(net/lane.py), falling back to the libp2p stream when the lane cannot be set up; otherwise they go on the
libp2p stream, packed to bfloat16 when the job says transfer_dtype = "bf16" (net/transfer.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from snakenode.layers import bundle as bundle_mod
from snakenode.net import host as host_mod
from snakenode.net import lane as lane_mod
from snakenode.net import transfer
from snakenode.snake.context import NodeContext
from snakenode.snake.runtime import JobRun
from snakenode.snake.view import NetworkView

StreamFactory = Callable[[], Awaitable[host_mod.StreamIO]]


@dataclass
class Sent:
    bytes: int
    seconds: float
    path: dict[str, Any]  # {"path": "lane"|"libp2p"}, plus "fallback": why, when the lane was offered but not used


class Sender:
    def __init__(self, ctx: NodeContext, view: NetworkView) -> None:
        self.ctx = ctx
        self.view = view

    @staticmethod
    def entries(run: JobRun, model: dict[str, str]) -> list[bundle_mod.LayerEntry]:
        return [bundle_mod.LayerEntry(n, h, run.schema[n].size, run.schema[n].tensors)
                for n, h in sorted(model.items())]

    @staticmethod
    def model_bytes(run: JobRun, model: dict[str, str]) -> int:
        return sum(run.schema[n].size for n in model if n in run.schema)

    def plan(self, run: JobRun, model: dict[str, str], held: set[str] | list[str], partial: dict[str, int]
             ) -> list[transfer.SendItem]:
        """The layers the receiver lacks, each from the offset its partial file already has."""
        return transfer.plan_send(self.entries(run, model), set(held), partial)

    def lane_cert(self, run: JobRun, model: dict[str, str]) -> lane_mod.LaneCert | None:
        """A fresh lane certificate to offer with the proposal (or upload), when this node runs a lane and the
        whole model reaches the threshold; the bytes actually planned decide later whether it is used."""
        if self.ctx.lane is not None and self.model_bytes(run, model) >= max(1, self.ctx.lane_threshold()):
            return lane_mod.LaneCert.generate()
        return None

    async def send(self, run: JobRun, peer: str, manifest: bundle_mod.LayerBundle, items: list[transfer.SendItem],
                   *, stream: StreamFactory, owns_stream: bool, offer: lane_mod.LaneOffer | None,
                   cert: lane_mod.LaneCert | None, via: str | None, ctx: dict[str, Any]) -> Sent:
        """Send the bundle and wait for the receiver's ack; raises (TransferError and others) on failure.
        `stream` gives the libp2p stream the bundle goes on without a lane (opened here when `owns_stream`,
        and then closed here; else the caller's conversation stream, which the caller closes)."""
        planned = sum(it.entry.size - it.offset for it in items)
        faults = self.ctx.faults
        if offer is not None and cert is not None and planned > 0 and planned >= self.ctx.lane_threshold():
            res = await lane_mod.send_over_lane(self.view.lane_hosts(peer, via), offer, cert, manifest, self.ctx.store,
                                                items, counters=self.ctx.counters, fallback=stream, peer=peer,
                                                rate=faults.rate, faults=faults, ctx=ctx)
            path = {"path": res["path"], **({"fallback": res["fallback"]} if res.get("fallback") else {})}
            return Sent(int(res["bytes"]), float(res["seconds"]), path)
        io = await stream()
        try:
            res = await transfer.send_bundle(io, manifest, self.ctx.store, items, rate=faults.rate, faults=faults,
                                             ctx=ctx, pack_bf16=run.spec.get("transfer_dtype") == "bf16")
        finally:
            if owns_stream:
                await io.close()
        return Sent(int(res["bytes"]), float(res["seconds"]), {"path": "libp2p"})
