"""Prometheus metrics of the gateway's HTTP side: requests by route and status, client disconnects.

The names (fieldline_gateway_requests, fieldline_gateway_client_disconnects) are kept as they
are: deploy/'s alert rules and dashboards use them. The LLM's metrics are in edge/llm/metrics.py.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class GatewayMetrics:
    """The HTTP counters, in their own registry (/metrics shows it with the LLM's)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fieldline_gateway_requests",
            "Gateway requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.disconnects = Counter(
            "fieldline_gateway_client_disconnects",
            "Requests aborted because the client went away",
            registry=self.registry,
        )
