"""Run one scenario on one backend: start the hosts, submit the jobs, play the fault timeline, watch the
hop logs, then judge the expectations and write the report.

The loop polls (hop-log files, node logs, each host's `status`) every TICK_S and never sleeps to wait for
an outcome: every wait has a deadline and a name. Whatever happens, the backend is closed (processes
killed, namespaces removed) before `execute` returns, including on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scenarios import analysis, collect, expect, jobfile, report, timeline
from scenarios.backends import Backend, Refused
from scenarios.choice import backend_class, make
from scenarios.procs import WaitTimeout, wait_for
from scenarios.spec import BOOTSTRAP, HOST_FAULTS, Host, Scenario

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_REFUSED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
TICK_S = 0.1  # a hop on digits takes ~0.2 s: hop-log triggers must be seen well within one hop
STATUS_POLL_S = 1.0  # readiness and state of every host (one control call each)
MESH_TIMEOUT_S = 90.0  # every initial host in the submitters' peer tables
SETTLE_S = 1.5  # after completion, until the logs stop growing (late released/progress records)
SETTLE_MAX_S = 6.0
FETCH_TIMEOUT_S = 120.0
# The state of a host a phase hook fires in (for the report's target_state).
HOOK_STATE = {"recv": "receiving", "send": "sending", "train": "training", "handoff": "sending",
              "propose": "sending", "accept": "idle", "handler": "idle", "assign": "idle", "upload": "sending"}


def refusal(scenario: Scenario, backend: str) -> str | None:
    """Why `scenario` cannot run on `backend` here; None when it can."""
    try:
        cls = backend_class(backend)
    except Refused as exc:
        return str(exc)
    return cls.refusal(scenario)


@dataclass
class Outcome:
    code: int
    report: dict[str, Any] = field(default_factory=dict)
    message: str = ""


class Interrupted(Exception):
    pass


class Runner:
    def __init__(self, scenario: Scenario, backend: str, report_dir: Path,
                 say: Callable[[str], None] = print) -> None:
        self.sc = scenario
        self.backend_name = backend
        self.dir = report_dir
        self.say = say
        self.b: Backend | None = None
        self.peer: dict[str, str] = {}
        self.name_of: dict[str, str] = {}
        self.faults: list[analysis.FaultRecord] = []
        self.pending: list[timeline.Pending] = []
        self.job_ids: dict[str, str] = {}
        self.submitted_at = 0.0
        self.m0 = 0.0
        self.ready: dict[str, dict[str, list[float]]] = {}  # job -> host -> ready times (one per start)
        self.ready_start: dict[tuple[str, str], int] = {}  # (job, host) -> start count last seen ready
        self.awaiting: dict[str, list[analysis.FaultRecord]] = {}  # host -> faults that end when it is ready
        self.fired_hooks: dict[str, set[str]] = {}
        self.started: set[str] = set()
        self.states: dict[str, str] = {}
        self.notes: list[str] = list(scenario.notes)
        self.error = ""
        self.completed_at: dict[str, float] = {}
        self.fetched: dict[str, dict[str, Any]] = {}
        self.summaries: dict[str, dict[str, Any]] = {}
        self.bandwidth = {h.name: h.bandwidth for h in scenario.hosts}

    # ------------------------------------------------------------------------------------------ helpers
    def t(self) -> float:
        """Seconds since the first submission (the report's time axis)."""
        return time.time() - self.submitted_at if self.submitted_at else 0.0

    def log(self, text: str) -> None:
        self.say(f"[{self.t():7.1f}s] {text}")

    def hooks_for(self, host: Host) -> tuple[str, ...]:
        return tuple(h for h in host.hooks if h not in self.fired_hooks.get(host.name, set()))

    def trusted(self) -> list[str]:
        return sorted({self.peer[j.submit_from] for j in self.sc.jobs})

    # ------------------------------------------------------------------------------------------ run
    def execute(self) -> Outcome:
        why = refusal(self.sc, self.backend_name)
        if why:
            return Outcome(EXIT_REFUSED, message=why)
        for sub in ("run", "logs", "jobs"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.b = make(self.backend_name, self.sc, self.dir)
        started = time.time()
        code = EXIT_OK
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._identities()
            self._start()
            self._play()
            self._fetch()
        except (KeyboardInterrupt, Interrupted):
            self.error = "interrupted (Ctrl-C or SIGTERM): hosts stopped, network torn down"
            code = EXIT_INTERRUPTED
        except Refused as exc:
            self.error = str(exc)
            code = EXIT_REFUSED
        except (WaitTimeout, RuntimeError, OSError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            code = EXIT_ERROR
        except Exception as exc:  # noqa: BLE001 - a runner bug still gets a report and a clean teardown
            import traceback

            self.error = f"runner error {type(exc).__name__}: {exc}"
            self.notes.append(traceback.format_exc()[-2000:])
            code = EXIT_ERROR
        finally:
            records = self._collect()
            try:
                self.b.close()
            finally:
                signal.signal(signal.SIGTERM, old_term)
        rep = report.build(self, records, started)
        if code == EXIT_OK and not rep["ok"]:
            code = EXIT_FAILED
        return Outcome(code, rep, self.error)

    def _identities(self) -> None:
        from snakenode import identity

        assert self.b is not None
        for h in self.sc.hosts:
            self.peer[h.name] = identity.load_or_create(self.b.home(h.name)).peer_id
        self.name_of = {p: n for n, p in self.peer.items()}

    def _start(self) -> None:
        assert self.b is not None
        self.log(f"scenario {self.sc.name} on the {self.backend_name} backend ({len(self.sc.hosts)} hosts)")
        self.b.open()
        self.started.add(BOOTSTRAP)
        self.name_of.update(self._bootstrap_id())
        first = [h for h in self.sc.hosts if h.start_delay_s == 0]
        for h in first:
            self.b.start_host(h, self.trusted(), self.hooks_for(h))
            self.started.add(h.name)
        for h in first:
            self.b.wait_ready(h.name)
        want = {self.peer[h.name] for h in first}
        for j in self.sc.jobs:
            sub = j.submit_from
            wait_for(lambda sub=sub: want - {self.peer[sub]} <= self._peer_ids(sub), MESH_TIMEOUT_S,
                     f"{sub} to see every initial host")
        self.log(f"{len(first)} hosts up and connected")

    def _bootstrap_id(self) -> dict[str, str]:
        assert self.b is not None
        try:
            info = json.loads((self.b.home("bootstrap") / "node.json").read_text())
            return {info["peer_id"]: "bootstrap"}
        except (OSError, ValueError, KeyError):
            return {}

    def _peer_ids(self, name: str) -> set[str]:
        assert self.b is not None
        rows = self.b.control(name, "peers")
        return {r["peer_id"] for r in rows if r.get("profile")}

    def _submit(self) -> None:
        assert self.b is not None
        (self.dir / "jobs").mkdir(parents=True, exist_ok=True)
        coordinators = [h.name for h in self.sc.hosts if h.role == "coordinator"]
        self.submitted_at = time.time()
        self.m0 = time.monotonic()
        for j in self.sc.jobs:
            spec = dict(j.spec)
            if spec.get("mode") == "cs" and coordinators:
                spec["coordinator"] = self.peer[coordinators[0]]
            path = self.dir / "jobs" / f"{j.name}.toml"
            path.write_text(jobfile.dumps(spec))
            reply = self.b.submit(j.submit_from, path)
            self.job_ids[j.name] = reply["job_id"]
            self.ready[j.name] = {}
            self.log(f"job {j.name} submitted from {j.submit_from}: {reply['job_id']}")

    def _play(self) -> None:
        assert self.b is not None
        self._submit()
        self.pending = timeline.initial(self.sc.faults, self.m0)
        homes = {h.name: self.b.home(h.name) for h in self.sc.hosts}
        logs = {name: collect.HopLogs(homes, jid) for name, jid in self.job_ids.items()}
        hooks = {h.name: collect.HookLines(self.b.log_path(h.name)) for h in self.sc.hosts if h.hooks}
        deadline = self.m0 + self.sc.timeout_s
        next_status = 0.0
        while True:
            now = time.monotonic()
            for jname, tail in logs.items():
                for rec in tail.poll():
                    timeline.observe(self.pending, rec, now, self.name_of)
                    if rec["event"] == "job_complete" and jname not in self.completed_at:
                        self.completed_at[jname] = float(rec["t"])
                        self.log(f"job {jname} complete: hop {rec['hop']}, holder {self.name_of.get(rec['holder'])}"
                                 f", test {(rec.get('detail') or {}).get('test')}")
            for host, lines in hooks.items():
                for hit in lines.poll():
                    self._hook_fired(host, hit)
            for h in self.sc.hosts:
                if h.name not in self.started and now >= self.m0 + h.start_delay_s:
                    self._join(h)
            if now >= next_status:
                self._poll_status()
                next_status = now + STATUS_POLL_S
            for p in timeline.take_due(self.pending, now):
                self._apply(p, now)
            if len(self.completed_at) == len(self.job_ids):
                break
            if now > deadline:
                self.notes.append(f"the run hit its timeout of {self.sc.timeout_s:g} s before every job completed")
                self.log(f"timeout after {self.sc.timeout_s:g} s")
                break
            time.sleep(TICK_S)
        # Undo what would keep the network broken (frozen hosts, cut links) so the final fetch works.
        for p in list(self.pending):
            if p.inverse_of is not None and p.kind in ("continue", "heal", "link_up"):
                self.pending.remove(p)
                self._apply(p, time.monotonic(), early=True)
        # A scripted fault still pending now never fired (the jobs ended first): record it as such, so the
        # automatic faults_injected check names it instead of counting only the faults that did fire.
        for p in [p for p in self.pending if p.inverse_of is None]:
            self.pending.remove(p)
            trig = p.fault.trigger.describe() if p.fault.trigger else ""
            self.faults.append(analysis.FaultRecord(p.fault.index, p.kind, p.target or "?", [], trig, None,
                                                    detail={"error": "never due: the run ended first"}))
        self._settle(logs)

    def _settle(self, logs: dict[str, collect.HopLogs]) -> None:
        """Let late records land: until the logs have been quiet for SETTLE_S (at most SETTLE_MAX_S)."""
        end = time.monotonic() + SETTLE_MAX_S
        quiet_since = time.monotonic()
        while time.monotonic() < end and time.monotonic() - quiet_since < SETTLE_S:
            if any(tail.poll() for tail in logs.values()):
                quiet_since = time.monotonic()
            time.sleep(TICK_S)

    # ------------------------------------------------------------------------------------------ hosts
    def _join(self, h: Host) -> None:
        assert self.b is not None
        state = "down"
        self.b.start_host(h, self.trusted(), self.hooks_for(h))
        self.started.add(h.name)
        rec = analysis.FaultRecord(-1, "join", h.name, [], f"start_delay_s = {h.start_delay_s:g}", time.time(),
                                   state, scheduled=False)
        self.faults.append(rec)
        self.log(f"join {h.name} (start_delay_s {h.start_delay_s:g})")

    def _poll_status(self) -> None:
        assert self.b is not None
        now = time.time()
        for h in self.sc.hosts:
            if not self.b.alive(h.name) or self.b.stopped(h.name):
                continue
            try:
                st = self.b.control(h.name, "status", timeout=0.5)
            except Exception:  # noqa: BLE001 - starting, busy or gone: try again next round
                continue
            self.states[h.name] = str((st.get("state") or {}).get("kind", "unknown"))
            joined = set((st.get("profile") or {}).get("jobs") or [])
            starts = self._starts(h.name)
            for jname, jid in self.job_ids.items():
                key = (jname, h.name)
                if jid in joined and self.ready_start.get(key) != starts:
                    self.ready_start[key] = starts
                    self.ready[jname].setdefault(h.name, []).append(now)
                    for f in self.awaiting.pop(h.name, []):
                        if f.ends is None:
                            f.ends = now

    def _starts(self, name: str) -> int:
        procs = getattr(self.b, "procs", {})
        p = procs.get(name)
        return 0 if p is None else int(p.starts)

    def state_of(self, name: str) -> str:
        assert self.b is not None
        if name not in self.started:
            return "not started"
        if not self.b.alive(name):
            return "down"
        if name == BOOTSTRAP:
            return "stopped" if self.b.stopped(name) else "running"  # it holds no job state to ask about
        if self.b.stopped(name):
            return "stopped"
        try:
            st = self.b.control(name, "status", timeout=0.5)
            return str((st.get("state") or {}).get("kind", "unknown"))
        except Exception:  # noqa: BLE001 - a node that does not answer is reported as such
            return "unresponsive"

    # ------------------------------------------------------------------------------------------ faults
    def _hook_fired(self, host: str, hit: dict[str, Any]) -> None:
        spec = self.sc.host(host)
        phase = str(hit.get("phase", ""))
        action = str(hit.get("action", ""))
        for f in self.sc.faults:
            if f.kind != "hook" or f.target != host or not f.hook.startswith(f"{action}@{phase}"):
                continue
            if f.hook in self.fired_hooks.get(host, set()):
                continue
            self.fired_hooks.setdefault(host, set()).add(f.hook)
            gone = action in ("exit", "stop", "hang")
            rec = analysis.FaultRecord(f.index, "hook", host, [host] if gone else [], f.hook, float(hit["t"]),
                                       HOOK_STATE.get(phase, "unknown"),
                                       detail={k: v for k, v in hit.items() if k != "t"})
            self.faults.append(rec)
            if gone:
                self.awaiting.setdefault(host, []).append(rec)
            self.log(f"hook {f.hook} fired on {host} ({rec.target_state}) {spec.data}")
            return

    def _last(self, kind: str, target: str) -> analysis.FaultRecord | None:
        for f in reversed(self.faults):
            if f.kind == kind and (f.target == target or not target) and f.ends is None:
                return f
        return None

    def _apply(self, p: timeline.Pending, now: float, early: bool = False) -> None:
        assert self.b is not None
        f = p.fault
        kind, target = p.kind, p.target
        if p.inverse_of is None:
            trig = f.trigger.describe() if f.trigger else ""
        else:
            delay = f.down_s if f.kind == "restart" else (f.duration_s or 0.0)
            trig = f"{delay:g} s after {f.label} ({f.kind})"
        if early:
            trig += " (applied early: the job ended first)"
        if kind in HOST_FAULTS and not target:
            rec = analysis.FaultRecord(f.index, kind, "?", [], trig, None, "n/a",
                                       detail={"error": "the triggering record's holder is not a scenario host"})
            self.faults.append(rec)
            return
        if kind in ("partition", "heal"):
            target = " | ".join(",".join(g) for g in f.groups) if f.groups else "all"
            state = ", ".join(f"{h}={self.state_of(h)}" for g in f.groups for h in g if h != "bootstrap") or "n/a"
        else:
            state = self.state_of(target)
        hosts: list[str] = []
        detail: dict[str, Any] = {}
        t = time.time()
        try:
            if kind == "kill":
                self.b.kill(target)
                hosts = [target]
            elif kind == "stop":
                self.b.stop(target)
                hosts = [target]
            elif kind == "continue":
                self.b.cont(target)
                self._end("stop", target, t)
            elif kind == "leave":
                self.b.leave(target)
                hosts = [target]
            elif kind == "restart":
                self.b.kill(target)
                hosts = [target]
                self.pending.append(timeline.Pending(f, "start", target, due=now + f.down_s, inverse_of=f.index))
            elif kind == "start" and target == BOOTSTRAP:
                if not self.b.alive(target):
                    self.b.start_bootstrap()  # waits until it listens again: its recovery ends here
                    for rec in self.awaiting.pop(target, []):
                        rec.ends = rec.ends or time.time()
                else:
                    detail["note"] = "already running"
            elif kind == "start":
                if not self.b.alive(target):
                    self.b.start_host(self.sc.host(target), self.trusted(), self.hooks_for(self.sc.host(target)))
                    self.started.add(target)
                else:
                    detail["note"] = "already running"
            elif kind == "link_down":
                self.b.link(target, up=False)
                hosts = [target]
            elif kind == "link_up":
                self.b.link(target, up=True)
                self._end("link_down", target, t)
            elif kind == "throttle":
                rate = p.restore_bandwidth if p.inverse_of is not None else f.bandwidth
                from snakenode.faults import parse_rate

                self.b.throttle(target, parse_rate(rate) if rate else None)
                detail["bandwidth"] = rate or "unlimited"
                if p.inverse_of is not None:
                    self._end("throttle", target, t)
                self.bandwidth[target] = rate
            elif kind == "partition":
                self.b.partition(f.groups)
                hosts = [h for g in f.groups for h in g if h != "bootstrap"]
            elif kind == "heal":
                self.b.heal()
                self._end("partition", "", t)
        except Refused as exc:
            detail["error"] = str(exc)
            t_fired: float | None = None
        else:
            t_fired = t
        rec = analysis.FaultRecord(f.index if p.inverse_of is None else -1, kind, target, hosts, trig, t_fired,
                                   state, detail=detail, scheduled=p.inverse_of is None)
        self.faults.append(rec)
        if kind in ("kill", "leave", "restart"):
            self.awaiting.setdefault(target, []).append(rec)
        if kind == "start":
            for r in self.faults:
                if r.target == target and r.kind in ("kill", "leave", "restart", "hook") and r.ends is None:
                    self.awaiting.setdefault(target, [])
                    if r not in self.awaiting[target]:
                        self.awaiting[target].append(r)
        self.log(f"{kind} {target} ({state}) {trig}" + (f" FAILED: {detail['error']}" if "error" in detail else ""))
        if t_fired is not None and p.inverse_of is None:
            original = self.sc.host(target).bandwidth if kind == "throttle" and target != BOOTSTRAP else ""
            inv = timeline.inverse(p, now, original)
            if inv is not None:
                self.pending.append(inv)

    def _end(self, kind: str, target: str, t: float) -> None:
        rec = self._last(kind, target)
        if rec is not None:
            rec.ends = t

    # ------------------------------------------------------------------------------------------ results
    def _fetch(self) -> None:
        """Fetch each completed job's final model from a live host: proof that no bundle was lost."""
        assert self.b is not None
        for jname, jid in self.job_ids.items():
            if jname not in self.completed_at:
                continue
            out = (self.dir / f"final-{jname}.safetensors").resolve()
            hosts = [h.name for h in self.sc.hosts if self.b.alive(h.name) and not self.b.stopped(h.name)]
            sub = next(j.submit_from for j in self.sc.jobs if j.name == jname)
            hosts.sort(key=lambda n: n != sub)
            last = "no live host to fetch from"
            for name in hosts:
                try:
                    self.fetched[jname] = self.b.control(name, "fetch", {"job_id": jid, "out": str(out)},
                                                         timeout=FETCH_TIMEOUT_S)
                    self.fetched[jname]["from"] = name
                    break
                except Exception as exc:  # noqa: BLE001 - try the next host; report the last error
                    last = f"{name}: {exc}"
            else:
                self.fetched[jname] = {"error": last}
            try:
                summary = self.b.control(sub, "job", {"job_id": jid, "since": 10**9}, timeout=5)["summary"]
                self.summaries[jname] = summary
            except Exception:  # noqa: BLE001 - the summary is a cross-check only
                pass

    def _collect(self) -> dict[str, list[dict[str, Any]]]:
        if self.b is None:
            return {}
        homes = [self.b.home(h.name) for h in self.sc.hosts]
        return {jname: collect.all_records(homes, jid) for jname, jid in self.job_ids.items()}

    def facts(self, jname: str, records: list[dict[str, Any]], ended: float) -> expect.Facts:
        job = next(j for j in self.sc.jobs if j.name == jname)
        members = [h.name for h in self.sc.hosts if h.role == "node" and h.data
                   and _dataset_matches(job.spec["dataset"], h.data)]
        summary = self.summaries.get(jname) or {}
        blocks = int(summary.get("blocks") or 0)  # 0: unknown, the log is then not checked window by window
        return expect.Facts(job=jname, records=records, submitted_at=self.submitted_at, ended_at=ended,
                            blocks=blocks, faults=self.faults, ready_times=self.ready.get(jname, {}),
                            members=members, name_of=self.name_of, fetch=self.fetched.get(jname),
                            summary_test=((summary.get("completed") or {}).get("test")))


def _dataset_matches(dataset: str, data: str) -> bool:
    from snakenode.snake.job import dataset_matches

    return dataset_matches(dataset, data)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum}")
