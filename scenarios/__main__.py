"""`python -m scenarios list | run | compose | run-all`: scripted multi-host networks with faults and reports.

Exit status of `run`: 0 every expectation held, 1 an expectation failed, 2 the scenario file is invalid,
3 the scenario cannot run here (backend or capability missing: the message says what to do), 4 the run
itself broke (a host never started...), 130 interrupted. `run-all` exits 0 when no scenario failed
(scenarios refused here are listed as skipped; `--strict` counts them as failures).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Scripted multi-host snakenode networks: faults, shaping, expectations, reports.")


def _console() -> Any:
    from rich.console import Console

    return Console()


def _load(text: str) -> Any:
    from scenarios import library, spec

    try:
        return spec.load(library.resolve(text))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    except spec.ScenarioError as exc:
        print(f"error: invalid scenario: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """The scenario library (scenarios/library/*.toml)."""
    from scenarios import library, spec

    rows = []
    for path in library.library():
        try:
            sc = spec.load(path)
            rows.append({"name": sc.name, "backend": sc.backend, "hosts": len(sc.hosts), "faults": len(sc.faults),
                         "expect": list(sc.expect), "description": sc.description, "file": str(path)})
        except spec.ScenarioError as exc:
            rows.append({"name": path.stem, "error": str(exc), "file": str(path)})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    t = Table(title=f"{len(rows)} scenarios (python -m scenarios run NAME)")
    for col in ("name", "backend", "hosts", "faults", "expectations", "description"):
        t.add_column(col, overflow="fold")
    for r in rows:
        if "error" in r:
            t.add_row(r["name"], "-", "-", "-", "-", f"[red]{r['error']}[/]")
        else:
            t.add_row(r["name"], r["backend"], str(r["hosts"]), str(r["faults"]), ", ".join(r["expect"]),
                      r["description"])
    _console().print(t)


def _run_one(sc: Any, backend: str, report: Path, quiet: bool) -> tuple[int, dict[str, Any], str]:
    from scenarios import report as report_mod
    from scenarios.runner import Runner

    console = _console()

    def say(line: str) -> None:
        if not quiet:
            console.print(line, markup=False, highlight=False)

    outcome = Runner(sc, backend, report, say=say).execute()
    if outcome.report:
        console.print(report_mod.table(outcome.report))
        console.print(f"report: {report / 'report.json'}")
    if outcome.message and not outcome.report:
        print(f"refused: {outcome.message}", file=sys.stderr)
    return outcome.code, outcome.report, outcome.message


@app.command()
def run(
    scenario: str = typer.Argument(..., help="scenario file or library name (python -m scenarios list)"),
    backend: str = typer.Option(None, "--backend", help="local, netns or compose (default: the scenario's `backend`)"),
    report: Path = typer.Option(None, "--report", help="report directory (default out/scenarios/NAME)"),
    quiet: bool = typer.Option(False, "--quiet", help="only the final summary"),
) -> None:
    """Run one scenario and write DIR/report.json + PNG plots; exit 0 only if every expectation holds."""
    sc = _load(scenario)
    code, _, _ = _run_one(sc, backend or sc.backend, report or Path("out/scenarios") / sc.name, quiet)
    raise typer.Exit(code)


@app.command()
def compose(
    scenario: str = typer.Argument(..., help="scenario file or library name"),
    out: Path = typer.Option(..., "-o", "--out", help="directory for compose.yaml and the per-host config"),
) -> None:
    """Only generate the Docker Compose project (compose.yaml + hosts/*/snakenode.toml + jobs/)."""
    from scenarios.compose import HOME_IN_CONTAINER, generate

    sc = _load(scenario)
    doc = generate(sc, out)
    print(f"wrote {out / 'compose.yaml'}: {len(doc['services'])} services ({', '.join(doc['services'])})")
    print(f"run it: cd {out} && docker compose up -d --build && docker compose exec {sc.jobs[0].submit_from} "
          f"snakenode submit /jobs/{sc.jobs[0].name}.toml --home {HOME_IN_CONTAINER}")


@app.command("run-all")
def run_all(
    report: Path = typer.Option(Path("out/scenarios"), "--report", help="one sub-directory per scenario"),
    backend: str = typer.Option(None, "--backend", help="force one backend (default: each scenario's own)"),
    only: list[str] = typer.Option(None, "--only", help="run only these scenarios (repeatable)"),
    strict: bool = typer.Option(False, "--strict", help="a scenario refused here counts as a failure"),
    quiet: bool = typer.Option(True, "--quiet/--verbose", help="progress lines of each run"),
) -> None:
    """Run the whole library; a summary table at the end."""
    from rich.table import Table

    from scenarios import library, spec
    from scenarios.runner import EXIT_OK, EXIT_REFUSED

    rows = []
    for path in library.library():
        if only and path.stem not in only:
            continue
        try:
            sc = spec.load(path)
        except spec.ScenarioError as exc:
            rows.append((path.stem, "-", "INVALID", 0.0, str(exc)))
            continue
        be = backend or sc.backend
        t0 = time.monotonic()
        code, rep, msg = _run_one(sc, be, report / sc.name, quiet)
        took = time.monotonic() - t0
        verdict = {EXIT_OK: "PASS", EXIT_REFUSED: "SKIPPED"}.get(code, "FAIL")
        why = msg if code == EXIT_REFUSED else "; ".join(
            f"{e['name']}: {e['detail']}" for e in rep.get("expectations", []) if not e["ok"]) or (msg or "")
        recov = ", ".join(f"{f['kind']} {f['target']} {f['recovery_s']:.1f}s" for f in rep.get("faults", [])
                          if f.get("recovery_s") is not None and f["kind"] not in ("join", "start", "continue"))
        rows.append((sc.name, be, verdict, took, why or recov))
    t = Table(title="scenario library")
    for col in ("scenario", "backend", "verdict", "duration (s)", "detail / recovery after each fault"):
        t.add_column(col, overflow="fold")
    for name, be, verdict, took, why in rows:
        color = {"PASS": "green", "SKIPPED": "yellow"}.get(verdict, "red")
        t.add_row(name, be, f"[{color}]{verdict}[/]", f"{took:.1f}", why)
    _console().print(t)
    failed = [r for r in rows if r[2] in ("FAIL", "INVALID") or (strict and r[2] == "SKIPPED")]
    raise typer.Exit(1 if failed else 0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
