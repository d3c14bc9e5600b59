"""A hostile peer for the security tests: a real libp2p host with a fresh identity that speaks the snake
protocols wrongly on purpose, plus builders for the bad inputs it sends.

It runs in the test process under pytest-trio and is built exactly like a node's host
(`snakenode.net.host.build_host`: Noise + Yamux), so everything it sends reaches the victim's real
handlers. Replies are read until the victim closes or resets the stream, then decoded frame by frame, so
a test can assert on the named error (`{t: error, kind}`) or Decline reason the attacker receives.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack
import multiaddr
import numpy as np
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from snakenode import wire
from snakenode.counters import Counters
from snakenode.identity import Identity
from snakenode.layers import bundle as bundle_mod
from snakenode.net import host as host_mod
from snakenode.net.gossip import Gossip
from snakenode.net.liveness import Liveness
from snakenode.net.peers import PeerTable
from snakenode.snake import custody
from snakenode.snake import state as st
from snakenode.snake.job import SIGN_DOMAIN, SignedJob, sign_job
from snakenode.snake.window import Window, next_window

REPLY_TIMEOUT_S = 15.0  # longer than the victim's 10 s read deadline, so its verdict always arrives first
MAX_REPLY = 8 * 2**20


def fresh_identity() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


@dataclass
class Reply:
    """What the attacker saw on one stream: the frames the victim wrote, and how the stream ended
    (`reset`, `eof`, or `timeout` when the victim neither answered nor closed in time)."""

    frames: list[dict[str, Any]] = field(default_factory=list)
    end: str = "eof"
    raw: bytes = b""
    seconds: float = 0.0

    @property
    def first(self) -> dict[str, Any]:
        return self.frames[0] if self.frames else {}

    @property
    def kind(self) -> str:
        """`error:<kind>`, `decline:<reason>`, the message type, or `none` when no frame arrived."""
        f = self.first
        if not f:
            return "none"
        if f.get("t") == "error":
            return f"error:{f.get('kind')}"
        if f.get("t") == "decline":
            return f"decline:{f.get('reason')}"
        return str(f.get("t"))


def split_frames(data: bytes) -> list[dict[str, Any]]:
    out = []
    pos = 0
    while pos + 4 <= len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        if pos + 4 + n > len(data):
            break
        try:
            obj = msgpack.unpackb(data[pos + 4:pos + 4 + n], raw=False)
        except Exception:  # noqa: BLE001 - the rest is raw payload (get_layers), not frames
            break
        if not isinstance(obj, dict):
            break
        out.append(obj)
        pos += 4 + n
    return out


def frame_bytes(obj: Any) -> bytes:
    """A frame without the sender-side size check (the attacker may send what a node never would)."""
    payload = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


class Hostile:
    """One attacking peer. Use `async with Hostile.running() as h:`."""

    def __init__(self, host: IHost, ident: Identity) -> None:
        self.host = host
        self.ident = ident
        self.peer_id = ident.peer_id
        self.gossip: Gossip | None = None
        self.counters = Counters()

    @classmethod
    @asynccontextmanager
    async def running(cls, ident: Identity | None = None, network: str | None = None) -> AsyncIterator[Hostile]:
        """A listening host that answers and sends liveness pings like a node (so the victim keeps its
        connection: an attacker that looks alive is the harder case); with `network`, also a gossipsub
        instance subscribed to its topics."""
        ident = ident or fresh_identity()
        host = host_mod.build_host(ident, 16)
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            h = cls(host, ident)
            async with trio.open_nursery() as nursery:
                liveness = Liveness(host, PeerTable(ident.peer_id, 2, 60.0), h.counters, 1.0, 1.5,
                                    lambda event, pid: None)
                host.get_network().register_notifee(liveness.notifee())
                await nursery.start(liveness.run)
                if network is not None:
                    h.gossip = Gossip(host, network, h.counters)
                    await nursery.start(h.gossip.run)
                    for name in wire.TOPIC_NAMES:  # an attacker does not check what it publishes
                        h.gossip.pubsub.remove_topic_validator(h.gossip.topic(name))
                try:
                    yield h
                finally:
                    nursery.cancel_scope.cancel()

    async def connect(self, maddr: str, timeout: float = 10.0) -> str:
        info = info_from_p2p_addr(multiaddr.Multiaddr(maddr))
        with trio.fail_after(timeout):
            await self.host.connect(info)
        return info.peer_id.to_string()

    async def open(self, peer: str, proto: str, timeout: float = 10.0) -> INetStream:
        with trio.fail_after(timeout):
            return await self.host.new_stream(ID.from_base58(peer), [TProtocol(proto)])

    async def read_all(self, stream: INetStream, timeout: float = REPLY_TIMEOUT_S) -> Reply:
        """Everything the victim writes until it closes or resets the stream."""
        t0 = time.monotonic()
        buf = bytearray()
        end = "timeout"
        with trio.move_on_after(timeout):
            while len(buf) < MAX_REPLY:
                try:
                    chunk = await stream.read(65536)
                except Exception as exc:  # noqa: BLE001 - StreamEOF / StreamReset end the reply
                    end = "eof" if "EOF" in type(exc).__name__ else "reset"
                    break
                if not chunk:
                    end = "eof"
                    break
                buf += chunk
        return Reply(split_frames(bytes(buf)), end, bytes(buf), time.monotonic() - t0)

    async def exchange(self, peer: str, proto: str, data: bytes, *, half_close: bool = False,
                       timeout: float = REPLY_TIMEOUT_S) -> Reply:
        """Open a stream, write `data` (optionally half-close), and read the victim's answer."""
        stream = await self.open(peer, proto)
        try:
            try:
                if data:
                    await stream.write(data)
                if half_close:
                    await stream.close_write()
            except Exception:  # noqa: BLE001 - the victim may refuse before reading (allowed_peers)
                pass
            return await self.read_all(stream, timeout)
        finally:
            with trio.move_on_after(2):
                try:
                    await stream.reset()
                except Exception:  # noqa: BLE001 - already reset by the victim
                    pass

    async def request(self, peer: str, proto: str, obj: Mapping[str, Any], **kw: Any) -> Reply:
        return await self.exchange(peer, proto, frame_bytes(dict(obj)), **kw)

    async def px(self, peer: str, network: str) -> Reply:
        """The first thing an honest new peer does: swap profiles over /snake/peers/1.0.0."""
        return await self.request(peer, wire.PROTO_PEERS, {"t": "px_req", "want_peers": True,
                                                           "profile": honest_profile(self, network)})

    # --- gossip ----------------------------------------------------------------------------------------
    async def wait_topic_peer(self, peer: str, name: str, timeout: float = 20.0) -> None:
        """Until gossipsub knows that `peer` subscribes to topic `name` (so a publish reaches it)."""
        assert self.gossip is not None
        topic = self.gossip.topic(name)
        deadline = trio.current_time() + timeout
        pid = ID.from_base58(peer)
        while pid not in self.gossip.pubsub.peer_topics.get(topic, set()):
            if trio.current_time() > deadline:
                raise AssertionError(f"gossipsub never learned that {peer} subscribes to {topic}")
            await trio.sleep(0.05)

    async def publish(self, name: str, data: bytes) -> None:
        """Publish raw bytes (no size check: oversized messages are an attack too)."""
        assert self.gossip is not None
        await self.gossip.pubsub.publish(self.gossip.topic(name), data)


