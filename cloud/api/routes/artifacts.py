"""/v1/artifacts: streamed upload into the blob store, signed manifests, list and get."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from starlette.requests import ClientDisconnect

from fieldline.cloud.api.deps import ContextDep, OperatorKey, ViewerKey
from fieldline.cloud.artifacts.blobs import BlobError
from fieldline.cloud.artifacts.service import store_artifact
from fieldline.cloud.store import artifacts as artifact_store
from fieldline.shared.schemas import ArtifactKind, ArtifactManifest, name_problem

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])
MAX_METADATA_CHARS = 64 * 1024


def _check_name(what: str, value: str) -> None:
    problem = name_problem(value)
    if problem is not None:
        raise HTTPException(422, f"{what} {value!r} is invalid: {problem}")


def _metadata(header: str | None) -> dict[str, Any]:
    if not header:
        return {}
    if len(header) > MAX_METADATA_CHARS:
        raise HTTPException(400, f"X-Fieldline-Metadata exceeds {MAX_METADATA_CHARS} characters")
    try:
        data = json.loads(header)
    except ValueError:
        raise HTTPException(400, "X-Fieldline-Metadata is not valid JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "X-Fieldline-Metadata must be a JSON object")
    return data


@router.post("", status_code=201)
async def upload_artifact(
    request: Request,
    ctx: ContextDep,
    _: OperatorKey,
    name: Annotated[str, Query(max_length=128)],
    version: Annotated[str, Query(max_length=128)],
    kind: Annotated[str, Query()] = "file",
    quantization: Annotated[str | None, Query(max_length=64)] = None,
    x_fieldline_metadata: Annotated[str | None, Header()] = None,
) -> ArtifactManifest:
    """The request body is the file itself, streamed to disk (never held in memory)."""
    _check_name("name", name)
    _check_name("version", version)
    if kind not in ArtifactKind.__members__:
        allowed = ", ".join(k.value for k in ArtifactKind)
        raise HTTPException(422, f"unknown kind {kind!r}: use one of {allowed}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > ctx.settings.max_artifact_bytes:
        raise HTTPException(
            413, f"upload exceeds the limit of {ctx.settings.max_artifact_bytes} bytes"
        )
    try:
        return await store_artifact(
            ctx,
            request.stream(),
            name=name,
            version=version,
            kind=ArtifactKind(kind),
            quantization=quantization,
            metadata=_metadata(x_fieldline_metadata),
        )
    except ClientDisconnect:
        ctx.metrics.uploads.labels("disconnected").inc()
        raise HTTPException(400, "the client went away before the upload finished") from None
    except artifact_store.ArtifactExists:
        raise HTTPException(409, f"artifact {name}@{version} already exists") from None
    except BlobError as exc:
        raise HTTPException(exc.status, str(exc)) from None


@router.get("")
def list_artifacts(ctx: ContextDep, _: ViewerKey) -> list[ArtifactManifest]:
    return artifact_store.list_artifacts(ctx.db)


@router.get("/{name}/{version}")
def get_artifact(name: str, version: str, ctx: ContextDep, _: ViewerKey) -> ArtifactManifest:
    try:
        return artifact_store.get_artifact(ctx.db, name=name, version=version).manifest
    except artifact_store.ArtifactNotFound:
        raise HTTPException(404, f"artifact {name}@{version} not found") from None
