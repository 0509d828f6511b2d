"""The demo's MQTT broker: a Mosquitto process when installed, else an embedded amqtt broker.

amqtt speaks MQTT 3.1.1 only and does not redeliver QoS 1 messages on reconnect, so it is a
fallback for the demo, never for a plant: `fieldline edge run` expects a real broker.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from fieldline.cli.harness.mosquitto import (
    START_TIMEOUT_S,
    MosquittoBroker,
    find_mosquitto,
    free_port,
    wait_listening,
)


class DemoBroker:
    """start() picks Mosquitto or the embedded fallback; `protocol` says what clients must speak."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.kind = ""
        self.protocol = "5"
        self._mosquitto: MosquittoBroker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: object | None = None

    def start(self) -> DemoBroker:
        if find_mosquitto():
            self._mosquitto = MosquittoBroker(self.workdir, self.port).start()
            self.kind, self.protocol = "mosquitto", "5"
        else:
            self._start_embedded()
        return self

    def _start_embedded(self) -> None:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "sys_interval": 0,
            "auth": {"allow-anonymous": True},
        }
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            broker = Broker(config, loop=loop)
            self._broker = broker
            loop.run_until_complete(broker.start())
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="embedded-broker", daemon=True)
        self._thread.start()
        ready.wait(START_TIMEOUT_S)
        wait_listening(self.port, lambda: self._thread is not None and self._thread.is_alive())
        self.kind, self.protocol = "embedded amqtt (MQTT 3.1.1, demo only)", "3.1.1"

    def stop(self) -> None:
        if self._mosquitto is not None:
            self._mosquitto.stop()
        if self._loop is not None and self._broker is not None:
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)  # type: ignore[attr-defined]
            try:
                fut.result(10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
