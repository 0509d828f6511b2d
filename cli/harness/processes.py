"""Starting and stopping fieldline daemons as child processes (the demo and the e2e tests use it).

Every child gets its own log file and its own process group, so stop() can end it and
anything it started; children are stopped in reverse order of start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STOP_GRACE_S = 10.0
PORTS_WAIT_S = 60.0
POLL_S = 0.05


class ProcessError(Exception):
    """A child that died or did not come up in time; the message quotes its log tail."""


def fieldline_cmd(*args: str) -> list[str]:
    """The command line that runs `fieldline ARGS` with this interpreter."""
    return [sys.executable, "-m", "fieldline.cli", *args]


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Child:
    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = dict(os.environ)
        env.update(self.env or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            self.args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            code = self.proc.returncode if self.proc else None
            raise ProcessError(
                f"{self.name} exited with code {code}; its log ends with:\n{log_tail(self.log_path)}"
            )

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, as a fault test wants it)."""
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM, wait up to grace_s, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it exited just now
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@dataclass
class ProcessStack:
    """Children started in order and stopped in reverse; a context manager."""

    children: list[Child] = field(default_factory=list)

    def start(self, child: Child) -> Child:
        self.children.append(child.start())
        return child

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()

    def __enter__(self) -> ProcessStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_for_file(path: Path, child: Child, timeout_s: float = PORTS_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        child.check_alive()
        if time.monotonic() > deadline:
            raise ProcessError(
                f"{child.name} did not write {path} within {timeout_s:.0f}s; log:\n"
                f"{log_tail(child.log_path)}"
            )
        time.sleep(POLL_S)


def read_ports(data_dir: Path) -> dict[str, int]:
    """The ports a cloud started with port 0 actually bound (DATA_DIR/ports.json); with TLS
    also "enroll" (its TLS enrollment listener)."""
    data = json.loads((data_dir / "ports.json").read_text())
    ports = {"http": int(data["http"]), "grpc": int(data["grpc"])}
    if data.get("enroll"):
        ports["enroll"] = int(data["enroll"])
    return ports


def cloud_url(data_dir: Path, ports: dict[str, int]) -> str:
    """The admin API's base URL: https when the cloud runs with TLS (DATA/tls/ca.crt trusts it)."""
    scheme = "https" if "enroll" in ports else "http"
    return f"{scheme}://127.0.0.1:{ports['http']}"


def start_cloud(
    stack: ProcessStack,
    data_dir: Path,
    *,
    name: str = "cloud",
    env: dict[str, str] | None = None,
    http_port: int = 0,
    grpc_port: int = 0,
    tls: bool = False,
    enroll_port: int = 0,
) -> tuple[Child, dict[str, int]]:
    """Start `fieldline cloud serve` (with --tls: minted CA in DATA/tls) and wait for its ports."""
    ports_file = data_dir / "ports.json"
    if ports_file.exists():
        ports_file.unlink()  # a previous run's ports; wait for this run's
    child = stack.start(
        Child(
            name,
            fieldline_cmd(
                "cloud",
                "serve",
                "--data",
                str(data_dir),
                "--http",
                f"127.0.0.1:{http_port}",
                "--grpc",
                f"127.0.0.1:{grpc_port}",
                *(["--tls", "--enroll", f"127.0.0.1:{enroll_port}"] if tls else []),
            ),
            data_dir.parent / f"{name}.log",
            env=env,
        )
    )
    wait_for_file(ports_file, child)
    return child, read_ports(data_dir)


def start_edge(
    stack: ProcessStack,
    data_dir: Path,
    grpc_port: int,
    *,
    token: str | None,
    name: str,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
) -> Child:
    """Start `fieldline edge run` against a cloud on loopback."""
    args = ["edge", "run", "--cloud", f"127.0.0.1:{grpc_port}", "--data", str(data_dir)]
    if token:
        args += ["--token", token]
    return stack.start(
        Child(name, fieldline_cmd(*args, *(extra or [])), data_dir.parent / f"{name}.log", env=env)
    )
