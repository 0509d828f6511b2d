"""The edge's tunnel client against a real cloud (grpc.aio on loopback): it connects, its
heartbeat carries a NodeHealth the cloud stores and serves, it reconnects after the cloud
restarts on the same port, and it gives up a blackholed stream within keepalive + timeout."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from fieldline.cli.harness.tcp_proxy import TcpProxy
from fieldline.edge.control import tunnel as tunnel_module
from fieldline.edge.control.tunnel import TunnelClient
from fieldline.edge.store import EdgeStore
from fieldline.shared.clock import utcnow
from fieldline.shared.config import BackoffSettings, EdgeSettings
from fieldline.shared.health import DataPlaneHealth, NodeHealth, OutboxHealth
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.schemas import NodeInfo
from tests.support.local_cloud import LocalCloud, local_cloud
from tests.support.polling import until

CONNECT_S = 15


def beat(tunnel: TunnelClient, rows: int) -> NodeHealth:
    health = NodeHealth(
        tunnel=tunnel.health(),
        dataplane=DataPlaneHealth(outbox=OutboxHealth(rows=rows, last_seq=rows)),
        reported_at=utcnow(),
    )
    tunnel.heartbeat(health.model_dump_json())
    return health


async def stored_health(cloud: LocalCloud, node_id: str) -> NodeHealth | None:
    node = await cloud.api("get_node", node_id)
    return NodeHealth.model_validate(node["health"]) if node.get("health") else None


async def scenario(tmp: Path) -> None:
    store = EdgeStore(tmp / "edge")
    connected = asyncio.Event()
    generations: list[int] = []

    async def on_connected() -> None:
        connected.set()

    async def on_desired(push: pb.DesiredStatePush) -> None:
        generations.append(push.generation)

    settings = EdgeSettings(
        data_dir=tmp / "edge", reconnect=BackoffSettings(initial_s=0.1, max_s=0.5)
    )
    async with local_cloud(tmp / "cloud") as cloud:
        credential = await cloud.enroll(store)
        port = cloud.server.grpc_port
        tunnel = TunnelClient(
            settings,
            cloud.address,
            credential,
            NodeInfo.of_this_host("test"),
            on_desired=on_desired,
            on_connected=on_connected,
        )
        task = asyncio.create_task(tunnel.run())
        await asyncio.wait_for(connected.wait(), CONNECT_S)
        assert tunnel.health().connected
        assert generations, "the cloud pushes the desired state right after the welcome"

        sent = beat(tunnel, rows=7)
        got = await until(
            lambda: stored_health(cloud, credential.node_id), 10, "the heartbeat's health stored"
        )
        assert got.dataplane is not None and got.dataplane.outbox.rows == 7
        assert got.reported_at == sent.reported_at
        await until(lambda: tunnel.health().rtt_ms is not None, 10, "the heartbeat's ack")

    await until(lambda: not tunnel.health().connected, 10, "the tunnel to see the cloud gone")
    connected.clear()
    async with local_cloud(tmp / "cloud", grpc_port=port) as cloud:
        await asyncio.wait_for(connected.wait(), CONNECT_S)
        beat(tunnel, rows=11)
        got = await until(
            lambda: _rows(cloud, credential.node_id, 11), 10, "a heartbeat after the restart"
        )
        assert got
    await tunnel.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    store.close()


async def _rows(cloud: LocalCloud, node_id: str, rows: int) -> bool:
    health = await stored_health(cloud, node_id)
    return (
        health is not None and health.dataplane is not None and health.dataplane.outbox.rows == rows
    )


def test_connect_heartbeat_and_reconnect_after_the_cloud_restarts(tmp_path: Path) -> None:
    asyncio.run(scenario(tmp_path))


def test_a_blackholed_tunnel_with_heartbeats_only_reconnects_within_keepalive_and_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tunnel_module, "KEEPALIVE_TIMEOUT_S", 2.0)
    keepalive_s = 3.0

    async def run() -> None:
        store = EdgeStore(tmp_path / "edge")
        connects = 0
        connected = asyncio.Event()

        async def on_connected() -> None:
            nonlocal connects
            connects += 1
            connected.set()

        async def on_desired(push: pb.DesiredStatePush) -> None:
            return None

        settings = EdgeSettings(
            data_dir=tmp_path / "edge",
            keepalive_s=keepalive_s,
            heartbeat_interval_s=1.0,
            reconnect=BackoffSettings(initial_s=0.1, max_s=0.5),
        )
        async with local_cloud(tmp_path / "cloud") as cloud:
            credential = await cloud.enroll(store)
            proxy = TcpProxy(("127.0.0.1", cloud.server.grpc_port)).start()
            tunnel = TunnelClient(
                settings,
                f"127.0.0.1:{proxy.port}",
                credential,
                NodeInfo.of_this_host("test"),
                on_desired=on_desired,
                on_connected=on_connected,
            )
            task = asyncio.create_task(tunnel.run())

            async def heartbeats() -> None:
                while True:
                    beat(tunnel, rows=1)
                    await asyncio.sleep(settings.heartbeat_interval_s)

            beats = asyncio.create_task(heartbeats())
            try:
                await asyncio.wait_for(connected.wait(), CONNECT_S)
                proxy.blackhole()  # bytes stop both ways; every socket stays open
                holed = time.monotonic()
                await until(lambda: not tunnel.connected, 30, "the tunnel to give the stream up")
                noticed = time.monotonic() - holed
                assert noticed <= keepalive_s + tunnel_module.KEEPALIVE_TIMEOUT_S + 5, noticed
                proxy.unblackhole()
                connected.clear()
                await asyncio.wait_for(connected.wait(), CONNECT_S)
                assert connects == 2
            finally:
                beats.cancel()
                await tunnel.stop()
                task.cancel()
                await asyncio.gather(task, beats, return_exceptions=True)
                proxy.stop()
                store.close()

    asyncio.run(run())
