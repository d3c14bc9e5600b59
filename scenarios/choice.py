"""A backend by name: local, netns or compose.

Kept out of backends.py because the compose backend builds on backends.py (and needs pyyaml): choosing
it here lets backends.py stay below compose.py, with no import circle. compose.py is imported only when
it is asked for.
"""

from __future__ import annotations

from pathlib import Path

from scenarios.backends import Backend, LocalBackend, NetnsBackend, Refused
from scenarios.spec import Scenario

NAMES = ("local", "netns", "compose")


def backend_class(name: str) -> type[Backend]:
    """The backend class called `name`; Refused names the ones that exist."""
    if name == "compose":
        from scenarios.compose import ComposeBackend

        return ComposeBackend
    if name == "local":
        return LocalBackend
    if name == "netns":
        return NetnsBackend
    raise Refused(f"unknown backend {name!r}: use {', '.join(NAMES[:-1])} or {NAMES[-1]}")


def make(name: str, scenario: Scenario, workdir: Path) -> Backend:
    return backend_class(name)(scenario, workdir)
