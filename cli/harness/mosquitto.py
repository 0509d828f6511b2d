"""A real Mosquitto broker for the tests, the demo and bench/: free port, persistence,
stop/kill/restart on the same port."""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

START_TIMEOUT_S = 10.0
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")


def find_mosquitto() -> str | None:
    """The mosquitto binary, or None when it is not installed."""
    return shutil.which("mosquitto") or next((p for p in MOSQUITTO_PATHS if Path(p).exists()), None)


def mosquitto_binary() -> str:
    found = find_mosquitto()
    if found is None:
        raise RuntimeError(
            "mosquitto is not installed: `make test` installs it (apt-get install mosquitto)"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, alive: Callable[[], bool]) -> None:
    """Return once 127.0.0.1:port accepts a connection; raise if `alive()` turns False first."""
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


class MosquittoBroker:
    def __init__(self, workdir: Path, port: int | None = None, listener: list[str] | None = None):
        """`listener`: extra lines for the listener (TLS files, auth), replacing anonymous access."""
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    # As root, mosquitto drops to user "mosquitto", which cannot write here.
                    f"user {getpass.getuser()}",
                    *(listener or ["allow_anonymous true"]),
                    "set_tcp_nodelay true",
                    "max_inflight_messages 1000",
                    "max_queued_messages 1000000",
                    "max_queued_bytes 0",
                    "persistence true",
                    f"persistence_location {workdir}/",
                    "autosave_interval 1",
                    "autosave_on_changes false",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                ]
            )
            + "\n"
        )

    def start(self) -> MosquittoBroker:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                # its own session: a Ctrl-C meant for the demo or a test run reaches it only
                # through stop()
                [mosquitto_binary(), "-c", str(self.conf)],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        proc = self.proc
        try:
            wait_listening(self.port, lambda: proc.poll() is None)
        except RuntimeError as exc:
            raise RuntimeError(f"mosquitto: {exc}: {self.log.read_text()[-2000:]}") from None
        return self

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file on the way out."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> MosquittoBroker:
        self.stop()
        return self.start()
