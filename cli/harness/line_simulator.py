"""A simulated production line for the demo: sensors publish readings, a camera publishes frames.

Publishes with QoS 1 to a plant broker; a share of the frames shows defective parts.
Run alone with `python -m fieldline.cli.harness.line_simulator --host H --port P`.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from fieldline.cli.harness.classifier import make_frame

log = structlog.get_logger(__name__)

READING_TOPIC = "plant1/line-{line}/sensor/{sensor}"
FRAME_TOPIC = "plant1/line-{line}/camera/frames"
SENSORS = ("temperature", "vibration", "pressure")
CONNECT_TIMEOUT_S = 10.0


@dataclass
class LineConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    lines: tuple[str, ...] = ("a", "b")
    readings_per_s: float = 20.0  # per line, all sensors together
    frames_per_s: float = 4.0  # per line
    defect_rate: float = 0.1
    seed: int = 0
    mqtt_v311: bool = False  # the embedded demo broker speaks 3.1.1 only
    username: str | None = None
    password: str | None = None


class LineSimulator:
    """Publishes until stop(); counts what it published and how many defects it showed."""

    def __init__(self, config: LineConfig):
        self.config = config
        self.published = 0
        self.defects_shown = 0
        self.frames = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        protocol = mqtt.MQTTv311 if config.mqtt_v311 else mqtt.MQTTv5
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"line-sim-{config.seed}", protocol=protocol
        )
        self._client.max_queued_messages_set(10_000)
        if config.username:
            self._client.username_pw_set(config.username, config.password)

    def start(self) -> None:
        self._client.connect(self.config.host, self.config.port, keepalive=30)
        self._client.loop_start()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not self._client.is_connected():
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"line simulator: no broker at {self.config.host}:{self.config.port}"
                )
            time.sleep(0.05)
        self._thread = threading.Thread(target=self._run, name="line-simulator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self._client.loop_stop()
        self._client.disconnect()

    def _run(self) -> None:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        reading_every = 1.0 / cfg.readings_per_s
        frame_every = 1.0 / cfg.frames_per_s
        next_reading = next_frame = time.monotonic()
        n = 0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_reading:
                for line in cfg.lines:
                    sensor = SENSORS[n % len(SENSORS)]
                    value = 50 + 10 * math.sin(n / 20) + float(rng.normal(0, 0.5))
                    body = {"ts": time.time(), "value": round(value, 3), "id": f"{line}-{n}"}
                    self._publish(READING_TOPIC.format(line=line, sensor=sensor), json.dumps(body))
                n += 1
                next_reading += reading_every
            if now >= next_frame:
                for line in cfg.lines:
                    defective = bool(rng.random() < cfg.defect_rate)
                    self._publish(FRAME_TOPIC.format(line=line), make_frame(defective, rng))
                    self.frames += 1
                    self.defects_shown += int(defective)
                next_frame += frame_every
            time.sleep(max(0.0, min(next_reading, next_frame) - time.monotonic()))

    def _publish(self, topic: str, payload: str | bytes) -> None:
        info = self._client.publish(topic, payload, qos=1)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self.published += 1
        else:  # queue full or disconnected: the line goes on, the reading is lost, say so
            log.warning("publish failed", topic=topic, rc=info.rc)


STATUS_MAX_AGE_S = 10.0


def _check_status(path: str) -> int:
    """Exit code for a container health check: 0 while the status file is fresh."""
    import os

    try:
        age = time.time() - os.path.getmtime(path)
    except OSError:
        return 1
    return 0 if age <= STATUS_MAX_AGE_S else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--seconds", type=float, default=60.0, help="0: until SIGTERM")
    p.add_argument("--defect-rate", type=float, default=0.1)
    p.add_argument("--username")
    p.add_argument("--password-file", help="file holding the broker password")
    p.add_argument("--status-file", help="rewritten every second with the counts")
    p.add_argument("--check-status", metavar="FILE", help="exit 0 if FILE is fresh, else 1")
    a = p.parse_args()
    if a.check_status:
        raise SystemExit(_check_status(a.check_status))
    password = None
    if a.password_file:
        with open(a.password_file) as f:
            password = f.read().strip()
    sim = LineSimulator(
        LineConfig(
            host=a.host,
            port=a.port,
            defect_rate=a.defect_rate,
            username=a.username,
            password=password,
        )
    )
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sim.start()
    deadline = time.monotonic() + a.seconds if a.seconds > 0 else None
    try:
        while not stop.wait(1.0):
            counts = {
                "published": sim.published,
                "frames": sim.frames,
                "defects": sim.defects_shown,
            }
            if a.status_file:
                with open(a.status_file, "w") as f:
                    json.dump(counts, f)
            if deadline is not None and time.monotonic() >= deadline:
                break
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    print(
        json.dumps({"published": sim.published, "frames": sim.frames, "defects": sim.defects_shown})
    )


if __name__ == "__main__":
    main()
