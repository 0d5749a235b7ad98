"""Settings: one validated object built from MESHRT_* environment variables (and CLI flags).

A bad value raises SettingsError whose message is one line naming the variable; the CLI prints
it and exits 2. Secrets (OPENAI_API_KEY, MESHRT_ADMIN_TOKEN, the database URL's password) are
never part of repr() and never reach the zygote or a worker's environment (see `scrubbed_env`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from urllib.parse import urlsplit


class SettingsError(ValueError):
    pass


class CommandError(Exception):
    """A failure the person running the command can fix; its message is the one line shown (exit 1)."""


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected a number of seconds, got {raw!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise SettingsError(f"{name}: must be a positive finite number, got {raw!r}")
    return value


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise SettingsError(f"{name}: expected a whole number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name}: must be positive, got {raw!r}")
    return value


def _non_negative_float(name: str, raw: str) -> float:
    if raw.strip() in ("0", "0.0"):
        return 0.0
    return _positive_float(name, raw)


def _non_negative_int(name: str, raw: str) -> int:
    if raw.strip() == "0":
        return 0
    return _positive_int(name, raw)


def parse_port(raw: str) -> int:
    """A TCP port (0: any free one). Raises ValueError with a one-line reason; every place that
    reads a port (settings, the CLI, the simulator) uses this."""
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected a TCP port number, got {raw!r}") from None
    if not 0 <= value <= 65535:
        raise ValueError(f"port must be 0-65535, got {raw!r}")
    return value


def port_argument(raw: str) -> int:
    """`parse_port` as an argparse `type=`: its reason becomes the usage error."""
    import argparse

    try:
        return parse_port(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(name: str, raw: str) -> int:
    try:
        return parse_port(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


# Where workers' uids come from when the node runs as root and MESHRT_WORKER_UIDS is `auto`:
# far above any login's or a rootless container's subordinate ids (docs/security.md)
DEFAULT_WORKER_UIDS = (2_100_000_000, 2_100_999_999)
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged"


def _uid_range(name: str, raw: str) -> tuple[int, int] | str:
    """`auto`, `off`, or FIRST-LAST: the uids workers run under (each its own)."""
    if raw in ("auto", "off"):
        return raw
    first, sep, last = raw.partition("-")
    try:
        low, high = int(first), int(last)
    except ValueError:
        raise SettingsError(f"{name}: expected auto, off or FIRST-LAST (uids), got {raw!r}") from None
    if not sep or not 0 < low < high <= MAX_ID:
        raise SettingsError(f"{name}: FIRST-LAST needs 0 < FIRST < LAST <= {MAX_ID}, got {raw!r}")
    return low, high


def _ws_url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise SettingsError(f"{name}: expected a ws:// or wss:// URL, got {raw!r}")
    try:
        _ = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        raise SettingsError(f"{name}: bad port in {raw!r}") from None
    return raw


def _database_url(name: str, raw: str) -> str:
    scheme = raw.split(":", 1)[0]
    if not (scheme.startswith("sqlite") or scheme.startswith("postgresql")):
        raise SettingsError(f"{name}: expected a sqlite:/// or postgresql:// URL, got scheme {scheme!r}")
    if scheme in ("postgresql", "postgres"):
        raw = "postgresql+psycopg" + raw[len(scheme) :]
    return raw


def _networks(name: str, raw: str) -> tuple:
    nets = []
    for item in filter(None, (p.strip() for p in raw.split(","))):
        if item == "*":
            nets.append(ipaddress.ip_network("0.0.0.0/0"))
            nets.append(ipaddress.ip_network("::/0"))
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise SettingsError(f"{name}: {item!r} is not an IP address or network") from None
    return tuple(nets)


def _choice(*allowed: str):
    def parse(name: str, raw: str) -> str:
        if raw not in allowed:
            raise SettingsError(f"{name}: expected one of {', '.join(allowed)}, got {raw!r}")
        return raw

    return parse


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}: expected true or false, got {raw!r}")


def _text(name: str, raw: str) -> str:
    return raw


def _node_id(name: str, raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", raw):
        raise SettingsError(
            f"{name}: 1-63 letters, digits, '.', '_' or '-' (starting with a letter or digit), got {raw!r}"
        )
    return raw


@dataclass(frozen=True)
class Settings:
    state_dir: Path = Path(".meshrt")
    database_url: str = ""  # default: sqlite in state_dir
    upstream_url: str = "wss://api.openai.com/v1/realtime"
    openai_api_key: str = field(default="", repr=False)
    admin_token: str = field(default="", repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    forwarded_allow_ips: tuple = (ipaddress.ip_network("127.0.0.1/32"),)
    allow_plain_ws: bool = False  # `meshrt dev` only: plain ws:// from loopback
    idle_timeout_s: float = 300.0
    max_session_s: float = 3600.0
    session_token_cap: int = 2_000_000
    drain_usage_s: float = 2.0
    drain_s: float = 3600.0  # unset: max_session_s, so a drain lets every live session finish (load_settings)
    max_sessions: int = 1000
    max_message_bytes: int = 16 * 1024 * 1024
    default_max_concurrent_sessions: int = 10
    header_timeout_s: float = 10.0
    max_connections_per_peer: int = 64  # open connections the front door holds per peer address; 0: no cap
    upstream_connect_timeout_s: float = 10.0
    upstream_attempts: int = 3
    ephemeral_key_retention_s: float = 86400.0  # an expired ek_ key is deleted this long after; 0: kept
    upstream_preconnect_s: float = 20.0  # a pool worker's upstream connection opened ahead, renewed this old; 0: off
    warm_workers: int | None = None  # set: a fixed pool of this many (0: fork per session); unset: sized
    warm_workers_min: int = 2  # the sized pool's floor...
    warm_workers_max: int = 32  # ...and ceiling (worker/pool.py)
    worker_backend: str = "uvloop"  # asyncio on uvloop; "asyncio" (plain) and "trio" also run
    worker_memory_mb: int = 512
    pricing_file: str = ""
    log_level: str = "info"
    node_id: str = ""  # default: one made up once per state dir (see `node_identity`)
    node_lease_s: float = 15.0  # a node not heard from for this long is lost; its sessions end
    db_timeout_s: float = 10.0  # connect, statement and lock waits; SQLite's busy timeout
    preauth: bool = True  # a response starts only once its most cost is reserved (docs/billing.md)
    translation_bill_ahead_s: float = 1.0  # audio a translation session's increment covers ahead of what is sent
    translation_billing: str = "audio"  # audio | wall_clock: what a translation session's minutes are of
    max_response_output_tokens: int = 4096  # what a response with no smaller limit is reserved for
    sandbox: str = "on"  # off | on | require: the layers of shared/sandbox.py (docs/security.md)
    # auto | off | (FIRST, LAST): each worker runs under a uid of its own (docs/security.md)
    worker_uids: tuple[int, int] | str = "auto"

    @property
    def worker_uid_range(self) -> tuple[int, int] | None:
        """(FIRST, LAST) when workers get uids of their own: set, or `auto` on a root node."""
        if self.worker_uids == "off" or (self.worker_uids == "auto" and os.geteuid() != 0):
            return None
        return DEFAULT_WORKER_UIDS if self.worker_uids == "auto" else self.worker_uids

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir.resolve() / 'meshrt.db'}"

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "run" / "control.sock"

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def upstream_connect_budget_s(self) -> float:
        """The longest an upstream connect may take with every attempt (the backoff aside)."""
        return self.upstream_connect_timeout_s * self.upstream_attempts

    @property
    def warm_pool_bounds(self) -> tuple[int, int]:
        """(floor, ceiling) of the warm pool: MESHRT_WARM_WORKERS fixes both."""
        if self.warm_workers is not None:
            return self.warm_workers, self.warm_workers
        return self.warm_workers_min, self.warm_workers_max

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


# variable name -> (field, parser)
_ENV: dict[str, tuple[str, object]] = {
    "MESHRT_STATE_DIR": ("state_dir", lambda n, r: Path(r)),
    "MESHRT_DATABASE_URL": ("database_url", _database_url),
    "MESHRT_UPSTREAM_URL": ("upstream_url", _ws_url),
    "OPENAI_API_KEY": ("openai_api_key", _text),
    "MESHRT_ADMIN_TOKEN": ("admin_token", _text),
    "MESHRT_HOST": ("host", _text),
    "MESHRT_PORT": ("port", _port),
    "MESHRT_FORWARDED_ALLOW_IPS": ("forwarded_allow_ips", _networks),
    "MESHRT_IDLE_TIMEOUT_S": ("idle_timeout_s", _positive_float),
    "MESHRT_MAX_SESSION_S": ("max_session_s", _positive_float),
    "MESHRT_SESSION_TOKEN_CAP": ("session_token_cap", _positive_int),
    "MESHRT_DRAIN_USAGE_S": ("drain_usage_s", _positive_float),
    "MESHRT_DRAIN_S": ("drain_s", _positive_float),
    "MESHRT_MAX_SESSIONS": ("max_sessions", _positive_int),
    "MESHRT_MAX_MESSAGE_BYTES": ("max_message_bytes", _positive_int),
    "MESHRT_MAX_CONCURRENT_SESSIONS": ("default_max_concurrent_sessions", _positive_int),
    "MESHRT_HEADER_TIMEOUT_S": ("header_timeout_s", _positive_float),
    "MESHRT_MAX_CONNECTIONS_PER_PEER": ("max_connections_per_peer", _non_negative_int),
    "MESHRT_UPSTREAM_CONNECT_TIMEOUT_S": ("upstream_connect_timeout_s", _positive_float),
    "MESHRT_UPSTREAM_ATTEMPTS": ("upstream_attempts", _positive_int),
    "MESHRT_UPSTREAM_PRECONNECT_S": ("upstream_preconnect_s", _non_negative_float),
    "MESHRT_EPHEMERAL_KEY_RETENTION_S": ("ephemeral_key_retention_s", _non_negative_float),
    "MESHRT_WARM_WORKERS": ("warm_workers", _non_negative_int),
    "MESHRT_WARM_WORKERS_MIN": ("warm_workers_min", _non_negative_int),
    "MESHRT_WARM_WORKERS_MAX": ("warm_workers_max", _non_negative_int),
    "MESHRT_WORKER_BACKEND": ("worker_backend", _choice("asyncio", "uvloop", "trio")),
    "MESHRT_WORKER_MEMORY_MB": ("worker_memory_mb", _positive_int),
    "MESHRT_PRICING_FILE": ("pricing_file", _text),
    "MESHRT_LOG_LEVEL": ("log_level", _choice("debug", "info", "warning", "error")),
    "MESHRT_ALLOW_PLAIN_WS": ("allow_plain_ws", _bool),
    "MESHRT_NODE_ID": ("node_id", _node_id),
    "MESHRT_NODE_LEASE_S": ("node_lease_s", _positive_float),
    "MESHRT_DB_TIMEOUT_S": ("db_timeout_s", _positive_float),
    "MESHRT_PREAUTH": ("preauth", _bool),
    "MESHRT_TRANSLATION_BILL_AHEAD_S": ("translation_bill_ahead_s", _positive_float),
    "MESHRT_TRANSLATION_BILLING": ("translation_billing", _choice("audio", "wall_clock")),
    "MESHRT_MAX_RESPONSE_OUTPUT_TOKENS": ("max_response_output_tokens", _positive_int),
    "MESHRT_SANDBOX": ("sandbox", _choice("off", "on", "require")),
    "MESHRT_WORKER_UIDS": ("worker_uids", _uid_range),
}

SECRET_VARIABLES = ("OPENAI_API_KEY", "MESHRT_ADMIN_TOKEN", "MESHRT_DATABASE_URL")


def load_settings(environ: dict[str, str] | None = None, **overrides) -> Settings:
    """Build Settings from the environment; `overrides` (CLI flags) win. Raises SettingsError."""
    env = os.environ if environ is None else environ
    values: dict = {}
    for variable, (name, parse) in _ENV.items():
        raw = env.get(variable)
        if raw is not None and (raw != "" or name in ("openai_api_key", "admin_token")):
            values[name] = parse(variable, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "drain_s" not in values:  # a drain as long as the longest session: none is cut short
        values["drain_s"] = values.get("max_session_s", Settings.max_session_s)
    low, high = (
        values.get("warm_workers_min", Settings.warm_workers_min),
        values.get("warm_workers_max", Settings.warm_workers_max),
    )
    if low > high:
        raise SettingsError(f"MESHRT_WARM_WORKERS_MIN: {low} is above MESHRT_WARM_WORKERS_MAX ({high})")
    if values.get("pricing_file") and not Path(values["pricing_file"]).is_file():
        raise SettingsError(f"MESHRT_PRICING_FILE: no such file {values['pricing_file']!r}")
    return Settings(**values)


def make_state_dir(settings: Settings) -> None:
    """The state dir, made as `serve` makes it (0700): a command run in a fresh directory, or
    with a MESHRT_STATE_DIR that does not exist yet, must not fail for want of it."""
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CommandError(
            f"cannot create the state directory {settings.state_dir}: {exc.strerror}; "
            "set MESHRT_STATE_DIR to a directory you can write"
        ) from None


def node_identity(settings: Settings) -> str:
    """This node's id: MESHRT_NODE_ID, or one made up on first start and kept in the state dir.
    Not the hostname: two nodes on one host (or pods reusing names) must never share an id,
    and a node restarted on the same state dir must keep its own (its spools name its sessions)."""
    if settings.node_id:
        return settings.node_id
    path = settings.state_dir / "node_id"
    try:
        return _node_id(str(path), path.read_text().strip())
    except FileNotFoundError:
        pass
    node = f"node-{secrets.token_hex(6)}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node + "\n")
    os.replace(tmp, path)
    return node


def settings_env(settings: Settings) -> dict[str, str]:
    """The MESHRT_* variables that rebuild `settings` in a child process (the front door)."""
    out = {}
    for variable, (name, _parse) in _ENV.items():
        value = getattr(settings, name)
        if value is None:  # unset (MESHRT_WARM_WORKERS): stays unset
            continue
        if name == "forwarded_allow_ips":
            value = ",".join(str(n) for n in value)
        elif isinstance(value, bool):
            value = "1" if value else "0"
        elif name == "worker_uids" and isinstance(value, tuple):
            value = f"{value[0]}-{value[1]}"
        elif name == "database_url":
            value = settings.db_url
        out[variable] = str(value)
    return out


def scrubbed_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """An environment with no secret and no MESHRT_* setting: what the zygote starts with."""
    env = os.environ if environ is None else environ
    # SSL_CERT_FILE/SSL_CERT_DIR: which CAs the workers trust for the upstream's TLS (public)
    keep = (
        "PATH",
        "LANG",
        "LC_ALL",
        "TZ",
        "PYTHONPATH",
        "PYTHONHASHSEED",
        "VIRTUAL_ENV",
        "HOME",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    )
    return {k: env[k] for k in keep if k in env}
