"""The `snakenode` command: one Typer app. Every listing also prints JSON with `--json`.

Exit status: 0 success, 1 a user error (bad flag, bad file), 2 no daemon running in HOME. Commands that
only talk to a daemon import neither torch nor libp2p, so they answer at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Peer-to-peer Snake Learning: one model travels node to node; each trains a window of layers.")
trust_app = typer.Typer(help="Which submitters' jobs this node accepts.", no_args_is_help=True)
app.add_typer(trust_app, name="trust")

DEFAULT_HOME = Path(os.environ.get("SNAKENODE_HOME", "~/.snakenode")).expanduser()
HomeOpt = typer.Option(DEFAULT_HOME, "--home", help="node directory (env SNAKENODE_HOME)")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def _fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _call(home: Path, op: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    from snakenode import control
    from snakenode.home import NoDaemon

    try:
        return control.call(home, op, args, timeout=timeout)
    except NoDaemon as exc:
        _fail(str(exc), 2)
    except control.ControlError as exc:
        _fail(str(exc), 1)
    except TimeoutError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        _fail(f"cannot reach the node in {home}: {exc}", 2)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _console() -> Any:
    from rich.console import Console

    return Console()


# --- start -------------------------------------------------------------------------------------------
@app.command()
def start(
    home: Path = HomeOpt,
    listen: list[str] = typer.Option(None, "--listen", help="multiaddr to listen on (repeatable; default /ip4/0.0.0.0/tcp/4001)"),
    announce: list[str] = typer.Option(None, "--announce", help="multiaddr to advertise instead (repeatable)"),
    bootstrap: list[str] = typer.Option(None, "--bootstrap", help="bootstrap peer multiaddr with /p2p/ (repeatable)"),
    mdns: bool = typer.Option(None, "--mdns/--no-mdns", help="mDNS discovery on the LAN (trusted networks only)"),
    network: str = typer.Option(None, "--network", help="network name (separates gossip topics)"),
    role: str = typer.Option(None, "--role", help="node or coordinator"),
    data: str = typer.Option(None, "--data", help="local data NAME[:PATH], e.g. digits, mnist5k, text:pydoc"),
    partition: str = typer.Option(None, "--partition", help="iid, dirichlet:ALPHA or shards:K"),
    shard: str = typer.Option(None, "--shard", help="this node's share I/N"),
    seed: int = typer.Option(None, "--seed", help="partition seed"),
    memory_budget: int = typer.Option(None, "--memory-budget", help="MB this node may use for training"),
    coordinator: str = typer.Option(None, "--coordinator", help="CS mode: coordinator multiaddr (helps connect)"),
    trusted: list[str] = typer.Option(None, "--trust", help="peer id whose jobs to accept (repeatable)"),
    allowed_peer: list[str] = typer.Option(None, "--allowed-peer", help="closed network: peer id allowed (repeatable)"),
    ping_interval: float = typer.Option(None, "--ping-interval", help="liveness ping period, seconds"),
    compute_slowdown: float = typer.Option(None, "--compute-slowdown", help="emulate a slower device (scenarios)"),
    log_level: str = typer.Option(None, "--log-level", help="debug, info, warning or error"),
    test_faults: str = typer.Option(None, "--test-faults", help="TEST ONLY fault hooks, e.g. exit@recv:after_bytes=100000"),
) -> None:
    """Run a node in the foreground (logs on stderr; Ctrl-C or SIGTERM stops it within 5 s)."""
    from snakenode import config, identity, logs

    flags: dict[str, Any] = {
        "listen": listen or None, "announce": announce or None, "bootstrap": bootstrap or None,
        "mdns": mdns, "network": network, "role": role, "data": data, "partition": partition, "shard": shard,
        "seed": seed, "memory_budget_mb": memory_budget, "coordinator": coordinator,
        "trusted_submitters": trusted or None, "allowed_peers": allowed_peer or None,
        "ping_interval_s": ping_interval, "compute_slowdown": compute_slowdown, "log_level": log_level,
        "test_faults": test_faults,
    }
    try:
        cfg = config.load(home, flags)
        if cfg.role == "bootstrap":
            _fail("role 'bootstrap' is run with `python -m bootstrap --home DIR`")
        ident = identity.load_or_create(cfg.home)
    except (config.ConfigError, identity.IdentityError) as exc:
        _fail(str(exc))
    logs.setup(cfg.log_level)
    from snakenode.daemon import Daemon
    from snakenode.runner import StartupError, run_foreground

    try:
        daemon = Daemon(cfg, ident)
    except (StartupError, ValueError) as exc:
        _fail(str(exc))
    raise typer.Exit(run_foreground(daemon, daemon.cleanup))


# --- id ----------------------------------------------------------------------------------------------
@app.command("id")
def id_(home: Path = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Print this node's peer id (reads HOME/identity.key; no daemon needed)."""
    from snakenode import identity

    try:
        pid = identity.load(home.expanduser().resolve()).peer_id
    except identity.IdentityError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps({"peer_id": pid}))
    else:
        print(pid)


