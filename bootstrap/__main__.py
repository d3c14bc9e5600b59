"""`python -m bootstrap --home DIR --listen MADDR`: run a light bootstrap peer.

Prints its full multiaddr(s) with /p2p/ (one per line, the most useful first) once it listens and writes
DIR/node.json like a node does. It relays gossip and answers peer exchange; it never trains and never
imports torch, so it starts in about a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bootstrap", description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, type=Path, help="directory for identity.key and node.json")
    parser.add_argument("--listen", action="append", help="multiaddr to listen on (default /ip4/0.0.0.0/tcp/4001)")
    parser.add_argument("--announce", action="append", help="multiaddr to advertise instead")
    parser.add_argument("--bootstrap", action="append", help="other bootstrap peers to link up with")
    parser.add_argument("--network", help="network name (default snake)")
    parser.add_argument("--allowed-peer", action="append", dest="allowed_peers",
                        help="closed network: only these peer ids may connect (repeatable)")
    parser.add_argument("--ping-interval", type=float, dest="ping_interval_s")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
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
