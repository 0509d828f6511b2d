"""Configuration loading: pydantic-settings models read from a YAML file plus FIELDLINE_ env vars.

Precedence, highest first: values given in code (CLI flags), FIELDLINE_* environment variables
(nested with "__", e.g. FIELDLINE_MQTT__HOST), the YAML file, the defaults below.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fieldline.shared.limits import (
    MAX_LLM_UNPACKED_BYTES,
    MAX_RECORD_PAYLOAD_BYTES,
    MAX_TUNNEL_MESSAGE_BYTES,
)


class ConfigError(Exception):
    """A configuration file that cannot be read or does not validate."""


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]):
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class FieldlineSettings(BaseSettings):
    """Base for every settings model: env prefix FIELDLINE_, nested with "__"."""

    model_config = SettingsConfigDict(
        env_prefix="FIELDLINE_", env_nested_delimiter="__", extra="forbid"
    )
    _yaml_data: dict[str, Any] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_data = getattr(settings_cls, "_pending_yaml", {}) or {}
        return (init_settings, env_settings, _YamlSource(settings_cls, yaml_data))


S = TypeVar("S", bound=FieldlineSettings)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a ConfigError naming the file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_settings(cls: type[S], config_file: Path | None = None, **overrides: Any) -> S:
    """Build settings from (in order) overrides, environment, YAML file, defaults."""
    from pydantic import ValidationError

    yaml_data = read_yaml(config_file) if config_file else {}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cls._pending_yaml = yaml_data  # type: ignore[attr-defined]
    try:
        return cls(**overrides)
    except ValidationError as exc:
        where = f" (file {config_file})" if config_file else ""
        raise ConfigError(f"invalid configuration{where}:\n{exc}") from exc
    finally:
        cls._pending_yaml = {}  # type: ignore[attr-defined]


class CloudSettings(FieldlineSettings):
    """The cloud controller: `fieldline cloud serve`."""

    data_dir: Path = Path("./fieldline-cloud")
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=7443, ge=0, le=65535)
    max_artifact_bytes: int = Field(default=2 * 1024**3, ge=1)
    chunk_bytes: int = Field(default=1024 * 1024, ge=4096, le=3 * 1024 * 1024)
    default_token_ttl_s: int = Field(default=24 * 3600, ge=1)
    # A node counts as offline when nothing was heard from it for this long.
    offline_after_s: float = Field(default=30.0, gt=0)
    log_level: str = "info"
    # How often the rollout controller looks at running rollouts.
    rollout_tick_s: float = Field(default=1.0, gt=0, le=60)
    # TLS (docs/security.md): the admin API serves HTTPS, the tunnel requires client
    # certificates, enrollment moves to its own server-authenticated TLS listener.
    tls: bool = False
    tls_cert_file: Path | None = None  # given server certificate (chain), instead of minting
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None  # the CA that signed tls_cert_file: what edges pin
    tls_hostnames: list[str] = Field(default_factory=list)  # extra names for the minted cert
    enroll_host: str | None = None  # default: grpc_host
    enroll_port: int = Field(default=7444, ge=0, le=65535)
    node_cert_days: int = Field(default=3650, ge=1)
    # A key to make the first admin key from (a mounted secret) instead of a random one.
    bootstrap_admin_key_file: Path | None = None
    # Bounds on hostile clients (docs/security.md).
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    http_body_idle_timeout_s: float = Field(default=60.0, gt=0)
    http_max_connections: int = Field(default=1000, ge=1)
    # A request body on /v1/* (the streamed artifact upload has max_artifact_bytes instead).
    http_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    audit_max_rows: int = Field(default=100_000, ge=10)  # the audit trail's retention bound
    grpc_max_message_bytes: int = Field(default=MAX_TUNNEL_MESSAGE_BYTES, ge=64 * 1024)
    grpc_max_concurrent_rpcs: int = Field(default=10_000, ge=1)
    enroll_rate_per_s: float = Field(default=1.0, gt=0)  # per client address
    enroll_burst: int = Field(default=10, ge=1)
    enroll_global_rate_per_s: float = Field(default=20.0, gt=0)


class BackoffSettings(BaseModel):
    initial_s: float = Field(default=0.5, gt=0)
    max_s: float = Field(default=30.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1.0)
    jitter: float = Field(default=0.5, ge=0, le=1)


class InspectionSettings(BaseModel):
    """The edge's ONNX inspection runtime (edge/inspection/runtime.py)."""

    # Tried in this order; those this onnxruntime build lacks are left out (CPU is the fallback).
    providers: list[str] = Field(
        default_factory=lambda: [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ]
    )
    intra_op_threads: int = Field(default=1, ge=1, le=64)
    # Requests waiting per model beyond this are refused (counted as "overloaded").
    max_queue: int = Field(default=10_000, ge=1)
    # ... and payload bytes waiting per model beyond this (10,000 camera frames would be GiBs).
    max_queue_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)


