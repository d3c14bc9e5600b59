"""The scenario file: TOML in, validated `Scenario` out. Pure: no processes, no network, no clock.

Every error names the key that is wrong (`faults[1].on.event`, `hosts[3].bandwidth`, ...) and what is
allowed, so a user fixes a scenario from the message alone. The schema is documented in
scenarios/README.md; the library under scenarios/library/ exercises every part of it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snakenode.faults import FaultSpecError, parse_rate
from snakenode.faults import parse as parse_hook

BACKENDS = ("local", "netns", "compose")
ROLES = ("node", "coordinator")
# A target of a host fault: a host name, or the holder / previous holder named in the triggering record.
DYNAMIC_TARGETS = ("holder", "prev_holder")
HOST_FAULTS = ("kill", "stop", "continue", "leave", "start", "restart", "link_down", "link_up", "throttle",
               "hook")
NETWORK_FAULTS = ("partition", "heal")
FAULT_KINDS = HOST_FAULTS + NETWORK_FAULTS
# The bootstrap peer is a fault target too (it has no job phases to hook and nothing to leave).
BOOTSTRAP = "bootstrap"
BOOTSTRAP_FAULTS = ("kill", "stop", "continue", "start", "restart", "link_down", "link_up", "throttle")
# Faults that only a backend with real links can apply (the local backend shares one loopback).
NEEDS_LINKS = ("partition", "heal", "link_down", "link_up", "throttle")
# A fault whose effect `duration_s` undoes automatically.
INVERSE = {"stop": "continue", "kill": "start", "leave": "start", "partition": "heal", "link_down": "link_up",
           "throttle": "throttle"}
TRIGGER_EVENTS = ("received", "train_start", "trained", "lap_complete", "proposed", "accepted", "handoff",
                  "committed", "released", "retry", "superseded", "dropped", "job_complete")
EXPECTATIONS = ("job_completes", "accuracy_at_least", "max_hops_redone", "no_bundle_lost",
                "every_member_visited_each_lap", "one_lineage", "distinct_window_sizes_at_least",
                "max_recovery_s", "hosts_held_the_snake")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
NETWORK_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
DEFAULT_TIMEOUT_S = 300.0
MAX_HOSTS = 64


class ScenarioError(ValueError):
    """A scenario file that cannot run as written; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


@dataclass(frozen=True)
class Host:
    name: str
    role: str = "node"
    data: str = "digits"
    partition: str = "iid"
    shard: str = ""  # filled in by `load`: I/N among the hosts with data
    seed: int = 0
    memory_mb: int = 0  # 0 = the node's default (half the machine's RAM)
    compute_slowdown: float = 1.0
    start_delay_s: float = 0.0  # > 0: the host starts this long after the job was submitted
    bandwidth: str = ""  # egress limit, e.g. "1Mbit/s"; "" = unlimited
    hooks: tuple[str, ...] = ()  # protocol-phase faults for --test-faults (from `hook` faults)

    @property
    def bandwidth_bps(self) -> float | None:
        """Bytes per second, or None when unlimited."""
        return parse_rate(self.bandwidth) if self.bandwidth else None


@dataclass(frozen=True)
class Job:
    name: str
    file: Path
    submit_from: str
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value
    spec: dict[str, Any] = field(default_factory=dict)  # the validated, merged job spec


@dataclass(frozen=True)
class Trigger:
    """When a fault fires: `at_s` after the first job's submission, or on a hop-log event (+ `after_s`)."""

    at_s: float | None = None
    event: str | None = None
    hop: int | None = None
    min_hop: int | None = None
    attempt: int | None = None
    host: str | None = None  # the record's holder must be this host
    crossing: bool = False  # partition only: holder and previous holder end up on different sides
    after_s: float = 0.0

    def describe(self) -> str:
        if self.event is None:
            return f"at {self.at_s:g} s"
        parts = [self.event]
        if self.hop is not None:
            parts.append(f"hop={self.hop}")
        if self.min_hop is not None:
            parts.append(f"hop>={self.min_hop}")
        if self.attempt is not None:
            parts.append(f"attempt={self.attempt}")
        if self.host:
            parts.append(f"by {self.host}")
        if self.crossing:
            parts.append("crossing the split")
        text = "on " + " ".join(parts)
        return text + (f" +{self.after_s:g} s" if self.after_s else "")


