"""Reconnect delays: exponential with jitter, reset after a healthy connection.

Not `tenacity`: the tunnel's loop never finishes (a session that ran for hours and dropped is
normal, not a failed attempt), and the delay resets when a Welcome arrives mid-session, which
tenacity's per-call attempt count cannot express; its jitter is also not a configurable share.
"""

from __future__ import annotations

import random

from fieldline.shared.config import BackoffSettings


class Backoff:
    """next_delay() before each attempt, reset() after a success (the tunnel's Welcome)."""

    def __init__(self, settings: BackoffSettings, rng: random.Random | None = None):
        self.settings = settings
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt: initial * multiplier^n capped at max, minus jitter."""
        s = self.settings
        base = min(s.max_s, s.initial_s * (s.multiplier**self._attempt))
        self._attempt += 1
        # Full spread below the cap so a fleet that lost the cloud together does not return together.
        return base * (1.0 - s.jitter * self._rng.random())

    def reset(self) -> None:
        self._attempt = 0
