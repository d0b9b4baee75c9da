"""One frozen `Config` for the whole daemon, with two presets.

Sources, later ones winning: preset defaults (`lan()` unless `preset = "local"`), the TOML file
(`/etc/houndd/houndd.toml` or `--config`), `HOUNDD_<KEY>` environment variables, CLI flags.
Every field documents its unit in its name and its reason in its docstring-like `doc`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from houndd.errors import ConfigError
from houndd.names import (
    MAX_LABELS,
    MAX_NAME_CHARS,
    host_problem,
    label_key_problem,
    label_value_problem,
)

DEFAULT_CONFIG_PATH = Path("/etc/houndd/houndd.toml")
DEFAULT_PORT = 7480
ENV_PREFIX = "HOUNDD_"


def _default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/houndd"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "houndd")


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"doc": text}, **kw)


@dataclass(frozen=True)
class Config:
    """Everything a node needs to know. Construct through `lan()`, `local()` or `load()`."""

    # --- identity and placement (scripts and operators depend on these names) ---
    node_name: str = _doc("this node's name (default: hostname)", default="")
    state_dir: str = _doc(
        "keys, the SQLite store, the blob cache, the peers last seen alive (peers.json)",
        default_factory=_default_state_dir,
    )
    bind: str = _doc("address for HTTP (TCP) and gossip (UDP)", default="0.0.0.0")
    port: int = _doc("port for HTTP (TCP) and gossip (UDP)", default=DEFAULT_PORT)
    advertise: str = _doc(
        "address peers should use (default: address of the mDNS interface or of the default route)",
        default="",
    )
    mdns: bool = _doc("advertise and browse _houndd._tcp.local.", default=True)
    interfaces: tuple[str, ...] = _doc(
        "interface addresses for mDNS (default: the default-route interface only)", default=()
    )
    seeds: tuple[str, ...] = _doc("host:port peers to join without mDNS", default=())
    docker_host: str = _doc(
        "Docker endpoint (default: DOCKER_HOST or unix:///var/run/docker.sock)", default=""
    )
    cluster_key_file: str = _doc("cluster key file (default: state_dir/cluster.key)", default="")
    labels: Mapping[str, str] = _doc("labels of this node", default_factory=dict)
    preset: str = _doc("timing preset: lan (default) or local (fast, for tests)", default="lan")
    plan_replicas: int = _doc("durable copies before a plan is acknowledged", default=2)
    cluster_name: str = _doc(
        "name carried in every envelope; nodes of another cluster name are refused",
        default="houndd",
    )
    insecure_registries: tuple[str, ...] = _doc(
        "registries (host:port) always reached over plain HTTP; an override: registries the "
        "node's dockerd treats as insecure (--insecure-registry) are learned from it",
        default=(),
    )

    # --- API ---
    api_tokens: tuple[str, ...] = _doc(
        "extra accepted API bearer tokens besides the one derived from the cluster key", default=()
    )
    tls_cert_file: str = _doc("PEM certificate for the HTTP API (empty: plain HTTP)", default="")
    tls_key_file: str = _doc("PEM private key for the HTTP API", default="")
    max_http_body_bytes: int = _doc(
        "cap on any HTTP request body; caps memory a client or peer can force", default=1 << 20
    )
    max_event_streams: int = _doc(
        "plan event streams (GET /v1/plans/{id}/events) one node serves at once; caps the memory "
        "and CPU readers can force (beyond it: 503, follow through another node)",
        default=1024,
    )
    stream_queue_events: int = _doc(
        "event batches a stream reader may fall behind before it is dropped with a `dropped` "
        "event (its client reconnects to a fresh snapshot)",
        default=64,
    )
    submit_wait_s: float = _doc(
        "how long a submission waits for a coordinator before answering 503", default=5.0
    )
    preview_timeout_s: float = _doc(
        "how long the coordinator waits for the targets of a plan to say which of its images "
        "they hold and how much disk they have free (disk-aware admission, dry runs); a "
        "target that has not answered by then is admitted unchecked",
        default=2.0,
    )
    plan_parse_timeout_s: float = _doc(
        "time budget for parsing one plan's text, in a child process so the daemon never "
        "waits on it; a plan that takes longer is refused as invalid",
        default=10.0,
    )
    log_level: str = _doc("DEBUG, INFO, WARNING or ERROR", default="INFO")
    log_format: str = _doc(
        "text (one `ts level logger key=value...` line per record) or json (one object per line)",
        default="text",
    )

    # --- membership (SWIM with Lifeguard suspicion) ---
    probe_interval_s: float = _doc("one probe per interval; bounds detection time", default=1.0)
    probe_timeout_s: float = _doc("direct probe wait before asking others", default=0.5)
    indirect_probes: int = _doc("members asked to probe on our behalf", default=3)
    suspicion_mult: float = _doc(
        "suspicion timeout = mult * log10(N+1) * probe interval (min 1x)", default=4.0
    )
    suspicion_max_mult: float = _doc(
        "Lifeguard: the timeout starts at max_mult x the min and shrinks with confirmations",
        default=6.0,
    )
    # 6, as memberlist's SuspicionMaxTimeoutMult: a suspicion that no other member confirms
    # (one lossy path, one starved prober) gets six minimum timeouts to be refuted; a real
    # death is confirmed by the others and still takes the minimum. At 2, 10% packet loss on
    # a loaded 4-host test cluster once declared a healthy node dead.
    gossip_interval_s: float = _doc("piggyback-only gossip round", default=0.2)
    gossip_fanout: int = _doc("members per gossip round", default=3)
    retransmit_mult: int = _doc("each update is sent mult * log10(N+1) times", default=4)
    push_pull_interval_s: float = _doc("full state sync with one random member", default=30.0)
    join_retry_s: float = _doc("retry interval for seeds and mDNS candidates", default=2.0)
    dead_reap_s: float = _doc("forget dead members after this long", default=3600.0)

    # --- election and replication ---
    heartbeat_interval_s: float = _doc(
        "coordinator heartbeat period (each member gets one per period)", default=0.5
    )
    coordinator_timeout_s: float = _doc(
        "no heartbeat for this long: the coordinator is dead to this node (3 periods: one "
        "lost datagram starts no election)",
        default=1.5,
    )
    election_timeout_min_s: float = _doc("randomized election delay, lower bound", default=0.1)
    election_timeout_max_s: float = _doc("randomized election delay, upper bound", default=0.5)
    join_window_s: float = _doc(
        "no election until this long after the first discovery round (mDNS up, seeds tried "
        "once): nodes started together find each other before electing, instead of each "
        "electing itself alone; a lone node becomes coordinator after it",
        default=3.0,
    )
    anti_entropy_interval_s: float = _doc(
        "digest exchange period while a plan is open or a result may be unreported", default=1.0
    )
    anti_entropy_idle_s: float = _doc(
        "full digest exchange period at rest (a safety net: nothing to settle, nothing sent)",
        default=30.0,
    )
    peer_request_timeout_s: float = _doc("HTTP peer request timeout", default=5.0)
    keep_present_interval_s: float = _doc(
        "how often a node checks it holds the images of keep_present plans (besides at once "
        "on events: its start, its labels changing, a keep_present plan reaching it, a member "
        "coming back)",
        default=60.0,
    )
    node_return_timeout_s: float = _doc(
        "items of a dead or unreachable target fail with 'node unavailable' after this long",
        default=300.0,
    )

    # --- wire security ---
    signing_key_rotation_s: float = _doc("signing key lifetime before rotation", default=3600.0)
    signing_key_grace_s: float = _doc("a retired signing key is accepted this long", default=60.0)
    replay_window_s: float = _doc("accepted clock skew of message timestamps", default=30.0)
    max_udp_bytes: int = _doc("cap on a gossip datagram", default=65536)
    peer_rate_limit_per_s: float = _doc(
        "messages per second accepted from one source address before dropping", default=500.0
    )

    # --- puller ---
    progress_interval_s: float = _doc("pull progress reported at most this often", default=0.5)

    # --- blob sharing ---
    p2p: bool = _doc(
        "share image blobs between members: dockerd pulls through a loopback registry of "
        "houndd fed by the cache, peers, then the registry (false: dockerd pulls directly)",
        default=True,
    )
    blob_cache_bytes: int = _doc(
        "size cap of the blob cache under state_dir/blobs; least recently used blobs go first",
        default=10 * 1024**3,
    )
    blob_disk_reserve_bytes: int = _doc(
        "free disk space the blob cache never uses; a blob that would eat into it fails the "
        "item with 'no space'",
        default=1024**3,
    )
    blob_fanout: int = _doc(
        "children per node in a blob's distribution tree (each serves at most this many)",
        default=3,
    )
    blob_max_uploads: int = _doc(
        "blob uploads to peers at once; a peer asking beyond it waits and asks again",
        default=16,
    )
    blob_upload_limit_mbit: float = _doc(
        "cap on this node's blob upload rate to peers, Mbit/s (0: no cap)", default=0.0
    )
    blob_stall_timeout_s: float = _doc(
        "a blob source that sends nothing for this long is abandoned; the transfer resumes "
        "from another source",
        default=10.0,
    )
    blob_loopback_port: int = _doc(
        "port of the loopback registry on 127.0.0.1 that dockerd pulls through (0: any free)",
        default=0,
    )

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def cluster_key_path(self) -> Path:
        return (
            Path(self.cluster_key_file)
            if self.cluster_key_file
            else self.state_path / "cluster.key"
        )

    @property
    def identity_key_path(self) -> Path:
        return self.state_path / "identity.key"

    @property
    def db_path(self) -> Path:
        return self.state_path / "houndd.db"

    @property
    def effective_node_name(self) -> str:
        import socket  # only the daemon asks; the CLI's start-up does not pay for the module

        return self.node_name or socket.gethostname()

    @property
    def effective_docker_host(self) -> str:
        return (
            self.docker_host or os.environ.get("DOCKER_HOST", "") or "unix:///var/run/docker.sock"
        )

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


_LOCAL_TIMINGS: dict[str, Any] = {
    # Processes on one host (tests, simulation, demos): ten times faster than a LAN, but a
    # probe still waits 100 ms, because a busy 2-core CI machine can starve a process that long.
    "probe_interval_s": 0.2,
    "probe_timeout_s": 0.1,
    "gossip_interval_s": 0.05,
    "push_pull_interval_s": 1.0,
    "join_retry_s": 0.2,
    "heartbeat_interval_s": 0.1,
    "coordinator_timeout_s": 0.8,
    "election_timeout_min_s": 0.05,
    "election_timeout_max_s": 0.25,
    "join_window_s": 1.0,
    "anti_entropy_interval_s": 0.3,
    "anti_entropy_idle_s": 3.0,
    "peer_request_timeout_s": 2.0,
    "node_return_timeout_s": 20.0,
    "keep_present_interval_s": 1.0,
    "submit_wait_s": 5.0,
    "progress_interval_s": 0.2,
    "blob_stall_timeout_s": 3.0,
}

PRESETS = ("lan", "local")


def lan(**overrides: Any) -> Config:
    """Defaults for a LAN of Docker hosts."""
    return Config(**{"preset": "lan", **overrides})


def local(**overrides: Any) -> Config:
    """Fast timings for processes on one machine (tests, simulation, demos)."""
    return Config(**{"preset": "local", **_LOCAL_TIMINGS, **overrides})


def field_docs() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every config key, for the README and `houndd config`."""
    defaults = lan()
    rows = []
    for f in dataclasses.fields(Config):
        rows.append((f.name, repr(getattr(defaults, f.name)), str(f.metadata.get("doc", ""))))
    return rows


