"""Configuration: ``config/khod.toml`` semantics, validated before anything starts.

Every key has a default (the same values ``config/khod.toml`` documents; a
test keeps the two in step). Sizes are integers or strings with a K/M/G/T
suffix. An unknown key, a wrong type or an impossible value stops start-up
with a message naming the key and the file.
"""

from __future__ import annotations

import grp
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from khod.errors import Errno, KhoError
from khod.kho.handover import FDT_FIXED_BYTES, MAX_FDT_BYTES
from khod.kho.tree import FDT_MAX_FANOUT, FDT_MAX_NODES
from khod.pages import PAGE_SIZE

# The root of a KHO FDT holds /preserved-memory, /khod and one node per session.
MAX_SESSION_NODES = FDT_MAX_FANOUT - 2

DEFAULT_CONFIG_PATH = "/etc/khod/khod.toml"
DEFAULT_SOCKET = "/run/khod/khod.sock"


class ConfigError(KhoError):
    def __init__(self, message: str) -> None:
        super().__init__(Errno.EINVAL, message)


@dataclass(frozen=True)
class RegionConfig:
    backend: str = "file"
    path: str = "/dev/shm/khod/region"
    base: int = 0x1_0000_0000
    size: int | None = 1 << 30  # None: the dax backend maps the whole device ("auto")
    scratch_size: int = 16 << 20
    preallocate: bool = False


@dataclass(frozen=True)
class ServerConfig:
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o660
    socket_group: str = ""
    operator_group: str = ""
    memory_group: str = ""
    notifier_timeout_s: float = 10.0
    handover_on_stop: bool = False
    state_dir: str = ""


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9477"


@dataclass(frozen=True)
class LimitsConfig:
    max_frame: int = 16 << 20
    max_batch: int = 1 << 20
    max_sessions: int = MAX_SESSION_NODES
    max_connections_per_uid: int = 64
    max_connections: int = 1024
    max_buffered: int = 256 << 20
    request_timeout_s: float = 10.0
    send_timeout_s: float = 30.0
    send_queue: int = 256
    tree_max_nodes: int = 4096
    tree_max_bytes: int = 1 << 20
    tree_total_nodes: int = 1 << 14
    tree_total_bytes: int = 4 << 20
    # One user's share (root excepted): bytes of the region (or a fraction of it,
    # given as "50%"), sessions, and bytes of KHO trees.
    uid_max_bytes: int | float = 0.5
    uid_max_sessions: int = 64
    uid_max_tree_bytes: int = 1 << 20


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "logfmt"