def honest_profile(h: Hostile, network: str) -> dict[str, Any]:
    return {"v": 1, "peer_id": h.peer_id, "seq": time.time_ns(), "addrs": [str(a) for a in h.host.get_addrs()],
            "role": "node", "version": "0.1.0", "network": network,
            "state": {"kind": "idle", "job": None, "hop": None}}


# ---------------------------------------------------------------------------------------------- jobs


def untrusted_job(spec: Mapping[str, Any]) -> SignedJob:
    """A well-formed job signed by a key nobody trusts."""
    return sign_job(spec, fresh_identity())


def forged_job(spec: Mapping[str, Any], claimed_submitter: str) -> SignedJob:
    """A job that names a trusted submitter but carries another key's signature."""
    thief = fresh_identity()
    genuine = sign_job(spec, thief)
    fake = SignedJob(genuine.spec, claimed_submitter, genuine.created, genuine.nonce, b"")
    return SignedJob(fake.spec, claimed_submitter, fake.created, fake.nonce, thief.sign(SIGN_DOMAIN + fake.payload()))


def unsigned_job(spec: Mapping[str, Any], claimed_submitter: str) -> bytes:
    """A job map without a signature (empty `sig`), as raw wire bytes."""
    full = sign_job(spec, fresh_identity())
    d = {**full.to_dict(), "submitter": claimed_submitter, "sig": b""}
    return msgpack.packb(d, use_bin_type=True)


# ---------------------------------------------------------------------------------------------- job_state


