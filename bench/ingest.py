"""Ingest and sync throughput: MQTT QoS 1 into the durable outbox, then outbox to the cloud store.

Prints JSON lines (see DESIGN.md, Benchmark output):
- ingest_rate: messages/s from a publisher in another process into the outbox (acked after
  commit), baseline: the same path committing one message per transaction;
- sync_rate: records/s shipped over a real gRPC tunnel (gzip, a window of 8 batches) into the
  cloud's SQLite store, baseline: one record per batch, stop-and-wait;
- sync_rate_rtt200: the same through a TCP proxy adding 100 ms each way (harness TcpProxy),
  baseline: stop-and-wait (one 2,000-record batch in flight), measured the same way;
- wire_bytes_per_record: bytes on the wire edge -> cloud per record in that run, gzip against
  no compression (smaller is better; speedup = without / with);
- live_verdict_p95: store-to-cloud latency of verdicts stored (20/s) while a 200,000-record
  backlog drains, live lane first, baseline: the sequence-order drain in the same run.

`--client paho` ingests with paho's public API (edge/ingest/mqtt_client.py PahoClient) instead
of the BufferedClient subclass, the comparison that module's docstring cites.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing as mp
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PUBLISH_WINDOW = 5000
INGEST_TIMEOUT_S = 180.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _string(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def publish(port: int, n: int, topic: str, ready: mp.Event) -> None:  # type: ignore[type-arg]
    """A plain-socket MQTT 3.1.1 QoS 1 publisher: paho's Python publisher tops out near
    6,000 msg/s here, below what the ingest path takes, so it would measure itself."""
    import socket
    import threading

    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connect = _string(b"MQTT") + bytes([4, 0x02]) + (60).to_bytes(2, "big") + _string(b"bench-pub")
    sock.sendall(_packet(0x10, connect))
    assert sock.recv(4)[:1] == b"\x20", "no CONNACK"
    acked = [0]
    done = threading.Event()

    def read_acks() -> None:
        buf = b""
        while acked[0] < n:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
            whole = len(buf) // 4  # PUBACK is 4 bytes: 0x40 0x02 id id
            acked[0] += whole
            buf = buf[whole * 4 :]
        done.set()

    threading.Thread(target=read_acks, daemon=True).start()
    pad = "x" * 120
    topic_b = _string(topic.encode())
    packets = []
    for i in range(n):
        body = json.dumps({"ts": 1.7e9 + i, "value": i * 0.25, "id": i, "pad": pad}).encode()
        pid = (i % 65535) + 1
        packets.append(_packet(0x32, topic_b + pid.to_bytes(2, "big") + body))
    ready.wait()
    chunk = 500
    for start in range(0, n, chunk):
        while start - acked[0] > PUBLISH_WINDOW:  # packet ids must not wrap onto unacked ones
            time.sleep(0.001)
        sock.sendall(b"".join(packets[start : start + chunk]))
    done.wait(300)
    sock.close()


def ingest_rate(port: int, n: int, batch_max: int, data_dir: Path, client: str) -> float:
    from fieldline.edge.ingest.mqtt import MqttIngestor
    from fieldline.edge.ingest.mqtt_client import BufferedClient, PahoClient
    from fieldline.edge.ingest.outbox import Outbox
    from fieldline.shared.config import MqttSettings
    from fieldline.shared.policy import Policy, Subscription

    data_dir.mkdir(parents=True)
    outbox = Outbox(data_dir)
    topic = f"bench/{data_dir.name}/reading"
    ing = MqttIngestor(
        MqttSettings(port=port, batch_max=batch_max, batch_window_ms=5),
        outbox,
        client_id=f"bench-{data_dir.name}",
        client_class=PahoClient if client == "paho" else BufferedClient,
    )
    ing.apply_policy(Policy(subscriptions=[Subscription(topic=topic)]))
    ing.start()
    while not ing.connected:
        time.sleep(0.01)
    time.sleep(0.3)
    ready = mp.Event()
    proc = mp.Process(target=publish, args=(port, n, topic, ready))
    proc.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    ready.set()
    deadline = time.monotonic() + INGEST_TIMEOUT_S
    while ing.stored < n:
        if time.monotonic() > deadline or (proc.exitcode not in (None, 0)):
            ing.stop()
            raise SystemExit(
                f"ingest stalled at {ing.stored} of {n} (publisher exit {proc.exitcode})"
            )
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    proc.join()
    ing.stop()
    assert outbox.stats().rows == n
    outbox.close()
    return n / elapsed


def reading(i: int) -> bytes:
    """A sensor reading as plants send them: a timestamp, a value, ids and a 24-hex-digit trace
    field that does not compress (so gzip's figure is not flattered by padding)."""
    trace = hashlib.blake2b(i.to_bytes(8, "big"), digest_size=12).hexdigest()
    return (
        b'{"ts": %.3f, "value": %.3f, "id": %d, "sensor": "temp-%02d", "unit": "degC", '
        b'"status": "ok", "trace": "%s"}'
        % (1_700_000_000 + i / 100, 20 + (i % 997) / 100, i, i % 16, trace.encode())
    )


@dataclass(frozen=True)
class SyncRun:
    rate: float  # records/s
    wire_bytes: int  # edge -> cloud through the proxy (0 without one)
    verdict_ms: list[int] = field(default_factory=list)  # store-to-cloud latency of live verdicts


async def _sync_rate(
    n: int,
    batch: int,
    work: Path,
    *,
    window: int = 8,
    delay_s: float = 0.0,
    gzip: bool = True,
    verdicts_per_s: float = 0.0,
    live_lane: bool = True,
) -> SyncRun:
    """Ship n outbox records into a cloud over a real gRPC tunnel, through a TCP proxy that adds
    delay_s each way when given (it also counts the bytes). With verdicts_per_s, verdicts are
    stored while the backlog drains and their store-to-cloud latencies returned."""
    import grpc

    import fieldline.edge.ingest.sync as sync_mod
    from fieldline.cli.harness.tcp_proxy import TcpProxy
    from fieldline.cloud.server import CloudServer
    from fieldline.cloud.store import auth as auth_store
    from fieldline.cloud.store import records as record_store
    from fieldline.edge.ingest.outbox import NewRecord, Outbox
    from fieldline.edge.ingest.sync import OutboxSync
    from fieldline.shared.config import CloudSettings
    from fieldline.shared.policy import Retention
    from fieldline.shared.proto import tunnel_pb2 as pb
    from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc

    server = CloudServer(CloudSettings(data_dir=work / "cloud", http_port=0, grpc_port=0))
    await server.start()
    assert server.ctx is not None
    _, secret = auth_store.create_token(server.ctx.db, labels={}, ttl_s=60)
    proxy = None
    target = f"127.0.0.1:{server.grpc_port}"
    if delay_s:
        proxy = TcpProxy(("127.0.0.1", server.grpc_port), delay_s=delay_s).start()
        target = f"127.0.0.1:{proxy.port}"
    async with grpc.aio.insecure_channel(target) as ch:
        enrolled = await pb_grpc.EnrollmentStub(ch).Enroll(pb.EnrollRequest(token=secret))
        outbox = Outbox(_mkdir(work / "edge"), Retention(max_rows=10 * n))
        for start in range(0, n, 10_000):
            outbox.commit_batch(
                [
                    NewRecord("telemetry", "plant1/line-a/sensor/temp", 1, reading(i))
                    for i in range(start, min(n, start + 10_000))
                ]
            )
        out: asyncio.Queue[pb.EdgeMessage] = asyncio.Queue()
        sync = OutboxSync(
            outbox,
            lambda m: out.put_nowait(m) is None,
            Retention,
            window=window,
            live_lane=live_lane,
        )

        async def requests():  # type: ignore[no-untyped-def]
            yield pb.EdgeMessage(hello=pb.Hello(node_info_json="{}"))
            while True:
                yield await out.get()

        md = (("authorization", f"Bearer {enrolled.node_id}.{enrolled.node_secret}"),)
        compression = grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression
        call = pb_grpc.TunnelStub(ch).Connect(requests(), metadata=md, compression=compression)

        async def acks() -> None:
            async for msg in call:
                if msg.WhichOneof("body") == "records_ack":
                    ack = msg.records_ack
                    await sync.on_ack(ack.high_water_seq, ack.epoch, ack.batch_id)

        reader = asyncio.create_task(acks())
        sync_mod.BATCH_RECORDS = batch
        await asyncio.sleep(0.3 + 4 * delay_s)
        wire0 = proxy.bytes_up if proxy else 0
        backlog_done = asyncio.Event()
        producer = None
        if verdicts_per_s:
            producer = asyncio.create_task(_live_verdicts(outbox, verdicts_per_s, backlog_done))
        t0 = time.perf_counter()
        while outbox.stats().unsynced:
            await sync.run_once(max_batches=10_000)
            if await asyncio.to_thread(_backlog_synced, outbox, n):
                backlog_done.set()
        elapsed = time.perf_counter() - t0
        if producer is not None:
            backlog_done.set()
            await producer
            while outbox.stats().unsynced:
                await sync.run_once()
        wire = (proxy.bytes_up - wire0) if proxy else 0
        reader.cancel()
        call.cancel()
    if proxy is not None:
        proxy.stop()
    stored = record_store.count_records(server.ctx.db, node_id=enrolled.node_id)
    verdicts = [
        r.received_ms - r.ts_ms
        for r in record_store.query_records(
            server.ctx.db, node_id=enrolled.node_id, kind="verdict", limit=100_000
        )
    ]
    await server.stop()
    outbox.close()
    assert stored == n + len(verdicts), (stored, n)
    return SyncRun(n / elapsed, wire, verdicts)


async def _live_verdicts(outbox: Any, per_s: float, done: asyncio.Event) -> None:
    """Store a verdict every 1/per_s seconds, stamped with the wall clock, until done."""
    from fieldline.edge.ingest.outbox import NewRecord

    while not done.is_set():
        now = time.time_ns() // 1_000_000
        record = NewRecord("verdict", "plant1/line-a/verdicts", now, b'{"defect": false}')
        await asyncio.to_thread(outbox.append, [record])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 1 / per_s)


