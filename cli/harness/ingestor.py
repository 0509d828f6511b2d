"""A bare MQTT ingestor process (no tunnel, no inspection) that the kill -9 tests start and kill.

`python -m fieldline.cli.harness.ingestor --data DIR --port N --topic T` ingests into
DIR/outbox.db, prints "ready" on stdout once subscribed, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

import structlog

from fieldline.edge.ingest.mqtt import MqttIngestor
from fieldline.edge.ingest.outbox import Outbox
from fieldline.shared.config import MqttSettings
from fieldline.shared.logs import configure_logging
from fieldline.shared.policy import Policy, Subscription

log = structlog.get_logger(__name__)

SUBSCRIBED_POLL_S = 0.05


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Ingest MQTT topics into DIR/outbox.db until SIGTERM.")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", action="append", required=True, help="topic filter (repeatable)")
    ap.add_argument("--client-id", default="fieldline-edge-ingest")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    configure_logging(args.log_level)  # stderr: stdout carries only "ready"
    args.data.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(args.data)
    ing = MqttIngestor(
        MqttSettings(host=args.host, port=args.port), outbox, client_id=args.client_id
    )
    ing.apply_policy(Policy(subscriptions=[Subscription(topic=t) for t in args.topic]))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    ing.start()
    while not ing.subscribed.wait(SUBSCRIBED_POLL_S) and not done.is_set():
        pass
    print("ready", flush=True)
    done.wait()
    ing.stop()
    log.info("ingestion stopped", health=ing.health().model_dump())
    outbox.close()


if __name__ == "__main__":
    main()