class MqttSettings(BaseModel):
    """The plant broker the edge ingests from (MQTT v5, persistent session, QoS 1)."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    # "3.1.1" only for brokers without MQTT 5 (the demo's embedded fallback broker).
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = None  # default: "fieldline-<node id>", fixed across restarts
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None  # read at start (a mounted secret); wins over password
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = Field(default=30, ge=5)
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    # Unacked messages the broker may send us at once; it holds the rest (back-pressure).
    receive_maximum: int = Field(default=1000, ge=1, le=65535)
    batch_max: int = Field(default=1000, ge=1)
    batch_window_ms: float = Field(default=20.0, ge=0)
    # At most the cloud's record bound: a larger message could be stored here but never synced.
    max_payload_bytes: int = Field(
        default=MAX_RECORD_PAYLOAD_BYTES, ge=1024, le=MAX_RECORD_PAYLOAD_BYTES
    )


class LLMSettings(BaseModel):
    """How the edge runs its LLM artifact in the engine (edge/llm/runtime.py)."""

    device: str = "auto"  # "auto": cuda when torch sees a GPU, else cpu
    # An LLM artifact's members, summed, when unpacked (free disk caps it too).
    max_unpacked_bytes: int = Field(default=MAX_LLM_UNPACKED_BYTES, ge=1024 * 1024)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp16 on cuda
    # KV cache budget in bytes (never a share of GPU memory: Jetsons share it with the CPU).
    kv_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    slo_itl_p95_ms: float | None = Field(default=None, gt=0)
    autotune: bool = True  # profile the device at load; off: the engine defaults
    max_model_len: int | None = Field(default=None, ge=2)
    # Requests of the old version may finish for this long after a swap; the rest are aborted.
    drain_timeout_s: float = Field(default=120.0, ge=0)


class GatewaySettings(BaseModel):
    """The local HTTP gateway (edge/gateway/app.py): OpenAI-compatible API, /v1/inspect, metrics."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)  # 0: any free port (see DATA/gateway.json)
    api_key: str | None = None  # set: /v1/* needs "Authorization: Bearer <api_key>"
    cache_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    cache_ttl_s: float = Field(default=3600.0, gt=0)
    prefetch_interval_s: float = Field(default=60.0, gt=0)
    hot_window_s: float = Field(default=3600.0, gt=0)  # "most requested" looks back this far
    hot_top_n: int = Field(default=16, ge=0, le=1024)
    default_max_tokens: int = Field(default=256, ge=1)  # chat requests without max_tokens
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _key_off_loopback(self) -> GatewaySettings:
        # Off loopback without a key, anyone on the plant network could publish verdicts.
        if self.enabled and not self.api_key and not is_loopback(self.host):
            raise ValueError(
                f"gateway.host {self.host} is reachable from the network, so gateway.api_key "
                "must be set (YAML gateway.api_key, or FIELDLINE_GATEWAY__API_KEY), or bind "
                "gateway.host to 127.0.0.1"
            )
        return self


def is_loopback(host: str) -> bool:
    """A host only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


class RetentionLimits(BaseModel):
    """This gateway's own upper bounds on the outbox, whatever the policy asks (its disk size
    is known here, not in the cloud). None leaves the policy's value."""

    max_rows: int | None = Field(default=None, ge=100)
    max_bytes: int | None = Field(default=None, ge=64 * 1024)
    keep_synced_s: float | None = Field(default=None, ge=0)


class EdgeSettings(FieldlineSettings):
    """The edge daemon: `fieldline edge run`."""

    data_dir: Path = Path("./fieldline-edge")
    cloud: str | None = None  # HOST:PORT of the cloud's tunnel server
    token: str | None = None  # enrollment token, needed only on the first start
    token_file: Path | None = None  # the token in a file (a mounted secret), if token is unset
    # The cloud's CA, when the token carries no pin (else the pinned CA from enrollment is kept).
    cloud_ca_file: Path | None = None
    # Enrollment listener HOST:PORT; default: the cloud's host and the port the token names.
    enroll: str | None = None
    # The name the cloud's certificate must carry, when it differs from the host dialed.
    tls_server_name: str | None = None
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    keepalive_s: float = Field(default=20.0, gt=0)
    reconnect: BackoffSettings = Field(default_factory=BackoffSettings)
    inspection: InspectionSettings = Field(default_factory=InspectionSettings)
    log_level: str = "info"
    # No broker configured: no ingestion (the node still installs and serves its artifacts).
    mqtt: MqttSettings | None = None
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    retention: RetentionLimits = Field(default_factory=RetentionLimits)
