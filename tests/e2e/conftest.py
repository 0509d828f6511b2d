"""Fixtures for end-to-end tests: a cloud and edge daemons as real child processes."""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fieldline.cli.admin_client import AdminClient
from fieldline.cli.harness.processes import (
    Child,
    ProcessStack,
    cloud_url,
    fieldline_cmd,
    start_cloud,
    start_edge,
)
from tests.support.polling import wait_until

# Short reconnect backoff so tests see reconnection within seconds.
EDGE_ENV = {
    "FIELDLINE_RECONNECT__INITIAL_S": "0.2",
    "FIELDLINE_RECONNECT__MAX_S": "1.0",
    "FIELDLINE_HEARTBEAT_INTERVAL_S": "1.0",
    # Each edge's gateway on a free port (DATA/gateway.json says which), so edges never collide.
    "FIELDLINE_GATEWAY__PORT": "0",
}
CLOUD_ENV = {"FIELDLINE_OFFLINE_AFTER_S": "5", "FIELDLINE_ROLLOUT_TICK_S": "0.3"}

__all__ = ["CLOUD_ENV", "EDGE_ENV", "Fleet", "edge_status", "sha256_file", "wait_until"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def edge_status(data_dir: Path) -> dict[str, Any]:
    out = subprocess.run(
        fieldline_cmd("edge", "status", "--data", str(data_dir), "--json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@dataclass
class Fleet:
    root: Path
    stack: ProcessStack
    cloud: Child | None = None
    ports: dict[str, int] = field(default_factory=dict)
    key: str = ""
    edges: dict[str, Child] = field(default_factory=dict)
    tls: bool = False

    @property
    def url(self) -> str:
        return cloud_url(self.root / "cloud", self.ports)

    @property
    def ca_file(self) -> str | None:
        """The cloud's CA certificate when it runs with TLS (what the admin client trusts)."""
        return str(self.root / "cloud" / "tls" / "ca.crt") if self.tls else None

    def admin(self) -> AdminClient:
        return AdminClient(self.url, self.key, ca_file=self.ca_file)

    def start_cloud(self, *, same_ports: bool = False) -> None:
        http = self.ports.get("http", 0) if same_ports else 0
        grpc = self.ports.get("grpc", 0) if same_ports else 0
        enroll = self.ports.get("enroll", 0) if same_ports else 0
        self.cloud, self.ports = start_cloud(
            self.stack,
            self.root / "cloud",
            env=CLOUD_ENV,
            http_port=http,
            grpc_port=grpc,
            tls=self.tls,
            enroll_port=enroll,
        )
        self.key = (self.root / "cloud" / "admin.key").read_text().strip()

    def start_edge(self, name: str, token: str | None = None) -> Child:
        child = start_edge(
            self.stack, self.root / name, self.ports["grpc"], token=token, name=name, env=EDGE_ENV
        )
        self.edges[name] = child
        return child

    def enroll_edge(self, name: str, labels: dict[str, str]) -> Child:
        with self.admin() as admin:
            token = admin.create_token(labels)["token"]
        return self.start_edge(name, token)

    def node_of(self, name: str) -> dict[str, Any]:
        """The API's view of the node an edge process enrolled as."""
        node_id = edge_status(self.root / name)["node_id"]
        with self.admin() as admin:
            return admin.get_node(node_id)

    def metric(self, name: str) -> float:
        import httpx

        verify = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
        text = httpx.get(f"{self.url}/metrics", timeout=10, verify=verify).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with ProcessStack() as stack:
        f = Fleet(root=tmp_path, stack=stack)
        f.start_cloud()
        yield f


@pytest.fixture
def tls_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A cloud with --tls (minted CA): HTTPS admin API, mutual-TLS tunnel, TLS enrollment."""
    with ProcessStack() as stack:
        f = Fleet(root=tmp_path, stack=stack, tls=True)
        f.start_cloud()
        yield f
