"""Fixtures every test folder may use; folder-specific ones live in that folder's conftest.py."""

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fieldline.cli.harness.mosquitto import MosquittoBroker

# Triton kernels run on CPU tensors through the interpreter in tests. The flag is read when a
# kernel is decorated, so it must be set before any test module imports fieldline.kernels
# (nothing imported above does).
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A real Mosquitto on a free loopback port, with persistence, stopped after the test."""
    broker = MosquittoBroker(tmp_path / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[[], MosquittoBroker]]:
    """Start more brokers (each on its own free port and folder); all killed after the test."""
    brokers: list[MosquittoBroker] = []

    def make() -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / f"mosquitto-{len(brokers)}")
        brokers.append(broker)
        return broker.start()

    try:
        yield make
    finally:
        for broker in reversed(brokers):
            broker.kill()
