"""Issue 7: strict-wire rules that need no network (the hostile-peer tests drive the same paths through
real nodes): protocol ids, and how StreamIO names a stream that ends or stalls."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from snakenode import wire
from snakenode.counters import Counters
from snakenode.net import host as host_mod


@pytest.mark.timeout(30)
def test_every_protocol_id_has_the_snake_form() -> None:
    assert wire.SNAKE_PROTOCOLS
    for proto in wire.SNAKE_PROTOCOLS:
        assert wire.PROTOCOL_RE.match(proto), proto
    for bad in ("/snake/negotiate/1.0", "/snake/Negotiate/1.0.0", "/other/negotiate/1.0.0", "/snake//1.0.0",
                "/snake/negotiate/1.0.0/x"):
        assert not wire.PROTOCOL_RE.match(bad), bad
        with pytest.raises(ValueError, match="must have the form"):
            host_mod.register(SimpleNamespace(), bad, "x", None, Counters(), lambda _: True)  # type: ignore[arg-type]


class _Stream:
    """Serves `chunks`, then ends the way py-libp2p does: raises `end` (or blocks forever when None)."""

    def __init__(self, chunks: list[bytes], end: BaseException | None) -> None:
        self.chunks = list(chunks)
        self.end = end
        self.muxed_conn = SimpleNamespace(peer_id=SimpleNamespace(to_string=lambda: "12D3KooWpeer"))

    async def read(self, n: int) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.end is None:
            await trio.sleep_forever()
        raise self.end


async def _read_frame(stream: Any, timeout: float = 5.0) -> None:
    await host_mod.StreamIO(stream, Counters(), "t").read_frame(timeout=timeout)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("end", [StreamEOF(), StreamReset()], ids=["eof", "reset"])
@pytest.mark.parametrize("chunks", [[], [b"\x00\x00"], [wire.HEADER.pack(100) + b"\x80" * 10]],
                         ids=["empty", "in_header", "in_body"])
async def test_a_stream_that_ends_mid_frame_is_truncated(chunks: list[bytes], end: BaseException) -> None:
    with pytest.raises(wire.WireError) as info:
        await _read_frame(_Stream(chunks, end))
    assert info.value.kind == "truncated" and "by the peer" in str(info.value)


@pytest.mark.timeout(30)
async def test_a_silent_stream_times_out() -> None:
    with pytest.raises(trio.TooSlowError):
        await _read_frame(_Stream([b"\x00"], None), timeout=0.2)


@pytest.mark.timeout(30)
async def test_an_oversized_header_is_refused_before_the_body() -> None:
    s = _Stream([wire.HEADER.pack(wire.MAX_FRAME + 1)], None)  # the body never comes: no read is attempted
    with pytest.raises(wire.WireError) as info:
        await _read_frame(s)
    assert info.value.kind == "oversize"
