"""Making artifacts: store an upload (blob, signed manifest, record) and quantize an ONNX model.

The artifact routes call these and turn the exceptions below into HTTP statuses; nothing here
knows about HTTP requests.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fieldline.cloud.artifacts.blobs import BlobError
from fieldline.cloud.artifacts.quantize import quantize_onnx
from fieldline.cloud.context import CloudContext
from fieldline.cloud.store import artifacts as artifact_store
from fieldline.shared.clock import utcnow
from fieldline.shared.limits import MAX_LLM_UNPACKED_BYTES
from fieldline.shared.llm_artifact import LLMArtifactError, inspect_tar
from fieldline.shared.schemas import ArtifactKind, ArtifactManifest
from fieldline.shared.signing import sign_manifest

FILE_CHUNK = 1024 * 1024
FP32_SUFFIX = "-fp32"


class NotQuantizable(Exception):
    """The source is no ONNX model, or the INT8 version would overwrite it."""


async def store_artifact(
    ctx: CloudContext,
    chunks: AsyncIterator[bytes],
    *,
    name: str,
    version: str,
    kind: ArtifactKind,
    quantization: str | None,
    metadata: dict[str, Any],
) -> ArtifactManifest:
    """Stream bytes into the blob store, sign the manifest, record it (or leave nothing).

    Raises the store's ArtifactExists (the version is taken) or BlobError (a refused upload).
    """
    try:
        artifact_store.get_artifact(ctx.db, name=name, version=version)
    except artifact_store.ArtifactNotFound:
        pass
    else:
        raise artifact_store.ArtifactExists(f"{name}@{version}")
    try:
        sha, size = await ctx.blobs.put_stream(chunks, max_bytes=ctx.settings.max_artifact_bytes)
    except BlobError:
        ctx.metrics.uploads.labels("refused").inc()
        raise
    if kind == ArtifactKind.llm:
        await _inspect_llm(ctx, sha)
    manifest = ArtifactManifest(
        name=name,
        version=version,
        kind=kind,
        size=size,
        sha256=sha,
        created=utcnow(),
        quantization=quantization,
        metadata=metadata,
    )
    try:
        artifact_store.insert_artifact(ctx.db, signed=sign_manifest(ctx.signing_key, manifest))
    except artifact_store.ArtifactExists:  # the same version uploaded at the same time
        if not artifact_store.sha256_in_use(ctx.db, sha256=sha):
            ctx.blobs.delete(sha)
        raise
    ctx.metrics.uploads.labels("ok").inc()
    return manifest


async def _inspect_llm(ctx: CloudContext, sha: str) -> None:
    """Refuse (422) an LLM upload whose tar an edge would refuse to unpack: sparse, link or
    device members, or members summing past the unpack limit. The blob goes unless in use."""
    try:
        await asyncio.to_thread(
            inspect_tar, ctx.blobs.path(sha), max_total_bytes=MAX_LLM_UNPACKED_BYTES
        )
    except LLMArtifactError as exc:
        ctx.metrics.uploads.labels("refused").inc()
        if not artifact_store.sha256_in_use(ctx.db, sha256=sha):
            ctx.blobs.delete(sha)
        raise BlobError(f"not a safe LLM artifact: {exc}", 422) from None


def lookup(ctx: CloudContext, ref: str) -> ArtifactManifest:
    """The manifest of NAME@VERSION; raises the store's ArtifactNotFound."""
    name, _, version = ref.partition("@")
    return artifact_store.get_artifact(ctx.db, name=name, version=version).manifest


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(FILE_CHUNK):
            yield block


async def quantize_artifact(
    ctx: CloudContext,
    name: str,
    version: str,
    *,
    calibration: str | None = None,
    target_version: str | None = None,
) -> ArtifactManifest:
    """Store the INT8 version of an uploaded fp32 ONNX model, its report in the metadata.

    The target version defaults to the source's without a "-fp32" suffix. Raises the store's
    ArtifactNotFound, NotQuantizable, QuantizationError, and store_artifact's exceptions.
    """
    src = lookup(ctx, f"{name}@{version}")
    if src.kind != ArtifactKind.onnx:
        raise NotQuantizable(f"{src.ref} is a {src.kind.value} artifact; only onnx is quantized")
    calib = lookup(ctx, calibration) if calibration else None
    target = target_version or version.removesuffix(FP32_SUFFIX)
    if target == version:
        raise NotQuantizable(f"the INT8 version must differ from {version}: give target_version")
    with tempfile.TemporaryDirectory(dir=ctx.blobs.tmp) as tmp:
        dst = Path(tmp) / "model.int8.onnx"
        # Seconds of CPU work: off the event loop so the tunnel keeps serving.
        report = await asyncio.to_thread(
            quantize_onnx,
            ctx.blobs.path(src.sha256),
            dst,
            ctx.blobs.path(calib.sha256) if calib else None,
        )
        metadata = {
            "quantization": report.model_dump(mode="json"),
            "source": {"ref": src.ref, "sha256": src.sha256},
            "calibration": calib.ref if calib else None,
        }
        return await store_artifact(
            ctx,
            _file_chunks(dst),
            name=name,
            version=target,
            kind=ArtifactKind.onnx,
            quantization="int8",
            metadata=metadata,
        )
