"""`python -m tests.support.blocking_edge ARGS`: the real `fieldline` CLI, plus a SIGUSR1
handler that blocks the daemon's event loop for $FIELDLINE_TEST_BLOCK_S seconds.

Only the watchdog test uses it, to wedge the loop on purpose while every thread keeps running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from fieldline.cli.main import main
from fieldline.edge import agent

_start = agent.EdgeAgent.start


async def _start_with_block(self: agent.EdgeAgent) -> None:
    await _start(self)
    seconds = float(os.environ.get("FIELDLINE_TEST_BLOCK_S", "3"))
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, time.sleep, seconds)


agent.EdgeAgent.start = _start_with_block  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
