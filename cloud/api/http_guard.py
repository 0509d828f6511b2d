"""Time limits uvicorn lacks: a client must finish its request headers, and keep a request body
moving, within set times, or its connection is closed, logged and counted (slow-loris guard).

uvicorn's h11 protocol arms a timer only between requests (keep-alive); a connection that
trickles header bytes, or opens and sends nothing, would otherwise hold a slot forever.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

log = structlog.get_logger(__name__)

LOG_EVERY_S = 5.0  # under a flood of slow clients, one log line per this many seconds


class _GuardState:
    """Counts and rate-limited logging shared by every connection of one server."""

    def __init__(self, on_timeout: Any = None):
        self.on_timeout = on_timeout  # callable(kind) -> None, e.g. a metric
        self.closed = 0
        self._since_log = 0
        self._last_log = 0.0

    def record(self, kind: str, client: object) -> None:
        self.closed += 1
        self._since_log += 1
        if self.on_timeout is not None:
            self.on_timeout(kind)
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            log.warning(
                "slow HTTP client disconnected",
                reason=kind,
                client=str(client),
                closed=self._since_log,
                closed_total=self.closed,
            )
            self._since_log = 0
            self._last_log = now


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a header deadline and a body idle timeout (class attributes, set by
    `guarded_protocol`)."""

    header_timeout_s = 10.0
    body_idle_timeout_s = 60.0
    guard = _GuardState()

    _deadline: asyncio.TimerHandle | None = None
    _awaiting_headers = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._awaiting_headers = True
        self._arm(self.header_timeout_s, "headers")

    def data_received(self, data: bytes) -> None:
        cycle_before = self.cycle
        if self._awaiting_headers and self._deadline is None:
            self._arm(self.header_timeout_s, "headers")  # first byte of a keep-alive request
        super().data_received(data)
        if self.cycle is not cycle_before and self.cycle is not None:
            self._awaiting_headers = False  # h11 parsed a whole request head
            self._disarm()
        if not self._awaiting_headers:
            cycle = self.cycle
            if cycle is not None and cycle.more_body and not cycle.response_complete:
                self._arm(self.body_idle_timeout_s, "body")
            else:
                self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()
        self._awaiting_headers = True  # the next request's head has its own deadline
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float, kind: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, kind)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, kind: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if kind == "body" and self.flow.read_paused:
            # We paused reading (the app is behind), so no bytes could come: not the client.
            self._arm(self.body_idle_timeout_s, kind)
            return
        self.guard.record(kind, self.client)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
        self.transport.close()


def guarded_protocol(
    *, header_timeout_s: float, body_idle_timeout_s: float, on_timeout: Any = None
) -> type[GuardedH11Protocol]:
    """A protocol class for uvicorn.Config(http=...) with these limits."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout_s": header_timeout_s,
            "body_idle_timeout_s": body_idle_timeout_s,
            "guard": _GuardState(on_timeout),
        },
    )