@dataclass(frozen=True)
class Config:
    region: RegionConfig = field(default_factory=RegionConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<defaults>"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return d


SECTIONS: dict[str, type] = {
    "region": RegionConfig,
    "server": ServerConfig,
    "metrics": MetricsConfig,
    "limits": LimitsConfig,
    "logging": LoggingConfig,
}
SIZE_KEYS = {
    ("region", "base"),
    ("region", "size"),
    ("region", "scratch_size"),
    ("limits", "max_frame"),
    ("limits", "max_buffered"),
    ("limits", "tree_max_bytes"),
    ("limits", "tree_total_bytes"),
    ("limits", "uid_max_tree_bytes"),
}
PERCENT_KEYS = {("limits", "uid_max_bytes")}  # a size, or a share of the region: "50%"
_PERCENT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")
_SIZE = re.compile(r"\s*(0[xX][0-9a-fA-F]+|\d+)\s*([KMGTkmgt]?)(i?[Bb])?\s*")


def parse_size(value: object, where: str) -> int:
    """``4096``, ``"64G"``, ``"0x100000000"``, ``"16MiB"`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if not m:
            raise ConfigError(f"{where}: {value!r} is not a size (e.g. 4096, 16M, 64G)")
        n = int(m.group(1), 0) << (10 * " KMGT".index(m.group(2).upper() or " "))
    else:
        raise ConfigError(f"{where}: expected a size (integer or string like '16M')")
    if n < 0:
        raise ConfigError(f"{where}: a size cannot be negative")
    return n


def _coerce(section: str, key: str, default: Any, value: Any, where: str) -> Any:
    if (section, key) in PERCENT_KEYS:
        m = _PERCENT.fullmatch(value) if isinstance(value, str) else None
        if m is None:
            return parse_size(value, where)
        share = float(m.group(1)) / 100
        if not 0 < share <= 1:
            raise ConfigError(f"{where}: a share of the region must be in (0%, 100%]")
        return share
    if (section, key) in SIZE_KEYS:
        if section == "region" and key == "size" and value == "auto":
            return None
        return parse_size(value, where)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_mapping(
    data: dict[str, Any], source: str = "<mapping>", base: Config | None = None
) -> Config:
    """Build and validate a Config from parsed TOML (or overrides) on top of ``base``."""
    cfg = base or Config()
    parts: dict[str, Any] = {}
    for section, table in data.items():
        cls = SECTIONS.get(section)
        if cls is None:
            raise ConfigError(
                f"{source}: unknown section [{section}] (known: {', '.join(SECTIONS)})"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        current = getattr(cfg, section)
        known = {f.name: f for f in fields(cls)}
        changes = {}
        for key, value in table.items():
            where = f"{source}: {section}.{key}"
            if key not in known:
                raise ConfigError(f"{where}: unknown key (known: {', '.join(known)})")
            changes[key] = _coerce(section, key, getattr(cls(), key), value, where)
        parts[section] = replace(current, **changes)
    cfg = replace(cfg, **parts, source=source)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    src = cfg.source
    r = cfg.region
    if r.backend not in ("file", "devmem", "dax"):
        raise ConfigError(f"{src}: region.backend must be file, devmem or dax, not {r.backend!r}")
    if not r.path:
        raise ConfigError(f"{src}: region.path is empty")
    if r.base % PAGE_SIZE:
        raise ConfigError(f"{src}: region.base {r.base:#x} is not page-aligned ({PAGE_SIZE})")
    if r.size is None:
        if r.backend != "dax":
            raise ConfigError(f"{src}: region.size 'auto' only works with the dax backend")
    else:
        if r.size <= 0 or r.size % PAGE_SIZE:
            raise ConfigError(
                f"{src}: region.size {r.size} is not a positive multiple of {PAGE_SIZE}"
            )
        if r.scratch_size >= r.size - 2 * PAGE_SIZE:
            raise ConfigError(
                f"{src}: region.scratch_size {r.scratch_size} does not fit in region.size {r.size}"
            )
    if r.scratch_size <= 0 or r.scratch_size % PAGE_SIZE:
        raise ConfigError(
            f"{src}: region.scratch_size {r.scratch_size} is not a positive multiple of {PAGE_SIZE}"
        )
    s = cfg.server
    if not s.socket:
        raise ConfigError(f"{src}: server.socket is empty")
    if len(s.socket.encode()) > 107:
        raise ConfigError(
            f"{src}: server.socket is longer than a Unix socket path may be (107 bytes)"
        )
    if not 0 <= s.socket_mode <= 0o777:
        raise ConfigError(f"{src}: server.socket_mode {s.socket_mode:#o} is not a permission mode")
    if not 0 < s.notifier_timeout_s <= 3600:
        raise ConfigError(f"{src}: server.notifier_timeout_s must be in (0, 3600]")
    for key in ("socket_group", "operator_group", "memory_group"):
        name = getattr(s, key)
        if name:
            try:
                grp.getgrnam(name)
            except KeyError:
                raise ConfigError(f"{src}: server.{key}: no group named {name!r}") from None
    if cfg.metrics.listen:
        parse_listen(cfg.metrics.listen, f"{src}: metrics.listen")
    lim = cfg.limits
    if lim.max_frame < 4096:
        raise ConfigError(f"{src}: limits.max_frame must be at least 4096")
    for key in (
        "max_batch",
        "max_sessions",
        "max_connections_per_uid",
        "max_connections",
        "send_queue",
        "tree_max_nodes",
        "tree_total_nodes",
        "uid_max_sessions",
    ):
        if getattr(lim, key) < 1:
            raise ConfigError(f"{src}: limits.{key} must be at least 1")
    # What one khod writes, every khod must read: the handover's bounds are the format's.
    if lim.max_sessions > MAX_SESSION_NODES:
        raise ConfigError(
            f"{src}: limits.max_sessions {lim.max_sessions} is more than one handover carries "
            f"({MAX_SESSION_NODES} session nodes)"
        )
    if lim.tree_total_nodes > FDT_MAX_NODES - 3:
        raise ConfigError(
            f"{src}: limits.tree_total_nodes {lim.tree_total_nodes} is more than a KHO FDT "
            f"may hold ({FDT_MAX_NODES - 3} besides khod's own)"
        )
    if lim.tree_total_bytes > MAX_FDT_BYTES - FDT_FIXED_BYTES:
        raise ConfigError(
            f"{src}: limits.tree_total_bytes {lim.tree_total_bytes} is more than a KHO FDT "
            f"may hold ({MAX_FDT_BYTES - FDT_FIXED_BYTES} besides khod's own)"
        )
    for key in ("request_timeout_s", "send_timeout_s"):
        if not 0 < getattr(lim, key) <= 3600:
            raise ConfigError(f"{src}: limits.{key} must be in (0, 3600]")
    if lim.max_buffered < lim.max_frame:
        raise ConfigError(f"{src}: limits.max_buffered must be at least limits.max_frame")
    if cfg.logging.level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{src}: logging.level must be debug, info, warning or error")
    if cfg.logging.format not in ("logfmt", "json"):
        raise ConfigError(f"{src}: logging.format must be logfmt or json")


def parse_listen(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {text!r} is not host:port")
    return host, int(port)


def load(path: str | None) -> Config:
    """Read ``path`` (or the default location if it exists), else the defaults."""
    if path is None:
        if not Path(DEFAULT_CONFIG_PATH).exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    import tomllib  # only when a file is read: a start-up without one never loads it

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_mapping(data, source=path)


def override(cfg: Config, assignments: list[str]) -> Config:
    """Apply ``section.key=value`` overrides (values parsed as TOML, else as strings)."""
    import tomllib

    data: dict[str, dict[str, Any]] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        data.setdefault(section, {})[name] = value
    return from_mapping(data, source=f"{cfg.source} + command line", base=cfg)
