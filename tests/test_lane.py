"""Issue 9: the fast bulk lane (TLS 1.3, certificates pinned through the negotiation) keeps the libp2p path's
guarantees: only negotiated transfers, no man in the middle, resume after a break, fallback, garbage-proof.

Everything runs for real in one trio run: a LaneServer, senders in worker threads, and for the fallback two
libp2p hosts (Noise + Yamux) on 127.0.0.1.
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from snakenode import identity, wire
from snakenode.counters import Counters
from snakenode.faults import Faults
from snakenode.layers import bundle as bundle_mod
from snakenode.layers.store import LayerStore
from snakenode.net import lane, transfer
from snakenode.net.lane import client as lane_client

LAYER_FLOATS = 400_000  # 1.6 MB per layer: several 1 MiB chunks each, quick to send


class Model:
    """A small layered model in a sender's store, and what a receiver needs to check it."""

    def __init__(self, root: Path, layers: int = 4, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.store = LayerStore(root / "sender")
        self.entries: list[bundle_mod.LayerEntry] = []
        for i in range(layers):
            name = f"blocks.{i}"
            blob = bundle_mod.encode_blob({f"{name}.w": rng.standard_normal(LAYER_FLOATS, dtype=np.float32)})
            self.store.put_bytes(blob)
            self.entries.append(bundle_mod.layer_entry(name, blob))
        self.schema = {e.name: e for e in self.entries}
        self.manifest = bundle_mod.LayerBundle("0123456789abcdef", {"hop": 1}, self.entries)
        self.total = sum(e.size for e in self.entries)

    def plan(self, receiver: LayerStore) -> list[transfer.SendItem]:
        held = {e.hash for e in self.entries if receiver.has(e.hash)}
        partial = {e.hash: receiver.partial_offset(e.hash) for e in self.entries}
        return transfer.plan_send(self.entries, held, partial)


class Receiver:
    """What snake/receiver.py's bundle handler does, minus the snake's reservation logic; it serves the lane and the
    libp2p stream alike (lane.receive_layers picks the fast path for a LaneIO)."""

    def __init__(self, model: Model, root: Path) -> None:
        self.model = model
        self.store = LayerStore(root / "receiver")
        self.received: list[int] = []
        self.peers: list[str] = []
        self.remote_hosts: list[str | None] = []
        self.faults: Faults | None = None

    async def handle(self, io: Any) -> None:
        self.peers.append(io.peer)
        if not isinstance(io, lane.LaneIO):
            self.remote_hosts.append(lane.remote_host(io))
        kind, f = await io.read_frame(limit=bundle_mod.MAX_MANIFEST_BYTES + 64 * 1024)
        if kind != "bundle":
            raise wire.WireError(f"expected bundle, got {kind!r}", "unexpected")
        incoming = transfer.decode_incoming(f)
        incoming.manifest.check_against(self.model.schema)
        n = await lane.receive_layers(io, incoming, self.model.schema, self.store, faults=self.faults, ctx={})
        self.received.append(n)
        await io.write_frame({"t": "ack", "bytes": n})

    def complete(self) -> bool:
        return all(self.store.has(e.hash) for e in self.model.entries)


PEER = "12D3KooWTestSenderPeerIdxxxxxxxxxxxxxxxxxxxxxxxxxx"


async def _server(nursery: trio.Nursery, counters: Counters, **kw: Any) -> lane.LaneServer:
    srv = lane.LaneServer(counters, host="127.0.0.1", **kw)
    await nursery.start(srv.serve)
    return srv


async def _until(cond: Any, timeout: float = 10) -> None:
    """The sender may see the TLS alert before the listener has counted and logged the refusal."""
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def _send(model: Model, offer: lane.LaneOffer, cert: lane.LaneCert, items: list[transfer.SendItem],
                counters: Counters, **kw: Any) -> dict[str, Any]:
    return await lane.send_over_lane(["127.0.0.1"], offer, cert, model.manifest, model.store, items,
                                     counters=counters, peer="receiver", **kw)


@pytest.mark.timeout(30)
async def test_transfer_and_man_in_the_middle_refused(tmp_path: Path) -> None:
    model = Model(tmp_path)
    rx = Receiver(model, tmp_path)
    counters, scounters = Counters(), Counters()
    async with trio.open_nursery() as nursery:
        srv = await _server(nursery, scounters)
        sender_cert = lane.LaneCert.generate()
        offer = srv.expect(PEER, sender_cert.der, rx.handle)

        # 1. A client that knows the whole offer (port, lane id, token) but not the negotiated sender's key
        #    presents another certificate: the receiver refuses it during the handshake, before any byte.
        intruder = lane.LaneCert.generate()
        with pytest.raises(transfer.TransferError) as ei:
            await _send(model, offer, intruder, model.plan(rx.store), counters)
        assert ei.value.kind == "refused"
        await _until(lambda: scounters.get("reject.lane.pin_mismatch") == 1)
        assert not rx.peers and srv.pending == 1  # the offer survives: the intruder never got to use it

        # 2. A listener presenting another certificate than the one the Accept named (a MITM in front of the
        #    receiver, with its own offer for our certificate): the sender refuses before sending anything.
        mitm = await _server(nursery, Counters())
        mitm_rx = Receiver(model, tmp_path / "mitm")
        m = mitm.expect(PEER, sender_cert.der, mitm_rx.handle)
        forged = lane.LaneOffer(m.port, m.lane_id, m.token, offer.cert)  # what the sender pinned: the real one
        with pytest.raises(transfer.TransferError) as ei:
            await _send(model, forged, sender_cert, model.plan(rx.store), counters)
        assert ei.value.kind == "pin_mismatch"
        assert counters.get("lane.fallback.pin_mismatch") == 1
        assert not mitm_rx.peers and not any(mitm_rx.store.partial.iterdir())

        # 3. The negotiated pair: the whole bundle moves over the lane, verified, bound to the negotiated peer.
        res = await _send(model, offer, sender_cert, model.plan(rx.store), counters)
        assert res["path"] == "lane" and res["bytes"] == model.total
        assert rx.complete() and rx.received == [model.total] and rx.peers == [PEER]
        assert scounters.get("lane.accepted") == 1 and srv.pending == 0
        assert scounters.get("bytes.lane.in") > model.total  # payload + frames, TLS overhead excluded
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_not_negotiated_transfers_are_refused(tmp_path: Path) -> None:
    model = Model(tmp_path, layers=1)
    rx = Receiver(model, tmp_path)
    counters, scounters = Counters(), Counters()
    async with trio.open_nursery() as nursery:
        srv = await _server(nursery, scounters)
        cert = lane.LaneCert.generate()
        offer = srv.expect(PEER, cert.der, rx.handle)

        # A lane id nobody offered (SNI selects nothing): refused in the handshake.
        bogus = lane.LaneOffer(offer.port, "lane-" + "0" * 32, offer.token, offer.cert)
        with pytest.raises(transfer.TransferError):
            await _send(model, bogus, cert, model.plan(rx.store), counters)
        # The negotiated certificate with a wrong token: refused after the handshake, with the reason.
        wrong = lane.LaneOffer(offer.port, offer.lane_id, b"\x00" * 32, offer.cert)
        with pytest.raises(transfer.TransferError) as ei:
            await _send(model, wrong, cert, model.plan(rx.store), counters)
        assert ei.value.kind == "bad_token"
        # The real offer works once ...
        res = await _send(model, offer, cert, model.plan(rx.store), counters)
        assert res["path"] == "lane" and rx.complete()
        # ... and a replay of the spent token is refused (one-time offer).
        with pytest.raises(transfer.TransferError):
            await _send(model, offer, cert, [transfer.SendItem(model.entries[0])], counters)
        # An offer that expired is refused too.
        rx2 = Receiver(model, tmp_path / "second")
        late = srv.expect(PEER, cert.der, rx2.handle, ttl=-1)
        with pytest.raises(transfer.TransferError):
            await _send(model, late, cert, model.plan(rx2.store), counters)
        assert not rx2.peers and rx.peers == [PEER]
        await _until(lambda: scounters.get("reject.lane.not_negotiated") == 3)
        assert scounters.get("reject.lane.bad_token") == 1
        assert scounters.get("lane.accepted") == 1
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_broken_lane_resumes(tmp_path: Path) -> None:
    model = Model(tmp_path, layers=4)
    rx = Receiver(model, tmp_path)
    counters, scounters = Counters(), Counters()
    break_at = model.entries[0].size + 5  # the sender breaks after the 1st MiB of the 2nd layer
    async with trio.open_nursery() as nursery:
        srv = await _server(nursery, scounters)
        cert = lane.LaneCert.generate()
        offer = srv.expect(PEER, cert.der, rx.handle)
        with pytest.raises(RuntimeError, match="injected fault"):
            await _send(model, offer, cert, model.plan(rx.store), counters,
                        faults=Faults(f"raise@send:after_bytes={break_at}"))
        await _until(lambda: scounters.get("reject.lane.truncated") == 1)  # the receiver noticed the break
        assert rx.store.has(model.entries[0].hash)
        done = rx.store.partial_offset(model.entries[1].hash)
        assert done == transfer.CHUNK
        # Re-negotiation gives a new offer; the plan resumes at the receiver's partial offsets.
        items = model.plan(rx.store)
        assert [(it.entry.name, it.offset) for it in items][:1] == [("blocks.1", done)]
        offer2 = srv.expect(PEER, cert.der, rx.handle)
        res = await _send(model, offer2, cert, items, counters)
        assert res["path"] == "lane" and res["bytes"] == model.total - model.entries[0].size - done
        assert rx.complete() and not any(rx.store.partial.iterdir())
        for e in model.entries:  # what landed is bit-for-bit what was sent
            assert rx.store.get_bytes(e.hash) == model.store.get_bytes(e.hash)
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_receiver_refusal_reaches_the_sender(tmp_path: Path) -> None:
    model = Model(tmp_path, layers=2)
    other = Model(tmp_path / "other", layers=2, seed=1)  # same names and shapes, other values
    rx = Receiver(model, tmp_path)
    counters, scounters = Counters(), Counters()
    async with trio.open_nursery() as nursery:
        srv = await _server(nursery, scounters)
        cert = lane.LaneCert.generate()
        offer = srv.expect(PEER, cert.der, rx.handle)
        # A manifest whose first hash lies about the bytes: the per-layer sha256 catches it, the sender is
        # told. The honest second layer streamed in while the first was verified.
        first, second = model.entries
        lying = [transfer.SendItem(bundle_mod.LayerEntry(first.name, other.entries[0].hash, first.size,
                                                         first.tensors)), transfer.SendItem(second)]
        bad = bundle_mod.LayerBundle(model.manifest.job, {}, [it.entry for it in lying])
        with pytest.raises(transfer.TransferError) as ei:
            await lane.send_over_lane(["127.0.0.1"], offer, cert, bad, _Relabel(model, other), lying,
                                      counters=counters)
        assert ei.value.kind == "hash_mismatch"
        assert scounters.get("reject.lane.hash_mismatch") == 1
        # Nothing unverified entered the store, and nothing is left complete but unverified: the lying
        # layer's partial is gone; the honest one, already complete, was verified and kept.
        assert rx.store.hashes() == [second.hash]
        assert not any(rx.store.partial.iterdir())
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(60)
async def test_too_slow_sender_is_cut_off(tmp_path: Path) -> None:
    """The lane's twin of tests/test_security_hostile.py's slow writes into a bundle's layer bytes: an
    authenticated sender trickles one byte every 2 s; the receiver cuts it off with `too_slow` (the shared
    layer sink's minimum rate, as on the libp2p stream), tells the sender, counts it and keeps the bytes it
    got for a resume."""
    model = Model(tmp_path, layers=1)
    rx = Receiver(model, tmp_path)
    scounters = Counters()
    entry = model.entries[0]
    blob = model.store.get_bytes(entry.hash)
    async with trio.open_nursery() as nursery:
        srv = await _server(nursery, scounters)
        cert = lane.LaneCert.generate()
        offer = srv.expect(PEER, cert.der, rx.handle)

        def trickle() -> tuple[str, float]:
            conn = lane_client.connect_blocking(["127.0.0.1"], offer, cert, 5.0)
            try:
                conn.send(wire.frame({"t": "bundle", "manifest": model.manifest.encode(),
                                      "send": [{"name": entry.name, "hash": entry.hash, "offset": 0}]}))
                t0 = time.monotonic()
                for b in blob[:40]:
                    conn.send(bytes([b]))
                    try:
                        kind, f = conn.read_frame(wire.MAX_FRAME, 2.0)  # the pace: one byte per 2 s
                    except TimeoutError:
                        continue
                    return f"{kind}:{f.str('kind', 64, required=False)}", time.monotonic() - t0
                return "none", time.monotonic() - t0
            finally:
                conn.close()

        how, seconds = await trio.to_thread.run_sync(trickle)
        assert how == "error:too_slow", (how, seconds)
        assert seconds < 40, seconds
        await _until(lambda: scounters.get("reject.lane.too_slow") == 1)
        assert not rx.store.has(entry.hash) and rx.store.partial_offset(entry.hash) > 0
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(60)
def test_the_offer_codec_needs_neither_the_lane_sockets_nor_libp2p() -> None:
    """snake/messages.py decodes lane offers: importing it must not drag in the lane's sockets or libp2p."""
    code = ("import sys, snakenode.snake.messages; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('libp2p', 'trio') "
            "or m.startswith(('snakenode.net.lane.', 'snakenode.net.transfer')) and m != 'snakenode.net.lane.offer'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=True)
    assert out.stdout.strip() == "[]", out.stdout


class _Relabel(LayerStore):
    """A sender store that serves `model`'s bytes under `other`'s hashes (a lying or corrupted sender)."""

    def __init__(self, model: Model, other: Model) -> None:
        super().__init__(model.store.root)
        self._map = {other.entries[0].hash: model.entries[0].hash}

    def path(self, h: str) -> Path:
        return super().path(self._map.get(h, h))


def _dropped(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.mark.timeout(30)
async def test_garbage_leaves_the_listener_serving(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = Model(tmp_path, layers=2)
    rx = Receiver(model, tmp_path)
    counters, scounters = Counters(), Counters()
    caplog.set_level(logging.WARNING, logger="snakenode.lane")
    async with trio.open_nursery() as nursery:
        srv = await _server(nursery, scounters, handshake_timeout=0.5)
        cert = lane.LaneCert.generate()
        offer = srv.expect(PEER, cert.der, rx.handle)

        def junk() -> None:
            rng = np.random.default_rng(7)
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:  # not TLS at all
                s.sendall(rng.bytes(100_000))
                assert _dropped(s)
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:  # silent: timed out
                assert _dropped(s)
            # A TLS client without any certificate, and one speaking TLS 1.2 only.
            for ver in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                ctx.maximum_version = ver
                with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
                    with pytest.raises((ssl.SSLError, OSError)):
                        with ctx.wrap_socket(s, server_hostname=offer.lane_id) as t:
                            t.sendall(b"\x00\x00\x00\x05hello")
                            t.settimeout(5)
                            if not t.recv(100):
                                raise OSError("closed")

        await trio.to_thread.run_sync(junk)
        # The genuine transfer still goes through, and so does a second round of garbage after it.
        res = await _send(model, offer, cert, model.plan(rx.store), counters)
        assert res["path"] == "lane" and rx.complete()
        await trio.to_thread.run_sync(junk)

        def rejected() -> int:
            return sum(1 for r in caplog.records if r.getMessage() == "lane_rejected")

        await _until(lambda: rejected() >= 8)
        assert scounters.get("reject.lane.handshake") == 5  # junk, no certificate, TLS 1.2 (x2), but:
        assert scounters.get("reject.lane.not_negotiated") == 1  # once spent, the offer's lane id is unknown
        assert scounters.get("reject.lane.timeout") == 2
        assert scounters.get("lane.accepted") == 1
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(60)
async def test_fallback_to_libp2p_when_the_lane_is_unreachable(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from snakenode.net import host as host_mod

    model = Model(tmp_path, layers=3)
    rx = Receiver(model, tmp_path)
    counters = Counters()
    caplog.set_level(logging.WARNING, logger="snakenode.lane")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # a port that is bound but not listening: connection refused
    dead_port = closed.getsockname()[1]
    a = host_mod.build_host(identity.load_or_create(tmp_path / "a"), 8)
    b = host_mod.build_host(identity.load_or_create(tmp_path / "b"), 8)
    addr = [host_mod.listen_addrs(["/ip4/127.0.0.1/tcp/0"])[0]]
    try:
        async with a.run(listen_addrs=addr), b.run(listen_addrs=addr):
            host_mod.register(b, wire.PROTO_BUNDLE, "bundle", rx.handle, Counters(), allowed=lambda _: True)
            await a.connect(info_from_p2p_addr(host_mod.listen_addrs(host_mod.dialable_addrs(b)[:1])[0]))
            cert = lane.LaneCert.generate()
            offer = lane.LaneOffer(dead_port, "lane-" + "1" * 32, b"\x01" * 32, lane.LaneCert.generate().der)

            async def libp2p_stream() -> host_mod.StreamIO:
                return await host_mod.open_stream(a, b.get_id().to_string(), wire.PROTO_BUNDLE, counters, "bundle")

            res = await _send(model, offer, cert, model.plan(rx.store), counters, fallback=libp2p_stream)
            assert res["path"] == "libp2p" and res["bytes"] == model.total
            assert rx.complete() and rx.peers == [a.get_id().to_string()]
            assert rx.remote_hosts == ["127.0.0.1"]  # what the lane would dial, learnt from the connection
            assert counters.get("lane.fallback.connect") == 1
            lines = [r for r in caplog.records if r.getMessage() == "lane_fallback"]
            assert len(lines) == 1 and lines[0].fields["reason"] == "connect"  # type: ignore[attr-defined]
            await a.disconnect(b.get_id())
    finally:
        closed.close()