def _validate(c: Config) -> None:
    if c.preset not in PRESETS:
        raise ConfigError("preset", f"expected one of {', '.join(PRESETS)}, got {c.preset!r}")
    if not 0 < c.port < 65536:
        raise ConfigError("port", f"expected 1..65535, got {c.port}")
    if c.plan_replicas < 1:
        raise ConfigError("plan_replicas", f"expected >= 1, got {c.plan_replicas}")
    for key in ("max_event_streams", "stream_queue_events"):
        if getattr(c, key) < 1:
            raise ConfigError(key, f"expected >= 1, got {getattr(c, key)}")
    if c.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(
            "log_level", f"expected DEBUG, INFO, WARNING or ERROR, got {c.log_level!r}"
        )
    if c.log_format not in ("text", "json"):
        raise ConfigError("log_format", f"expected text or json, got {c.log_format!r}")
    for f in dataclasses.fields(Config):
        value = getattr(c, f.name)
        if f.name.endswith("_s") and not value > 0:
            raise ConfigError(f.name, f"expected a positive number of seconds, got {value}")
    if c.election_timeout_min_s > c.election_timeout_max_s:
        raise ConfigError("election_timeout_min_s", "must not exceed election_timeout_max_s")
    if c.probe_timeout_s >= c.probe_interval_s:
        raise ConfigError("probe_timeout_s", "must be smaller than probe_interval_s")
    _validate_blobs(c)
    for seed in c.seeds:
        host, sep, port = seed.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("seeds", f"expected host:port entries, got {seed!r}")
    if bool(c.tls_cert_file) != bool(c.tls_key_file):
        raise ConfigError("tls_cert_file", "tls_cert_file and tls_key_file go together")
    _validate_member(c)


