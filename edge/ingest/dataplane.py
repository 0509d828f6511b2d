"""The edge's data plane: outbox, MQTT ingestion, inspection and sync, configured by the policy.

Owned by the agent. It runs from the last persisted desired state, so it goes on offline and
after a restart without the cloud; only sync waits for the tunnel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from fieldline.edge.ingest.mqtt import MqttIngestor
from fieldline.edge.ingest.outbox import NewRecord, Outbox, OutboxFull, RecordRefused
from fieldline.edge.ingest.sync import OutboxSync
from fieldline.edge.inspection.health import ModelHealthReporter
from fieldline.edge.inspection.runtime import InspectionRuntime, Verdict
from fieldline.edge.store import EdgeStore
from fieldline.shared.config import EdgeSettings
from fieldline.shared.health import DataPlaneHealth, ModelHealth, MqttHealth
from fieldline.shared.policy import InspectionRule, Policy, Retention
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.schemas import ArtifactKind, DesiredState

log = structlog.get_logger(__name__)

# A verdict or event that meets a full outbox (only verdicts and events left, sync behind, or
# a full disk) waits, tried again this often, for as long as it takes: it blocks the model's
# worker thread (or the explainer's store thread), so the worker's bounded request queue
# (settings.inspection.max_queue) fills and new inspections are refused as overloaded, counted
# in inspection health, while their frames are still stored and synced. Only stop() ends the
# wait: then the verdict or event is dropped, logged and counted (reason "full").
STORE_RETRY_S = 0.2
EPOCH_META = "outbox_epoch"  # edge.db meta key: the newest outbox epoch of this node


class DataPlane:
    """Owns the outbox, the MQTT ingestor, the inspection runtime and sync; start()/stop()."""

    def __init__(
        self,
        settings: EdgeSettings,
        store: EdgeStore,
        node_id: str,
        send: Callable[[pb.EdgeMessage], bool],  # the tunnel's send
    ):
        self.settings = settings
        self.store = store
        self.registry = CollectorRegistry()
        self.policy = Policy()
        self.outbox = Outbox(settings.data_dir)
        self.inspection = InspectionRuntime(
            self._publish, self._store_verdict, settings=settings.inspection, registry=self.registry
        )
        self.model_reporter = ModelHealthReporter(settings.inspection)
        self.ingestor: MqttIngestor | None = None
        if settings.mqtt is not None:
            self.ingestor = MqttIngestor(
                settings.mqtt,
                self.outbox,
                client_id=f"fieldline-{node_id}",
                on_inspect=self.inspection.on_inspect,
                registry=self.registry,
            )
        self._stopping = threading.Event()
        self.sync = OutboxSync(
            self.outbox,
            send,
            self.retention,
            epoch=self._outbox_epoch(),
            backfill_rate=lambda: self.policy.sync_backfill_records_per_s,
        )
        self.verdicts_published = 0
        self.defects = 0
        self.verdicts_dropped = 0
        self.events_dropped = 0
        self._dropped = Counter(
            "fieldline_edge_records_dropped",
            "Verdicts and events not stored, by kind and reason (full: the outbox stayed full; "
            "refused: the cloud would refuse the record).",
            ["kind", "reason"],
            registry=self.registry,
        )
        # Called on inspection worker threads after each verdict is stored, or dropped (the
        # alert explainer hooks in here); it must return at once and never raise.
        self.on_verdict: Callable[[Verdict, InspectionRule | None], None] | None = None

    def start(self) -> None:
        self.inspection.start()
        if self.ingestor is not None:
            self.ingestor.start()

    def stop(self) -> None:
        self._stopping.set()  # verdicts and events waiting for room give up (counted)
        if self.ingestor is not None:
            self.ingestor.stop()  # flushes and acks what it holds
        self.inspection.stop()  # answers (stores) every queued request
        self.outbox.close()

    # -- configuration -------------------------------------------------------------------------

    def retention(self) -> Retention:
        """The policy's retention within this gateway's own limits (settings.retention)."""
        r, cap = self.policy.retention, self.settings.retention
        return Retention(
            max_rows=min(r.max_rows, cap.max_rows or r.max_rows),
            max_bytes=min(r.max_bytes, cap.max_bytes or r.max_bytes),
            keep_synced_s=min(
                r.keep_synced_s, r.keep_synced_s if cap.keep_synced_s is None else cap.keep_synced_s
            ),
        )

    def apply(self, desired: DesiredState) -> None:
        """Run the desired state's policy on what is installed now (called after each reconcile)."""
        if desired.policy is not None:
            try:
                self.policy = Policy.model_validate(desired.policy)
            except ValidationError as exc:
                log.error("policy in the desired state does not validate", error=str(exc)[:300])
                return
        self.outbox.set_retention(self.retention())
        if self.ingestor is not None:
            self.ingestor.apply_policy(self.policy)
        self.inspection.apply_policy(self.policy, self.installed_models())

    def installed_models(
        self, kind: ArtifactKind = ArtifactKind.onnx
    ) -> dict[str, tuple[str, Path]]:
        """Active artifacts of `kind` (ONNX by default): name -> (version, path)."""
        models = {}
        for name, version in self.store.active().items():
            row = self.store.artifact(name, version)
            if row is not None and row.kind == kind.value and row.path:
                models[name] = (version, Path(row.path))
        return models

    def model_health(self) -> dict[str, ModelHealth]:
        """Per active ONNX model: loaded or not, and the last window's requests, errors, p95."""
        return self.model_reporter.report(self.installed_models(), self.inspection.health())

    # -- verdicts ------------------------------------------------------------------------------

    def _store_verdict(self, verdict: Verdict) -> None:
        """Store a verdict, waiting while the outbox is full (see STORE_RETRY_S); a verdict the
        cloud would refuse is dropped, logged and counted."""
        rule = next((r for r in self.policy.inspections if r.name == verdict.rule), None)
        topic = rule.result_topic if rule else f"verdicts/{verdict.rule}"
        record = NewRecord("verdict", topic, verdict.ts_ms, verdict.to_json())
        self._store_waiting(record, rule=verdict.rule)
        if verdict.defect:
            self.defects += 1
        if self.on_verdict is not None:
            try:
                self.on_verdict(verdict, rule)
            except Exception:  # a hook must never cost a verdict
                log.exception("verdict hook failed", rule=verdict.rule)

    def _drop(self, kind: str, reason: str, detail: str, **where: str) -> None:
        """Count and log a verdict or event that was not stored (reason: full or refused)."""
        if kind == "verdict":
            self.verdicts_dropped += 1
        else:
            self.events_dropped += 1
        self._dropped.labels(kind, reason).inc()
        log.error(f"{kind} dropped: not stored", reason=detail, **where)

    def publish_event(self, topic: str, payload: bytes) -> None:
        """Publish something other than a verdict (an alert explanation) with QoS 1."""
        if self.ingestor is not None:
            self.ingestor.publish(topic, payload)

    def store_event(self, topic: str, payload: bytes, ts_ms: int) -> None:
        """Store an event (kind "event": the outbox never drops one to make room) for sync,
        waiting while the outbox is full (see STORE_RETRY_S). An event the cloud would refuse
        (RecordRefused), or still waiting at stop (OutboxFull), is dropped, counted and logged
        here, and raised to the caller."""
        self._store_waiting(NewRecord("event", topic, ts_ms, payload), raise_dropped=True)

    def _store_waiting(
        self, record: NewRecord, *, raise_dropped: bool = False, **where: str
    ) -> bool:
        """Append one verdict or event, waiting out a full outbox until stored or stopping."""
        waited = False
        while True:
            try:
                self.outbox.append([record])
            except OutboxFull as exc:
                if not waited:
                    log.warning(f"{record.kind} waits for room in the outbox", error=str(exc))
                    waited = True
                if not self._stopping.wait(STORE_RETRY_S):
                    continue
                self._drop(record.kind, "full", str(exc), **where)
                if raise_dropped:
                    raise
                return False
            except RecordRefused as exc:
                self._drop(record.kind, "refused", str(exc), **where)
                if raise_dropped:
                    raise
                return False
            if waited:
                log.info(f"{record.kind} stored after waiting for room")
            return True

    def _publish(self, topic: str, payload: bytes) -> None:
        if self.ingestor is None:
            return
        self.ingestor.publish(topic, payload)
        self.verdicts_published += 1

    # -- sync ----------------------------------------------------------------------------------

    def _outbox_epoch(self) -> int:
        """The outbox's sequence space: a new outbox.db (deleted, or a fresh install) takes the
        next epoch after the last one edge.db knows, so its sequences, starting at 1 again, are
        new records to the cloud; an outbox from before epochs keeps 0."""
        known = int(self.store.get_meta(EPOCH_META) or 0)
        if self.outbox.has_epoch():
            epoch = self.outbox.epoch
        else:
            # Unnumbered: new (or left empty by a crash at its creation), or an outbox from
            # before epochs on a node that never had one, which keeps 0 (its cloud records do).
            epoch = 0 if (not self.outbox.created and known == 0) else known + 1
            self.outbox.start_epoch(epoch)
            if epoch:
                log.info("new outbox: a new record sequence space", epoch=epoch)
        if epoch > known:
            self.store.set_meta(**{EPOCH_META: str(epoch)})
        return epoch

    async def run_sync(self) -> None:
        """The sync task (owned by the agent): drains on each connect, else every policy interval."""
        await self.sync.run(lambda: self.policy.sync_interval_s)

    async def on_records_welcome(self, synced_seq: int) -> None:
        await self.sync.on_welcome(synced_seq)

    async def on_records_ack(self, high_water_seq: int, epoch: int, batch_id: int) -> None:
        await self.sync.on_ack(high_water_seq, epoch, batch_id)

    def health(self) -> DataPlaneHealth:
        """Outbox, MQTT and per-model inspection health, what was published or dropped, and
        how far sync is behind."""
        backlog, live_lag = self.sync.lag()
        return DataPlaneHealth(
            outbox=self.outbox.stats(),
            mqtt=self.ingestor.health() if self.ingestor is not None else MqttHealth(),
            inspection=self.inspection.health(),
            verdicts_published=self.verdicts_published,
            defects=self.defects,
            verdicts_dropped=self.verdicts_dropped,
            events_dropped=self.events_dropped,
            sync_unacked_batches=self.sync.unacked_batches,
            sync_backlog=backlog,
            sync_live_lag_ms=live_lag,
        )
