"""The bootstrap peer: the network service alone (no data, no worker, no snake logic)."""

from __future__ import annotations

import trio

from snakenode.config import NodeConfig
from snakenode.identity import Identity
from snakenode.net.service import NetService


class BootstrapPeer:
    def __init__(self, cfg: NodeConfig, ident: Identity) -> None:
        self.cfg = cfg
        self.service = NetService(cfg, ident)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.service.run)
            # The contract: print the full multiaddrs once listening (node.json has them too).
            for addr in self.service.addrs:
                print(addr, flush=True)
            task_status.started()