def _validate_blobs(c: Config) -> None:
    if not 0 <= c.blob_loopback_port < 65536:
        raise ConfigError("blob_loopback_port", f"expected 0..65535, got {c.blob_loopback_port}")
    for key in ("blob_cache_bytes", "blob_fanout", "blob_max_uploads"):
        if getattr(c, key) < 1:
            raise ConfigError(key, f"expected >= 1, got {getattr(c, key)}")
    if c.blob_disk_reserve_bytes < 0:
        raise ConfigError("blob_disk_reserve_bytes", "expected >= 0")
    if not c.blob_upload_limit_mbit >= 0:
        raise ConfigError(
            "blob_upload_limit_mbit", f"expected >= 0 (0: no cap), got {c.blob_upload_limit_mbit}"
        )


def _validate_member(c: Config) -> None:
    """What goes into this node's member record must pass the wire bounds every peer checks,
    or peers would refuse our gossip."""
    if len(c.labels) > MAX_LABELS:
        raise ConfigError("labels", f"at most {MAX_LABELS} labels")
    for k, v in c.labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError("labels", "expected a table of string = string")
        problem = label_key_problem(k) or label_value_problem(v)
        if problem:
            raise ConfigError("labels", f"{k[:64]!r}: {problem}")
    name = c.node_name
    if name and (len(name) > MAX_NAME_CHARS or not name.isprintable()):
        raise ConfigError("node_name", f"expected 1..{MAX_NAME_CHARS} printable characters")
    if c.advertise and host_problem(c.advertise):
        raise ConfigError("advertise", f"{c.advertise[:64]!r}: {host_problem(c.advertise)}")


