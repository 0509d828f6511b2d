"""systemd integration: the daemons speak sd_notify (READY=1, WATCHDOG=1 from the event loop),
and the unit files in deploy/systemd pass `systemd-analyze verify` where systemd is installed."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fieldline.cli.harness.processes import Child, ProcessStack, fieldline_cmd, start_cloud
from fieldline.shared.sdnotify import Notifier
from tests.e2e.conftest import Fleet

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
WATCHDOG_USEC = 400_000  # pings every 0.2 s
BLOCK_S = 2.5


class NotifySocket:
    """The datagram socket systemd would own: records (time, message) as they arrive."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []

    def drain(self, seconds: float) -> list[tuple[float, str]]:
        """Collect for `seconds`; returns what arrived in that time."""
        end = time.monotonic() + seconds
        got = []
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                got.append((time.monotonic(), line))
        self.messages += got
        return got

    def wait_for(self, text: str, timeout_s: float) -> float:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for at, line in self.drain(0.1):
                if line == text:
                    return at
        raise AssertionError(f"no {text} within {timeout_s}s; got {self.messages[-5:]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def _pings(messages: list[tuple[float, str]]) -> list[float]:
    return [at for at, line in messages if line == "WATCHDOG=1"]


def test_edge_sends_ready_then_watchdog_and_stops_when_its_loop_blocks(
    fleet: Fleet, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    with fleet.admin() as admin:
        token = admin.create_token({"line": "a"})["token"]
    env = {
        "NOTIFY_SOCKET": str(notify_socket.path),
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "FIELDLINE_TEST_BLOCK_S": str(BLOCK_S),
    }
    args = [
        sys.executable,
        "-m",
        "tests.support.blocking_edge",
        "edge",
        "run",
        "--cloud",
        f"127.0.0.1:{fleet.ports['grpc']}",
        "--token",
        token,
        "--data",
        str(tmp_path / "edge"),
    ]
    child = fleet.stack.start(Child("edge", args, tmp_path / "edge.log", env=env))
    ready_at = notify_socket.wait_for("READY=1", 60)
    assert not _pings([m for m in notify_socket.messages if m[0] < ready_at])
    steady = _pings(notify_socket.drain(1.5))
    assert len(steady) >= 5, steady  # every 0.2 s
    assert max(b - a for a, b in itertools.pairwise(steady)) < 0.6

    assert child.proc is not None
    child.proc.send_signal(signal.SIGUSR1)  # the loop sleeps BLOCK_S seconds
    sent = time.monotonic()
    during = notify_socket.drain(BLOCK_S + 1.5)
    pings = _pings(during)
    # At most one ping that raced the signal, then silence for the whole block.
    blocked = [t for t in pings if sent + 0.3 < t < sent + BLOCK_S - 0.2]
    assert blocked == [], blocked
    assert any(t > sent + BLOCK_S for t in pings), "pings did not resume after the block"
    child.check_alive()
    assert child.stop() == 0
    assert any(
        line == "STOPPING=1" for _, line in notify_socket.drain(0.5) + notify_socket.messages
    )


def test_cloud_sends_ready_and_watchdog(notify_socket: NotifySocket, tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    with ProcessStack() as stack:
        start_cloud(stack, tmp_path / "cloud", env=env)
        notify_socket.wait_for("READY=1", 30)
        assert len(_pings(notify_socket.drain(1.2))) >= 4


def test_notifier_is_silent_outside_systemd() -> None:
    n = Notifier(env={})
    assert not n.enabled and not n.ready() and n.watchdog_s is None
    assert Notifier(env={"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier(env={"WATCHDOG_USEC": "5000000"}).watchdog_s == 5.0
    assert Notifier(env={"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
@pytest.mark.parametrize("unit", ["fieldline-edge.service", "fieldline-cloud.service"])
def test_units_pass_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this checkout's fieldline.
    exe = Path(sys.executable).with_name("fieldline")
    assert exe.exists(), exe
    text = (UNITS / unit).read_text()
    assert "/opt/fieldline/bin/fieldline " in text
    (tmp_path / unit).write_text(text.replace("/opt/fieldline/bin/fieldline", str(exe)))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    # verify exits 0 on directives it ignores; any warning it prints is a failure here.
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", (
        out.stdout + out.stderr
    )


@pytest.mark.parametrize("unit", ["fieldline-edge.service", "fieldline-cloud.service"])
def test_units_have_the_required_settings(unit: str) -> None:
    text = (UNITS / unit).read_text()
    settings = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert settings["Type"] == "notify"
    assert settings["Restart"] == "on-failure"
    assert settings["WatchdogSec"]
    assert settings["ProtectSystem"] == "strict"
    assert settings["NoNewPrivileges"] == "yes"
    data = "/var/lib/" + unit.removesuffix(".service")
    assert settings["ReadWritePaths"] == data
    assert f"--data {data}" in settings["ExecStart"]
    assert fieldline_cmd("x")[-1] == "x"  # the CLI entry point the units run exists
