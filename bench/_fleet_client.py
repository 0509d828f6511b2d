"""Lightweight edge clients for bench/fleet.py: many nodes in one process, each with its own gRPC
channel (its own TCP connection), enrollment, control stream, heartbeats with model health,
signed-manifest checks and real artifact downloads. Run by bench/fleet.py, one process per share.

    python bench/_fleet_client.py --cloud HOST:PORT --tokens FILE --out FILE [--heartbeat-s 5]

Prints one JSON line {"ready": n} on stdout when its nodes are connected; on SIGTERM it writes
its samples (heartbeat round trips, apply times) to --out and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fieldline.shared.health import ModelHealth, NodeHealth
from fieldline.shared.limits import MAX_TUNNEL_MESSAGE_BYTES
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc
from fieldline.shared.schemas import (
    ArtifactState,
    ArtifactStatus,
    DesiredState,
    NodeInfo,
    ObservedState,
)
from fieldline.shared.signing import verify_manifest

ENROLL_CONCURRENCY = 32
CHANNEL_OPTIONS = [
    # One TCP connection per node, as real edges have: no sharing of subchannels in-process.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", MAX_TUNNEL_MESSAGE_BYTES),
]


@dataclass
class Samples:
    rtts: list[tuple[float, float]] = field(default_factory=list)  # (wall time, ms)
    applied: list[tuple[str, str, str, float]] = field(default_factory=list)  # node, name, ver, t
    errors: list[str] = field(default_factory=list)


class Node:
    def __init__(self, index: int, token: str, target: str, hb_s: float, samples: Samples):
        self.index = index
        self.token = token
        self.hb_s = hb_s
        self.samples = samples
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.node_id = ""
        self.public_key = b""
        self.md: tuple[tuple[str, str], ...] = ()
        self.out: asyncio.Queue[pb.EdgeMessage] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.sent: dict[int, float] = {}
        self.seq = 0
        self.generation = 0
        self.active: dict[str, tuple[str, str]] = {}  # name -> (version, sha256)
        self._applying: set[asyncio.Task[None]] = set()

    async def enroll(self) -> None:
        info = NodeInfo(hostname=f"bench-{self.index}", agent_version="bench")
        resp = await pb_grpc.EnrollmentStub(self.channel).Enroll(
            pb.EnrollRequest(token=self.token, node_info_json=info.model_dump_json())
        )
        self.node_id = resp.node_id
        self.public_key = resp.cloud_public_key
        self.md = (("authorization", f"Bearer {resp.node_id}.{resp.node_secret}"),)

    async def run(self) -> None:
        stub = pb_grpc.TunnelStub(self.channel)

        async def requests():  # type: ignore[no-untyped-def]
            yield pb.EdgeMessage(hello=pb.Hello(node_info_json="{}", applied_generation=0))
            while True:
                yield await self.out.get()

        beats = asyncio.create_task(self._beat())
        try:
            async for msg in stub.Connect(requests(), metadata=self.md):
                kind = msg.WhichOneof("body")
                if kind == "welcome":
                    self.connected.set()
                elif kind == "heartbeat_ack":
                    sent = self.sent.pop(msg.heartbeat_ack.seq, None)
                    if sent is not None:
                        self.samples.rtts.append((time.time(), (time.monotonic() - sent) * 1e3))
                elif kind == "desired":
                    task = asyncio.create_task(self._apply(msg.desired))
                    self._applying.add(task)
                    task.add_done_callback(self._applying.discard)
        finally:
            beats.cancel()

    def _health(self) -> str:
        models = {
            name: ModelHealth(name=name, version=v, loaded=True, serving=True)
            for name, (v, _) in self.active.items()
        }
        return NodeHealth(models=models).model_dump_json()

    def heartbeat(self) -> None:
        self.seq += 1
        self.sent[self.seq] = time.monotonic()
        beat = pb.Heartbeat(
            seq=self.seq, sent_at_ms=int(time.time() * 1000), health_json=self._health()
        )
        self.out.put_nowait(pb.EdgeMessage(heartbeat=beat))

    async def _beat(self) -> None:
        await self.connected.wait()
        await asyncio.sleep(random.uniform(0, self.hb_s))  # spread the fleet's beats
        while True:
            self.heartbeat()
            await asyncio.sleep(self.hb_s)

    async def _apply(self, push: pb.DesiredStatePush) -> None:
        try:
            desired = DesiredState.model_validate_json(push.desired_json)
            if desired.generation <= self.generation:
                return
            stub = pb_grpc.TunnelStub(self.channel)
            for signed in desired.artifacts:
                m = verify_manifest(self.public_key, signed)
                if self.active.get(m.name, ("", ""))[1] == m.sha256:
                    continue
                h = hashlib.sha256()
                async for chunk in stub.FetchArtifact(
                    pb.FetchArtifactRequest(sha256=m.sha256, offset=0), metadata=self.md
                ):
                    h.update(chunk.data)
                if h.hexdigest() != m.sha256:
                    raise ValueError(f"sha256 mismatch for {m.ref}")
                self.active[m.name] = (m.version, m.sha256)
                self.samples.applied.append((self.node_id, m.name, m.version, time.time()))
            self.generation = desired.generation
            observed = ObservedState(
                applied_generation=desired.generation,
                active={n: v for n, (v, _) in self.active.items()},
                artifacts=[
                    ArtifactStatus(name=n, version=v, sha256=s, state=ArtifactState.active)
                    for n, (v, s) in self.active.items()
                ],
            )
            self.out.put_nowait(
                pb.EdgeMessage(
                    observed=pb.ObservedStateReport(observed_json=observed.model_dump_json())
                )
            )
            self.heartbeat()  # fresh model health at once, as the real edge does
        except Exception as exc:  # a bench client: record and go on
            self.samples.errors.append(f"{self.node_id}: {exc!r}"[:300])


async def main(args: argparse.Namespace) -> None:
    tokens = json.loads(Path(args.tokens).read_text())
    samples = Samples()
    nodes = [Node(i, t, args.cloud, args.heartbeat_s, samples) for i, t in enumerate(tokens)]
    gate = asyncio.Semaphore(ENROLL_CONCURRENCY)

    async def enroll(node: Node) -> None:
        async with gate:
            await node.enroll()

    await asyncio.gather(*(enroll(n) for n in nodes))
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    await asyncio.gather(*(n.connected.wait() for n in nodes))
    print(json.dumps({"ready": len(nodes)}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    Path(args.out).write_text(
        json.dumps({"rtts": samples.rtts, "applied": samples.applied, "errors": samples.errors})
    )
    for t in tasks:
        t.cancel()
    for n in nodes:
        with contextlib.suppress(Exception):
            await n.channel.close(grace=None)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cloud", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--heartbeat-s", type=float, default=5.0)
    try:
        asyncio.run(main(p.parse_args()))
    except KeyboardInterrupt:
        sys.exit(130)
