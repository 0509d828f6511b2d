"""MQTT ingestion: paho (MQTT v5, persistent session, manual acks) into the outbox, then acks.

paho's callbacks only queue; one writer thread checks payloads, commits a batch to the outbox,
and only then acknowledges its messages, so a crash loses nothing the broker handed over. A
redelivery of a message stored before a crash (DUP flag, same packet id and bytes, among the
newest ingested rows) is acked without being stored again. A message the cloud would refuse
as a record, or that is no reading or image, is dead-lettered with the reason and acked.
"""

from __future__ import annotations

import hashlib
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client import CollectorRegistry, Counter, Gauge

from fieldline.edge.ingest.mqtt_client import BufferedClient, PahoClient, catch_log_exception
from fieldline.edge.ingest.outbox import (
    REDELIVERY_WINDOW_ROWS,
    DeadLetter,
    DiskFull,
    NewRecord,
    Outbox,
    OutboxFull,
    RecordRefused,
    check_record,
)
from fieldline.edge.ingest.payloads import PayloadError, classify
from fieldline.shared.config import MqttSettings
from fieldline.shared.health import MqttHealth
from fieldline.shared.policy import Policy, topic_matches

log = structlog.get_logger(__name__)

RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
FULL_RETRY_S = 0.5  # how often a blocked batch retries while the outbox is full
UNREACHABLE_LOG_S = 30.0  # "broker unreachable" at most this often while it stays away
WRITER_RETRY_S = 1.0  # how often a batch that failed otherwise (an I/O error) is retried
QUEUE_POLL_S = 0.1

InspectFn = Callable[[str, bytes, int], object]


@dataclass(slots=True)  # not frozen: a frozen init costs 4x, once per message on paho's thread
class _Message:
    mid: int
    qos: int
    dup: bool
    topic: str
    payload: bytes


def mqtt_password(settings: MqttSettings) -> str | None:
    """The broker password: from password_file when given (a mounted secret), else inline."""
    if settings.password_file is not None:
        try:
            return settings.password_file.read_text().strip()
        except OSError as exc:
            raise MqttConfigError(
                f"cannot read the MQTT password file {settings.password_file}: {exc.strerror}"
            ) from exc
    return settings.password


class MqttConfigError(Exception):
    """MQTT settings that cannot be used (an unreadable password, certificate or key file)."""


class _Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.messages = Counter(
            "fieldline_edge_mqtt_messages",
            "MQTT messages by result: stored, dead_letter (not a reading or image), refused "
            "(dead-lettered: the cloud would refuse the record), duplicate, dropped.",
            ["result"],
            registry=registry,
        )
        self.batches = Counter(
            "fieldline_edge_mqtt_batches", "Outbox batches committed.", registry=registry
        )
        self.blocked = Gauge(
            "fieldline_edge_mqtt_backpressure",
            "1 while the outbox is full and acks wait.",
            registry=registry,
        )
        self.errors = Counter(
            "fieldline_edge_mqtt_errors",
            "Errors caught in MQTT callbacks and hooks, and refused publishes and subscriptions.",
            ["where"],
            registry=registry,
        )


