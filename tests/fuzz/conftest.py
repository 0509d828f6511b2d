"""Fuzz budgets: a short run in `make test`, at least 10,000 inputs per target in `make test-all`.

Each target counts the inputs it ran and the slow variant asserts the count, so a budget that
hypothesis cut short (a too-small search space, a filter) shows up as a failure.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

QUICK = int(os.environ.get("FIELDLINE_FUZZ_QUICK", "300"))
LONG = int(os.environ.get("FIELDLINE_FUZZ_LONG", "10000"))


def budget(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
