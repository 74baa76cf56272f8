"""The agent's configuration file (TOML), validated with pydantic: every error names its field.

node_id = "hosta"
state_dir = "/var/lib/novacron"          # store, run directories, baseline store, API socket
# pki_dir = "<state_dir>/pki"             # node.pem, node.key, bundle.pem (novacron pki issue)
# cluster_key_file = "<pki_dir>/cluster.key"   # 32 bytes shared by the cluster (HDE tags)

[listen]
dwcp = "0.0.0.0:7400"                    # DWCP (mTLS) for peers
# api_unix = "<state_dir>/api.sock"
# api_tcp = "0.0.0.0:7480"  with api_tls_cert / api_tls_key

[peers]                                   # static peers: node id -> DWCP address
hostb = "10.77.0.2:7400"
# hostc = { address = "10.0.0.3:7400", link_mbit = 100 }

[migration]                               # see MigrationSettings below for every key
max_incoming = 2
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from novacron.errors import UserError
from novacron.security.identity import validate_id

MAX_PEERS = 256
MAX_CONFIG_BYTES = 1 << 20


class AgentConfigError(UserError):
    """The agent's configuration is invalid; ``field`` names the first bad setting."""


def _valid_id(value: str, what: str) -> str:
    try:
        return validate_id(value, what)
    except UserError as exc:
        raise ValueError(exc.message) from None


def parse_address(value: str, what: str = "address") -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) into its parts; ValueError says what is wrong."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"{what} must be host:port, got {value!r}")
    host, _, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise ValueError(f"{what} {value!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{what} {value!r} has no numeric port") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{what} port {port} out of range")
    if ":" in host:
        ipaddress.IPv6Address(host)
    return host, port


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PeerConfig(_Section):
    address: str
    link_mbit: Annotated[float, Field(gt=0, le=1_000_000)] | None = None  # known link rate (hint)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        _, port = parse_address(value, "peer address")
        if port == 0:
            raise ValueError("peer address needs a port")
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_address(self.address)


class ListenConfig(_Section):
    dwcp: str = "0.0.0.0:7400"
    api_unix: Path | None = None  # default <state_dir>/api.sock
    api_tcp: str | None = None
    api_tls_cert: Path | None = None
    api_tls_key: Path | None = None

    @field_validator("dwcp", "api_tcp")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value)
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> ListenConfig:
        if (self.api_tls_cert is None) != (self.api_tls_key is None):
            raise ValueError("api_tls_cert and api_tls_key go together")
        return self


class TimeoutSettings(_Section):
    prepare_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    connect_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    switchover_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    verify_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    commit_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    rollback_s: Annotated[float, Field(gt=0, le=3600)] = 60.0


class MigrationSettings(_Section):
    max_incoming: Annotated[int, Field(ge=1, le=64)] = 2
    max_outgoing: Annotated[int, Field(ge=1, le=64)] = 2
    max_downtime_ms: Annotated[int, Field(ge=1, le=60_000)] = 300
    deadline_s: Annotated[float, Field(ge=1, le=86_400)] = 600.0
    allow_postcopy: bool = False
    multifd_channels: Annotated[int, Field(ge=1, le=64)] = 4
    datacenter_path: Literal["direct", "passthrough"] = "direct"
    direct_compression: Literal["none", "zstd", "zlib"] = "none"  # direct path, datacenter mode
    direct_wan_compression: Literal["none", "zstd", "zlib"] = "zstd"  # direct path elsewhere
    direct_listen: str = "0.0.0.0"  # where a destination QEMU listens on the direct path
    capacity_mib: Annotated[int, Field(ge=64)] | None = None
    trust_source_paths: bool = True
    mode_warmup_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    # HDE session caches (512 MiB each) kept faulted-in between tunnelled migrations; 0: none kept.
    warm_cache_arenas: Annotated[int, Field(ge=0, le=8)] = 1
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)


