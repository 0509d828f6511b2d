"""The demo's MQTT broker: a Mosquitto process when installed, else an embedded amqtt broker.

amqtt speaks MQTT 3.1.1 only and does not redeliver QoS 1 messages on reconnect, so it is a
fallback for the demo, never for a plant: `fieldline edge run` expects a real broker.
"""

from __future__ import annotations

import asyncio
import getpass
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, alive: callable) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the broker exited while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the broker did not listen on port {port}")


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), None
    )


class DemoBroker:
    """start() picks Mosquitto or the embedded fallback; `protocol` says what clients must speak."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = _free_port()
        self.kind = ""
        self.protocol = "5"
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: object | None = None

    def start(self) -> DemoBroker:
        binary = find_mosquitto()
        if binary:
            self._start_mosquitto(binary)
        else:
            self._start_embedded()
        return self

    def _start_mosquitto(self, binary: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
            "set_tcp_nodelay true\nmax_inflight_messages 1000\nmax_queued_messages 100000\n"
            f"persistence true\npersistence_location {self.workdir}/\n"
        )
        log = (self.workdir / "mosquitto.log").open("ab")
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=log, stderr=log, start_new_session=True
        )
        _wait_listening(self.port, lambda: self._proc is not None and self._proc.poll() is None)
        self.kind, self.protocol = "mosquitto", "5"

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
        _wait_listening(self.port, lambda: self._thread is not None and self._thread.is_alive())
        self.kind, self.protocol = "embedded amqtt (MQTT 3.1.1, demo only)", "3.1.1"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._loop is not None and self._broker is not None:
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)  # type: ignore[attr-defined]
            try:
                fut.result(10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
