"""`python -m bootstrap --home DIR --listen MADDR`: run a light bootstrap peer.

Prints its full multiaddr(s) with /p2p/ (one per line, the most useful first) once it listens and writes
DIR/node.json like a node does. It relays gossip and answers peer exchange; it never trains and never
imports torch, so it starts in about a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# the node settings a bootstrap peer takes as flags; names, help and allowed values come from the table
FLAGS = ("listen", "announce", "bootstrap", "network", "allowed_peers", "ping_interval_s", "log_level")


def main(argv: list[str] | None = None) -> int:
    from snakenode.config import SETTING_BY_NAME

    parser = argparse.ArgumentParser(prog="python -m bootstrap", description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, type=Path, help="directory for identity.key and node.json")
    for name in FLAGS:
        s = SETTING_BY_NAME[name]
        kind: dict[str, Any] = {"action": "append"} if s.kind is list else {"type": s.kind}
        parser.add_argument(s.flag, dest=name, choices=s.choices, help=s.help, **kind)
    args = parser.parse_args(argv)

    from snakenode import config, identity, logs
    from snakenode.runner import run_foreground

    flags = {k: v for k, v in vars(args).items() if k != "home" and v is not None}
    flags["role"] = "bootstrap"
    try:
        cfg = config.load(args.home, flags)
        ident = identity.load_or_create(cfg.home)
    except (config.ConfigError, identity.IdentityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logs.setup(cfg.log_level)

    from bootstrap.peer import BootstrapPeer

    peer = BootstrapPeer(cfg, ident)
    return run_foreground(peer, peer.service.cleanup)


if __name__ == "__main__":
    sys.exit(main())