def forged_state(job_id: str, blocks: int, victim: str, *, hop: int, lap: int, attempt: int = 0,
                 members: list[str] | None = None, prev_holder: str | None = None) -> st.JobState:
    """A self-consistent job_state that makes `victim` the holder of (lap, hop): its lineage hashes
    correctly, its window follows the serpentine policy, and it decodes strictly. Anyone can compute one;
    nothing in it proves that the proposer ever held the previous hop."""
    if hop == 0:
        s = st.start_job(job_id, members or [victim], victim, 1, blocks, attempt=attempt)
        return s
    parent = os.urandom(32).hex()
    prev = Window(0, 1)
    window = next_window(prev, 1, blocks)
    return st.JobState(
        job_id=job_id, blocks=blocks, hop=hop, attempt=attempt,
        lineage=st.lineage_next(parent, hop, attempt, victim), parent_lineage=parent, lap=lap,
        lap_members=tuple(sorted(set(members or [victim]))), visited=(victim,), window=window, holder=victim,
        prev_window=prev, prev_holder=prev_holder, recent=(victim,), ancestry=(parent,),
    )


def propose(job_id: str, job: bytes, state: st.JobState | dict[str, Any], layers: Mapping[str, str],
            suggested: int = 1, signer: Identity | None = None) -> dict[str, Any]:
    """A propose frame; with `signer`, carrying the custody link `signer` makes for the state's hand-over
    (a submitter's for hop 0 is the only one that verifies without a chain behind it)."""
    s = state.to_dict() if isinstance(state, st.JobState) else state
    msg = {"t": "propose", "job_id": job_id, "job": job, "state": s, "suggested": suggested,
           "layers": dict(layers)}
    if signer is not None and isinstance(state, st.JobState):
        msg["custody"] = [custody.sign(signer, state.parent_lineage, state.hop, state.attempt, state.holder).to_wire()]
    return msg


# ---------------------------------------------------------------------------------------------- bundles


def zeros_like(entry: bundle_mod.LayerEntry, fill: float = 0.0) -> dict[str, np.ndarray]:
    out = {}
    for name, info in entry.tensors.items():
        dt = np.dtype(bundle_mod.DTYPES[info["dtype"]][0])
        out[name] = np.full(tuple(info["shape"]), fill, dtype=dt)
    return out


def blob_for(entry: bundle_mod.LayerEntry, fill: float = 0.0, *, nan: bool = False) -> bytes:
    """A blob with the model's tensor names, dtypes and shapes (so the same size), values `fill`; with
    `nan`, one value of the first float tensor is NaN."""
    tensors = zeros_like(entry, fill)
    if nan:
        name = next(n for n, a in sorted(tensors.items()) if a.dtype.kind == "f" and a.size)
        a = tensors[name].copy()
        a.reshape(-1)[0] = math.nan
        tensors[name] = a
    blob = bundle_mod.encode_blob(tensors)
    assert len(blob) == entry.size, (len(blob), entry.size)
    return blob


def reshaped_blob(entry: bundle_mod.LayerEntry) -> bytes:
    """Same tensor names, dtypes and byte size as the model's layer, but the largest 2-D tensor is
    transposed (shape [a, b] -> [b, a]): only the shape check can catch it."""
    tensors = zeros_like(entry)
    name = max((n for n, a in tensors.items() if a.ndim == 2 and a.shape[0] != a.shape[1]),
               key=lambda n: tensors[n].size)
    tensors[name] = np.zeros(tensors[name].shape[::-1], dtype=tensors[name].dtype)
    blob = bundle_mod.encode_blob(tensors)
    assert len(blob) == entry.size
    return blob


def entry_of(name: str, blob: bytes, like: bundle_mod.LayerEntry | None = None) -> bundle_mod.LayerEntry:
    """The manifest entry a sender would list for `blob` (or `like`'s tensors with the blob's hash)."""
    e = bundle_mod.layer_entry(name, blob)
    if like is not None:
        return bundle_mod.LayerEntry(name, e.hash, e.size, like.tensors)
    return e


def bundle_frame(job_id: str, state: st.JobState | dict[str, Any], entries: list[bundle_mod.LayerEntry],
                 send: list[bundle_mod.LayerEntry]) -> dict[str, Any]:
    s = state.to_dict() if isinstance(state, st.JobState) else state
    manifest = bundle_mod.LayerBundle(job_id, s, entries).encode()
    return {"t": "bundle", "manifest": manifest,
            "send": [{"name": e.name, "hash": e.hash, "offset": 0} for e in send]}


def schema_of(home: Any, job_id: str) -> dict[str, bundle_mod.LayerEntry]:
    """The job's model schema as the victim recorded it (what any peer can compute from the public spec)."""
    meta = json.loads((home / "jobs" / job_id / "meta.json").read_text())
    return bundle_mod.schema_map(meta["schema"])


def init_state_of(home: Any, job_id: str) -> dict[str, str]:
    meta = json.loads((home / "jobs" / job_id / "meta.json").read_text())
    return dict(meta["init_state"])