@dataclass(frozen=True)
class Fault:
    index: int
    kind: str
    target: str = ""  # host name, "holder" or "prev_holder"; "" for partition/heal
    trigger: Trigger | None = None  # None for hook faults (the node fires them itself)
    duration_s: float | None = None
    groups: tuple[tuple[str, ...], ...] = ()
    bandwidth: str = ""  # throttle
    hook: str = ""  # kind = hook: ACTION@PHASE[:KEY=VALUE...]
    down_s: float = 2.0  # restart: how long the host stays down

    @property
    def label(self) -> str:
        return f"faults[{self.index}]"


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    path: Path | None
    backend: str
    timeout_s: float
    network: str
    hosts: tuple[Host, ...]
    jobs: tuple[Job, ...]
    faults: tuple[Fault, ...]
    expect: dict[str, Any]
    notes: tuple[str, ...] = ()

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def needs_links(self) -> list[str]:
        """Why this scenario needs a backend with real links (netns or compose); [] when local will do."""
        return [f"{f.label} ({f.kind})" for f in self.faults if f.kind in NEEDS_LINKS]


# ---------------------------------------------------------------------------------------------- helpers


def _table(doc: Mapping[str, Any], key: str, where: str, required: bool = False) -> dict[str, Any]:
    v = doc.get(key)
    if v is None:
        if required:
            raise ScenarioError(_join(where, key), "missing (a table is required here)")
        return {}
    if not isinstance(v, Mapping):
        raise ScenarioError(_join(where, key), f"must be a table, got {type(v).__name__}")
    return dict(v)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _unknown(doc: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for k in doc:
        if k not in known:
            raise ScenarioError(_join(where, k), f"unknown key; known keys here: {', '.join(known)}")


def _str(doc: Mapping[str, Any], key: str, where: str, default: str | None = None,
         pattern: re.Pattern[str] | None = None, choices: tuple[str, ...] | None = None) -> str:
    v = doc.get(key, default)
    k = _join(where, key)
    if v is None:
        raise ScenarioError(k, "missing (required)")
    if not isinstance(v, str):
        raise ScenarioError(k, f"must be a string, got {v!r}")
    if choices is not None and v not in choices:
        raise ScenarioError(k, f"must be one of {', '.join(choices)}; got {v!r}")
    if pattern is not None and not pattern.match(v):
        raise ScenarioError(k, f"{v!r} must match {pattern.pattern}")
    return v


def _num(doc: Mapping[str, Any], key: str, where: str, default: float | None = None, lo: float = 0.0,
         hi: float = 1e9, lo_open: bool = False) -> float | None:
    v = doc.get(key, default)
    if v is None:
        return None
    k = _join(where, key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ScenarioError(k, f"must be a number, got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise ScenarioError(k, f"must be {bound} and <= {hi:g}; got {v!r}")
    return float(v)


def _int(doc: Mapping[str, Any], key: str, where: str, default: int | None = None, lo: int = 0,
         hi: int = 10**9) -> int | None:
    v = doc.get(key, default)
    if v is None:
        return None
    k = _join(where, key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ScenarioError(k, f"must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ScenarioError(k, f"must be between {lo} and {hi}; got {v}")
    return int(v)


def _bandwidth(value: Any, key: str) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str):
        raise ScenarioError(key, f"must be a rate string such as \"1Mbit/s\" or \"500KB/s\", got {value!r}")
    try:
        bps = parse_rate(value)
    except FaultSpecError as exc:
        raise ScenarioError(key, str(exc)) from None
    if bps < 1000:
        raise ScenarioError(key, f"{value!r} is below 1 kB/s (8 kbit/s); nodes would time out, not just slow down")
    return value


# ---------------------------------------------------------------------------------------------- parts


HOST_KEYS = ("name", "role", "data", "partition", "shard", "seed", "memory_mb", "compute_slowdown",
             "start_delay_s", "bandwidth")
DEFAULT_KEYS = tuple(k for k in HOST_KEYS if k not in ("name", "shard", "start_delay_s"))


def _host(raw: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
    _unknown(raw, HOST_KEYS, where)
    doc = {**defaults, **raw}
    from snakenode.train.data import DataError, parse_data_flag, parse_partition_flag, parse_shard_flag

    out: dict[str, Any] = {
        "name": _str(doc, "name", where, pattern=NAME_RE),
        "role": _str(doc, "role", where, "node", choices=ROLES),
        "data": _str(doc, "data", where, "digits"),
        "partition": _str(doc, "partition", where, "iid"),
        "seed": _int(doc, "seed", where, 0, 0, 2**32 - 1),
        "memory_mb": _int(doc, "memory_mb", where, 0, 0, 10**7),
        "compute_slowdown": _num(doc, "compute_slowdown", where, 1.0, 1.0, 1000.0),
        "start_delay_s": _num(doc, "start_delay_s", where, 0.0, 0.0, 86_400.0),
        "bandwidth": _bandwidth(doc.get("bandwidth"), _join(where, "bandwidth")),
    }
    if out["name"] in ("bootstrap", *DYNAMIC_TARGETS):
        raise ScenarioError(_join(where, "name"), f"{out['name']!r} is reserved; choose another host name")
    try:
        if out["data"]:
            parse_data_flag(out["data"])
        out["partition"] = parse_partition_flag(out["partition"])
        if "shard" in doc:
            parse_shard_flag(_str(doc, "shard", where))
            out["shard"] = doc["shard"]
    except DataError as exc:
        raise ScenarioError(where, str(exc).replace("--", "")) from None
    return out


JOB_KEYS = ("name", "file", "submit_from", "set")


def _merge_overrides(spec: dict[str, Any], overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Apply `set` (dotted keys or nested tables) onto a raw job spec."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in spec.items()}

    def put(path: list[str], value: Any) -> None:
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ScenarioError(f"{where}.set.{'.'.join(path)}", f"{part!r} is not a table in the job file")
            node = nxt
        node[path[-1]] = value

    def walk(prefix: list[str], doc: Mapping[str, Any]) -> None:
        for k, v in doc.items():
            path = [*prefix, *k.split(".")]
            if isinstance(v, Mapping) and path[0] != "model_args":
                walk(path, v)
            elif isinstance(v, Mapping):
                put(path, dict(v))
            else:
                put(path, v)

    walk([], overrides)
    return out


def _job(raw: Mapping[str, Any], where: str, base_dir: Path, host_names: set[str], index: int) -> Job:
    from snakenode.snake import job as job_mod

    _unknown(raw, JOB_KEYS, where)
    name = _str(raw, "name", where, "main" if index == 0 else f"job{index}", pattern=NAME_RE)
    file_text = _str(raw, "file", where)
    submit_from = _str(raw, "submit_from", where)
    if submit_from not in host_names:
        raise ScenarioError(_join(where, "submit_from"), f"{submit_from!r} is not a host of this scenario "
                            f"(hosts: {', '.join(sorted(host_names))})")
    path = resolve_job_file(file_text, base_dir)
    if path is None:
        raise ScenarioError(_join(where, "file"), f"job file {file_text!r} not found (looked next to the "
                            f"scenario and in the repository root)")
    try:
        raw_spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(_join(where, "file"), f"cannot read {path}: {exc}") from None
    overrides = _table(raw, "set", where)
    merged = _merge_overrides(raw_spec, overrides, where)
    if merged.get("mode") == "cs" and not merged.get("coordinator"):
        # The coordinator host has no identity yet: the runner names it at submit time.
        from scenarios.jobfile import PLACEHOLDER_COORDINATOR

        merged["coordinator"] = PLACEHOLDER_COORDINATOR
    try:
        spec = job_mod.validate_spec(merged)
    except job_mod.JobSpecError as exc:
        raise ScenarioError(_join(where, "set"), f"the job after overrides is invalid: {exc}") from None
    return Job(name=name, file=path, submit_from=submit_from, overrides=overrides, spec=spec)


def resolve_job_file(text: str, base_dir: Path) -> Path | None:
    p = Path(text)
    if p.is_absolute():
        return p if p.exists() else None
    repo = Path(__file__).resolve().parents[1]
    for root in (base_dir, repo, Path.cwd()):
        cand = (root / p).resolve()
        if cand.exists():
            return cand
    return None


FAULT_KEYS = ("kind", "target", "at_s", "on", "after_s", "duration_s", "groups", "bandwidth", "hook", "down_s")
ON_KEYS = ("event", "hop", "min_hop", "attempt", "host", "crossing")


def _trigger(raw: Mapping[str, Any], where: str, kind: str, host_names: set[str]) -> Trigger | None:
    at = _num(raw, "at_s", where, None, 0.0, 86_400.0)
    on = raw.get("on")
    after = _num(raw, "after_s", where, 0.0, 0.0, 86_400.0) or 0.0
    if kind == "hook":
        for k in ("at_s", "on", "after_s"):
            if k in raw:
                raise ScenarioError(_join(where, k), "a hook fault fires inside the node at its protocol phase; "
                                    "say when in `hook` (e.g. exit@recv:hop=2:after_bytes=100000)")
        return None
    if (at is None) == (on is None):
        raise ScenarioError(where, "give exactly one trigger: `at_s = SECONDS` (after the job was submitted) "
                            "or `on = {event = \"train_start\", hop = 4}` (a hop-log event)")
    if on is None:
        return Trigger(at_s=at, after_s=after)
    w = _join(where, "on")
    if not isinstance(on, Mapping):
        raise ScenarioError(w, "must be a table, e.g. {event = \"train_start\", hop = 4}")
    _unknown(on, ON_KEYS, w)
    event = _str(on, "event", w, choices=TRIGGER_EVENTS)
    host = on.get("host")
    if host is not None and host not in host_names:
        raise ScenarioError(_join(w, "host"), f"{host!r} is not a host of this scenario")
    crossing = on.get("crossing", False)
    if not isinstance(crossing, bool):
        raise ScenarioError(_join(w, "crossing"), "must be true or false")
    if crossing and kind != "partition":
        raise ScenarioError(_join(w, "crossing"), "only a partition fault can wait for a crossing hand-off")
    return Trigger(event=event, hop=_int(on, "hop", w), min_hop=_int(on, "min_hop", w),
                   attempt=_int(on, "attempt", w), host=host, crossing=crossing, after_s=after)


def _fault(raw: Mapping[str, Any], index: int, host_names: set[str]) -> Fault:
    where = f"faults[{index}]"
    if not isinstance(raw, Mapping):
        raise ScenarioError(where, "must be a table ([[faults]])")
    _unknown(raw, FAULT_KEYS, where)
    kind = _str(raw, "kind", where, choices=FAULT_KINDS)
    trigger = _trigger(raw, where, kind, host_names)
    target = ""
    if kind in HOST_FAULTS:
        target = _str(raw, "target", where)
        if target == BOOTSTRAP and kind not in BOOTSTRAP_FAULTS:
            raise ScenarioError(_join(where, "target"), f"the bootstrap peer can be a target of "
                                f"{', '.join(BOOTSTRAP_FAULTS)}, not of {kind}")
        if target not in host_names and target not in DYNAMIC_TARGETS and target != BOOTSTRAP:
            raise ScenarioError(_join(where, "target"), f"{target!r} is neither a host ({', '.join(sorted(host_names))}) "
                                f"nor one of {', '.join((*DYNAMIC_TARGETS, BOOTSTRAP))}")
        if target in DYNAMIC_TARGETS and (trigger is None or trigger.event is None):
            raise ScenarioError(_join(where, "target"), f"{target!r} is named by the triggering hop-log record: "
                                "use an `on = {event = ...}` trigger")
    elif "target" in raw:
        raise ScenarioError(_join(where, "target"), f"a {kind} fault has no single target; use `groups`")
    duration = _num(raw, "duration_s", where, None, 0.0, 86_400.0, lo_open=True)
    if duration is not None and kind not in INVERSE:
        raise ScenarioError(_join(where, "duration_s"), f"{kind} has nothing to undo; duration_s applies to "
                            f"{', '.join(INVERSE)}")
    groups: tuple[tuple[str, ...], ...] = ()
    if kind == "partition":
        g = raw.get("groups")
        k = _join(where, "groups")
        if not (isinstance(g, list) and len(g) == 2 and all(isinstance(x, list) and x for x in g)):
            raise ScenarioError(k, "must be two non-empty lists of host names, e.g. [[\"a\", \"b\"], [\"c\", \"d\"]]")
        flat = [h for side in g for h in side]
        for h in flat:
            if h not in host_names and h != "bootstrap":
                raise ScenarioError(k, f"{h!r} is not a host of this scenario")
        if len(set(flat)) != len(flat):
            raise ScenarioError(k, "a host appears on both sides")
        groups = tuple(tuple(side) for side in g)
    elif "groups" in raw:
        raise ScenarioError(_join(where, "groups"), "only a partition fault has groups")
    bandwidth = ""
    if kind == "throttle":
        bandwidth = _bandwidth(raw.get("bandwidth"), _join(where, "bandwidth"))
        if not bandwidth:
            raise ScenarioError(_join(where, "bandwidth"), "a throttle fault needs a rate, e.g. \"256kbit/s\"")
    elif "bandwidth" in raw:
        raise ScenarioError(_join(where, "bandwidth"), "only a throttle fault takes a bandwidth")
    hook = ""
    if kind == "hook":
        hook = _str(raw, "hook", where)
        try:
            items, rate = parse_hook(hook)
        except FaultSpecError as exc:
            raise ScenarioError(_join(where, "hook"), str(exc)) from None
        if rate is not None or len(items) != 1:
            raise ScenarioError(_join(where, "hook"), "one ACTION@PHASE item per hook fault (bandwidth goes in "
                                "the host's `bandwidth`)")
        if target in DYNAMIC_TARGETS:
            raise ScenarioError(_join(where, "target"), "a hook is installed when the host starts: name a host")
    elif "hook" in raw:
        raise ScenarioError(_join(where, "hook"), "only kind = \"hook\" takes a hook spec")
    down_s = _num(raw, "down_s", where, 2.0, 0.0, 3600.0) or 0.0
    if "down_s" in raw and kind != "restart":
        raise ScenarioError(_join(where, "down_s"), "only a restart fault has a down time")
    return Fault(index=index, kind=kind, target=target, trigger=trigger, duration_s=duration, groups=groups,
                 bandwidth=bandwidth, hook=hook, down_s=down_s)


def _expect(raw: Mapping[str, Any]) -> dict[str, Any]:
    where = "expect"
    _unknown(raw, EXPECTATIONS, where)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = _join(where, key)
        if key in ("no_bundle_lost", "every_member_visited_each_lap"):
            if not isinstance(value, bool):
                raise ScenarioError(k, "must be true or false")
            if value:
                out[key] = True
        elif key == "accuracy_at_least":
            out[key] = _num(raw, key, where, None, 0.0, 1.0)
        elif key == "hosts_held_the_snake":
            if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
                raise ScenarioError(k, "must be a non-empty list of host names, e.g. [\"node5\"]")
            out[key] = list(value)
        elif key in ("max_hops_redone", "distinct_window_sizes_at_least"):
            out[key] = _int(raw, key, where, None, 0, 10**6)
        else:  # job_completes, one_lineage, max_recovery_s: seconds
            out[key] = _num(raw, key, where, None, 0.0, 86_400.0, lo_open=True)
    return out


# ---------------------------------------------------------------------------------------------- load


TOP_KEYS = ("name", "description", "backend", "timeout_s", "network", "defaults", "hosts", "links", "jobs",
            "faults", "expect", "notes")
LINK_KEYS = ("bandwidth", "latency_ms")


def parse(doc: Mapping[str, Any], path: Path | None = None) -> Scenario:
    """Validate a scenario document (a parsed TOML table)."""
    _unknown(doc, TOP_KEYS, "")
    name = _str(doc, "name", "", pattern=NAME_RE)
    description = _str(doc, "description", "", "")
    backend = _str(doc, "backend", "", "local", choices=BACKENDS)
    timeout = _num(doc, "timeout_s", "", DEFAULT_TIMEOUT_S, 1.0, 86_400.0) or DEFAULT_TIMEOUT_S
    network = _str(doc, "network", "", name.replace("-", "")[:32] or "scn", pattern=NETWORK_RE)
    notes = doc.get("notes", [])
    if not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
        raise ScenarioError("notes", "must be a list of strings")
    defaults = _table(doc, "defaults", "")
    _unknown(defaults, DEFAULT_KEYS, "defaults")

    raw_hosts = doc.get("hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise ScenarioError("hosts", "missing: give at least one [[hosts]] table with a name")
    if len(raw_hosts) > MAX_HOSTS:
        raise ScenarioError("hosts", f"at most {MAX_HOSTS} hosts per scenario")
    hosts = []
    for i, h in enumerate(raw_hosts):
        if not isinstance(h, Mapping):
            raise ScenarioError(f"hosts[{i}]", "must be a table ([[hosts]])")
        hosts.append(_host(h, defaults, f"hosts[{i}]"))
    names = [h["name"] for h in hosts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ScenarioError("hosts", f"duplicate host names: {', '.join(dupes)}")
    host_names = set(names)

    links = _table(doc, "links", "")
    for hname, link in links.items():
        w = f"links.{hname}"
        if hname not in host_names:
            raise ScenarioError(w, f"{hname!r} is not a host of this scenario")
        if not isinstance(link, Mapping):
            raise ScenarioError(w, "must be a table, e.g. {bandwidth = \"1Mbit/s\"}")
        _unknown(link, LINK_KEYS, w)
        if "latency_ms" in link:
            raise ScenarioError(_join(w, "latency_ms"), "added latency needs the netem qdisc, which this kernel "
                                "lacks; it is left out rather than faked (only bandwidth is shaped)")
        bw = _bandwidth(link.get("bandwidth"), _join(w, "bandwidth"))
        for h in hosts:
            if h["name"] == hname and bw:
                h["bandwidth"] = bw

    raw_faults = doc.get("faults", [])
    if not isinstance(raw_faults, list):
        raise ScenarioError("faults", "must be an array of tables ([[faults]])")
    faults = tuple(_fault(f, i, host_names) for i, f in enumerate(raw_faults))
    hooks: dict[str, list[str]] = {}
    for f in faults:
        if f.kind == "hook":
            hooks.setdefault(f.target, []).append(f.hook)

    # Shards: the hosts with data split it among themselves, in file order, unless a host names its own.
    with_data = [h for h in hosts if h["data"] and h["role"] == "node"]
    for i, h in enumerate(with_data):
        h.setdefault("shard", f"{i}/{len(with_data)}")
    built = tuple(Host(**{**h, "shard": h.get("shard", "0/1"), "hooks": tuple(hooks.get(h["name"], ()))})
                  for h in hosts)

    raw_jobs = doc.get("jobs")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        raise ScenarioError("jobs", "missing: give at least one [[jobs]] table (file, submit_from)")
    base_dir = path.parent if path is not None else Path.cwd()
    jobs = tuple(_job(j, f"jobs[{i}]", base_dir, host_names, i) if isinstance(j, Mapping) else
                 _raise(f"jobs[{i}]", "must be a table ([[jobs]])") for i, j in enumerate(raw_jobs))
    jnames = [j.name for j in jobs]
    if len(set(jnames)) != len(jnames):
        raise ScenarioError("jobs", "two jobs share a name; give each a distinct `name`")
    expect = _expect(_table(doc, "expect", ""))
    if not expect:
        raise ScenarioError("expect", "missing: a scenario needs at least one expectation, e.g. job_completes = 120")
    unknown = [h for h in expect.get("hosts_held_the_snake", []) if h not in {b.name for b in built}]
    if unknown:
        raise ScenarioError("expect.hosts_held_the_snake", f"{', '.join(unknown)} not a host of this scenario")
    return Scenario(name=name, description=description, path=path, backend=backend, timeout_s=timeout,
                    network=network, hosts=built, jobs=jobs, faults=faults, expect=expect, notes=tuple(notes))


def _raise(key: str, message: str) -> Any:
    raise ScenarioError(key, message)


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError("", f"cannot read scenario {p}: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError("", f"{p} is not valid TOML: {exc}") from None
    try:
        return parse(doc, p.resolve())
    except ScenarioError as exc:
        err = ScenarioError("", f"{p.name}: {exc}")
        err.key = exc.key
        raise err from None