# --- loading -------------------------------------------------------------------------------


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(key: str, tp: Any, value: Any, *, from_text: bool) -> Any:
    """Check (TOML) or parse (environment, flags) one value against the field's type."""
    origin = typing.get_origin(tp)
    if tp in _SCALARS:
        return _SCALARS[tp](key, value, from_text)
    if origin is tuple:
        return _coerce_list(key, value, from_text)
    if origin in (Mapping, dict) or tp is Mapping:
        return _coerce_table(key, value, from_text)
    raise ConfigError(key, f"unsupported type {tp!r}")  # a bug in Config, not user input


def _coerce_bool(key: str, value: Any, from_text: bool) -> bool:
    if from_text and isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    if isinstance(value, bool):
        return value
    raise ConfigError(key, f"expected a boolean, got {value!r}")


def _coerce_int(key: str, value: Any, from_text: bool) -> int:
    if from_text and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(key, f"expected an integer, got {value!r}")


def _coerce_float(key: str, value: Any, from_text: bool) -> float:
    if from_text and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(key, f"expected a number, got {value!r}")


def _coerce_str(key: str, value: Any, from_text: bool) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(key, f"expected a string, got {value!r}")


_SCALARS: dict[Any, Callable[[str, Any, bool], Any]] = {
    bool: _coerce_bool,
    int: _coerce_int,
    float: _coerce_float,
    str: _coerce_str,
}


