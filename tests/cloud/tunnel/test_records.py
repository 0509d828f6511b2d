"""Record batches into a real cloud store: the shared limits, records refused one by one as dead
letters while the rest is stored and the mark acked, idempotent inserts, outbox epochs, and the
migration of a store from before epochs."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from fieldline.cloud.context import CloudContext, open_context
from fieldline.cloud.store import nodes as node_store
from fieldline.cloud.store import records as record_store
from fieldline.cloud.tunnel.records import RecordRefused
from fieldline.shared.config import CloudSettings
from fieldline.shared.limits import MAX_BATCH_RECORDS, MAX_RECORD_PAYLOAD_BYTES, MAX_TOPIC_CHARS
from fieldline.shared.proto import tunnel_pb2 as pb

NODE = "node_records"


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[CloudContext]:
    ctx = open_context(CloudSettings(data_dir=tmp_path / "cloud"))
    node_store.create_node(ctx.db, node_id=NODE, secret="s", labels={})
    yield ctx
    ctx.close()


def record(seq: int, payload: bytes = b'{"t": 21.5}', kind: str = "telemetry") -> pb.Record:
    return pb.Record(
        seq=seq, kind=kind, topic="plant/line7/temp", ts_ms=1000 + seq, payload=payload
    )


def test_a_record_at_the_shared_limit_is_stored_and_read_back(ctx: CloudContext) -> None:
    big = b"\xff" * MAX_RECORD_PAYLOAD_BYTES  # a camera frame at the edge's own bound
    done = ctx.records.ingest(NODE, pb.RecordBatch(records=[record(1), record(2, big)]))
    assert (done.high_water_seq, done.stored, done.refused) == (2, 2, 0)
    rows = record_store.query_records(ctx.db, node_id=NODE)
    assert [(r.seq, len(r.payload)) for r in rows] == [(1, 11), (2, MAX_RECORD_PAYLOAD_BYTES)]
    assert rows[0].topic == "plant/line7/temp" and rows[0].ts_ms == 1001


def test_a_poison_record_is_a_dead_letter_and_the_rest_is_stored_and_acked(
    ctx: CloudContext,
) -> None:
    size = MAX_RECORD_PAYLOAD_BYTES + 1
    batch = pb.RecordBatch(
        records=[record(1), record(2, b"x" * size), record(3, kind="metric"), record(4)]
    )
    done = ctx.records.ingest(NODE, batch)
    assert (done.high_water_seq, done.stored, done.refused) == (4, 2, 2)
    assert [r.seq for r in record_store.query_records(ctx.db, node_id=NODE)] == [1, 4]
    assert node_store.get_node(ctx.db, node_id=NODE).synced_seq == 4
    dead = record_store.query_dead_records(ctx.db, node_id=NODE)
    assert [(d.seq, d.kind, d.size) for d in dead] == [(2, "telemetry", size), (3, "metric", 11)]
    assert dead[0].reason == (
        f"payload of {size} bytes exceeds the record limit of {MAX_RECORD_PAYLOAD_BYTES} bytes"
    )
    assert dead[1].reason == "kind 'metric' is not one of event, telemetry, verdict"
    # Sent again (a reconnect before the ack arrived): nothing stored or dead-lettered twice.
    assert ctx.records.ingest(NODE, batch).high_water_seq == 4
    assert record_store.count_records(ctx.db, node_id=NODE) == 2
    assert len(record_store.query_dead_records(ctx.db, node_id=NODE)) == 2


def test_a_batch_with_a_seq_below_1_is_refused(ctx: CloudContext) -> None:
    with pytest.raises(RecordRefused, match="start at 1"):
        ctx.records.ingest(NODE, pb.RecordBatch(records=[record(0)]))


def test_a_batch_over_the_record_limit_is_refused(ctx: CloudContext) -> None:
    batch = pb.RecordBatch(records=[record(i + 1) for i in range(MAX_BATCH_RECORDS + 1)])
    with pytest.raises(RecordRefused, match=f"exceeds the limit of {MAX_BATCH_RECORDS}"):
        ctx.records.ingest(NODE, batch)


def test_resent_batches_are_stored_once_and_long_topics_kept_as_prefix(ctx: CloudContext) -> None:
    long_topic = pb.Record(seq=3, kind="event", topic="t" * 600, ts_ms=1, payload=b"{}")
    batch = pb.RecordBatch(records=[record(1), record(2), long_topic])
    assert ctx.records.ingest(NODE, batch).high_water_seq == 3
    assert ctx.records.ingest(NODE, batch).high_water_seq == 3
    rows = record_store.query_records(ctx.db, node_id=NODE)
    assert [r.seq for r in rows] == [1, 2, 3]
    assert rows[2].topic == "t" * MAX_TOPIC_CHARS


def test_a_new_outbox_epoch_is_a_new_sequence_space(ctx: CloudContext) -> None:
    ctx.records.ingest(NODE, pb.RecordBatch(records=[record(1), record(2)], epoch=1))
    # outbox.db recreated: sequences start at 1 again, in epoch 2; nothing is ignored.
    assert record_store.start_epoch(ctx.db, node_id=NODE, epoch=2) == 0
    done = ctx.records.ingest(NODE, pb.RecordBatch(records=[record(1)], epoch=2))
    assert (done.high_water_seq, done.stored) == (1, 1)
    rows = record_store.query_records(ctx.db, node_id=NODE)
    assert [(r.epoch, r.seq) for r in rows] == [(1, 1), (1, 2), (2, 1)]
    assert record_store.synced_seq(ctx.db, node_id=NODE, epoch=1) == 2
    assert node_store.get_node(ctx.db, node_id=NODE).synced_seq == 1


def test_a_store_from_before_epochs_is_migrated_to_epoch_0(tmp_path: Path) -> None:
    path = tmp_path / "cloud" / "cloud.db"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE nodes (id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, labels TEXT NOT NULL,"
        " node_info TEXT NOT NULL DEFAULT '{}', created TEXT NOT NULL, last_seen TEXT,"
        " desired_generation INTEGER NOT NULL DEFAULT 0, desired TEXT,"
        " applied_generation INTEGER NOT NULL DEFAULT 0, observed TEXT, health TEXT,"
        " synced_seq INTEGER NOT NULL DEFAULT 0);"
        "CREATE TABLE records (node_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,"
        " topic TEXT NOT NULL, ts_ms INTEGER NOT NULL, payload BLOB NOT NULL,"
        " received_ms INTEGER NOT NULL, PRIMARY KEY (node_id, seq)) WITHOUT ROWID;"
        f"INSERT INTO nodes (id, secret_hash, labels, created, synced_seq)"
        f" VALUES ('{NODE}', 'h', '{{}}', 'now', 7);"
        f"INSERT INTO records VALUES ('{NODE}', 7, 'telemetry', 't', 1, x'7b7d', 2);"
    )
    conn.commit()
    conn.close()
    ctx = open_context(CloudSettings(data_dir=tmp_path / "cloud"))
    try:
        assert record_store.synced_seq(ctx.db, node_id=NODE, epoch=0) == 7
        assert [(r.epoch, r.seq) for r in record_store.query_records(ctx.db, node_id=NODE)] == [
            (0, 7)
        ]
        # An edge without epochs (epoch 0) resends 7: still once.
        assert ctx.records.ingest(NODE, pb.RecordBatch(records=[record(7)])).stored == 0
    finally:
        ctx.close()
