"""Installer names and surprises on a real edge store and installer: a version named after the
layout (`active`) is refused, also when an older cloud signed it; a version directory that is a
symlink is refused; an unexpected error in one artifact is reported and the next still installs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from fieldline.edge.control.installer import ArtifactInstaller, InstallError
from fieldline.edge.control.reconciler import Reconciler
from fieldline.edge.store import EdgeStore
from fieldline.shared.clock import utcnow
from fieldline.shared.schemas import ArtifactKind, ArtifactManifest, DesiredState, ObservedState
from fieldline.shared.signing import generate_key, public_key_bytes, sign_manifest
from tests.support.artifacts import Fetcher, signed_blob

NODE = "node_test"


@pytest.mark.parametrize("version", ["active", "ACTIVE", "checkpoint"])
def test_reserved_versions_are_refused_by_the_schema(version: str) -> None:
    with pytest.raises(ValidationError, match="reserved"):
        signed_blob(generate_key(), b"x", version)


def _signed_unchecked(key, data: bytes, version: str):  # type: ignore[no-untyped-def]
    """What a cloud from before the reserved names would have signed."""
    m = ArtifactManifest.model_construct(
        name="model",
        version=version,
        kind=ArtifactKind.file,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        created=utcnow(),
        quantization=None,
        metadata={},
    )
    return sign_manifest(key, m)


def test_an_active_version_signed_by_an_older_cloud_is_refused(tmp_path: Path) -> None:
    key = generate_key()
    v1 = random.Random(1).randbytes(3000)
    bad = random.Random(2).randbytes(3000)
    store = EdgeStore(tmp_path / "edge")
    installer = ArtifactInstaller(store, public_key_bytes(key))
    blobs = {hashlib.sha256(b).hexdigest(): b for b in (v1, bad)}

    async def fetch(sha256: str, offset: int) -> AsyncIterator[bytes]:
        async for block in Fetcher(blobs[sha256])(sha256, offset):
            yield block

    reports: list[ObservedState] = []
    reconciler = Reconciler(store, installer, fetch, reports.append)

    async def go() -> None:
        for gen, signed in enumerate([signed_blob(key, v1), _signed_unchecked(key, bad, "active")]):
            d = DesiredState(node_id=NODE, generation=gen + 1, artifacts=[signed])
            assert store.save_desired(d)
            await reconciler.apply(d)
        # The reconciler lives on: the next generation applies.
        d = DesiredState(node_id=NODE, generation=3, artifacts=[signed_blob(key, v1)])
        assert store.save_desired(d)
        await reconciler.apply(d)

    asyncio.run(go())
    assert any("reserved" in e for e in reports[1].errors)
    assert reports[2].applied_generation == 3 and reports[2].errors == []
    link = tmp_path / "edge/artifacts/model/active"
    assert os.readlink(link) == "1" and (link / "model").read_bytes() == v1
    store.close()


def test_a_symlinked_version_dir_is_refused(tmp_path: Path) -> None:
    key = generate_key()
    store = EdgeStore(tmp_path / "edge")
    installer = ArtifactInstaller(store, public_key_bytes(key))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "edge/artifacts/model").mkdir(parents=True)
    (tmp_path / "edge/artifacts/model/2").symlink_to(elsewhere)
    data = b"weights" * 100
    with pytest.raises(InstallError, match="symlink"):
        asyncio.run(installer.install(signed_blob(key, data, "2"), Fetcher(data)))
    assert list(elsewhere.iterdir()) == []
    store.close()


def test_an_unexpected_error_is_reported_and_the_next_artifact_installs(tmp_path: Path) -> None:
    key = generate_key()
    good = random.Random(1).randbytes(3000)
    store = EdgeStore(tmp_path / "edge")
    installer = ArtifactInstaller(store, public_key_bytes(key))
    broken = signed_blob(key, b"never served", "1", name="broken")

    async def fetch(sha256: str, offset: int) -> AsyncIterator[bytes]:
        if sha256 == broken.manifest.sha256:
            raise OSError(28, "No space left on device")  # what a full disk raises mid-install
        async for block in Fetcher(good)(sha256, offset):
            yield block

    reports: list[ObservedState] = []
    reconciler = Reconciler(store, installer, fetch, reports.append)
    d = DesiredState(node_id=NODE, generation=1, artifacts=[broken, signed_blob(key, good)])
    assert store.save_desired(d)
    asyncio.run(reconciler.apply(d))
    (observed,) = reports
    assert any("broken@1" in e and "No space left" in e for e in observed.errors)
    assert observed.active == {"model": "1"}
    states = {a.name: a.state.value for a in observed.artifacts}
    assert states == {"broken": "failed", "model": "active"}
    store.close()