def _coerce_list(key: str, value: Any, from_text: bool) -> tuple[str, ...]:
    if from_text and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(key, f"expected a list of strings, got {value!r}")


def _coerce_table(key: str, value: Any, from_text: bool) -> Mapping[str, str]:
    if from_text and isinstance(value, str):
        out: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            k, sep, v = part.partition("=")
            if not sep or not k:
                raise ConfigError(key, f"expected k=v[,k=v], got {value!r}")
            out[k.strip()] = v.strip()
        return types.MappingProxyType(out)
    if isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return types.MappingProxyType(dict(value))
    raise ConfigError(key, f"expected a table of string = string, got {value!r}")


def load(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config from preset, TOML file, environment and flag overrides.

    `path=None` reads `/etc/houndd/houndd.toml` if it exists (else nothing), or the file
    named by `HOUNDD_CONFIG`. An explicit path that does not exist is an error. An invalid
    value raises `ConfigError` naming where it came from: the file, `HOUNDD_<KEY>`, or a flag.
    """
    env = os.environ if env is None else env
    types_ = _field_types()
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    _read_file(path, env, types_, values, sources)
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in types_:
            continue  # HOUNDD_* variables of other tools (HOUNDD_API, ...) are not config keys
        sources[key] = f"from the environment variable {name}"
        try:
            values[key] = _coerce(key, types_[key], raw, from_text=True)
        except ConfigError as e:
            raise _with_source(e, sources) from None

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in types_:
            raise ConfigError(key, "unknown key")
        sources[key] = f"from the flag --{key.replace('_', '-')}"
        try:
            values[key] = _coerce(key, types_[key], value, from_text=isinstance(value, str))
        except ConfigError as e:
            raise _with_source(e, sources) from None

    preset = values.get("preset", "lan")
    if preset not in PRESETS:
        raise _with_source(
            ConfigError("preset", f"expected one of {', '.join(PRESETS)}, got {preset!r}"),
            sources,
        )
    try:
        return local(**values) if preset == "local" else lan(**values)
    except ConfigError as e:
        raise _with_source(e, sources) from None


def _read_file(
    path: str | Path | None,
    env: Mapping[str, str],
    types_: Mapping[str, Any],
    values: dict[str, Any],
    sources: dict[str, str],
) -> None:
    """The TOML file's values into `values` (and where each came from into `sources`)."""
    explicit = path is not None or bool(env.get(ENV_PREFIX + "CONFIG"))
    file_path = (
        Path(path)
        if path is not None
        else Path(env.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG_PATH)
    )
    if not file_path.exists():
        if explicit:
            raise ConfigError(str(file_path), "config file not found")
        return
    import tomllib  # only when there is a file to read

    try:
        data = tomllib.loads(file_path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(file_path), f"not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError(str(file_path), f"cannot read: {reason}") from None
    for key, value in data.items():
        if key not in types_:
            raise ConfigError(key, f"unknown key in {file_path}")
        sources[key] = f"in {file_path}"
        values[key] = _coerce(key, types_[key], value, from_text=False)


def _with_source(e: ConfigError, sources: Mapping[str, str]) -> ConfigError:
    """The same error, saying where the bad value was set (a file, HOUNDD_X, a flag)."""
    where = sources.get(e.key)
    if where is None or e.where:
        return e
    return ConfigError(e.key, e.reason, where=where)
