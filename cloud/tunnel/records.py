"""Ingesting record batches from edges: idempotent by (node id, sequence), acked by high-water mark."""

from __future__ import annotations

from fieldline.cloud.metrics import CloudMetrics
from fieldline.cloud.store import records as record_store
from fieldline.cloud.store.db import Database
from fieldline.shared.clock import now_ms
from fieldline.shared.proto import tunnel_pb2 as pb

MAX_BATCH_RECORDS = 10_000
MAX_PAYLOAD_BYTES = 1024 * 1024
KINDS = frozenset({"telemetry", "verdict", "event"})


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
            raise ValueError(f"batch of {len(batch.records)} records exceeds {MAX_BATCH_RECORDS}")
        received = now_ms()
        rows = []
        for r in batch.records:
            if r.seq <= 0 or r.kind not in KINDS or len(r.payload) > MAX_PAYLOAD_BYTES:
                raise ValueError(f"invalid record seq={r.seq} kind={r.kind!r}")
            rows.append(
                (node_id, r.seq, r.kind, r.topic[:512], r.ts_ms, bytes(r.payload), received)
            )
        inserted, high = record_store.insert_batch(self.db, node_id=node_id, rows=rows)
        self.metrics.records.inc(inserted)
        return high
