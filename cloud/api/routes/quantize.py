"""/v1/artifacts/{name}/{version}/quantize: make the INT8 version of an uploaded fp32 ONNX model.

The fp32 artifact stays as it is; the INT8 one gets its own version (default: the fp32 version
without a "-fp32" suffix) with the quantization report in its manifest metadata, and that is
the one an admin assigns.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from fieldline.cloud.api.deps import ContextDep, OperatorKey
from fieldline.cloud.api.routes.artifacts import store_artifact
from fieldline.cloud.artifacts.quantize import QuantizationError, quantize_onnx
from fieldline.cloud.store import artifacts as artifact_store
from fieldline.shared.schemas import ArtifactKind, ArtifactManifest

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])
FILE_CHUNK = 1024 * 1024
FP32_SUFFIX = "-fp32"


class QuantizeRequest(BaseModel):
    method: str = Field(default="int8", pattern="^int8$")
    # NAME@VERSION of an uploaded .npz with calibration inputs; dynamic quantization without it.
    calibration: str | None = None
    target_version: str | None = None


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(FILE_CHUNK):
            yield block


def _lookup(ctx: ContextDep, ref: str) -> ArtifactManifest:
    name, _, version = ref.partition("@")
    try:
        return artifact_store.get_artifact(ctx.db, name=name, version=version).manifest
    except artifact_store.ArtifactNotFound:
        raise HTTPException(404, f"artifact {ref} not found") from None


@router.post("/{name}/{version}/quantize", status_code=201)
async def quantize_artifact(
    name: str, version: str, body: QuantizeRequest, ctx: ContextDep, _: OperatorKey
) -> ArtifactManifest:
    src = _lookup(ctx, f"{name}@{version}")
    if src.kind != ArtifactKind.onnx:
        raise HTTPException(
            422, f"{src.ref} is a {src.kind.value} artifact; only onnx is quantized here"
        )
    calibration = _lookup(ctx, body.calibration) if body.calibration else None
    target = body.target_version or version.removesuffix(FP32_SUFFIX)
    if target == version:
        raise HTTPException(
            422, f"the INT8 version must differ from {version}: give target_version"
        )
    with tempfile.TemporaryDirectory(dir=ctx.blobs.tmp) as tmp:
        dst = Path(tmp) / "model.int8.onnx"
        try:
            # Seconds of CPU work: off the event loop so the tunnel keeps serving.
            report = await asyncio.to_thread(
                quantize_onnx,
                ctx.blobs.path(src.sha256),
                dst,
                ctx.blobs.path(calibration.sha256) if calibration else None,
            )
        except QuantizationError as exc:
            raise HTTPException(422, f"cannot quantize {src.ref}: {exc}") from None
        metadata = {
            "quantization": report.model_dump(mode="json"),
            "source": {"ref": src.ref, "sha256": src.sha256},
            "calibration": calibration.ref if calibration else None,
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
