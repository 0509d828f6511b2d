"""The cloud's Prometheus metrics, in a registry per server so two servers in one process never clash."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class CloudMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.tunnels = Gauge(
            "fieldline_cloud_tunnels_connected", "Edge tunnels connected now.", registry=r
        )
        self.enrollments = Counter(
            "fieldline_cloud_enrollments", "Enrollment attempts by result.", ["result"], registry=r
        )
        self.uploads = Counter(
            "fieldline_cloud_artifact_uploads",
            "Artifact uploads by result.",
            ["result"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "fieldline_cloud_artifact_bytes_sent",
            "Artifact bytes sent to edges by FetchArtifact.",
            registry=r,
        )
        self.audit_failures = Counter(
            "fieldline_cloud_audit_failures", "Audit entries that could not be written.", registry=r
        )
        self.desired_pushes = Counter(
            "fieldline_cloud_desired_pushes",
            "Desired states pushed to connected edges.",
            registry=r,
        )
        self.heartbeats = Counter(
            "fieldline_cloud_heartbeats", "Heartbeats received from edges.", registry=r
        )
        self.records = Counter(
            "fieldline_cloud_records_ingested",
            "Records stored from edges (duplicates excluded).",
            registry=r,
        )
        self.records_refused = Counter(
            "fieldline_cloud_records_refused",
            "Records refused one by one and kept as dead letters (GET /v1/records?dead=true).",
            registry=r,
        )
        self.tunnel_errors = Counter(
            "fieldline_cloud_tunnel_errors",
            "Tunnel messages refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.http_requests = Histogram(
            "fieldline_cloud_http_request_seconds",
            "Admin API latency.",
            ["route", "status"],
            registry=r,
        )
        self.http_slow_clients = Counter(
            "fieldline_cloud_http_slow_clients",
            "HTTP connections closed for slow headers or a stalled body.",
            ["reason"],
            registry=r,
        )
