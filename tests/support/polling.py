"""Waiting in tests for something another thread or process does: poll a predicate until it holds."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

POLL_S = 0.2  # the e2e tests poll HTTP and `fieldline edge status` (a process) with it


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = POLL_S
) -> Any:
    """Poll until predicate() is truthy and return its value; fail the test naming `what` on
    timeout. A predicate that raises counts as not yet (the thing polled may not be up)."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    raise _timed_out(timeout_s, what, last_exc)


def _timed_out(timeout_s: float, what: str, last_exc: Exception | None) -> AssertionError:
    return AssertionError(
        f"timed out after {timeout_s}s waiting for {what} (last error: {last_exc})"
    )


def holds_within(predicate: Callable[[], Any], timeout_s: float, poll_s: float = POLL_S) -> bool:
    """True as soon as predicate() is truthy, False if it never is within timeout_s (for
    asserting that something does *not* happen, e.g. a refused connection)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


async def until(
    predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = POLL_S
) -> Any:
    """wait_until inside an event loop: the predicate may return an awaitable (an API call
    made off the loop), and the loop keeps serving while this waits."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(poll_s)
    raise _timed_out(timeout_s, what, last_exc)
