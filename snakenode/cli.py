"""The `snakenode` command: one Typer app. Every listing also prints JSON with `--json`.

Exit status: 0 success, 1 a user error (bad flag, bad file), 2 no daemon running in HOME. Commands that
only talk to a daemon import neither torch nor libp2p, so they answer at once.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from snakenode import metric

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Peer-to-peer Snake Learning: one model travels node to node; each trains a window of layers.")
trust_app = typer.Typer(help="Which submitters' jobs this node accepts.", no_args_is_help=True)
app.add_typer(trust_app, name="trust")

DEFAULT_HOME = Path(os.environ.get("SNAKENODE_HOME", "~/.snakenode")).expanduser()
HomeOpt = typer.Option(DEFAULT_HOME, "--home", help="node directory (env SNAKENODE_HOME)")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def _fail(message: str, code: int = 1) -> NoReturn:
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


def _reach(home: Path, op: str, timeout: float) -> bool:
    """Tell a running node something it may also learn at its next start: False (and nothing printed) when
    no node runs in HOME, since the caller has already done what matters."""
    from snakenode import control
    from snakenode.home import NoDaemon

    try:
        control.call(home, op, None, timeout=timeout)
    except NoDaemon:
        return False
    except (control.ControlError, TimeoutError, OSError) as exc:
        print(f"warning: the node in {home} did not take the change now ({exc}); it reads it at its next "
              "start", file=sys.stderr)
        return False
    return True


def match_job_id(given: str, known: list[str]) -> str:
    """The job id `given` names: itself when known, else the one id it is a prefix of. An unknown id is
    returned as given (the node says it is not known); a prefix of several ids is an error that lists them."""
    if not given or given in known:
        return given
    matches = sorted(j for j in known if j.startswith(given))
    if len(matches) > 1:
        raise ValueError(f"job id prefix {given!r} is ambiguous: it matches {', '.join(matches)}; "
                         "give more of the id")
    return matches[0] if matches else given


def _job_id(home: Path, given: str) -> str:
    try:
        return match_job_id(given, [r["job_id"] for r in _call(home, "jobs")])
    except ValueError as exc:
        _fail(str(exc))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _console() -> Any:
    from rich.console import Console

    return Console()


# --- start -------------------------------------------------------------------------------------------
def start(**given: Any) -> None:
    """Run a node in the foreground (logs on stderr; Ctrl-C or SIGTERM stops it within 5 s)."""
    from snakenode import config, identity, logs

    home = given.pop("home")
    # a repeatable flag given zero times arrives as an empty list: "not given", like any flag left out
    flags = {k: (v or None) if isinstance(v, list) else v for k, v in given.items()}
    try:
        cfg = config.load(home, flags)
        if cfg.role == "bootstrap":
            _fail("role 'bootstrap' is run with `python -m bootstrap --home DIR`")
        _check_data(cfg)
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


def _check_data(cfg: Any) -> None:
    """The data flags name a dataset, a partition and a shard the training side knows. Checked here, on
    the node's start path, not in config.py: the bootstrap peer loads config.py and must not reach the
    training package (train.data is numpy-only, and the daemon imports it anyway)."""
    from snakenode.config import ConfigError

    if not cfg.data:
        return
    from snakenode.train import data as data_mod

    try:
        data_mod.DataSpec.from_flags(cfg.data, cfg.partition, cfg.shard, cfg.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _start_signature() -> tuple[inspect.Signature, dict[str, Any]]:
    """`start`'s options, one per setting that declares a flag in config.SETTINGS, with the table's help:
    the flags, their help and their defaults are declared once, in that table."""
    from snakenode.config import SETTINGS

    kinds: dict[type, Any] = {list: list[str], bool: bool, int: int, float: float, str: str}
    params = [inspect.Parameter("home", inspect.Parameter.KEYWORD_ONLY, default=HomeOpt, annotation=Path)]
    for s in SETTINGS:
        if not s.flag:
            continue
        decl = f"{s.flag}/--no-{s.flag[2:]}" if s.kind is bool else s.flag
        default = s.default if s.default not in ("", []) else None
        more = "; repeatable" if s.kind is list else ""
        if default is not None:
            more += f"; default {', '.join(default) if isinstance(default, list) else default}"
        params.append(inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, annotation=kinds[s.kind],
                                        default=typer.Option(None, decl, help=s.help + more)))
    return inspect.Signature(params, return_annotation=None), {p.name: p.annotation for p in params}


start.__signature__, start.__annotations__ = _start_signature()  # type: ignore[attr-defined]
app.command()(start)


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


# --- jobs --------------------------------------------------------------------------------------------
@app.command()
def submit(
    job_file: Path = typer.Argument(..., help="job spec (TOML); see jobs/ for examples"),
    home: Path = HomeOpt,
    mode: str = typer.Option(None, "--mode", help="p2p or cs: overrides the job's `mode` key"),
    coordinator: str = typer.Option(None, "--coordinator", help="CS mode: the coordinator's peer id "
                                    "(default: the submitting node when --mode cs is given on a coordinator)"),
    as_json: bool = JsonOpt,
) -> None:
    """Sign a job with this node's key and submit it; prints the job id."""
    from snakenode import identity
    from snakenode.snake import job as job_mod

    try:
        spec = job_mod.load_spec(job_file)
        if mode is not None:
            if mode == "cs" and not coordinator and not spec.get("coordinator"):
                coordinator = identity.load(home.expanduser().resolve()).peer_id
            spec = job_mod.with_mode(spec, mode, coordinator)
        ident = identity.load(home.expanduser().resolve())
        signed = job_mod.sign_job(spec, ident)
    except job_mod.JobSpecError as exc:
        _fail(f"{job_file}: {exc}")
    except (OSError, identity.IdentityError) as exc:
        _fail(str(exc))
    result = _call(home, "submit", {"job": signed.encode()}, timeout=10)
    if as_json:
        _print_json(result)
    else:
        print(result["job_id"])


