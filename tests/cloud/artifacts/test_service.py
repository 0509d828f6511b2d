"""The artifact service on a real cloud store and blob store: an upload is stored and signed
whole or leaves nothing, and quantizing refuses what it cannot make."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fieldline.cloud.artifacts.blobs import BlobError
from fieldline.cloud.artifacts.service import NotQuantizable, quantize_artifact, store_artifact
from fieldline.cloud.context import CloudContext, open_context
from fieldline.cloud.store import artifacts as artifact_store
from fieldline.shared.config import CloudSettings
from fieldline.shared.schemas import ArtifactKind, ArtifactManifest
from fieldline.shared.signing import public_key_bytes, verify_manifest

MAX_BYTES = 64 * 1024


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[CloudContext]:
    ctx = open_context(CloudSettings(data_dir=tmp_path / "cloud", max_artifact_bytes=MAX_BYTES))
    yield ctx
    ctx.close()


async def _chunks(*blocks: bytes) -> AsyncIterator[bytes]:
    for block in blocks:
        yield block


def store(ctx: CloudContext, *blocks: bytes, version: str = "1.0") -> ArtifactManifest:
    return asyncio.run(
        store_artifact(
            ctx,
            _chunks(*blocks),
            name="config",
            version=version,
            kind=ArtifactKind.file,
            quantization=None,
            metadata={"line": "7"},
        )
    )


def blobs(ctx: CloudContext) -> list[Path]:
    return [p for p in (ctx.blobs.root / "sha256").rglob("*") if p.is_file()]


def test_an_upload_is_stored_signed_and_listed(ctx: CloudContext) -> None:
    manifest = store(ctx, b"a" * 1000, b"b" * 24)
    assert manifest.size == 1024 and manifest.metadata == {"line": "7"}
    signed = artifact_store.get_artifact(ctx.db, name="config", version="1.0")
    assert verify_manifest(public_key_bytes(ctx.signing_key), signed).sha256 == manifest.sha256
    assert ctx.blobs.path(manifest.sha256).read_bytes() == b"a" * 1000 + b"b" * 24


def test_a_taken_version_is_refused_and_stores_nothing_new(ctx: CloudContext) -> None:
    store(ctx, b"first")
    with pytest.raises(artifact_store.ArtifactExists):
        store(ctx, b"second")
    assert len(blobs(ctx)) == 1


def test_an_oversize_upload_leaves_nothing(ctx: CloudContext) -> None:
    with pytest.raises(BlobError) as exc:
        store(ctx, b"x" * MAX_BYTES, b"y")
    assert exc.value.status == 413
    assert blobs(ctx) == [] and artifact_store.list_artifacts(ctx.db) == []


def test_quantize_refuses_a_file_artifact_and_an_unknown_one(ctx: CloudContext) -> None:
    store(ctx, b"not a model")
    with pytest.raises(NotQuantizable, match="only onnx is quantized"):
        asyncio.run(quantize_artifact(ctx, "config", "1.0"))
    with pytest.raises(artifact_store.ArtifactNotFound):
        asyncio.run(quantize_artifact(ctx, "nothing", "1.0"))
