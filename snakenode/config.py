"""Node configuration: HOME/snakenode.toml < SNAKENODE_* environment < command-line flags.

Every setting is declared once in SETTINGS (name, type, default, allowed values, help, command-line
flag); `NodeConfig`'s defaults, the loader, the validator, the flags of `snakenode start` and
`python -m bootstrap` with their help, and docs/OPERATIONS.md all come from that table, so they cannot
drift apart. Errors name the setting, where it came from and what is allowed.

Standard library only: the bootstrap peer loads this module and must not reach the training package or
torch. Checks that need the dataset code (the `data`, `partition`, `shard` flags) are made by the node's
own start path (`snakenode.cli.start`), which imports `snakenode.train.data` anyway.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_FILE = "snakenode.toml"
ENV_PREFIX = "SNAKENODE_"
ROLES = ("node", "coordinator", "bootstrap")
LOG_LEVELS = ("debug", "info", "warning", "error")
NETWORK_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class ConfigError(Exception):
    """A setting with a bad value; the message names it, its source and what is allowed."""


def _default_memory_mb() -> int:
    """Half the machine's RAM: a node shares its device with other work by default."""
    try:
        import psutil

        return int(psutil.virtual_memory().total / 2**20 / 2)
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable: a safe small budget
        return 2048


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type  # str, int, float, bool, list
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    flag: str = ""  # the `snakenode start` flag ("" = config file and environment only)


SETTINGS: tuple[Setting, ...] = (
    Setting("network", str, "snake", "network name; nodes only see peers of the same network (gossip topics)",
            flag="--network"),
    Setting("role", str, "node", "node, coordinator (CS mode Process Controller) or bootstrap", choices=ROLES,
            flag="--role"),
    Setting("listen", list, ["/ip4/0.0.0.0/tcp/4001"], "multiaddrs to listen on (use /tcp/0 for any free port)",
            flag="--listen"),
    Setting("announce", list, [], "multiaddrs to advertise instead of the listen addresses (NAT, containers)",
            flag="--announce"),
    Setting("bootstrap", list, [], "bootstrap peers, full multiaddrs with /p2p/PEER_ID", flag="--bootstrap"),
    Setting("mdns", bool, False, "discover peers by mDNS on the local network (trusted LANs only)", flag="--mdns"),
    Setting("data", str, "", "local data NAME[:PATH]: digits, mnist5k, cifar10:DIR, digits32, mnist32, "
            "text:pydoc, text:DIR, synthetic; empty = no data (relay only)", flag="--data"),
    Setting("partition", str, "iid", "partition of the data: iid, dirichlet:ALPHA or shards:K", flag="--partition"),
    Setting("shard", str, "0/1", "this node's share I/N of the partitioned data", flag="--shard"),
    Setting("seed", int, 0, "partition seed", minimum=0, flag="--seed"),
    Setting("memory_budget_mb", int, 0, "memory the node may use for training (0 = half the machine's RAM)",
            minimum=0, flag="--memory-budget"),
    Setting("ping_interval_s", float, 1.0, "liveness ping period per peer", minimum=0.1, maximum=60,
            flag="--ping-interval"),
    Setting("ping_timeout_s", float, 1.5, "a ping not answered within this counts as missed",
            minimum=0.1, maximum=60),
    Setting("ping_misses", int, 2, "consecutive missed pings before a peer is declared down",
            minimum=1, maximum=100),
    Setting("profile_refresh_s", float, 15.0, "re-publish the profile at least this often", minimum=1),
    Setting("profile_ttl_s", float, 60.0, "forget a profile not refreshed for this long", minimum=2),
    Setting("max_peers", int, 64, "direct connections kept (every known peer up to this many)",
            minimum=1, maximum=1024),
    Setting("trusted_submitters", list, [], "peer ids whose signed jobs this node accepts (its own always)",
            flag="--trust"),
    Setting("allowed_peers", list, [], "closed network: only these peer ids may talk to this node (empty = all)",
            flag="--allowed-peer"),
    Setting("lane_port", int, 0, "TCP port of the fast bulk lane for large bundles (0 = any free port, -1 = no lane: "
            "every bundle goes over libp2p)", minimum=-1, maximum=65535, flag="--lane-port"),
    Setting("lane_announce_port", int, 0, "lane port put in lane offers instead of the listening one (port "
            "forwarding, containers; 0 = the listening port)", minimum=0, maximum=65535),
    Setting("lane_min_mb", float, 8.0, "bundles of at least this many MiB go over the lane, smaller ones over "
            "libp2p (0 = every bundle)", minimum=0),
    Setting("http", str, "127.0.0.1:0", "HOST:PORT of the read-only HTTP server: /metrics, /api/..., the dashboard "
            "(port 0 = any free port, written to node.json as http_url; off = none). Unauthenticated: bind "
            "beyond loopback only on a trusted network", flag="--http"),
    Setting("coordinator", str, "", "CS mode: multiaddr of the coordinator (only helps the node connect)",
            flag="--coordinator"),
    Setting("worker_threads", int, 0, "torch threads in the training worker (0 = cores - 1, at least 1)",
            minimum=0, maximum=256),
    Setting("worker_nice", int, 10, "nice level of the training worker (keeps the network loop responsive)",
            minimum=0, maximum=19),
    Setting("compute_slowdown", float, 1.0, "emulate a slower device: training takes this many times longer "
            "and the advertised compute shrinks accordingly (scenarios)", minimum=1.0, maximum=1000,
            flag="--compute-slowdown"),
    Setting("log_level", str, "info", "log verbosity", choices=LOG_LEVELS, flag="--log-level"),
    Setting("test_faults", str, "", "TEST ONLY fault hooks (see OPERATIONS.md); refused unless given explicitly",
            flag="--test-faults"),
)
SETTING_BY_NAME = {s.name: s for s in SETTINGS}


