"""Diagnostic only (never part of the product): where a daemon's bytes go, by libp2p protocol.

Put this directory on PYTHONPATH and set SNAKENODE_WIRESTATS=DIR. Every process that then imports
py-libp2p (daemons, the bootstrap peer) counts, cumulatively:
  stream.<protocol>.out    bytes the process wrote on streams of that protocol (payload + the protocol's
                           own framing; protobuf RPCs of gossipsub, identify, ping, our snake streams)
  rpc.<part>.out           gossipsub RPCs taken apart: publish (messages), sender_record (the signed peer
                           record py-libp2p attaches to RPCs), ihave/iwant/graft/prune/idontwant (control)
  noise.out / noise.msgs   bytes and messages after Yamux framing and Noise encryption (what TCP carries)
and appends a snapshot {"t": unix time, "argv": ..., "c": {...}} to DIR/<pid>.jsonl every second.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import threading
import time
from collections import Counter

_DIR = os.environ.get("SNAKENODE_WIRESTATS")
C: Counter[str] = Counter()


def _patch_stream(mod) -> None:
    cls = mod.NetStream
    orig = cls.write

    async def write(self, data):  # type: ignore[no-untyped-def]
        try:
            proto = self.get_protocol()
        except Exception:  # noqa: BLE001
            proto = None
        C[f"stream.{proto}.out"] += len(data)
        C[f"stream.{proto}.writes"] += 1
        return await orig(self, data)

    cls.write = write


def _patch_pubsub(mod) -> None:
    cls = mod.Pubsub
    orig = cls.write_msg

    async def write_msg(self, stream, rpc_msg):  # type: ignore[no-untyped-def]
        try:
            C["rpc.total.out"] += rpc_msg.ByteSize()
            C["rpc.count"] += 1
            if rpc_msg.senderRecord:
                C["rpc.sender_record.out"] += len(rpc_msg.senderRecord)
            for m in rpc_msg.publish:
                C["rpc.publish.out"] += m.ByteSize()
                C["rpc.publish.msgs"] += 1
            if rpc_msg.subscriptions:
                C["rpc.subscriptions.out"] += sum(s.ByteSize() for s in rpc_msg.subscriptions)
            if rpc_msg.HasField("control"):
                ctl = rpc_msg.control
                for part in ("ihave", "iwant", "graft", "prune", "idontwant"):
                    items = getattr(ctl, part, None)
                    if items:
                        C[f"rpc.{part}.out"] += sum(x.ByteSize() for x in items)
                        C[f"rpc.{part}.rpcs"] += 1
        except Exception:  # noqa: BLE001
            C["rpc.parse_error"] += 1
        return await orig(self, stream, rpc_msg)

    cls.write_msg = write_msg


def _patch_noise(mod) -> None:
    cls = mod.BaseNoiseMsgReadWriter
    orig = cls.write_msg

    async def write_msg(self, msg, prefix_encoded=False):  # type: ignore[no-untyped-def]
        n = len(msg)
        C["noise.plain.out"] += n
        C["noise.msgs"] += max(1, -(-n // 65519))
        C["noise.out"] += n + 18 * max(1, -(-n // 65519))
        return await orig(self, msg, prefix_encoded)

    cls.write_msg = write_msg


PATCHES = {"libp2p.network.stream.net_stream": _patch_stream, "libp2p.pubsub.pubsub": _patch_pubsub,
           "libp2p.security.noise.io": _patch_noise}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        orig_exec = loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            orig_exec(module)
            PATCHES[name](module)
            _start_dumper()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_started = False


def _start_dumper() -> None:
    global _started
    if _started:
        return
    _started = True
    path = os.path.join(_DIR, f"{os.getpid()}.jsonl")

    def loop() -> None:
        while True:
            time.sleep(1.0)
            try:
                with open(path, "a") as f:
                    f.write(json.dumps({"t": time.time(), "argv": sys.argv[1:6], "c": dict(C)}) + "\n")
            except OSError:
                pass

    threading.Thread(target=loop, name="wirestats", daemon=True).start()


if _DIR:
    os.makedirs(_DIR, exist_ok=True)
    sys.meta_path.insert(0, _Finder())
