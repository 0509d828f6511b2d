"""/v1/artifacts/{name}/{version}/quantize: make the INT8 version of an uploaded fp32 ONNX model.

The fp32 artifact stays as it is; the INT8 one gets its own version (default: the fp32 version
without a "-fp32" suffix) with the quantization report in its manifest metadata, and that is
the one an admin assigns (cloud/artifacts/service.py does the work).
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from fieldline.cloud.api.deps import ContextDep, OperatorKey
from fieldline.cloud.artifacts import service as artifact_service
from fieldline.cloud.artifacts.blobs import BlobError
from fieldline.cloud.artifacts.quantize import QuantizationError
from fieldline.cloud.store import artifacts as artifact_store
from fieldline.shared.schemas import ArtifactManifest

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


class QuantizeRequest(BaseModel):
    method: str = Field(default="int8", pattern="^int8$")
    # NAME@VERSION of an uploaded .npz with calibration inputs; dynamic quantization without it.
    calibration: str | None = None
    target_version: str | None = None


@router.post("/{name}/{version}/quantize", status_code=201)
async def quantize_artifact(
    name: str, version: str, body: QuantizeRequest, ctx: ContextDep, _: OperatorKey
) -> ArtifactManifest:
    try:
        return await artifact_service.quantize_artifact(
            ctx, name, version, calibration=body.calibration, target_version=body.target_version
        )
    except artifact_store.ArtifactNotFound as exc:
        raise HTTPException(404, f"artifact {exc} not found") from None
    except artifact_service.NotQuantizable as exc:
        raise HTTPException(422, str(exc)) from None
    except QuantizationError as exc:
        raise HTTPException(422, f"cannot quantize {name}@{version}: {exc}") from None
    except artifact_store.ArtifactExists as exc:
        raise HTTPException(409, f"artifact {exc} already exists") from None
    except BlobError as exc:
        raise HTTPException(exc.status, str(exc)) from None