def _default(name: str) -> Any:
    """NodeConfig's default for a setting, taken from SETTINGS (a fresh list for list settings)."""
    value = SETTING_BY_NAME[name].default
    return field(default_factory=lambda: list(value)) if isinstance(value, list) else value


@dataclass
class NodeConfig:
    """A node's validated settings; one field per entry of SETTINGS, in the same order (a test checks)."""

    home: Path
    network: str = _default("network")
    role: str = _default("role")
    listen: list[str] = _default("listen")
    announce: list[str] = _default("announce")
    bootstrap: list[str] = _default("bootstrap")
    mdns: bool = _default("mdns")
    data: str = _default("data")
    partition: str = _default("partition")
    shard: str = _default("shard")
    seed: int = _default("seed")
    memory_budget_mb: int = _default("memory_budget_mb")
    ping_interval_s: float = _default("ping_interval_s")
    ping_timeout_s: float = _default("ping_timeout_s")
    ping_misses: int = _default("ping_misses")
    profile_refresh_s: float = _default("profile_refresh_s")
    profile_ttl_s: float = _default("profile_ttl_s")
    max_peers: int = _default("max_peers")
    trusted_submitters: list[str] = _default("trusted_submitters")
    allowed_peers: list[str] = _default("allowed_peers")
    lane_port: int = _default("lane_port")
    lane_announce_port: int = _default("lane_announce_port")
    lane_min_mb: float = _default("lane_min_mb")
    http: str = _default("http")
    coordinator: str = _default("coordinator")
    worker_threads: int = _default("worker_threads")
    worker_nice: int = _default("worker_nice")
    compute_slowdown: float = _default("compute_slowdown")
    log_level: str = _default("log_level")
    test_faults: str = _default("test_faults")
    sources: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def memory_mb(self) -> int:
        return self.memory_budget_mb or _default_memory_mb()

    @property
    def threads(self) -> int:
        return self.worker_threads or max(1, (os.cpu_count() or 2) - 1)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("sources",)}
        out["home"] = str(self.home)
        return out


def _coerce(setting: Setting, value: Any, source: str) -> Any:
    where = f"setting {setting.name!r} (from {source})"
    kind = setting.kind
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if number != number or number in (float("inf"), float("-inf")):  # nan passes every range check
                raise ValueError
            return number
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    expected = {bool: "true or false", list: "a list of strings", int: "an integer", float: "a finite number",
                str: "a string"}[kind]
    raise ConfigError(f"{where} must be {expected}, got {value!r}")


def _check(setting: Setting, value: Any, source: str) -> None:
    where = f"setting {setting.name!r} (from {source})"
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{where} must be one of {', '.join(setting.choices)}; got {value!r}")
    if setting.minimum is not None and value < setting.minimum:
        raise ConfigError(f"{where} must be >= {setting.minimum}; got {value!r}")
    if setting.maximum is not None and value > setting.maximum:
        raise ConfigError(f"{where} must be <= {setting.maximum}; got {value!r}")


