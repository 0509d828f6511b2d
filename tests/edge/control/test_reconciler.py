"""The reconciler on a real edge store and installer: a persisted desired state is applied when
it wakes, the observed state it reports is typed (NodeHealth inside) and kept in the store, and
an artifact refused for its signature keeps the last applied generation."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from fieldline.edge.control.installer import ArtifactInstaller
from fieldline.edge.control.reconciler import Reconciler
from fieldline.edge.store import EdgeStore
from fieldline.shared.clock import utcnow
from fieldline.shared.health import NodeHealth, TunnelHealth
from fieldline.shared.schemas import ArtifactState, DesiredState, ObservedState
from fieldline.shared.signing import generate_key, public_key_bytes
from tests.support.artifacts import Fetcher, signed_blob

TIMEOUT_S = 10
NODE = "node_test"


async def scenario(tmp: Path) -> None:
    key = generate_key()
    store = EdgeStore(tmp / "edge")
    v1, v2 = random.Random(1).randbytes(5000), random.Random(2).randbytes(7000)
    blobs = {signed_blob(key, v).manifest.sha256: v for v in (v1, v2)}

    async def fetch(sha256: str, offset: int):  # type: ignore[no-untyped-def]
        async for block in Fetcher(blobs[sha256])(sha256, offset):
            yield block

    reports: asyncio.Queue[ObservedState] = asyncio.Queue()
    applied: list[int] = []
    reconciler = Reconciler(
        store,
        ArtifactInstaller(store, public_key_bytes(key)),
        fetch,
        reports.put_nowait,
        health=lambda: NodeHealth(tunnel=TunnelHealth(connected=True), reported_at=utcnow()),
        on_applied=lambda desired: applied.append(desired.generation),
    )
    task = asyncio.create_task(reconciler.run())

    async def push(desired: DesiredState) -> ObservedState:
        assert store.save_desired(desired)  # persisted before acting, as the agent does
        reconciler.wake()
        return await asyncio.wait_for(reports.get(), TIMEOUT_S)

    policy = {"name": "p1", "sync_interval_s": 5}
    observed = await push(
        DesiredState(node_id=NODE, generation=1, artifacts=[signed_blob(key, v1)], policy=policy)
    )
    assert observed.applied_generation == 1 and observed.errors == []
    assert observed.active == {"model": "1"}
    assert [(a.name, a.version, a.state) for a in observed.artifacts] == [
        ("model", "1", ArtifactState.active)
    ]
    assert isinstance(observed.health, NodeHealth)
    assert observed.health.tunnel == TunnelHealth(connected=True)
    assert (tmp / "edge/artifacts/model/active/model").read_bytes() == v1
    assert store.observed() == observed  # kept, and parsed back to the same typed state

    observed = await push(
        DesiredState(node_id=NODE, generation=2, artifacts=[signed_blob(key, v2, "2")])
    )
    assert observed.applied_generation == 2 and observed.active == {"model": "2"}
    assert store.previous("model") == "1"  # kept for rollback
    assert applied == [1, 2]

    foreign = signed_blob(generate_key(), random.Random(3).randbytes(100), "3")
    observed = await push(DesiredState(node_id=NODE, generation=3, artifacts=[foreign]))
    assert observed.applied_generation == 2  # not applied: the reason is reported
    assert any("signature" in e for e in observed.errors)
    assert observed.active == {"model": "2"}

    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    store.close()


def test_desired_state_applied_and_observed_state_typed(tmp_path: Path) -> None:
    asyncio.run(scenario(tmp_path))
