"""Structured logs: one line per event, `time level component event key=value ...`, on stderr.

Lines are grep-able and machine-parseable (values with spaces are quoted JSON strings), so scenario
runners and tests can wait on events in a node's log. libp2p's own loggers are held at WARNING: they
are chatty and configure themselves on import.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
NOISY = ("libp2p", "multiaddr", "async_service", "anyio_service", "trio", "asyncio", "urllib3")


def _fmt_value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and all(c.isprintable() and c not in ' "=' for c in value) else json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool | int) or value is None:
        return json.dumps(value)
    return json.dumps(value, default=str, separators=(",", ":"))


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        fields = getattr(record, "fields", None)
        msg = record.getMessage()
        parts = [t, record.levelname.lower(), record.name.removeprefix("snakenode."), msg]
        if fields:
            parts.extend(f"{k}={_fmt_value(v)}" for k, v in fields.items())
        line = " ".join(parts)
        if record.exc_info and record.levelno >= logging.ERROR:
            line += " exc=" + json.dumps(self.formatException(record.exc_info).splitlines()[-1])
        return line


def setup(level: str = "info") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    quiet()


def quiet() -> None:
    """Hold third-party loggers at WARNING (call again after importing libp2p: it reconfigures)."""
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING if name != "libp2p" else logging.ERROR)


class Log:
    """`log.info("event", key=value, ...)` -> one structured line."""

    def __init__(self, component: str) -> None:
        self._logger = logging.getLogger("snakenode." + component)

    def _emit(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, False, fields)

    def error(self, event: str, exc_info: bool = False, **fields: Any) -> None:
        self._emit(logging.ERROR, event, exc_info, fields)


def get(component: str) -> Log:
    return Log(component)