def _validate_semantics(cfg: NodeConfig) -> None:
    from snakenode import identity

    def src(name: str) -> str:
        return cfg.sources.get(name, "default")

    if not NETWORK_RE.match(cfg.network):
        raise ConfigError(
            f"setting 'network' (from {src('network')}) must be 1-32 characters of a-z, 0-9, '-', '_'; "
            f"got {cfg.network!r}"
        )
    for name in ("listen", "announce", "bootstrap"):
        for addr in getattr(cfg, name):
            if not addr.startswith("/"):
                raise ConfigError(f"setting {name!r} (from {src(name)}): {addr!r} is not a multiaddr "
                                  f"(expected e.g. /ip4/0.0.0.0/tcp/4001)")
    if not cfg.listen:
        raise ConfigError("setting 'listen' is empty: give at least one address, e.g. /ip4/0.0.0.0/tcp/0")
    for addr in cfg.bootstrap:
        if "/p2p/" not in addr:
            raise ConfigError(
                f"setting 'bootstrap' (from {src('bootstrap')}): {addr!r} lacks /p2p/PEER_ID; "
                f"copy the full address that `python -m bootstrap` printed"
            )
    if cfg.coordinator and "/p2p/" not in cfg.coordinator:
        raise ConfigError(f"setting 'coordinator' (from {src('coordinator')}): {cfg.coordinator!r} lacks /p2p/PEER_ID; "
                          f"copy the address from the coordinator's node.json")
    for name in ("trusted_submitters", "allowed_peers"):
        for pid in getattr(cfg, name):
            try:
                identity.public_key_from_peer_id(pid)
            except ValueError as exc:
                raise ConfigError(f"setting {name!r} (from {src(name)}): {exc}") from None
    if cfg.test_faults:
        if src("test_faults").endswith(CONFIG_FILE):
            raise ConfigError("test_faults cannot come from the config file: pass --test-faults explicitly "
                              "(fault hooks crash and freeze the node on purpose)")
        from snakenode.faults import FaultSpecError, parse

        try:
            parse(cfg.test_faults)
        except FaultSpecError as exc:
            raise ConfigError(f"--test-faults: {exc}") from None
    from snakenode.http.address import HttpAddressError, parse_address

    try:
        parse_address(cfg.http)
    except HttpAddressError as exc:
        raise ConfigError(f"setting 'http' (from {src('http')}): {exc}") from None
    if cfg.ping_timeout_s > cfg.ping_interval_s * 5:
        raise ConfigError("setting 'ping_timeout_s' must be at most 5x 'ping_interval_s' "
                          f"(got {cfg.ping_timeout_s} vs {cfg.ping_interval_s})")


def load(home: Path, flags: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> NodeConfig:
    """Merge file < environment < flags (flags whose value is None are 'not given') and validate."""
    home = Path(home).expanduser().resolve()
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    path = home / CONFIG_FILE
    if path.exists():
        try:
            doc = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}; fix or remove it") from None
        for key, value in doc.items():
            if key not in SETTING_BY_NAME:
                raise ConfigError(
                    f"unknown setting {key!r} in {path}; known settings: {', '.join(SETTING_BY_NAME)}"
                )
            values[key] = _coerce(SETTING_BY_NAME[key], value, str(path))
            sources[key] = str(path)

    for setting in SETTINGS:
        var = ENV_PREFIX + setting.name.upper()
        if var in env:
            values[setting.name] = _coerce(setting, env[var], f"${var}")
            sources[setting.name] = f"${var}"

    for key, value in (flags or {}).items():
        if value is None or (isinstance(value, list | tuple) and not value and key in values):
            continue
        if key not in SETTING_BY_NAME:
            raise ConfigError(f"unknown setting {key!r}")
        flag = SETTING_BY_NAME[key].flag or f"--{key.replace('_', '-')}"
        values[key] = _coerce(SETTING_BY_NAME[key], value, flag)
        sources[key] = flag

    for key, value in values.items():
        _check(SETTING_BY_NAME[key], value, sources[key])
    cfg = NodeConfig(home=home, **values, sources=sources)
    _validate_semantics(cfg)
    return cfg


def operations_table() -> str:
    """Markdown table of every setting, for docs/OPERATIONS.md (a test keeps the doc in sync)."""
    lines = ["| setting | env | flag | type | default | meaning |", "|---|---|---|---|---|---|"]
    for s in SETTINGS:
        kind = s.kind.__name__
        if s.choices:
            kind += " (" + "/".join(s.choices) + ")"
        default = s.default if s.default not in ("", []) else "—"
        flag = f"`{s.flag}`" if s.flag else "—"
        lines.append(f"| `{s.name}` | `{ENV_PREFIX}{s.name.upper()}` | {flag} | {kind} | `{default}` | {s.help} |")
    return "\n".join(lines)
