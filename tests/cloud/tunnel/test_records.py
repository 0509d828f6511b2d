"""Record batches into a real cloud store: the shared limits, refusals that name the record,
idempotent inserts and the high-water mark."""

from __future__ import annotations

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
    high = ctx.records.ingest(NODE, pb.RecordBatch(records=[record(1), record(2, big)]))
    assert high == 2
    rows = record_store.query_records(ctx.db, node_id=NODE)
    assert [(r.seq, len(r.payload)) for r in rows] == [(1, 11), (2, MAX_RECORD_PAYLOAD_BYTES)]
    assert rows[0].topic == "plant/line7/temp" and rows[0].ts_ms == 1001


def test_a_record_over_the_limit_refuses_the_batch_and_names_it(ctx: CloudContext) -> None:
    size = MAX_RECORD_PAYLOAD_BYTES + 1
    batch = pb.RecordBatch(records=[record(1), record(2, b"x" * size)])
    with pytest.raises(RecordRefused) as exc:
        ctx.records.ingest(NODE, batch)
    assert str(exc.value) == (
        f"record seq=2: payload of {size} bytes exceeds the limit of {MAX_RECORD_PAYLOAD_BYTES}"
    )
    assert record_store.count_records(ctx.db, node_id=NODE) == 0
    assert node_store.get_node(ctx.db, node_id=NODE).synced_seq == 0


@pytest.mark.parametrize(
    ("bad", "says"),
    [(record(0), "seq=0"), (record(3, kind="metric"), "kind 'metric' is not one of event")],
)
def test_bad_seq_or_kind_is_refused(ctx: CloudContext, bad: pb.Record, says: str) -> None:
    with pytest.raises(RecordRefused, match=says):
        ctx.records.ingest(NODE, pb.RecordBatch(records=[bad]))


def test_a_batch_over_the_record_limit_is_refused(ctx: CloudContext) -> None:
    batch = pb.RecordBatch(records=[record(i + 1) for i in range(MAX_BATCH_RECORDS + 1)])
    with pytest.raises(RecordRefused, match=f"exceeds the limit of {MAX_BATCH_RECORDS}"):
        ctx.records.ingest(NODE, batch)


def test_resent_batches_are_stored_once_and_long_topics_kept_as_prefix(ctx: CloudContext) -> None:
    long_topic = pb.Record(seq=3, kind="event", topic="t" * 600, ts_ms=1, payload=b"{}")
    batch = pb.RecordBatch(records=[record(1), record(2), long_topic])
    assert ctx.records.ingest(NODE, batch) == 3
    assert ctx.records.ingest(NODE, batch) == 3
    rows = record_store.query_records(ctx.db, node_id=NODE)
    assert [r.seq for r in rows] == [1, 2, 3]
    assert rows[2].topic == "t" * MAX_TOPIC_CHARS
