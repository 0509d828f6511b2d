"""Clocks: timezone-aware wall time and millisecond timestamps, in one place so tests can agree."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch (for timestamps that cross machines)."""
    return time.time_ns() // 1_000_000


def monotonic_ms() -> float:
    """Monotonic milliseconds (for durations measured on one machine)."""
    return time.monotonic_ns() / 1e6
