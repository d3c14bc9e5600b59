"""The `snakenode` command and the settings table it is built from: every setting's default, flag and help
are declared once (config.SETTINGS); config.py stays free of the training package; the data flags are
still refused before a node starts."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import typer
from harness import REPO, run_cli

from snakenode import cli, config


def test_node_config_fields_and_defaults_are_the_settings_table() -> None:
    names = [f.name for f in fields(config.NodeConfig) if f.name not in ("home", "sources")]
    assert names == [s.name for s in config.SETTINGS], "NodeConfig must have one field per setting, in order"
    cfg = config.NodeConfig(home=Path("/nowhere"))
    for s in config.SETTINGS:
        assert getattr(cfg, s.name) == s.default, f"NodeConfig.{s.name} default differs from SETTINGS"
    cfg.listen.append("/ip4/1.2.3.4/tcp/1")
    assert config.NodeConfig(home=Path("/nowhere")).listen == config.SETTING_BY_NAME["listen"].default, \
        "a list default must be a fresh copy per NodeConfig"


def test_start_flags_and_help_come_from_the_settings_table() -> None:
    group = typer.main.get_command(cli.app)
    start = group.commands["start"]  # type: ignore[attr-defined]
    opts = {p.name: p for p in start.params}
    flagged = [s for s in config.SETTINGS if s.flag]
    assert set(opts) == {"home"} | {s.name for s in flagged}
    for s in flagged:
        assert s.flag in opts[s.name].opts, f"{s.name}: start has {opts[s.name].opts}, the table says {s.flag}"
        assert s.help in (opts[s.name].help or ""), f"{s.name}: start's help is not the table's"
        assert opts[s.name].default is None, f"{s.name}: a flag left out must mean 'not given'"
    assert opts["trusted_submitters"].multiple and opts["mdns"].secondary_opts == ["--no-mdns"]


def test_config_loads_without_the_training_package(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from snakenode import config; "
            f"c = config.load(Path({str(tmp_path)!r}), {{'data': 'digits', 'shard': '1/2'}}, env={{}}); "
            "bad = sorted(m for m in sys.modules if m.startswith('snakenode.train') or m == 'torch'); "
            "print(c.data, bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["digits", "[]"], f"config.load imported {r.stdout}"


@pytest.mark.timeout(60)
def test_bad_data_flags_are_refused_before_the_node_starts(tmp_path: Path) -> None:
    home = tmp_path / "h"
    r = run_cli("start", "--home", str(home), "--data", "nosuchdata")
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nosuchdata" in lines[0], r.stderr
    assert "digits" in lines[0], "the error should list the datasets that exist"
    assert not (home / "identity.key").exists(), "nothing is created for a node that cannot start"
    r = run_cli("start", "--home", str(home), "--data", "digits", "--shard", "3/2")
    assert r.returncode == 1 and "shard" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_match_job_id_names_every_match_of_an_ambiguous_prefix() -> None:
    known = ["ab12", "ab34", "cd56"]
    assert cli.match_job_id("ab34", known) == "ab34"
    assert cli.match_job_id("c", known) == "cd56"
    assert cli.match_job_id("ef", known) == "ef", "an unknown id goes to the node, which says it is not known"
    with pytest.raises(ValueError, match="'ab' is ambiguous: it matches ab12, ab34"):
        cli.match_job_id("ab", known)


@pytest.mark.timeout(90)
def test_trust_add_without_a_node_is_a_plain_success(tmp_path: Path) -> None:
    from snakenode import identity

    home = tmp_path / "h"
    pid = identity.Identity(identity.Ed25519PrivateKey.generate()).peer_id
    r = run_cli("trust", "add", pid, "--home", str(home))
    assert r.returncode == 0 and r.stdout.strip() == f"trusted {pid}", (r.stdout, r.stderr)
    assert r.stderr.strip() == "", f"trust add succeeded but printed: {r.stderr}"
    assert pid in (home / "snakenode.toml").read_text()


@pytest.mark.timeout(120)
def test_an_ambiguous_job_id_prefix_is_reported_with_its_matches(tmp_net) -> None:  # noqa: ANN001
    """A node without data keeps the jobs submitted to it; among 17 job ids two share their first hex digit."""
    from harness import control

    from snakenode import identity
    from snakenode.snake import job as job_mod

    node = tmp_net.start_node("n0", data=None)
    node.wait_ready(60)
    ident = identity.load(node.home)
    spec = job_mod.load_spec(REPO / "snakenode" / "jobs" / "demo.toml")
    ids: list[str] = []
    while len({i[0] for i in ids}) == len(ids):
        ids.append(control(node.home, "submit", {"job": job_mod.sign_job(spec, ident).encode()},
                           timeout=10)["job_id"])
    first = next(c for c in {i[0] for i in ids} if sum(i.startswith(c) for i in ids) > 1)
    matches = sorted(i for i in ids if i.startswith(first))
    for cmd in (["watch", first, "--no-follow"], ["fetch", first, "-o", str(tmp_net.root / "m")],
                ["resume", first]):
        r = run_cli(*cmd, "--home", str(node.home))
        assert r.returncode == 1, (cmd, r.stdout, r.stderr)
        assert "ambiguous" in r.stderr and all(m in r.stderr for m in matches), (cmd, r.stderr)
        assert "not known" not in r.stderr
    unique = matches[0][:-1]  # all but the last digit: one job
    r = run_cli("watch", unique, "--no-follow", "--json", "--home", str(node.home))
    assert r.returncode == 0, r.stderr
    r = run_cli("trust", "add", identity.Identity(identity.Ed25519PrivateKey.generate()).peer_id,
                "--home", str(node.home))
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
