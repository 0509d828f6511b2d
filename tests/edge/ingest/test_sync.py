"""Outbox sync over the real tunnel client to a real cloud (grpc.aio on loopback): batches go in
sequence order within the batch bounds with a window in flight, the cloud's ack marks rows synced,
a record the cloud refuses is a dead letter there while the rest is acked, a cloud restored from
an older backup gets back what it lost, and a reconnect resends at once from the cloud's mark."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fieldline.cli.harness.tcp_proxy import TcpProxy
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
    connected: asyncio.Event = field(default_factory=asyncio.Event)  # set on each Welcome
    acked_at_send: list[int] = field(default_factory=list)  # the acked mark as each batch left


@asynccontextmanager
async def edge_of(cloud: LocalCloud, tmp: Path, via: str | None = None) -> AsyncIterator[Link]:
    """An enrolled node's outbox and sync, wired to the tunnel as the data plane wires them;
    the tunnel dials `via` (a proxy) when given."""
    store = EdgeStore(tmp / "edge")
    credential = await cloud.enroll(store)
    connected = asyncio.Event()

    async def on_connected() -> None:
        connected.set()

    async def on_desired(push: pb.DesiredStatePush) -> None:
        return None

    tunnel = TunnelClient(
        EdgeSettings(data_dir=tmp / "edge"),
        via or cloud.address,
        credential,
        NodeInfo.of_this_host("test"),
        on_desired=on_desired,
        on_connected=on_connected,
    )
    outbox = Outbox(tmp / "edge")
    batches: list[list[int]] = []
    acked_at_send: list[int] = []

    def send(msg: pb.EdgeMessage) -> bool:
        batches.append([r.seq for r in msg.records.records])
        acked_at_send.append(sync.acked_seq)
        return tunnel.send(msg)

    sync = OutboxSync(outbox, send, lambda: Retention(keep_synced_s=3600), epoch=1)
    tunnel.records_epoch = lambda: sync.epoch
    tunnel.on_records_welcome = sync.on_welcome
    tunnel.on_records_ack = sync.on_ack
    task = asyncio.create_task(tunnel.run())
    await asyncio.wait_for(connected.wait(), CONNECT_S)
    try:
        yield Link(cloud, credential.node_id, outbox, sync, batches, connected, acked_at_send)
    finally:
        await tunnel.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        outbox.close()
        store.close()


@asynccontextmanager
async def linked(tmp: Path) -> AsyncIterator[Link]:
    async with local_cloud(tmp / "cloud") as cloud, edge_of(cloud, tmp) as link:
        yield link


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


def test_a_record_the_cloud_refuses_is_its_dead_letter_and_the_rest_is_acked(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        async with linked(tmp_path) as link:
            link.outbox.commit_batch(readings(3))
            # A row this outbox would refuse now, as an older edge version may have stored it.
            conn = sqlite3.connect(tmp_path / "edge" / DB_FILE)
            conn.execute(
                "INSERT INTO records (kind, topic, ts_ms, payload, size) VALUES (?, ?, ?, ?, ?)",
                ("alarm", "plant/a", 1, b"{}", 2),
            )
            conn.commit()
            conn.close()
            link.outbox.commit_batch(readings(2))
            assert await link.sync.run_once() == 6
            assert link.sync.unacked_batches == 0
            assert link.outbox.stats().unsynced == 0
            assert await cloud_seqs(link) == [1, 2, 3, 5, 6]
            page = await link.cloud.api("records", node=link.node_id, dead=True)
            assert [(d["seq"], d["kind"], d["size"], d["epoch"]) for d in page["dead"]] == [
                (4, "alarm", 2, 1)
            ]
            assert "kind 'alarm' is not one of" in page["dead"][0]["reason"]

    asyncio.run(run())


def test_a_window_of_batches_is_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_module, "BATCH_RECORDS", 10)

    async def run() -> None:
        async with linked(tmp_path) as link:
            link.outbox.commit_batch(readings(200))
            link.sync.window = 4
            assert await link.sync.run_once() == 200
            # The first four batches all went out before any ack (not one, waiting for it).
            assert link.acked_at_send[:4] == [0, 0, 0, 0]
            assert len(link.batches) == 20
            assert sorted(await cloud_seqs(link)) == list(range(1, 201))

    asyncio.run(run())


def test_a_cloud_restored_from_an_older_backup_gets_back_what_it_lost(tmp_path: Path) -> None:
    async def run() -> None:
        backup = tmp_path / "backup.db"
        async with local_cloud(tmp_path / "cloud") as cloud:
            port = cloud.server.grpc_port
            async with edge_of(cloud, tmp_path) as link:
                link.outbox.commit_batch(readings(1000))
                assert await link.sync.run_once() == 1000
                # A backup at mark 1000 (SQLite's online backup, as `fieldline cloud backup`).
                src = sqlite3.connect(tmp_path / "cloud" / "cloud.db")
                dst = sqlite3.connect(backup)
                src.backup(dst)
                src.close()
                dst.close()
                link.outbox.commit_batch(readings(5000))
                assert await link.sync.run_once() == 5000
                await cloud.server.stop()
                # Restored: the cloud now holds 1-1000 while the edge marked 1-6000 synced.
                for suffix in ("", "-wal", "-shm"):
                    (tmp_path / "cloud" / f"cloud.db{suffix}").unlink(missing_ok=True)
                backup.rename(tmp_path / "cloud" / "cloud.db")
                link.connected.clear()
                async with local_cloud(tmp_path / "cloud", grpc_port=port) as restored:
                    link.cloud = restored
                    await asyncio.wait_for(link.connected.wait(), CONNECT_S)
                    assert link.outbox.stats().unsynced == 5000
                    assert await link.sync.run_once() == 5000
                    seqs = await cloud_seqs(link)
                    assert seqs == list(range(1, 6001))  # all of them, each once
                    assert link.sync.resent_rows == 5000

    asyncio.run(run())


def test_a_reconnect_resends_at_once_from_the_cloud_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sync_module, "BATCH_RECORDS", 100)

    async def run() -> None:
        async with local_cloud(tmp_path / "cloud") as cloud:
            proxy = TcpProxy(("127.0.0.1", cloud.server.grpc_port)).start()
            try:
                async with edge_of(cloud, tmp_path, f"127.0.0.1:{proxy.port}") as link:
                    link.outbox.commit_batch(readings(20_000))
                    drain = asyncio.create_task(link.sync.run_once(max_batches=1000))
                    while link.sync.acked_seq == 0:
                        await asyncio.sleep(0.002)
                    # The link dies with a window of batches sent and not acked.
                    proxy.cut()
                    link.connected.clear()
                    cut_at = link.sync.acked_seq
                    await asyncio.sleep(0.5)
                    proxy.restore()
                    await asyncio.wait_for(link.connected.wait(), CONNECT_S)
                    back_at = asyncio.get_running_loop().time()
                    # Far sooner than ACK_TIMEOUT_S: the Welcome restarts the drain from its mark.
                    assert await asyncio.wait_for(drain, 10) > 0
                    assert asyncio.get_running_loop().time() - back_at < 5
                    assert cut_at < 20_000
                    assert link.outbox.stats().unsynced == 0
                    assert await cloud_seqs(link) == list(range(1, 20_001))
                    assert link.sync.unacked_batches == 0
            finally:
                proxy.stop()

    asyncio.run(run())


def test_after_an_outage_new_records_go_first_and_the_backlog_drains_behind(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        async with linked(tmp_path) as link:
            link.outbox.commit_batch(readings(30_000))  # the backlog of an outage
            link.sync.backfill_rate = lambda: 10_000.0  # 3 s of backfill
            drain = asyncio.create_task(link.sync.run_once(max_batches=1000))
            await asyncio.sleep(0.5)
            stored_at = asyncio.get_running_loop().time()
            (seq,) = await asyncio.to_thread(
                link.outbox.commit_batch, [NewRecord("verdict", "plant/v", 1, b'{"ok": 1}')]
            )
            page: dict = {}
            while not page.get("records"):
                page = await link.cloud.api("records", node=link.node_id, kind="verdict")
            latency = asyncio.get_running_loop().time() - stored_at
            assert page["records"][0]["seq"] == seq and page["records"][0]["live"]
            backlog_then = link.outbox.stats().unsynced
            assert backlog_then > 10_000, "the verdict did not wait for the backlog"
            # What the heartbeat reports (DataPlaneHealth.sync_backlog, sync_live_lag_ms).
            backlog, live_lag = await asyncio.to_thread(link.sync.lag)
            assert backlog > 5_000 and live_lag is None  # the new one is in, the backlog not
            assert latency < 1.5
            assert await drain == 30_001
            assert await cloud_seqs(link) == list(range(1, 30_002))
            assert link.sync.live_records == 1 and not link.sync.behind
            assert await asyncio.to_thread(link.sync.lag) == (0, None)
            # The cloud's mark passes the live record with the next batch in sequence order.
            link.outbox.commit_batch(readings(1))
            assert await link.sync.run_once() == 1
            node = await link.cloud.api("get_node", link.node_id)
            assert node["synced_seq"] == 30_002

    asyncio.run(run())


def test_a_backlog_sends_its_verdicts_before_its_telemetry(tmp_path: Path) -> None:
    async def run() -> None:
        async with linked(tmp_path) as link:
            link.outbox.commit_batch(readings(15_000))
            (old_verdict,) = link.outbox.commit_batch([NewRecord("verdict", "plant/v", 1, b"{}")])
            link.outbox.commit_batch(readings(15_000))
            link.sync.backfill_rate = lambda: 5_000.0
            drain = asyncio.create_task(link.sync.run_once(max_batches=1000))
            page: dict = {}
            while not page.get("records"):
                page = await link.cloud.api("records", node=link.node_id, kind="verdict")
            # The verdict in the middle of the backlog is in while most telemetry still waits.
            assert page["records"][0]["seq"] == old_verdict
            assert link.outbox.stats().unsynced > 15_000
            assert await drain == 30_001
            assert await cloud_seqs(link) == list(range(1, 30_002))

    asyncio.run(run())
