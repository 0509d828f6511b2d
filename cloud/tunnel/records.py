"""Ingesting record batches from edges: each record stored or refused on its own, acked by mark.

Records are idempotent by (node id, outbox epoch, sequence). The bounds are shared/limits.py's,
the same the edge checks before a record enters its outbox; a record outside them (an older
edge's row) is refused alone and kept as a dead letter with its reason (GET
/v1/records?dead=true), and the batch's high-water mark is acked all the same, so one poison
record never stalls a node's sync. The commit is durable (synchronous=FULL) before the ack: the
edge forgets what it was acked.
"""

from __future__ import annotations

from dataclasses import dataclass

from fieldline.cloud.metrics import CloudMetrics
from fieldline.cloud.store import records as record_store
from fieldline.cloud.store.db import Database
from fieldline.cloud.store.records import DeadRecordRow, RecordRow
from fieldline.shared.clock import now_ms
from fieldline.shared.limits import (
    MAX_BATCH_RECORDS,
    MAX_RECORD_PAYLOAD_BYTES,
    MAX_TOPIC_CHARS,
    RECORD_KINDS,
)
from fieldline.shared.proto import tunnel_pb2 as pb


class RecordRefused(ValueError):
    """A batch outside the shared limits (too many records, no sequence); refused whole."""


@dataclass(frozen=True)
class IngestResult:
    """What one batch did: the node's new mark in the batch's epoch, rows new and refused."""

    high_water_seq: int
    stored: int
    refused: int
    batch_top: int = 0  # the batch's highest seq (what its ack answers)


def refusal(r: pb.Record) -> str | None:
    """Why the cloud refuses this record, or None when it stores it."""
    if r.kind not in RECORD_KINDS:
        return f"kind {r.kind[:40]!r} is not one of {', '.join(sorted(RECORD_KINDS))}"
    if len(r.payload) > MAX_RECORD_PAYLOAD_BYTES:
        return (
            f"payload of {len(r.payload)} bytes exceeds the record limit of "
            f"{MAX_RECORD_PAYLOAD_BYTES} bytes"
        )
    return None


class RecordIngestor:
    def __init__(self, db: Database, metrics: CloudMetrics):
        self.db = db
        self.metrics = metrics

    def ingest(self, node_id: str, batch: pb.RecordBatch) -> IngestResult:
        """Store a batch for the authenticated node, refusing records one by one.

        The edge sends records in sequence order on one stream, and this runs in arrival
        order, so every sequence at or below the batch's highest is in the cloud: stored,
        refused (a dead letter), or never sent because the edge dropped it by its retention
        policy, never one still in flight.
        """
        if len(batch.records) > MAX_BATCH_RECORDS:
            raise RecordRefused(
                f"batch of {len(batch.records)} records exceeds the limit of {MAX_BATCH_RECORDS}"
            )
        if any(r.seq <= 0 for r in batch.records):  # never an outbox's (AUTOINCREMENT)
            raise RecordRefused("record sequence numbers start at 1")
        received = now_ms()
        rows, dead = [], []
        for r in batch.records:
            # The edge bounds topics by the same number; an older edge's longer topic is kept
            # as its prefix rather than refused.
            topic = r.topic[:MAX_TOPIC_CHARS]
            reason = refusal(r)
            if reason is not None:
                dead.append(
                    DeadRecordRow(
                        node_id,
                        batch.epoch,
                        r.seq,
                        r.kind[:40],
                        topic,
                        len(r.payload),
                        reason,
                        received,
                    )
                )
                continue
            rows.append(
                RecordRow(node_id, r.seq, r.kind, topic, r.ts_ms, bytes(r.payload), received)
            )
        inserted, high = record_store.insert_batch(
            self.db, node_id=node_id, rows=rows, epoch=batch.epoch, dead=dead, live=batch.live
        )
        self.metrics.records.inc(inserted)
        if dead:
            self.metrics.records_refused.inc(len(dead))
        top = max((r.seq for r in batch.records), default=0)
        return IngestResult(high, inserted, len(dead), top)