def _backlog_synced(outbox: Any, n: int) -> bool:
    """Every telemetry record of the backlog is synced."""
    with outbox._lock:  # the bench reads the outbox's own file; no API for this count
        (left,) = outbox._conn.execute(
            "SELECT COUNT(*) FROM records WHERE synced_ms IS NULL AND kind = 'telemetry'"
        ).fetchone()
    return int(left) == 0


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--baseline-messages", type=int, default=5_000)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--client", choices=["buffered", "paho"], default="buffered")
    ap.add_argument("--skip-sync", action="store_true", help="measure ingest_rate only")
    ap.add_argument("--rtt-ms", type=int, default=200, help="round trip the proxy makes")
    ap.add_argument("--rtt-records", type=int, default=100_000)
    ap.add_argument("--window", type=int, default=8, help="batches in flight")
    ap.add_argument("--backlog-records", type=int, default=200_000, help="for live_verdict_p95")
    args = ap.parse_args()
    from fieldline.shared.logs import configure_logging

    configure_logging("warning")  # logs to stderr: stdout carries only the JSON lines
    from fieldline.cli.harness.mosquitto import MosquittoBroker

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work / "broker").start()
        try:
            log(f"ingest: baseline, {args.baseline_messages} messages, one commit each")
            base = ingest_rate(broker.port, args.baseline_messages, 1, work / "base", args.client)
            log(f"ingest: {args.messages} messages, batched commits")
            rate = ingest_rate(broker.port, args.messages, 1000, work / "batched", args.client)
        finally:
            broker.kill()
        print(
            json.dumps(
                {
                    "bench": "ingest",
                    "metric": "ingest_rate",
                    "unit": "msg/s",
                    "value": round(rate, 1),
                    "baseline": round(base, 1),
                    "speedup": round(rate / base, 2),
                    "messages": args.messages,
                    "baseline_messages": args.baseline_messages,
                    "payload_bytes": 200,
                    "qos": 1,
                    "durability": "sqlite WAL synchronous=FULL, ack after commit",
                    "baseline_desc": "one transaction (fsync) per message",
                    "client": args.client,
                }
            ),
            flush=True,
        )
        if args.skip_sync:
            return
        log(f"sync: baseline, {args.records // 20} records, one per batch")
        sbase = asyncio.run(
            _sync_rate(args.records // 20, 1, _mkdir(work / "sync-base"), window=1)
        ).rate
        log(f"sync: {args.records} records, batches of 2000")
        srate = asyncio.run(_sync_rate(args.records, 2000, _mkdir(work / "sync"))).rate
        emit(
            "sync_rate",
            "records/s",
            srate,
            sbase,
            records=args.records,
            batch_records=2000,
            window_batches=8,
            transport="grpc.aio loopback, gzip",
            baseline_desc="one record per batch, ack awaited each time",
        )
        rtt_runs(args, work)
        live_runs(args, work)


def emit(metric: str, unit: str, value: float, baseline: float, **conditions: object) -> None:
    """One JSON line; speedup > 1 is better (for a latency, baseline / value)."""
    better = baseline / value if unit in ("ms", "bytes") else value / baseline
    line = {
        "bench": "ingest",
        "metric": metric,
        "unit": unit,
        "value": round(value, 1),
        "baseline": round(baseline, 1),
        "speedup": round(better, 2),
        **conditions,
    }
    print(json.dumps(line), flush=True)


def live_runs(args: argparse.Namespace, work: Path) -> None:
    """live_verdict_p95: verdicts stored while a backlog drains, live lane against the
    sequence-order drain."""
    from fieldline.shared.health import percentile

    n, per_s = args.backlog_records, 20.0
    runs = {}
    for lane in (False, True):
        log(f"live verdicts during a {n}-record backlog, live lane {'on' if lane else 'off'}")
        run = asyncio.run(
            _sync_rate(n, 2000, _mkdir(work / f"live-{lane}"), verdicts_per_s=per_s, live_lane=lane)
        )
        runs[lane] = run
    p95 = {
        lane: percentile([float(v) for v in r.verdict_ms], 0.95) or 0.0 for lane, r in runs.items()
    }
    emit(
        "live_verdict_p95",
        "ms",
        p95[True],
        p95[False],
        backlog_records=n,
        verdicts=len(runs[True].verdict_ms),
        baseline_verdicts=len(runs[False].verdict_ms),
        verdicts_per_s=per_s,
        backlog_drain_rate=round(runs[True].rate, 1),
        baseline_drain_rate=round(runs[False].rate, 1),
        transport="grpc.aio loopback, gzip, window 8",
        baseline_desc="sequence-order drain: verdicts wait behind the backlog",
    )


def rtt_runs(args: argparse.Namespace, work: Path) -> None:
    """sync_rate_rtt200 (a window against stop-and-wait over a 200 ms round trip) and
    wire_bytes_per_record (gzip against none), through the delaying proxy."""
    delay = args.rtt_ms / 2000
    n = args.rtt_records
    log(f"sync over {args.rtt_ms} ms RTT: stop-and-wait baseline, {n // 4} records")
    stop_wait = asyncio.run(
        _sync_rate(n // 4, 2000, _mkdir(work / "rtt-base"), window=1, delay_s=delay)
    )
    log(f"sync over {args.rtt_ms} ms RTT: window of {args.window}, {n} records, gzip")
    windowed = asyncio.run(
        _sync_rate(n, 2000, _mkdir(work / "rtt"), window=args.window, delay_s=delay)
    )
    log(f"sync over {args.rtt_ms} ms RTT: window of {args.window}, {n} records, no compression")
    plain = asyncio.run(
        _sync_rate(
            n, 2000, _mkdir(work / "rtt-plain"), window=args.window, delay_s=delay, gzip=False
        )
    )
    emit(
        f"sync_rate_rtt{args.rtt_ms}",
        "records/s",
        windowed.rate,
        stop_wait.rate,
        records=n,
        baseline_records=n // 4,
        batch_records=2000,
        window_batches=args.window,
        rtt_ms=args.rtt_ms,
        transport="grpc.aio through a TCP proxy adding rtt/2 each way, gzip",
        baseline_desc="stop-and-wait: one 2,000-record batch in flight",
        no_compression_rate=round(plain.rate, 1),
    )
    per_gzip, per_plain = windowed.wire_bytes / n, plain.wire_bytes / n
    # Smaller is better: speedup is plain / gzip, like a latency.
    emit(
        "wire_bytes_per_record",
        "bytes",
        per_gzip,
        per_plain,
        speedup_desc="bytes without compression / bytes with gzip",
        records=n,
        payload_bytes=len(reading(n // 2)),
        compression="gzip (grpc per-message)",
        baseline_desc="no compression",
    )


if __name__ == "__main__":
    main()
