"""Issue 21: the node's home directory (snakenode/home.py) with real daemons: one daemon per HOME (the
`node.lock` flock), and a HOME so long that HOME/control.sock would not fit in a unix socket address."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Net, control, run_cli

from snakenode import home as home_mod


@pytest.mark.timeout(60)
def test_a_second_daemon_on_the_same_home_is_refused(tmp_net: Net) -> None:
    first = tmp_net.start_node("a", data=None)
    info = first.wait_ready()
    home = tmp_net.home("a")
    r = run_cli("start", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0", "--network", tmp_net.network,
                timeout=30)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(err) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert f"a node is already running in {home} (pid {first.pid})" in err[0], err
    assert "stop it first or use another --home" in err[0], err
    # The refused start took nothing from the running daemon: it still serves, node.json still names it.
    assert first.alive() and home_mod.read_node_json(home) == info
    assert control(home, "status")["peer_id"] == info["peer_id"]


@pytest.mark.timeout(60)
def test_a_home_too_long_for_a_unix_socket_still_serves(tmp_net: Net) -> None:
    name = "h" * (home_mod.UNIX_PATH_MAX - len(str(tmp_net.root)))  # HOME/control.sock is over the limit
    home = tmp_net.home(name)
    assert len(str(home / home_mod.SOCKET_NAME).encode()) > home_mod.UNIX_PATH_MAX
    node = tmp_net.start_node(name, data=None)
    info = node.wait_ready()
    sock = Path(info["control"])
    # The socket lives in a private 0700 directory instead, and node.json tells the CLI where.
    assert sock.parent != home and len(str(sock).encode()) <= home_mod.UNIX_PATH_MAX, sock
    assert sock.parent.stat().st_mode & 0o777 == 0o700
    assert not (home / home_mod.SOCKET_NAME).exists()
    assert control(home, "status")["peer_id"] == info["peer_id"]
    r = run_cli("status", "--home", str(home), "--json")
    assert r.returncode == 0 and info["peer_id"] in r.stdout, r.stderr
    assert node.stop() == 0
    assert not sock.parent.exists(), "the private socket directory outlived the daemon"
