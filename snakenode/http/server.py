"""Serve the app with Hypercorn's trio worker inside the daemon's nursery (one event loop, no threads).

`serve` reports the URL it listens on (port 0 picks a free one); the daemon writes it to node.json as
`http_url`. Hypercorn and prometheus_client are imported here only, so `--http off` never loads them.
"""

from __future__ import annotations

import logging
from functools import partial

import trio

from snakenode.http.address import is_loopback, parse_address
from snakenode.http.lag import LagMonitor
from snakenode.http.sources import Sources
from snakenode.runner import StartupError


class HttpStartError(StartupError):
    """The server could not bind; the message says which address and what to do."""


async def serve(address: str, sources: Sources, lag: LagMonitor, node_id: str,
                task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.config import Config
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    from snakenode.http.app import App

    parsed = parse_address(address)
    assert parsed is not None, "serve() is not called with --http off"
    host, port = parsed
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("snakenode.http")
    config.graceful_timeout = 1.0
    config.include_server_header = False
    app = App(sources, lag, node_id, loopback_only=is_loopback(host))
    try:
        # Bound here rather than inside Hypercorn, so a taken port is reported in words, not a traceback.
        sockets = config.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
    except OSError as exc:
        raise HttpStartError(f"cannot serve HTTP on {address}: {exc.strerror or exc}; choose another port "
                             f"(--http 127.0.0.1:0 picks a free one) or disable it with --http off") from None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(worker_serve, wrap_app(app, config.wsgi_max_body_size, "asgi"),
                                            config, sockets=sockets))
        task_status.started(binds[0])
