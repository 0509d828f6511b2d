"""Outbox sync over the real tunnel client to a real cloud (grpc.aio on loopback): batches go in
sequence order within the batch bounds, the cloud's ack marks rows synced, and a batch the cloud
refuses leaves its rows unsynced, counted, to be sent again."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fieldline.edge.control.tunnel import TunnelClient
from fieldline.edge.ingest import sync as sync_module
from fieldline.edge.ingest.outbox import DB_FILE, NewRecord, Outbox
from fieldline.edge.ingest.sync import OutboxSync
from fieldline.edge.store import EdgeStore
from fieldline.shared.config import EdgeSettings
from fieldline.shared.limits import MAX_BATCH_PAYLOAD_BYTES, MIB
from fieldline.shared.policy import Retention
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.schemas import NodeInfo
from tests.support.local_cloud import LocalCloud, local_cloud

CONNECT_S = 15


@dataclass
class Link:
    cloud: LocalCloud
    node_id: str
    outbox: Outbox
    sync: OutboxSync
    batches: list[list[int]] = field(default_factory=list)  # the seqs of each batch sent


@asynccontextmanager
async def linked(tmp: Path) -> AsyncIterator[Link]:
    """An enrolled node's outbox and sync, wired to the tunnel as the data plane wires them."""
    async with local_cloud(tmp / "cloud") as cloud:
        store = EdgeStore(tmp / "edge")
        credential = await cloud.enroll(store)
        connected = asyncio.Event()

        async def on_connected() -> None:
            connected.set()

        async def on_desired(push: pb.DesiredStatePush) -> None:
            return None

        tunnel = TunnelClient(
            EdgeSettings(data_dir=tmp / "edge"),
            cloud.address,
            credential,
            NodeInfo.of_this_host("test"),
            on_desired=on_desired,
            on_connected=on_connected,
        )
        outbox = Outbox(tmp / "edge")
        batches: list[list[int]] = []

        def send(msg: pb.EdgeMessage) -> bool:
            batches.append([r.seq for r in msg.records.records])
            return tunnel.send(msg)

        sync = OutboxSync(outbox, send, lambda: Retention(keep_synced_s=3600))
        tunnel.on_records_ack = sync.on_ack
        task = asyncio.create_task(tunnel.run())
        await asyncio.wait_for(connected.wait(), CONNECT_S)
        try:
            yield Link(cloud, credential.node_id, outbox, sync, batches)
        finally:
            await tunnel.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            outbox.close()
            store.close()


async def cloud_seqs(link: Link) -> list[int]:
    """Every record seq the cloud serves for this node, through the admin API's pages."""
    seqs: list[int] = []
    cursor = None
    while True:
        page = await link.cloud.api("records", node=link.node_id, limit=1000, cursor=cursor)
        seqs += [r["seq"] for r in page["records"]]
        cursor = page.get("next_cursor")
        if not cursor:
            return seqs


def readings(n: int, size: int = 20) -> list[NewRecord]:
    return [
        NewRecord("telemetry", "plant/t", 1_700_000_000_000 + i, b"%0*d" % (size, i))
        for i in range(n)
    ]


def test_batches_in_sequence_order_and_the_ack_marks_rows_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sync_module, "BATCH_RECORDS", 100)

    async def run() -> None:
        async with linked(tmp_path) as link:
            link.outbox.commit_batch(readings(350))
            # Big records: a batch stops before it would pass MAX_BATCH_PAYLOAD_BYTES.
            big = MAX_BATCH_PAYLOAD_BYTES // 4
            assert big <= MIB  # what this cloud stores per record
            link.outbox.commit_batch([NewRecord("verdict", "plant/v", 1, b"7" * big)] * 6)
            assert await link.sync.run_once() == 356
            # The 4th batch: the last 50 readings and 3 big ones (a 4th would pass the bound).
            assert [len(b) for b in link.batches] == [100, 100, 100, 53, 3]
            sent = [seq for batch in link.batches for seq in batch]
            assert sent == list(range(1, 357))
            stats = link.outbox.stats()
            assert (stats.unsynced, stats.synced_seq) == (0, 356)
            assert sorted(await cloud_seqs(link)) == list(range(1, 357))
            assert await link.sync.run_once() == 0  # nothing left to send

    asyncio.run(run())


def test_a_batch_the_cloud_refuses_stays_unsynced_and_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sync_module, "ACK_TIMEOUT_S", 1.0)

    async def run() -> None:
        async with linked(tmp_path) as link:
            link.outbox.commit_batch(readings(3))
            # A row this outbox would refuse now, as an older edge version may have stored it:
            # the cloud refuses the whole batch and acks nothing.
            conn = sqlite3.connect(tmp_path / "edge" / DB_FILE)
            conn.execute(
                "INSERT INTO records (kind, topic, ts_ms, payload, size) VALUES (?, ?, ?, ?, ?)",
                ("alarm", "plant/a", 1, b"{}", 2),
            )
            conn.commit()
            conn.close()
            assert await link.sync.run_once() == 0
            assert link.sync.unacked_batches == 1
            assert link.outbox.stats().unsynced == 4
            assert await cloud_seqs(link) == []
            # Sent again from the cloud's mark on the next run, and counted again.
            assert await link.sync.run_once() == 0
            assert link.batches == [[1, 2, 3, 4], [1, 2, 3, 4]]
            assert link.sync.unacked_batches == 2

    asyncio.run(run())
