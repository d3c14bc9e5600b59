"""The ASGI app: `/metrics`, `/api/...` and the dashboard (`/`). Read-only by construction.

Only GET and HEAD are served; every document comes from `Sources`, which has no way to change the node
(submit, trust and resume stay on the control socket, same uid only). A plain ASGI callable: the routes
are a handful of fixed paths, so a framework would add weight to the daemon and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from snakenode.http.lag import LagMonitor
from snakenode.http.metrics import CONTENT_TYPE, NodeMetrics
from snakenode.http.sources import Sources, UnknownJob

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "index.html": "text/html; charset=utf-8"}
JOB_PATH = re.compile(r"/api/jobs/([0-9a-f]{1,16})\Z")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")
# The dashboard loads nothing from elsewhere; the policy makes a browser refuse it if it ever tried.
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


def _static(name: str) -> bytes:
    return resources.files("snakenode.http").joinpath("static", name).read_bytes()


class App:
    def __init__(self, sources: Sources, lag: LagMonitor, node_id: str, loopback_only: bool = True) -> None:
        self.sources = sources
        self.lag = lag
        self.metrics = NodeMetrics(sources, lag, node_id)
        self.files = {name: _static(name) for name in STATIC}
        # Bound to loopback, the server answers only requests addressed to loopback names: a web page on
        # another site cannot read the API through a DNS name rebound to 127.0.0.1.
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        status, ctype, body, extra = self.route(scope)
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
                   (b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"),
                   (b"content-security-policy", CSP.encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    def _host_ok(self, scope: Scope) -> bool:
        if not self.loopback_only:
            return True
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in LOOPBACK_NAMES

    def route(self, scope: Scope) -> tuple[int, str, bytes, list[tuple[bytes, bytes]]]:
        if scope["method"] not in ("GET", "HEAD"):
            return (*_json(405, {"error": "read-only: only GET and HEAD are served; submit, trust and resume "
                                          "use the CLI (control socket)"}), [(b"allow", b"GET, HEAD")])
        if not self._host_ok(scope):
            return (*_json(421, {"error": "this node serves HTTP to loopback names only (127.0.0.1, "
                                          "localhost); bind another address with --http HOST:PORT"}), [])
        path = scope["path"]
        if path in ("/", "/index.html"):
            return 200, STATIC["index.html"], self.files["index.html"], []
        if path.startswith("/static/") and path[8:] in STATIC:
            return 200, STATIC[path[8:]], self.files[path[8:]], []
        if path == "/metrics":
            return 200, CONTENT_TYPE, self.metrics.render(), []
        api: dict[str, Callable[[], Any]] = {
            "/api/status": self.sources.status, "/api/peers": self.sources.peers, "/api/jobs": self.sources.jobs,
            "/api/progress": self.sources.progress, "/api/lag": self.lag.summary,
        }
        if path in api:
            return (*_json(200, api[path]()), [])
        m = JOB_PATH.match(path)
        if m:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            since = query.get("since", ["0"])[0]
            if not since.isdigit():
                return (*_json(400, {"error": "since must be a record index (0, 1, ...)"}), [])
            try:
                return (*_json(200, self.sources.job(m.group(1), int(since))), [])
            except UnknownJob as exc:
                return (*_json(404, {"error": str(exc)}), [])
            except Exception as exc:
                if getattr(exc, "kind", None) == "unknown_job":  # the control socket's error, same text
                    return (*_json(404, {"error": str(exc)}), [])
                raise
        return (*_json(404, {"error": f"no such path {path!r}; try /, /metrics, /api/status, /api/peers, "
                                      f"/api/jobs, /api/jobs/JOB_ID, /api/progress, /api/lag"}), [])


def _json(status: int, obj: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj, sort_keys=True, default=str).encode()
