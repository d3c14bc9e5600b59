"""The libp2p host: TCP + Noise + Yamux only, safe stream handlers, framed stream I/O.

Hazards of py-libp2p 0.8.1 that this module exists to contain (docs/DESIGN.md, "py-libp2p 0.8.1"):
- an exception escaping a stream handler can take the whole node down -> `safe_handler` catches
  everything, logs, counts and resets the stream;
- a stream opened and closed without a write wedges its connection -> `StreamIO` always writes a frame
  before closing;
- a busy listen port is not an error in libp2p (the host just has no addresses) -> `check_listening`;
- 0.0.0.0 is advertised verbatim -> `dialable_addrs` expands it to the machine's interface addresses.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from snakenode import logs, wire
from snakenode.counters import Counters
from snakenode.identity import Identity

log = logs.get("host")

Handler = Callable[["StreamIO"], Awaitable[None]]


class ListenError(Exception):
    """The node could not listen; the message says what to do."""


def build_host(ident: Identity, max_peers: int, announce: list[str] | None = None,
               mdns: bool = False) -> IHost:
    """A host that offers only Noise and Yamux: no plaintext, no secio, no mplex (slow, unsafe)."""
    kp = ident.libp2p_key_pair()
    cfg = ConnectionConfig(
        max_connections=max_peers * 2 + 16,
        min_connections=0,  # we keep our own connections; libp2p's auto-connect would redial dead peers
        low_watermark=0,
        high_watermark=max_peers * 2 + 16,
        max_connections_per_peer=2,
        dial_timeout=10.0,
        inbound_upgrade_timeout=10.0,
        outbound_upgrade_timeout=10.0,
    )
    host = new_host(
        key_pair=kp,
        sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=new_x25519().private_key)},
        muxer_opt={YAMUX_ID: Yamux},
        connection_config=cfg,
        announce_addrs=[multiaddr.Multiaddr(a) for a in announce] if announce else None,
        enable_mDNS=mdns,
    )
    logs.quiet()
    return host


def listen_addrs(listen: list[str]) -> list[multiaddr.Multiaddr]:
    out = []
    for a in listen:
        try:
            out.append(multiaddr.Multiaddr(a))
        except Exception as exc:  # noqa: BLE001 - multiaddr raises several types
            raise ListenError(f"--listen {a!r} is not a valid multiaddr ({exc}); e.g. /ip4/0.0.0.0/tcp/4001") from None
    return out


def preflight_ports(listen: list[str]) -> None:
    """Fail early, and clearly, when a fixed TCP port is taken (libp2p itself stays silent)."""
    for a in listen:
        ma = multiaddr.Multiaddr(a)
        try:
            port = int(ma.value_for_protocol("tcp"))
            ip = ma.value_for_protocol("ip4")
        except Exception:  # noqa: BLE001 - not a tcp/ip4 address: libp2p will judge it
            continue
        if port == 0 or not ip:
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(
                    f"port {port} is in use: pass --listen /ip4/{ip}/tcp/0 for any free port, "
                    f"or stop the program that holds it (`ss -ltnp 'sport = :{port}'` shows it)"
                ) from None
            raise ListenError(f"cannot listen on {a}: {exc.strerror}") from None
        finally:
            s.close()


def check_listening(host: IHost, listen: list[str]) -> None:
    if not host.get_transport_addrs():
        raise ListenError(
            f"could not listen on {', '.join(listen)} (port in use or address not on this machine); "
            f"pass --listen /ip4/0.0.0.0/tcp/0 for any free port"
        )


def _local_ipv4() -> list[str]:
    try:
        import psutil

        addrs = []
        for entries in psutil.net_if_addrs().values():
            for e in entries:
                if e.family == socket.AF_INET and e.address:
                    addrs.append(e.address)
        return sorted(set(addrs), key=lambda ip: (ip.startswith("127."), ip))
    except Exception:  # noqa: BLE001 - fall back to loopback only
        return ["127.0.0.1"]


def dialable_addrs(host: IHost) -> list[str]:
    """Full multiaddrs with /p2p/ that other machines can dial (0.0.0.0 expanded to real interfaces)."""
    pid = host.get_id().to_string()
    out: list[str] = []
    for ma in host.get_addrs():
        text = str(ma)
        if "/p2p/" not in text:
            text += f"/p2p/{pid}"
        if text.startswith("/ip4/0.0.0.0/"):
            rest = text[len("/ip4/0.0.0.0/"):]
            out.extend(f"/ip4/{ip}/{rest}" for ip in _local_ipv4())
        else:
            out.append(text)
    return list(dict.fromkeys(out))


def remote_peer(stream: INetStream) -> str:
    return stream.muxed_conn.peer_id.to_string()


class StreamIO:
    """Buffered, framed, time-bounded I/O on a libp2p stream, counting bytes under a name.

    Every read has a deadline (`wire.READ_TIMEOUT_S` unless told otherwise) so a silent or slow peer
    cannot hold a handler forever; frame sizes are checked against the caller's limit before reading.
    """

    def __init__(self, stream: INetStream, counters: Counters, name: str) -> None:
        self.stream = stream
        self.counters = counters
        self.name = name
        self.peer = remote_peer(stream)
        self._buf = bytearray()
        self.bytes_in = 0
        self.bytes_out = 0

    async def _fill(self, n: int, timeout: float) -> None:
        with trio.fail_after(timeout):
            while len(self._buf) < n:
                try:
                    chunk = await self.stream.read(max(n - len(self._buf), 65536))
                except StreamEOF:  # py-libp2p signals the end of a stream this way, not with b""
                    chunk = b""
                except StreamReset:
                    raise wire.WireError(f"stream reset by the peer after {self.bytes_in} bytes",
                                         "truncated") from None
                if not chunk:
                    raise wire.WireError(f"stream closed by the peer after {self.bytes_in} bytes", "truncated")
                self._buf += chunk
                self.bytes_in += len(chunk)
                self.counters.add(f"bytes.{self.name}.in", len(chunk))

    async def read_exact(self, n: int, timeout: float = wire.READ_TIMEOUT_S) -> bytes:
        await self._fill(n, timeout)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_some(self, max_n: int, timeout: float = wire.READ_TIMEOUT_S) -> bytes:
        """Up to max_n bytes (at least one), for bulk payloads that are hashed as they arrive."""
        if not self._buf:
            await self._fill(1, timeout)
        n = min(max_n, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_frame(self, limit: int = wire.MAX_FRAME, timeout: float = wire.READ_TIMEOUT_S
                         ) -> tuple[str, wire.Fields]:
        (length,) = wire.HEADER.unpack(await self.read_exact(4, timeout))
        if length > limit:
            raise wire.WireError(f"frame of {length} bytes exceeds the {limit}-byte limit", "oversize")
        return wire.decode_message(await self.read_exact(length, timeout), limit)

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)
        self.bytes_out += len(data)
        self.counters.add(f"bytes.{self.name}.out", len(data))

    async def write_frame(self, obj: dict[str, Any]) -> None:
        await self.write(wire.frame(obj))

    async def close(self) -> None:
        with trio.move_on_after(2):
            try:
                await self.stream.close()
            except Exception:  # noqa: BLE001 - closing a dead stream is not news
                pass

    async def reset(self) -> None:
        with trio.move_on_after(2):
            try:
                await self.stream.reset()
            except Exception:  # noqa: BLE001
                pass


def safe_handler(name: str, fn: Handler, counters: Counters,
                 allowed: Callable[[str], bool]) -> Callable[[INetStream], Awaitable[None]]:
    """Wrap a protocol handler so nothing it raises can reach libp2p (which may kill the node).

    A peer `allowed` refuses gets an `error` frame `peer_not_allowed` and a reset, counted as
    `reject.<name>.peer_not_allowed`, before the handler sees a byte (defence in depth behind the
    connection-level check in net/liveness.py).
    A WireError is answered with an `error` frame naming the problem (so an honest but buggy sender
    learns what it did wrong), counted as `reject.<name>.<kind>`; anything else is logged and counted
    as `error.handler.<name>`. The stream is always closed or reset afterwards.
    """

    async def handler(stream: INetStream) -> None:
        io: StreamIO | None = None
        try:
            io = StreamIO(stream, counters, name)
            if not allowed(io.peer):
                counters.add(f"reject.{name}.peer_not_allowed")
                log.warning("rejected", proto=name, peer=io.peer, reason="peer_not_allowed")
                with trio.move_on_after(2):
                    await io.write_frame({"t": "error", "kind": "peer_not_allowed",
                                          "error": "this network is closed to your peer id"})
                await io.reset()
                return
            await fn(io)
            await io.close()
        except wire.WireError as exc:
            counters.add(f"reject.{name}.{exc.kind}")
            log.warning("rejected", proto=name, peer=io.peer if io else "?", kind=exc.kind, error=str(exc))
            if io is not None:
                with trio.move_on_after(2):
                    try:
                        await io.write_frame({"t": "error", "kind": exc.kind, "error": str(exc)[:500]})
                    except Exception:  # noqa: BLE001 - peer may be gone
                        pass
                await io.reset()
        except trio.TooSlowError:
            counters.add(f"reject.{name}.timeout")
            log.warning("rejected", proto=name, peer=io.peer if io else "?", kind="timeout")
            if io is not None:
                await io.reset()
        except trio.Cancelled:
            raise
        except BaseException as exc:  # noqa: BLE001 - the whole point: nothing escapes
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            counters.add(f"error.handler.{name}")
            log.error("handler_failed", proto=name, peer=io.peer if io else "?",
                      error=f"{type(exc).__name__}: {exc}"[:300])
            if io is not None:
                await io.reset()
            else:
                with trio.move_on_after(2):
                    try:
                        await stream.reset()
                    except Exception:  # noqa: BLE001
                        pass

    return handler


def register(host: IHost, protocol: str, name: str, fn: Handler, counters: Counters,
             allowed: Callable[[str], bool]) -> None:
    """Serve `protocol` with `fn` behind safe_handler and the peer predicate `allowed`, which every caller
    states: a node passes its allowlist (NetService.register_protocol does), and only a test or benchmark
    that serves anyone on purpose passes `lambda _: True`. The one handler registered without this wrapper
    is libp2p's standard ping (net/liveness.py says why)."""
    if not wire.PROTOCOL_RE.match(protocol):
        raise ValueError(f"protocol id {protocol!r} must have the form /snake/<name>/<semver>")
    host.set_stream_handler(TProtocol(protocol), safe_handler(name, fn, counters, allowed))


async def open_stream(host: IHost, peer_id: str, protocol: str, counters: Counters, name: str,
                      timeout: float = 10.0) -> StreamIO:
    from libp2p.peer.id import ID

    with trio.fail_after(timeout):
        stream = await host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])
    return StreamIO(stream, counters, name)
