"""Run a service in the foreground: logs to stderr, exit 0 on SIGINT/SIGTERM within 5 s, no traceback.

Shutdown is a cancellation of the service's nursery. libp2p's own teardown is not always prompt, so a
watchdog thread guarantees the exit deadline: it removes node.json and the control socket and ends the
process (its worker dies with it through the parent-death signal).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import trio

from snakenode import logs
from snakenode.home import HomeError, HomeLock

log = logs.get("node")
EXIT_DEADLINE_S = 4.0


class StartupError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from snakenode.config import ConfigError
    from snakenode.identity import IdentityError

    errs: list[type[BaseException]] = [StartupError, HomeError, ConfigError, IdentityError]
    try:
        from snakenode.net.host import ListenError

        errs.append(ListenError)
    except ImportError:
        pass
    return tuple(errs)


def _find(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _find(sub, types)
            if found is not None:
                return found
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc and isinstance(cause, types):
        return cause
    return None


def run_foreground(service: Any, cleanup: Callable[[], None]) -> int:
    """Run `service.run(task_status)` until a signal; returns the process exit status."""
    lock = HomeLock(service.cfg.home)
    try:
        lock.acquire()
    except HomeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stopping = threading.Event()

    def hard_exit() -> None:
        if not stopping.is_set():
            return
        try:
            cleanup()
        finally:
            os._exit(0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("stopping", signal=signal.Signals(signum).name)
                        stopping.set()
                        timer = threading.Timer(EXIT_DEADLINE_S, hard_exit)
                        timer.daemon = True
                        timer.start()
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(on_signals)
            await nursery.start(service.run)

    try:
        trio.run(main)
    except BaseException as exc:  # noqa: BLE001 - translate into one line + exit status
        user = _find(exc, _user_errors())
        if user is not None:
            print(f"error: {user}", file=sys.stderr)
            cleanup()
            return 1
        if _find(exc, (KeyboardInterrupt,)) is not None:
            cleanup()
            return 0
        cleanup()
        raise
    finally:
        lock.release()
    cleanup()
    log.info("stopped")
    return 0