class ClusterSettings(_Section):
    """Membership (``novacron cluster init`` / ``join`` write this section)."""

    advertise: str  # the address other nodes reach this one at (DWCP and the node listener)
    node_listen: str = "0.0.0.0:7481"  # the node listener: mutual TLS, peers' certificates authenticate
    control: Annotated[list[str], Field(max_length=16)] = Field(default_factory=list)  # https URLs
    roles: Annotated[list[Literal["control", "worker"]], Field(min_length=1, max_length=2)] = Field(
        default_factory=lambda: list[Literal["control", "worker"]](["worker"])
    )
    labels: Annotated[dict[str, str], Field(max_length=64)] = Field(default_factory=dict)
    heartbeat_s: Annotated[float, Field(ge=0.5, le=60)] = 2.0
    vcpus: Annotated[int, Field(ge=1, le=65536)] | None = None  # default: the host's CPUs
    memory_mib: Annotated[int, Field(ge=64)] | None = None  # default: migration.capacity_mib or RAM - 512

    @field_validator("node_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_address(value, "node_listen")
        return value

    @field_validator("control")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith("https://"):
                raise ValueError(f"control URLs must be https://host:port, got {url!r}")
        return value

    @property
    def is_control(self) -> bool:
        return "control" in self.roles


class StoreSettings(_Section):
    backend: Literal["sqlite", "etcd"] = "sqlite"
    endpoints: Annotated[list[str], Field(max_length=16)] = Field(default_factory=list)  # etcd

    @model_validator(mode="after")
    def _endpoints(self) -> StoreSettings:
        if self.backend == "etcd" and not self.endpoints:
            raise ValueError("the etcd backend needs endpoints")
        return self


class TestingSettings(_Section):
    """Fault injection for the failure tests; never set in production."""

    corrupt_hde_batch: Annotated[int, Field(ge=0)] | None = None


class AgentConfig(_Section):
    node_id: str
    state_dir: Path
    pki_dir: Path | None = None
    cluster_key_file: Path | None = None
    listen: ListenConfig = Field(default_factory=ListenConfig)
    peers: Annotated[dict[str, PeerConfig], Field(max_length=MAX_PEERS)] = Field(default_factory=dict)
    migration: MigrationSettings = Field(default_factory=MigrationSettings)
    testing: TestingSettings = Field(default_factory=TestingSettings)
    cluster: ClusterSettings | None = None  # None: a standalone agent with static peers only
    store: StoreSettings = Field(default_factory=StoreSettings)
    log_json: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("node_id")
    @classmethod
    def _node(cls, value: str) -> str:
        return _valid_id(value, "node id")

    @field_validator("peers", mode="before")
    @classmethod
    def _peer_shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ({"address": v} if isinstance(v, str) else v) for k, v in value.items()}
        return value

    @field_validator("peers")
    @classmethod
    def _peer_ids(cls, value: dict[str, PeerConfig]) -> dict[str, PeerConfig]:
        for node in value:
            _valid_id(node, "peer node id")
        return value

    @model_validator(mode="after")
    def _not_own_peer(self) -> AgentConfig:
        if self.node_id in self.peers:
            raise ValueError(f"peers must not list this node ({self.node_id}) itself")
        return self

    # ----- derived paths -----

    @property
    def pki(self) -> Path:
        return self.pki_dir or self.state_dir / "pki"

    @property
    def cluster_key_path(self) -> Path:
        return self.cluster_key_file or self.pki / "cluster.key"

    @property
    def api_socket(self) -> Path:
        return self.listen.api_unix or self.state_dir / "api.sock"


def _describe(exc: ValidationError) -> tuple[str, str, str | None]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "config"
        problems.append((loc, str(err.get("msg", "invalid")).removeprefix("Value error, ")))
    field, reason = problems[0]
    others = "; ".join(f"{f}: {r}" for f, r in problems[1:]) or None
    return field, reason, others


def parse_config(data: dict[str, Any], source: str = "<config>") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        field, reason, others = _describe(exc)
        raise AgentConfigError(
            f"invalid agent config: {field}: {reason}", field=field, file=source, also=others
        ) from None


def load_config(path: Path) -> AgentConfig:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AgentConfigError("cannot read the agent config", file=str(path), reason=exc.strerror) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise AgentConfigError("agent config file too large", file=str(path), limit=MAX_CONFIG_BYTES)
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AgentConfigError(f"agent config is not valid TOML: {exc}", file=str(path)) from None
    return parse_config(data, str(path))


def render_config(config: AgentConfig) -> str:
    """The config as TOML (tests and ``agent init`` write it); only what differs from the defaults."""
    lines = [f'node_id = "{config.node_id}"', f'state_dir = "{config.state_dir}"']
    for key in ("pki_dir", "cluster_key_file"):
        value = getattr(config, key)
        if value is not None:
            lines.append(f'{key} = "{value}"')
    lines.append(f"log_json = {'true' if config.log_json else 'false'}")
    lines.append(f'log_level = "{config.log_level}"')
    sections: list[tuple[str, BaseModel]] = [
        ("listen", config.listen),
        ("migration", config.migration),
        ("testing", config.testing),
        ("store", config.store),
    ]
    if config.cluster is not None:
        sections.append(("cluster", config.cluster))
    for name, section in sections:
        values = section.model_dump(exclude_defaults=True, mode="json")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        flat = {k: v for k, v in values.items() if not isinstance(v, dict)}
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in flat.items()]
        for sub, items in nested.items():
            lines.append(f"\n[{name}.{sub}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in items.items()]
    lines.append("\n[peers]")
    for node, peer in config.peers.items():
        if peer.link_mbit is None:
            lines.append(f'{node} = "{peer.address}"')
        else:
            lines.append(f'{node} = {{ address = "{peer.address}", link_mbit = {peer.link_mbit} }}')
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
