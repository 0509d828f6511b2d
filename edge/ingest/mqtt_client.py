"""paho's Client with its read and ack paths overridden for speed, and the callback wrapper.

Why paho's internals and not its public API: `bench/ingest.py --skip-sync --messages 60000`
(QoS 1, 200-byte readings, acked after an fsynced commit) ingested 11,600 and 12,200 msg/s
with `--client paho` (public API: paho's reads, one ack() per message) and 17,600 and 23,600
msg/s with this subclass, two runs each on a 2-vCPU AMD EPYC VM shared with other jobs.
paho 2.x has no public hook for either path, so pyproject pins paho to <3.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import ParamSpec

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.client import PUBACK

log = structlog.get_logger(__name__)

READ_CHUNK_BYTES = 256 * 1024  # one recv() for many packets

P = ParamSpec("P")


def catch_log_exception(
    callback: Callable[P, None], count: Callable[[str], None]
) -> Callable[P, None]:
    """Wrap a callback run on paho's thread (or a hook run on the writer's) so that one which
    raises is logged and counted (`count(name)`) instead of taking the network loop down."""
    name = getattr(callback, "__name__", repr(callback)).lstrip("_")

    @functools.wraps(callback)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            callback(*args, **kwargs)
        except Exception:
            count(name)
            log.exception("mqtt callback failed", callback=name)

    return wrapper


class PahoClient(mqtt.Client):
    """paho's public API only; `ack_many` acks one message at a time (what the bench compares)."""

    def ack_many(self, mids: list[int]) -> None:
        for mid in mids:
            self.ack(mid, 1)


class BufferedClient(PahoClient):
    """paho reads each packet with about four recv() calls and one select() per packet. This
    serves paho's small reads from one large recv() and parses every packet already read
    before paho goes back to select() (else they would wait for more bytes to arrive). The
    buffer belongs to one socket and is dropped on reconnect."""

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

    def ack_many(self, mids: list[int]) -> None:
        """PUBACK every message id in one write.

        paho's ack() queues one packet and wakes its loop per message; at thousands of
        messages per second that wake-up dominates. A PUBACK with no reason code is 4 bytes
        (0x40 0x02 id id) in MQTT 3.1.1 and 5, so a batch of them is one byte string.
        """
        if len(mids) < 2:
            super().ack_many(mids)
            return
        packet = b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids)
        self._packet_queue(PUBACK, packet, 0, 0)
