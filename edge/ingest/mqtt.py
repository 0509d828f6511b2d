"""MQTT ingestion: paho (MQTT v5, persistent session, manual acks) into the outbox, then acks.

paho's callbacks only queue; one writer thread checks payloads, commits a batch to the outbox,
and only then acknowledges its messages, so a crash loses nothing the broker handed over. A
redelivery of a message stored before a crash (DUP flag, same packet id and bytes, among the
newest ingested rows) is acked without being stored again. `python -m fieldline.edge.ingest.mqtt`
runs a bare ingestor (the kill -9 tests use it).
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
from paho.mqtt.client import PUBACK
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client import CollectorRegistry, Counter, Gauge

from fieldline.edge.ingest.outbox import (
    REDELIVERY_WINDOW_ROWS,
    DeadLetter,
    NewRecord,
    Outbox,
    OutboxFull,
)
from fieldline.edge.ingest.payloads import PayloadError, classify
from fieldline.shared.config import MqttSettings
from fieldline.shared.policy import Policy, topic_matches

log = structlog.get_logger(__name__)

RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
FULL_RETRY_S = 0.5  # how often a blocked batch retries while the outbox is full
QUEUE_POLL_S = 0.1
READ_CHUNK_BYTES = 256 * 1024  # one recv() for many packets (see _BufferedClient)

InspectFn = Callable[[str, bytes, int], object]


@dataclass(slots=True)  # not frozen: a frozen init costs 4x, once per message on paho's thread
class _Message:
    mid: int
    qos: int
    dup: bool
    topic: str
    payload: bytes


class _BufferedClient(mqtt.Client):
    """paho reads each packet with about four recv() calls and one select() per packet, which
    caps ingestion near 6,000 msg/s. This serves paho's small reads from one large recv() and
    parses every packet already read before paho goes back to select() (else they would wait
    for more bytes to arrive). The buffer belongs to one socket and is dropped on reconnect."""

    _rbuf = b""
    _rpos = 0
    _rsock: object = None

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rsock is not self._sock:
            self._rbuf, self._rpos, self._rsock = b"", 0, self._sock
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(READ_CHUNK_BYTES)  # BlockingIOError when nothing there
            if not data:
                return data  # end of stream
            self._rbuf, self._rpos = data, 0
        out = self._rbuf[self._rpos : self._rpos + bufsize]
        self._rpos += len(out)
        return out

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        """Fast path for the common QoS 0/1 v5 PUBLISH with no properties: paho builds a
        Properties object for each one (~15 us, a quarter of the time per message here).
        Anything else (QoS 2, properties such as a topic alias, a short packet) goes to paho."""
        cmd = self._in_packet["command"]
        packet = self._in_packet["packet"]
        qos = (cmd & 0x06) >> 1
        if self._protocol != mqtt.MQTTv5 or qos == 2 or not self._manual_ack:
            return super()._handle_publish()
        try:
            end = 2 + int.from_bytes(packet[:2], "big")
            topic = bytes(packet[2:end])
            mid = 0
            if qos:
                mid, end = int.from_bytes(packet[end : end + 2], "big"), end + 2
            if len(topic) == 0 or (qos and mid == 0) or packet[end] != 0:
                return super()._handle_publish()
        except IndexError:
            return super()._handle_publish()  # malformed: paho raises what it should
        message = mqtt.MQTTMessage(mid=mid, topic=topic)
        message.dup = bool(cmd & 0x08)
        message.qos = qos
        message.retain = bool(cmd & 0x01)
        message.payload = bytes(packet[end + 1 :])
        message.timestamp = time.monotonic()
        self._handle_on_message(message)  # with manual_ack, QoS 1 waits for our ack()
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        # Each round consumes at least one buffered byte, so this ends.
        while (
            rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            and self._sock is not None
            and self._rsock is self._sock
            and self._rpos < len(self._rbuf)
        ):
            rc = super().loop_read(1)
        return rc


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
            "MQTT messages by result.",
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
            "Errors caught in MQTT callbacks.",
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
    ):
        self.settings = settings
        self.outbox = outbox
        self.on_inspect = on_inspect
        self.metrics = _Metrics(registry if registry is not None else CollectorRegistry())
        self._subscriptions: dict[str, str] = {}  # topic filter -> record kind
        self._inspect_filters: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.connected = False
        self.subscribed = threading.Event()  # set on the first SUBACK
        self.stored = 0
        self.dead_lettered = 0
        self.duplicates = 0  # redeliveries of messages stored before a crash, acked again
        self._dropped_seen = outbox.dropped
        self._v5 = settings.protocol == "5"
        self._client = _BufferedClient(
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
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

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

    # -- paho callbacks (run on paho's thread: never raise) -----------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        try:
            if getattr(reason_code, "is_failure", False):
                log.warning("mqtt connect refused", reason=str(reason_code))
                return
            self.connected = True
            with self._lock:
                topics = list(self._subscriptions)
            if topics:
                client.subscribe(self._subscribe_args(topics))
            log.info("mqtt connected", session_present=flags.session_present, topics=len(topics))
        except Exception:
            self.metrics.errors.labels("on_connect").inc()
            log.exception("mqtt on_connect failed")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self.connected = False
        if not self._stop.is_set():
            log.warning("mqtt disconnected", reason=str(reason_code))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        try:
            refused = [str(rc) for rc in reason_codes if rc.is_failure]
            if refused:
                self.metrics.errors.labels("subscribe").inc()
                log.warning("mqtt subscription refused", reasons=refused)
            self.subscribed.set()
        except Exception:
            self.metrics.errors.labels("on_subscribe").inc()
            log.exception("mqtt on_subscribe failed")

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        try:
            self._queue.put(
                _Message(msg.mid, msg.qos, bool(msg.dup), msg.topic, bytes(msg.payload))
            )
        except Exception:
            self.metrics.errors.labels("on_message").inc()
            log.exception("mqtt on_message failed")

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
            try:
                self._commit(batch)
            except Exception:  # a bug here must not stop ingestion: the batch stays unacked
                self.metrics.errors.labels("writer").inc()
                log.exception("mqtt batch failed; its messages stay unacked for redelivery")

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
            try:
                info = classify(m.payload, max_bytes=self.settings.max_payload_bytes)
            except PayloadError as exc:
                items.append((m, None, DeadLetter(m.topic, str(exc), m.payload)))
                continue
            except Exception as exc:  # a decoder bug must not block the batch: dead-letter it
                self.metrics.errors.labels("decoder").inc()
                log.exception("payload decoder failed", topic=m.topic)
                items.append(
                    (
                        m,
                        None,
                        DeadLetter(m.topic, f"decoder error: {type(exc).__name__}", m.payload),
                    )
                )
                continue
            kind = kinds.get(m.topic)
            if kind is None:
                kind = next((k for f, k in subs.items() if topic_matches(f, m.topic)), "telemetry")
                kinds[m.topic] = kind
            items.append((m, NewRecord(kind, m.topic, info.ts_ms or now, m.payload), None))
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
                # then wait for sync to free room.
                if not blocked:
                    log.warning("outbox full; holding acks", error=str(exc))
                    blocked = True
                self.metrics.blocked.set(1)
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

    def _ack_all(self, mids: list[int]) -> None:
        """PUBACK every message id, coalesced into one write when paho lets us.

        paho's ack() queues one packet and wakes its loop per message; at thousands of
        messages per second that wake-up dominates. A PUBACK with no reason code is 4 bytes
        (0x40 0x02 id id) in MQTT 3.1.1 and 5, so a batch of them is one byte string.
        """
        queue_packet = getattr(self._client, "_packet_queue", None)
        if queue_packet is None or len(mids) < 2:
            for mid in mids:
                self._client.ack(mid, 1)
            return
        packet = b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids)
        queue_packet(PUBACK, packet, 0, 0)

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
        self._ack_all([m.mid for m, _, _ in part if m.qos == 1])
        self.stored += len(stored)
        self.dead_lettered += len(dead)
        self.metrics.messages.labels("stored").inc(len(stored))
        self.metrics.messages.labels("dead_letter").inc(len(dead))
        self.duplicates += len(part) - len(stored) - len(dead)
        self.metrics.messages.labels("duplicate").inc(len(part) - len(stored) - len(dead))
        # Telemetry the outbox dropped (oldest first) to make room; read after our commit.
        dropped = self.outbox.dropped
        self.metrics.messages.labels("dropped").inc(max(0, dropped - self._dropped_seen))
        self._dropped_seen = dropped
        if dead:
            log.warning("payloads dead-lettered", count=len(dead), first=dead[0].reason)
        if self.on_inspect is None or not inspect_filters:
            return
        inspected: dict[str, bool] = {}
        for (m, _), seq in zip(stored, seqs, strict=True):
            hit = inspected.get(m.topic)
            if hit is None:
                hit = inspected[m.topic] = any(topic_matches(f, m.topic) for f in inspect_filters)
            if hit:
                try:
                    self.on_inspect(m.topic, m.payload, seq)
                except Exception:
                    self.metrics.errors.labels("inspect").inc()
                    log.exception("inspection hook failed", topic=m.topic)


def main(argv: list[str] | None = None) -> None:
    """A bare ingestor process (tests kill -9 it): `python -m fieldline.edge.ingest.mqtt --data DIR ...`."""
    import argparse
    import signal
    from pathlib import Path

    from fieldline.shared.logs import configure_logging
    from fieldline.shared.policy import Subscription

    ap = argparse.ArgumentParser(description="Ingest MQTT topics into DIR/outbox.db until SIGTERM.")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", action="append", required=True, help="topic filter (repeatable)")
    ap.add_argument("--client-id", default="fieldline-edge-ingest")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    configure_logging(args.log_level)  # stderr: stdout carries only "ready"
    args.data.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(args.data)
    ing = MqttIngestor(
        MqttSettings(host=args.host, port=args.port), outbox, client_id=args.client_id
    )
    ing.apply_policy(Policy(subscriptions=[Subscription(topic=t) for t in args.topic]))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    ing.start()
    while not ing.subscribed.wait(0.05) and not done.is_set():
        pass
    print("ready", flush=True)
    done.wait()
    ing.stop()
    log.info(
        "ingestion stopped",
        stored=ing.stored,
        dead_lettered=ing.dead_lettered,
        duplicates=ing.duplicates,
    )
    outbox.close()


if __name__ == "__main__":
    main()