# --- status / peers ----------------------------------------------------------------------------------
@app.command()
def status(home: Path = HomeOpt, as_json: bool = JsonOpt) -> None:
    """The node's identity, peers, state and counters."""
    st = _call(home, "status")
    if as_json:
        _print_json(st)
        return
    from rich.table import Table

    t = Table(show_header=False, box=None)
    for key in ("peer_id", "role", "network", "peers", "uptime_s"):
        t.add_row(key, str(st.get(key)))
    state = st.get("state") or {}
    t.add_row("state", " ".join(f"{k}={v}" for k, v in state.items() if v is not None))
    for a in st.get("addrs", []):
        t.add_row("addr", a)
    for name, value in (st.get("counters") or {}).items():
        if not name.startswith("bytes."):
            t.add_row(name, str(value))
    _console().print(t)


def _fmt_data(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    hist = d.get("label_hist")
    head = f"{d.get('dataset')} n={d.get('samples')}"
    if hist:
        top = sorted(range(len(hist)), key=lambda i: -hist[i])[:3]
        head += " top=" + ",".join(f"{i}:{hist[i]}" for i in top)
    return head


@app.command()
def peers(home: Path = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Live peers this node sees, with their advertised profiles."""
    rows = _call(home, "peers")
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    t = Table(title=f"{len(rows)} live peers")
    for col in ("peer", "role", "state", "data", "compute/s", "mem MB", "rtt ms", "seen s"):
        t.add_column(col)
    for r in rows:
        p = r.get("profile") or {}
        st = p.get("state") or {}
        comp = (p.get("compute") or {}).get("samples_per_s")
        t.add_row(r["peer_id"][-10:], r["role"], str(st.get("kind", "")), _fmt_data(p.get("data")),
                  f"{comp:.0f}" if comp else "-", str(p.get("memory_mb", "-")),
                  "-" if r.get("rtt_ms") is None else f"{r['rtt_ms']:.1f}", f"{r['last_seen_s']:.1f}")
    _console().print(t)


# --- trust -------------------------------------------------------------------------------------------
def _config_path(home: Path) -> Path:
    from snakenode.config import CONFIG_FILE

    return home.expanduser().resolve() / CONFIG_FILE


@trust_app.command("add")
def trust_add(peer_id: str, home: Path = HomeOpt) -> None:
    """Accept jobs signed by PEER_ID (writes trusted_submitters in HOME/snakenode.toml)."""
    from snakenode import configfile, identity

    try:
        identity.public_key_from_peer_id(peer_id)
    except ValueError as exc:
        _fail(str(exc))
    added = configfile.add_to_list(_config_path(home), "trusted_submitters", peer_id)
    print(("trusted " if added else "already trusted ") + peer_id)
    if added:
        try:
            _call(home, "reload_trust", timeout=2)
        except typer.Exit:
            pass  # no daemon: the next start reads the file


@trust_app.command("list")
def trust_list(home: Path = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Submitters whose jobs this node accepts (its own key always)."""
    from snakenode import config, identity

    try:
        cfg = config.load(home, {})
    except config.ConfigError as exc:
        _fail(str(exc))
    own = None
    try:
        own = identity.load(cfg.home).peer_id
    except identity.IdentityError:
        pass
    rows = ([{"peer_id": own, "source": "own key"}] if own else []) + [
        {"peer_id": p, "source": cfg.sources.get("trusted_submitters", "config")} for p in cfg.trusted_submitters
        if p != own
    ]
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        print(f"{r['peer_id']}  ({r['source']})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
