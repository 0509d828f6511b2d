"""A node speaking the tunnel protocol by hand: enroll, then send heartbeats and read the acks.

tests/cloud and tests/cli use it to give a real cloud a node whose health is known exactly.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc

from fieldline.shared.health import (
    CacheHealth,
    DataPlaneHealth,
    GatewayHealth,
    InspectionModelHealth,
    LlmHealth,
    LocalRollback,
    ModelHealth,
    MqttHealth,
    NodeHealth,
    OutboxHealth,
    TunnelHealth,
)
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc
from fieldline.shared.schemas import ArtifactState, ArtifactStatus, ObservedState

ACK_WAIT_S = 15.0


def enroll(target: str, token: str) -> pb.EnrollResponse:
    async def go() -> pb.EnrollResponse:
        async with grpc.aio.insecure_channel(target) as ch:
            return await pb_grpc.EnrollmentStub(ch).Enroll(
                pb.EnrollRequest(token=token, node_info_json='{"hostname": "press-7"}')
            )

    return asyncio.run(go())


def report(
    target: str,
    node: pb.EnrollResponse,
    healths: list[str],
    observed: ObservedState | None = None,
) -> list[int]:
    """Send hello, the observed state, then one heartbeat per health JSON (seq 1, 2, ...) and
    a last empty heartbeat; return the heartbeat seqs the cloud acked, once it acked the last.

    Messages are handled in order, so when the last ack arrives every earlier one was stored
    or refused.
    """
    last = len(healths) + 1

    async def go() -> list[int]:
        async def messages():  # type: ignore[no-untyped-def]
            yield pb.EdgeMessage(hello=pb.Hello(node_info_json='{"hostname": "press-7"}'))
            if observed is not None:
                yield pb.EdgeMessage(
                    observed=pb.ObservedStateReport(observed_json=observed.model_dump_json())
                )
            for seq, text in enumerate([*healths, ""], start=1):
                yield pb.EdgeMessage(heartbeat=pb.Heartbeat(seq=seq, health_json=text))
            await asyncio.sleep(ACK_WAIT_S)

        bearer = f"Bearer {node.node_id}.{node.node_secret}"
        acked: list[int] = []
        async with grpc.aio.insecure_channel(target) as ch:
            call = pb_grpc.TunnelStub(ch).Connect(messages(), metadata=(("authorization", bearer),))
            async with asyncio.timeout(ACK_WAIT_S):
                async for msg in call:
                    if msg.WhichOneof("body") == "heartbeat_ack":
                        acked.append(msg.heartbeat_ack.seq)
                        if msg.heartbeat_ack.seq == last:
                            call.cancel()
                            return acked[:-1]
        raise AssertionError(f"no ack of heartbeat {last}; acked {acked}")

    return asyncio.run(go())


def sample_health() -> NodeHealth:
    """A node running every part, with figures a person would look for."""
    return NodeHealth(
        models={
            "detector": ModelHealth(
                name="detector",
                version="2.0",
                loaded=True,
                serving=True,
                requests=5120,
                errors=3,
                window_requests=240,
                window_errors=3,
                error_rate=0.0125,
                p95_latency_ms=41.5,
            )
        },
        local_rollbacks=[
            LocalRollback(
                name="detector",
                from_version="2.1",
                to_version="2.0",
                sha256="a" * 64,
                reason="error rate 31% over 50 requests",
                at=datetime(2026, 3, 1, 8, 30, tzinfo=UTC),
            )
        ],
        tunnel=TunnelHealth(connected=True, rtt_ms=7.25),
        dataplane=DataPlaneHealth(
            outbox=OutboxHealth(rows=1234, bytes=567_890, unsynced=17, dead_letters=2),
            mqtt=MqttHealth(configured=True, connected=True, stored=9876, dead_lettered=2),
            inspection={
                "detector": InspectionModelHealth(
                    loaded=True, version="2.0", requests=5120, errors=3, p95_latency_ms=41.5
                )
            },
            verdicts_published=5117,
            defects=12,
            sync_backlog=150_000,  # behind after an outage: a live lane ahead of the backlog
            sync_live_lag_ms=850.0,
        ),
        llm=LlmHealth(state="serving", loaded=True, model="assistant", version="1.3", inflight=2),
        gateway=GatewayHealth(
            listening=8081,
            cache=CacheHealth(entries=40, hits=300, misses=60),
            explanations_published=9,
        ),
        reported_at=datetime(2026, 3, 1, 9, 0, tzinfo=UTC),
    )


def sample_observed() -> ObservedState:
    return ObservedState(
        applied_generation=3,
        active={"detector": "2.0"},
        artifacts=[
            ArtifactStatus(
                name="detector", version="2.0", sha256="b" * 64, state=ArtifactState.active
            )
        ],
    )
