"""Ingesting record batches from edges: idempotent by (node id, sequence), acked by high-water mark.

The bounds are shared/limits.py's, the same the edge checks before a record enters its outbox;
a batch with a record outside them is refused whole (not acked), with the record's seq in the
reason, and counted by the tunnel.
"""

from __future__ import annotations

from fieldline.cloud.metrics import CloudMetrics
from fieldline.cloud.store import records as record_store
from fieldline.cloud.store.db import Database
from fieldline.cloud.store.records import RecordRow
from fieldline.shared.clock import now_ms
from fieldline.shared.limits import (
    MAX_BATCH_RECORDS,
    MAX_RECORD_PAYLOAD_BYTES,
    MAX_TOPIC_CHARS,
    RECORD_KINDS,
)
from fieldline.shared.proto import tunnel_pb2 as pb


class RecordRefused(ValueError):
    """A batch, or a record in it, outside the shared limits; the tunnel counts and skips it."""


def _check(r: pb.Record) -> None:
    if r.seq <= 0:
        raise RecordRefused(f"record seq={r.seq}: sequence numbers start at 1")
    if r.kind not in RECORD_KINDS:
        raise RecordRefused(
            f"record seq={r.seq}: kind {r.kind!r} is not one of {', '.join(sorted(RECORD_KINDS))}"
        )
    if len(r.payload) > MAX_RECORD_PAYLOAD_BYTES:
        raise RecordRefused(
            f"record seq={r.seq}: payload of {len(r.payload)} bytes exceeds the limit of "
            f"{MAX_RECORD_PAYLOAD_BYTES}"
        )


class RecordIngestor:
    def __init__(self, db: Database, metrics: CloudMetrics):
        self.db = db
        self.metrics = metrics

    def ingest(self, node_id: str, batch: pb.RecordBatch) -> int:
        """Store a batch for the authenticated node; return the node's new high-water mark.

        The edge sends records in sequence order and waits for acks, so every record at or
        below the highest sequence of a stored batch is in the cloud (gaps are rows the edge
        dropped by its retention policy, never rows in flight).
        """
        if len(batch.records) > MAX_BATCH_RECORDS:
            raise RecordRefused(
                f"batch of {len(batch.records)} records exceeds the limit of {MAX_BATCH_RECORDS}"
            )
        received = now_ms()
        rows = []
        for r in batch.records:
            _check(r)
            rows.append(
                RecordRow(
                    node_id=node_id,
                    seq=r.seq,
                    kind=r.kind,
                    # The edge bounds topics by the same number; an older edge's longer topic
                    # is kept as its prefix rather than stalling the node's sync.
                    topic=r.topic[:MAX_TOPIC_CHARS],
                    ts_ms=r.ts_ms,
                    payload=bytes(r.payload),
                    received_ms=received,
                )
            )
        inserted, high = record_store.insert_batch(self.db, node_id=node_id, rows=rows)
        self.metrics.records.inc(inserted)
        return high
