"""systemd's notify protocol for `Type=notify` units: READY=1 once serving, WATCHDOG=1 pings.

The pings come from a task on the daemon's event loop (`run_watchdog`), so a loop that is
blocked stops them and systemd restarts the service after WatchdogSec. Without NOTIFY_SOCKET
(not under systemd) every call does nothing.

Not the `sdnotify` package (0.3.2, 2017): its SystemdNotifier drops every send error silently
(or raises with debug=True) and never reads WATCHDOG_USEC/WATCHDOG_PID; this module counts and
logs failed sends and derives the ping period, in about as many lines as the adapter would take.
"""

from __future__ import annotations

import asyncio
import os
import socket

import structlog

log = structlog.get_logger(__name__)

# Ping at this share of WatchdogSec (systemd's advice is about half).
PING_SHARE = 0.5


class Notifier:
    """Sends datagrams to $NOTIFY_SOCKET (a path, or an abstract socket starting with '@')."""

    def __init__(self, env: dict[str, str] | None = None):
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):
            self.address = "\0" + addr[1:]
        elif addr.startswith("/"):
            self.address = addr
        self.watchdog_s = self._watchdog_seconds(env)
        self._sock: socket.socket | None = None
        self.errors = 0

    @staticmethod
    def _watchdog_seconds(env: dict[str, str]) -> float | None:
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None  # meant for another process (e.g. our parent)
        return int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send "KEY=VALUE" fields in one datagram; False (and counted) when it fails."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            self.errors += 1
            if self.errors == 1 or self.errors % 100 == 0:
                log.warning("sd_notify failed", error=str(exc), errors=self.errors)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def run_watchdog(notifier: Notifier, interval_s: float | None = None) -> None:
    """Ping WATCHDOG=1 from this event loop until cancelled (returns at once without a watchdog)."""
    period = interval_s or (notifier.watchdog_s * PING_SHARE if notifier.watchdog_s else None)
    if not notifier.enabled or period is None:
        return
    log.info("systemd watchdog on", every_s=round(period, 3))
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(period)