def _short(pid: str | None) -> str:
    return "-" if not pid else pid[-8:]


METRIC_KEY = "acc = accuracy (higher is better), ppl = perplexity (lower is better)"


def _fmt_metrics(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    text = metric.short(m)
    return text if text != "-" else f"loss={m.get('loss', float('nan')):.3f}"


def _fmt_final(m: dict[str, Any] | None) -> str:
    """A final result in words: 'test perplexity 168.20 (lower is better)'."""
    r = metric.of(m)
    return "test -" if r.value is None else f"test {r.name} {r.text(4)} ({r.label.split('(')[1]}"


@app.command()
def jobs(home: Path = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Jobs this node knows, with their progress."""
    rows = _call(home, "jobs")
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    t = Table(title=f"{len(rows)} jobs", caption=METRIC_KEY)
    for col in ("job", "name", "status", "joined", "hop", "lap", "holder", "window", "metric"):
        t.add_column(col)
    for r in rows:
        w = r.get("window")
        t.add_row(r["job_id"], str(r.get("name")), r["status"], "yes" if r["joined"] else "no",
                  str(r.get("hop", "-")), f"{r.get('lap', '-')}/{r.get('laps')}", _short(r.get("holder")),
                  "-" if not w else f"[{w['start']},{w['end']})", _fmt_metrics(r.get("metrics")))
    _console().print(t)


def _record_line(rec: dict[str, Any]) -> str:
    import time as _time

    w = rec.get("window")
    b = rec.get("bytes") or {}
    moved = b.get("bundle_in", 0) + b.get("bundle_out", 0)
    extra = ""
    if rec["event"] == "trained":
        extra = f" {_fmt_metrics(rec.get('metrics_before'))} -> {_fmt_metrics(rec.get('metrics_after'))}"
        if rec.get("t_train_start") and rec.get("t_train_end"):
            extra += f" in {rec['t_train_end'] - rec['t_train_start']:.1f}s"
    elif rec.get("detail") and rec["event"] in ("declined", "retry", "superseded", "dropped", "job_complete",
                                                 "lap_complete"):
        extra = " " + " ".join(f"{k}={v}" for k, v in rec["detail"].items() if not isinstance(v, dict | list))
    if moved:
        extra += f" bytes={moved}"
    stamp = _time.strftime("%H:%M:%S", _time.localtime(rec["t"]))
    win = "" if not w else f" [{w['start']},{w['end']})"
    return (f"{stamp} {rec['event']:<12} hop={rec['hop']:<3} att={rec['attempt']} lap={rec['lap']} "
            f"holder={_short(rec['holder'])}{win}{extra}")


@app.command()
def watch(
    job_id: str = typer.Argument(..., help="job id (a unique prefix is enough)"),
    home: Path = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="one JSON hop-log record per line"),
    timeout: float = typer.Option(0, "--timeout", help="give up after this many seconds (0 = never)"),
    follow: bool = typer.Option(True, "--follow/--no-follow", help="keep watching until the job completes"),
) -> None:
    """Live progress of a job: hop, lap, holder, window, metrics, bytes (exits when the job completes)."""
    import time as _time

    job_id = _job_id(home, job_id)
    since = 0
    last_live: dict[str, Any] | None = None
    t0 = _time.monotonic()
    while True:
        detail = _call(home, "job", {"job_id": job_id, "since": since})
        for rec in detail["records"]:
            print(json.dumps(rec, sort_keys=True) if as_json else _record_line(rec), flush=True)
        since = detail["total"]
        summary = detail["summary"]
        live = summary.get("training")  # this node's worker progress while it trains a hop
        if live and live != last_live and not as_json:
            hop = live.get("hop", (summary.get("local_state") or {}).get("hop"))
            fields = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in live.items() if k not in ("event", "hop", "t"))
            print(f"         training     hop={hop} {live.get('event')} {fields}", flush=True)
        last_live = live
        if summary["status"] == "complete" or not follow:
            if not as_json:
                # The other nodes' proposals, hand-offs and declines are not gossiped: pull them once.
                full = _call(home, "job", {"job_id": job_id, "since": since, "collect": True}, timeout=10)
                for rec in full["records"]:
                    if rec["event"] not in ("received", "trained", "lap_complete", "job_complete"):
                        print(_record_line(rec), flush=True)
            if not as_json and summary.get("completed"):
                c = summary["completed"]
                print(f"complete: {c['hop'] + 1} hops, {c['lap']} laps, final holder {_short(c['holder'])}, "
                      f"{_fmt_final(c.get('test'))}", flush=True)
            return
        if timeout and _time.monotonic() - t0 > timeout:
            _fail(f"job {job_id} did not complete within {timeout:g} s (status {summary['status']})")
        _time.sleep(0.5)


@app.command()
def fetch(
    job_id: str = typer.Argument(..., help="job id (a unique prefix is enough)"),
    home: Path = HomeOpt,
    out: Path = typer.Option(Path("model.safetensors"), "-o", "--out", help="where to write the final model"),
    as_json: bool = JsonOpt,
) -> None:
    """Write a completed job's final model (one safetensors file, loadable by the engine)."""
    job_id = _job_id(home, job_id)
    result = _call(home, "fetch", {"job_id": job_id, "out": str(out.expanduser().resolve())}, timeout=600)
    if as_json:
        _print_json(result)
    else:
        print(f"wrote {result['path']} ({result['bytes']} bytes, {len(result['layers'])} layers, "
              f"hop {result['hop']}, {_fmt_final(result.get('test'))})")


@app.command()
def resume(job_id: str = typer.Argument(..., help="job id (a unique prefix is enough)"), home: Path = HomeOpt,
           as_json: bool = JsonOpt) -> None:
    """Restart a job whose baton holders were all lost, from the highest committed hop any node holds."""
    job_id = _job_id(home, job_id)
    result = _call(home, "resume", {"job_id": job_id}, timeout=60)
    if as_json:
        _print_json(result)
    else:
        print(f"resumed job {result['job_id']} at hop {result['hop']} (attempt {result['attempt']}) on "
              f"{_short(result['holder'])} from its {result['phase']} checkpoint")


@app.command()
def bench(home: Path = HomeOpt, seconds: float = typer.Option(5.0, "--seconds", help="how long to measure"),
          as_json: bool = JsonOpt) -> None:
    """Re-measure this node's compute score in its worker (runs in the background)."""
    result = _call(home, "bench", {"seconds": seconds})
    if as_json:
        _print_json(result)
    else:
        print(f"measuring compute for {seconds:.0f} s; `snakenode status` shows the new score"
              if result.get("started") else "stopped")


@app.command()
def demo(
    nodes: int = typer.Option(4, "--nodes", min=2, max=32, help="training nodes (plus one bootstrap peer)"),
    laps: int = typer.Option(None, "--laps", min=1, help="laps (default: the job's)"),
    dataset: str = typer.Option("digits", "--dataset", help="local data of every node"),
    partition: str = typer.Option("dirichlet:0.3", "--partition", help="iid, dirichlet:ALPHA or shards:K"),
    mode: str = typer.Option("p2p", "--mode", help="p2p, or cs (a coordinator peer plans every hop)"),
    job_file: Path = typer.Option(None, "--job", help="job spec TOML (default: the built-in digits job)"),
    out: Path = typer.Option(None, "--out", help="directory for logs, report.json and the final model"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on the last line"),
    open_browser: bool = typer.Option(False, "--open", help="open the dashboard of node 0 in a web browser"),
) -> None:
    """Run a whole local network (bootstrap + N nodes as real processes), one job, and a summary."""
    from snakenode.demo import run_demo

    if mode not in ("p2p", "cs"):
        _fail(f"--mode must be p2p or cs, got {mode!r}")
    raise typer.Exit(run_demo(nodes, laps, dataset, partition, mode, job_file, out, as_json, keep=False,
                             open_browser=open_browser))


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
        _reach(home, "reload_trust", timeout=2)  # no node running: its next start reads the file


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
