"""What each part of an edge reports about itself, and the `NodeHealth` every heartbeat carries.

The parts return these objects; the agent composes them into one NodeHealth; the cloud
validates, stores and serves that same type (GET /v1/nodes), and the CLI renders it. One
window and one p95 definition serve every gate figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from fieldline.shared.clock import utcnow

# The window behind every "last window" figure (error rate, p95 latency) on the edge.
HEALTH_WINDOW_S = 60.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) by the nearest-rank method, a value that occurred; None if
    empty. Every percentile the edge reports (gates, Prometheus summaries, the SLO) is this one."""
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])


def p95(values: Sequence[float]) -> float | None:
    """The 95th percentile (nearest rank) of `values`; None if empty."""
    return percentile(values, 0.95)


class ModelHealth(BaseModel):
    """One active model on an edge: whether it loaded, and how it served over the last window.

    Rollout health gates read this; `loaded` is False with `error` set when the version failed
    to load. A model no inspection rule uses is still load-checked (`serving` False).
    """

    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=128)
    version: str | None = Field(default=None, max_length=128)
    kind: str = Field(default="onnx", max_length=16)
    loaded: bool = False
    serving: bool = False
    requests: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    window_s: float = Field(default=HEALTH_WINDOW_S, ge=0)
    window_requests: int = Field(default=0, ge=0)
    window_errors: int = Field(default=0, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    p95_latency_ms: float | None = Field(default=None, ge=0)
    error: str | None = Field(default=None, max_length=2000)


class LocalRollback(BaseModel):
    """An edge returned a model to its previous version by itself (the policy allowed it)."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=128)
    from_version: str = Field(max_length=128)
    to_version: str = Field(max_length=128)
    sha256: str = Field(max_length=64)
    reason: str = Field(max_length=2000)
    at: datetime = Field(default_factory=utcnow)


class _Part(BaseModel):
    # Newer edges may report more; an older cloud keeps what it knows.
    model_config = ConfigDict(extra="ignore")


class TunnelHealth(_Part):
    connected: bool = False
    rtt_ms: float | None = Field(default=None, ge=0)


class OutboxHealth(_Part):
    rows: int = Field(default=0, ge=0)
    bytes: int = Field(default=0, ge=0)
    unsynced: int = Field(default=0, ge=0)
    dropped: int = Field(default=0, ge=0)
    dead_letters: int = Field(default=0, ge=0)
    last_seq: int = Field(default=0, ge=0)
    synced_seq: int = Field(default=0, ge=0)
    epoch: int = Field(default=0, ge=0)  # the outbox's sequence space (a new outbox.db: the next)
    # Rows the cloud lost (its mark went back) that retention had already pruned here.
    sync_gap: int = Field(default=0, ge=0)


class MqttHealth(_Part):
    configured: bool = False
    connected: bool = False
    stored: int = Field(default=0, ge=0)
    dead_lettered: int = Field(default=0, ge=0)  # refused ones included
    # Dead-lettered because the cloud would refuse them as records (shared/limits.py).
    refused: int = Field(default=0, ge=0)
    duplicates: int = Field(default=0, ge=0)  # redeliveries acked without storing them again
    # The outbox is full (of verdicts and events, or its disk is): acks wait for room.
    backpressure: bool = False
    connect_failures: int = Field(default=0, ge=0)  # failed attempts to reach the broker


class InspectionModelHealth(_Part):
    """One inspection model's session as the runtime sees it."""

    loaded: bool = False
    version: str | None = Field(default=None, max_length=128)
    providers: list[str] = Field(default_factory=list, max_length=16)
    requests: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    inferences: int = Field(default=0, ge=0)
    queue_depth: int = Field(default=0, ge=0)
    window_s: float = Field(default=HEALTH_WINDOW_S, ge=0)
    window_requests: int = Field(default=0, ge=0)
    window_errors: int = Field(default=0, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    p95_latency_ms: float | None = Field(default=None, ge=0)
    error: str | None = Field(default=None, max_length=2000)


class DataPlaneHealth(_Part):
    outbox: OutboxHealth = Field(default_factory=OutboxHealth)
    mqtt: MqttHealth = Field(default_factory=MqttHealth)
    inspection: dict[str, InspectionModelHealth] = Field(default_factory=dict, max_length=256)
    verdicts_published: int = Field(default=0, ge=0)
    defects: int = Field(default=0, ge=0)
    # Not stored: the outbox stayed full, or the cloud would refuse the record (edge log says).
    verdicts_dropped: int = Field(default=0, ge=0)
    events_dropped: int = Field(default=0, ge=0)
    # Record batches the cloud did not ack in time (sent again from its mark on the next run).
    sync_unacked_batches: int = Field(default=0, ge=0)
    # Rows still to sync behind the live lane (0 when sync keeps up), and how old the oldest
    # record not yet in the cloud is, backlog aside (None: everything new is in the cloud).
    sync_backlog: int = Field(default=0, ge=0)
    sync_live_lag_ms: float | None = Field(default=None, ge=0)


class EngineConfigReport(_Part):
    """The engine configuration an LLM serves with (after autotune)."""

    dtype: str = Field(default="float32", max_length=32)
    device: str = Field(default="cpu", max_length=32)
    attention_backend: str = Field(default="auto", max_length=32)
    block_size: int = Field(default=16, ge=1)
    num_blocks: int | None = Field(default=None, ge=1)
    kv_cache_bytes: int | None = Field(default=None, ge=1)
    max_num_seqs: int = Field(default=1, ge=1)
    max_num_batched_tokens: int = Field(default=1, ge=1)
    max_prefill_chunk: int = Field(default=1, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool = True
    slo_itl_p95_ms: float | None = Field(default=None, gt=0)


class LlmHealth(_Part):
    """The served LLM: state is serving, loading, failed or none."""

    state: str = Field(default="none", max_length=16)
    loaded: bool = False
    model: str | None = Field(default=None, max_length=128)
    version: str | None = Field(default=None, max_length=128)
    loading: bool = False
    loading_ref: str | None = Field(default=None, max_length=260)  # name@version being loaded
    error: str | None = Field(default=None, max_length=2000)
    inflight: int = Field(default=0, ge=0)
    retiring: int = Field(default=0, ge=0)
    engine_config: EngineConfigReport | None = None
    chat_template: str | None = Field(default=None, max_length=16)  # checkpoint or default


class CacheHealth(_Part):
    entries: int = Field(default=0, ge=0)
    bytes: int = Field(default=0, ge=0)
    hits: int = Field(default=0, ge=0)
    misses: int = Field(default=0, ge=0)
    prefetches: int = Field(default=0, ge=0)


class PrefetchHealth(_Part):
    """The last prefetch run."""

    model: str | None = Field(default=None, max_length=128)
    prompts_warmed: int = Field(default=0, ge=0)
    prompts_fresh: int = Field(default=0, ge=0)
    prefixes_warmed: int = Field(default=0, ge=0)
    prefixes_fresh: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)


class GatewayHealth(_Part):
    """The local HTTP gateway and the LLM services behind it."""

    listening: int | None = Field(default=None, ge=0, le=65535)  # the bound port
    error: str | None = Field(default=None, max_length=2000)
    cache: CacheHealth = Field(default_factory=CacheHealth)
    prefetch: PrefetchHealth | None = None
    explanations_published: int = Field(default=0, ge=0)


class NodeHealth(_Part):
    """The health summary every heartbeat carries: per-model health (what rollout gates read),
    local rollbacks, and each part of the node. A part the node does not run is None."""

    models: dict[str, ModelHealth] = Field(default_factory=dict, max_length=256)
    local_rollbacks: list[LocalRollback] = Field(default_factory=list, max_length=256)
    tunnel: TunnelHealth | None = None
    dataplane: DataPlaneHealth | None = None
    llm: LlmHealth | None = None
    gateway: GatewayHealth | None = None
    # A part whose report failed: its name and the error, so a broken part is seen, not hidden.
    part_errors: dict[str, str] = Field(default_factory=dict, max_length=32)
    reported_at: datetime | None = None