class MqttIngestor:
    """start() connects and starts the writer; stop() flushes, acks and disconnects."""

    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        *,
        client_id: str,
        on_inspect: InspectFn | None = None,
        registry: CollectorRegistry | None = None,
        client_class: type[PahoClient] = BufferedClient,  # PahoClient: public API (the bench)
    ):
        self.settings = settings
        self.outbox = outbox
        self.metrics = _Metrics(registry if registry is not None else CollectorRegistry())
        count = self._count_error
        self._on_inspect = catch_log_exception(on_inspect, count) if on_inspect else None
        self._subscriptions: dict[str, str] = {}  # topic filter -> record kind
        self._inspect_filters: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.connected = False
        self.subscribed = threading.Event()  # set on the first SUBACK
        self.stored = 0
        self.dead_lettered = 0  # refused ones included
        self.refused = 0
        self.duplicates = 0  # redeliveries of messages stored before a crash, acked again
        self.backpressure = False  # the outbox is full: acks wait (the broker holds the rest)
        self._dropped_seen = outbox.dropped
        self._v5 = settings.protocol == "5"
        self._client = client_class(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id or client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else False,
            manual_ack=True,
        )
        if settings.username:
            self._client.username_pw_set(settings.username, mqtt_password(settings))
        if settings.tls or settings.ca_file or settings.cert_file:
            try:
                # Verified against ca_file (else the system's trust store), hostname included;
                # a client certificate when cert_file/key_file are given.
                self._client.tls_set(
                    ca_certs=str(settings.ca_file) if settings.ca_file else None,
                    certfile=str(settings.cert_file) if settings.cert_file else None,
                    keyfile=str(settings.key_file) if settings.key_file else None,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise MqttConfigError(f"MQTT TLS files cannot be loaded: {exc}") from exc
        self._client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self._client.on_connect = catch_log_exception(self._on_connect, count)
        self._client.on_disconnect = catch_log_exception(self._on_disconnect, count)
        self._client.on_connect_fail = catch_log_exception(self._on_connect_fail, count)
        self._unreachable_logged = 0.0  # monotonic time of the last "broker unreachable" line
        self.connect_failures = 0
        self._client.on_message = catch_log_exception(self._on_message, count)
        self._client.on_subscribe = catch_log_exception(self._on_subscribe, count)

    def _count_error(self, where: str) -> None:
        """Count a callback or hook that raised (catch_log_exception logged it)."""
        self.metrics.errors.labels(where).inc()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="mqtt-writer", daemon=True)
        self._writer.start()
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.settings.session_expiry_s
            props.ReceiveMaximum = self.settings.receive_maximum
            self._client.connect_async(
                self.settings.host,
                self.settings.port,
                self.settings.keepalive_s,
                clean_start=False,
                properties=props,
            )
        else:
            self._client.connect_async(
                self.settings.host, self.settings.port, self.settings.keepalive_s
            )
        self._client.loop_start()
        log.info("mqtt ingestion started", broker=f"{self.settings.host}:{self.settings.port}")

    def stop(self) -> None:
        self._stop.set()
        if self._writer is not None:
            self._writer.join(10)
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish with QoS 1 (verdicts); paho keeps QoS 1 messages while the broker is away."""
        info = self._client.publish(topic, payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.metrics.errors.labels("publish").inc()
            log.warning("publish failed", topic=topic, rc=info.rc)

    # -- configuration -----------------------------------------------------------------------

    def apply_policy(self, policy: Policy) -> None:
        """Subscribe to the policy's topics and its inspection rules' topics; drop the rest."""
        wanted = {s.topic: s.kind for s in policy.subscriptions}
        for rule in policy.inspections:
            wanted.setdefault(rule.topic, "telemetry")
        with self._lock:
            old = self._subscriptions
            self._subscriptions = wanted
            self._inspect_filters = tuple(r.topic for r in policy.inspections)
        gone = [t for t in old if t not in wanted]
        new = [t for t in wanted if t not in old]
        if self.connected:
            if gone:
                self._client.unsubscribe(gone)
            if new:
                self._client.subscribe(self._subscribe_args(new))
        log.info("mqtt subscriptions", topics=sorted(wanted))

    def _subscribe_args(self, topics: list[str]) -> list[tuple[str, SubscribeOptions | int]]:
        if self._v5:
            return [(t, SubscribeOptions(qos=1)) for t in topics]
        return [(t, 1) for t in topics]

    def health(self) -> MqttHealth:
        """Connection, counts since start, and whether acks wait for room (back-pressure)."""
        return MqttHealth(
            configured=True,
            connected=self.connected,
            stored=self.stored,
            dead_lettered=self.dead_lettered,
            refused=self.refused,
            duplicates=self.duplicates,
            backpressure=self.backpressure,
            connect_failures=self.connect_failures,
        )

    # -- paho callbacks (on paho's thread; wrapped by catch_log_exception in __init__) ---------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if getattr(reason_code, "is_failure", False):
            log.warning("mqtt connect refused", reason=str(reason_code))
            return
        self.connected = True
        with self._lock:
            topics = list(self._subscriptions)
        if topics:
            client.subscribe(self._subscribe_args(topics))
        log.info("mqtt connected", session_present=flags.session_present, topics=len(topics))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self.connected = False
        if not self._stop.is_set():
            log.warning("mqtt disconnected", reason=str(reason_code))

    def _on_connect_fail(self, client, userdata) -> None:  # type: ignore[no-untyped-def]
        """paho retries on its own; say so at most every UNREACHABLE_LOG_S (health says always)."""
        self.connect_failures += 1
        now = time.monotonic()
        if now - self._unreachable_logged >= UNREACHABLE_LOG_S:
            self._unreachable_logged = now
            log.warning(
                "mqtt broker unreachable; retrying",
                broker=f"{self.settings.host}:{self.settings.port}",
                failures=self.connect_failures,
            )

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            self.metrics.errors.labels("subscribe").inc()
            log.warning("mqtt subscription refused", reasons=refused)
        self.subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        self._queue.put(_Message(msg.mid, msg.qos, bool(msg.dup), msg.topic, bytes(msg.payload)))

    # -- the writer thread -------------------------------------------------------------------

    def _next_batch(self) -> list[_Message]:
        try:
            first = self._queue.get(timeout=QUEUE_POLL_S)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.settings.batch_window_ms / 1000
        while len(batch) < self.settings.batch_max:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
        return batch

    def _write_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                if self._stop.is_set() and self._queue.empty():
                    return
                continue
            self._commit_until_stored(batch)

    def _commit_until_stored(self, batch: list[_Message]) -> None:
        """Commit a batch, retrying on an unexpected failure (an I/O error): dropping it would
        leave its messages unacked in a session the broker never redelivers, so the broker's
        window of unacked messages fills and ingestion wedges. Logged once per failure run."""
        failing = False
        while True:
            try:
                self._commit(batch)
            except Exception:
                self.metrics.errors.labels("writer").inc()
                if not failing:
                    log.exception("mqtt batch failed; retrying it (its messages stay unacked)")
                    failing = True
                if self._stop.wait(WRITER_RETRY_S):
                    return
                continue
            if failing:
                log.info("mqtt batch stored after retries")
            return

    @staticmethod
    def _key(m: _Message) -> str:
        digest = hashlib.blake2b(m.topic.encode() + b"\0" + m.payload, digest_size=8).hexdigest()
        return f"{m.mid}:{digest}"

    def _commit(self, batch: list[_Message]) -> None:
        """Check, store and only then ack a batch; under back-pressure store it in smaller parts."""
        with self._lock:
            subs = dict(self._subscriptions)
            inspect_filters = self._inspect_filters
        now = time.time_ns() // 1_000_000
        kinds: dict[str, str] = {}  # topic -> record kind; a batch holds few distinct topics
        dups = self.outbox.already_delivered(
            [self._key(m) for m in batch if m.dup],
            window=max(REDELIVERY_WINDOW_ROWS, 4 * self.settings.receive_maximum),
        )
        # (message, record or None); dead letters and redeliveries carry no record
        items: list[tuple[_Message, NewRecord | None, DeadLetter | None]] = []
        for m in batch:
            if m.dup and self._key(m) in dups:
                items.append((m, None, None))
                continue
            kind = kinds.get(m.topic)
            if kind is None:
                kind = next((k for f, k in subs.items() if topic_matches(f, m.topic)), "telemetry")
                kinds[m.topic] = kind
            items.append((m, *self._check(m, kind, now)))
        size = len(items)
        start = 0
        blocked = False
        while start < len(items):
            part = items[start : start + size]
            stored = [(m, r) for m, r, _ in part if r is not None]
            dead = [d for _, _, d in part if d is not None]
            try:
                seqs = self.outbox.commit_batch(
                    [r for _, r in stored], dead, delivered=[self._key(m) for m, _ in stored]
                )
            except OutboxFull as exc:
                # Back-pressure: hold the acks (the broker keeps the backlog); try smaller parts,
                # then wait for sync (or, on a full disk, the operator) to free room.
                if not blocked:
                    what = "disk full" if isinstance(exc, DiskFull) else "outbox full"
                    log.warning(f"{what}; holding acks", error=str(exc))
                    blocked = True
                self.metrics.blocked.set(1)
                self.backpressure = True
                if size > 1:
                    size = max(1, size // 2)
                elif self._stop.wait(FULL_RETRY_S):
                    return
                continue
            self._acked(part, stored, seqs, dead, inspect_filters)
            start += len(part)
        if blocked:
            log.info("outbox has room again; acks resumed")
        self.metrics.blocked.set(0)
        self.backpressure = False

    def _check(
        self, m: _Message, kind: str, now: int
    ) -> tuple[NewRecord | None, DeadLetter | None]:
        """The record to store, or the dead letter saying why not."""
        try:
            check_record(kind, m.topic, len(m.payload))  # what the cloud would refuse
            info = classify(m.payload, max_bytes=self.settings.max_payload_bytes)
        except RecordRefused as exc:
            return None, DeadLetter(m.topic, str(exc), m.payload, refused=True)
        except PayloadError as exc:
            return None, DeadLetter(m.topic, str(exc), m.payload)
        except Exception as exc:  # a decoder bug must not block the batch: dead-letter it
            self.metrics.errors.labels("decoder").inc()
            log.exception("payload decoder failed", topic=m.topic)
            return None, DeadLetter(m.topic, f"decoder error: {type(exc).__name__}", m.payload)
        return NewRecord(kind, m.topic, info.ts_ms or now, m.payload), None

    def _acked(
        self,
        part: list[tuple[_Message, NewRecord | None, DeadLetter | None]],
        stored: list[tuple[_Message, NewRecord]],
        seqs: list[int],
        dead: list[DeadLetter],
        inspect_filters: tuple[str, ...],
    ) -> None:
        """After a commit: ack every message of the part, count, hand frames to inspection."""
        self.metrics.batches.inc()
        self._client.ack_many([m.mid for m, _, _ in part if m.qos == 1])
        refused = sum(d.refused for d in dead)
        self.stored += len(stored)
        self.dead_lettered += len(dead)
        self.refused += refused
        self.metrics.messages.labels("stored").inc(len(stored))
        self.metrics.messages.labels("dead_letter").inc(len(dead) - refused)
        self.metrics.messages.labels("refused").inc(refused)
        self.duplicates += len(part) - len(stored) - len(dead)
        self.metrics.messages.labels("duplicate").inc(len(part) - len(stored) - len(dead))
        # Telemetry the outbox dropped (oldest first) to make room; read after our commit.
        dropped = self.outbox.dropped
        self.metrics.messages.labels("dropped").inc(max(0, dropped - self._dropped_seen))
        self._dropped_seen = dropped
        if dead:
            log.warning("payloads dead-lettered", count=len(dead), first=dead[0].reason)
        if self._on_inspect is None or not inspect_filters:
            return
        inspected: dict[str, bool] = {}
        for (m, _), seq in zip(stored, seqs, strict=True):
            hit = inspected.get(m.topic)
            if hit is None:
                hit = inspected[m.topic] = any(topic_matches(f, m.topic) for f in inspect_filters)
            if hit:
                self._on_inspect(m.topic, m.payload, seq)
