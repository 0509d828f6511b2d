"""Fuzzing the tunnel message handlers on both ends, with real stores:

- the cloud's TunnelService._handle (hello, heartbeat, observed state, record batches, and
  messages decoded from raw bytes) may only answer or raise the ValueError/ValidationError its
  reader counts and skips; afterwards the node must still read back through the admin API;
- the edge's desired-state handler (EdgeAgent._on_desired) never raises, and what it stored
  still loads.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from fieldline.cloud.api.routes.nodes import node_public
from fieldline.cloud.context import CloudContext, open_context
from fieldline.cloud.store import nodes as node_store
from fieldline.cloud.tunnel.service import TunnelService
from fieldline.edge.agent import EdgeAgent
from fieldline.edge.control.installer import ArtifactInstaller
from fieldline.edge.control.reconciler import Reconciler
from fieldline.edge.store import EdgeStore
from fieldline.shared.config import CloudSettings, EdgeSettings
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.schemas import ObservedState
from tests.fuzz.conftest import LONG, QUICK, budget
from tests.fuzz.strategies import json_values

I64 = st.integers(-(2**63), 2**63 - 1)
json_text = (
    json_values.map(lambda v: json.dumps(v, allow_nan=True))
    | st.text(max_size=80)
    | st.integers(1, 100_000).map(lambda n: "[" * n + "]" * n)  # deep nesting
    | st.integers(1, 100_000).map(lambda n: '{"a":' * n + "1" + "}" * n)
)
valid_observed = st.builds(
    lambda gen, errs, active: ObservedState(
        applied_generation=gen, errors=errs, active=active
    ).model_dump_json(),
    st.integers(0, 2**63 - 1),
    st.lists(st.text(max_size=20), max_size=3),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)
records = st.builds(
    pb.Record,
    seq=I64,
    kind=st.sampled_from(["telemetry", "verdict", "event"]) | st.text(max_size=10),
    topic=st.text(max_size=600),
    ts_ms=I64,
    payload=st.binary(max_size=256),
)
edge_messages = st.one_of(
    st.builds(
        lambda t, g: pb.EdgeMessage(hello=pb.Hello(node_info_json=t, applied_generation=g)),
        json_text | st.just(""),
        I64,
    ),
    st.builds(
        lambda s, t, h: pb.EdgeMessage(heartbeat=pb.Heartbeat(seq=s, sent_at_ms=t, health_json=h)),
        I64,
        I64,
        json_text | st.just(""),
    ),
    st.builds(
        lambda o: pb.EdgeMessage(observed=pb.ObservedStateReport(observed_json=o)),
        valid_observed | json_text,
    ),
    st.builds(
        lambda rs: pb.EdgeMessage(records=pb.RecordBatch(records=rs)),
        st.lists(records, max_size=8),
    ),
    st.binary(max_size=200),  # raw bytes off the wire
)


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[CloudContext, TunnelService, str]]:
    ctx = open_context(CloudSettings(data_dir=tmp_path / "cloud"))
    node_store.create_node(ctx.db, node_id="node_fuzz", secret="s", labels={}, node_info={})
    service = TunnelService(
        ctx.db, ctx.blobs, ctx.sessions, ctx.desired, ctx.records, ctx.metrics, 65536
    )
    yield ctx, service, "node_fuzz"
    ctx.close()


def cloud_target(cloud: tuple[CloudContext, TunnelService, str], counter: list[int]):  # type: ignore[no-untyped-def]
    ctx, service, node_id = cloud
    loop = asyncio.new_event_loop()

    @given(msg=edge_messages)
    def run(msg: pb.EdgeMessage | bytes) -> None:
        counter[0] += 1
        if isinstance(msg, bytes):
            try:
                msg = pb.EdgeMessage.FromString(msg)
            except DecodeError:
                return  # gRPC refuses what does not decode before our code sees it
        kind = msg.WhichOneof("body")
        try:
            replies = loop.run_until_complete(service._handle(node_id, kind, msg))
        except (ValidationError, ValueError):
            pass  # counted and skipped by the reader; the stream stays up
        else:
            assert all(isinstance(r, pb.CloudMessage) for r in replies)
        # Whatever was stored still reads back through the admin API's model.
        node_public(ctx, node_store.get_node(ctx.db, node_id=node_id))

    return run, loop


def test_cloud_tunnel_handlers_quick(cloud) -> None:  # type: ignore[no-untyped-def]
    counter = [0]
    run, loop = cloud_target(cloud, counter)
    try:
        budget(QUICK)(run)()
    finally:
        loop.close()
    assert counter[0] >= QUICK


@pytest.mark.slow
def test_cloud_tunnel_handlers_10k(cloud) -> None:  # type: ignore[no-untyped-def]
    counter = [0]
    run, loop = cloud_target(cloud, counter)
    try:
        budget(LONG)(run)()
    finally:
        loop.close()
    assert counter[0] >= LONG


async def _no_fetch(sha256: str, offset: int) -> AsyncIterator[bytes]:
    raise AssertionError("nothing is fetched while fuzzing")
    yield b""


desired_docs = st.one_of(
    json_text,
    st.builds(
        lambda gen, pol: json.dumps(
            {"node_id": "node_fuzz", "generation": gen, "artifacts": [], "policy": pol}
        ),
        st.integers(-5, 2**63),
        json_values,
    ),
)


def edge_target(tmp: Path, counter: list[int]):  # type: ignore[no-untyped-def]
    store = EdgeStore(tmp / "edge")
    agent = EdgeAgent(EdgeSettings(data_dir=tmp / "edge"))
    agent.store = store
    agent.reconciler = Reconciler(
        store, ArtifactInstaller(store, b"\0" * 32), _no_fetch, lambda o: None
    )
    loop = asyncio.new_event_loop()

    @given(doc=desired_docs, generation=I64)
    def run(doc: str, generation: int) -> None:
        counter[0] += 1
        push = pb.DesiredStatePush(generation=generation, desired_json=doc)
        loop.run_until_complete(agent._on_desired(push))
        store.desired()  # what was persisted loads again

    return run, loop, store


def test_edge_desired_handler_quick(tmp_path: Path) -> None:
    counter = [0]
    run, loop, store = edge_target(tmp_path, counter)
    try:
        budget(QUICK)(run)()
    finally:
        loop.close()
        store.close()
    assert counter[0] >= QUICK


@pytest.mark.slow
def test_edge_desired_handler_10k(tmp_path: Path) -> None:
    counter = [0]
    run, loop, store = edge_target(tmp_path, counter)
    try:
        budget(LONG)(run)()
    finally:
        loop.close()
        store.close()
    assert counter[0] >= LONG
