"""Enrollment: exchange a single-use token for the node credential and the cloud's public key, once."""

from __future__ import annotations

import grpc

from fieldline.edge.store import Credential, EdgeStore
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc
from fieldline.shared.schemas import NodeInfo

ENROLL_TIMEOUT_S = 30.0


class EnrollmentError(Exception):
    """The cloud refused the token, or could not be reached; the message says which."""


async def enroll(store: EdgeStore, *, cloud: str, token: str, node_info: NodeInfo) -> Credential:
    """Enroll unless a credential is already stored (then it is returned as it is)."""
    existing = store.credential()
    if existing is not None:
        return existing
    async with grpc.aio.insecure_channel(cloud) as channel:
        stub = pb_grpc.EnrollmentStub(channel)
        try:
            resp = await stub.Enroll(
                pb.EnrollRequest(token=token, node_info_json=node_info.model_dump_json()),
                timeout=ENROLL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise EnrollmentError(
                    f"cannot reach the cloud at {cloud}: {exc.details()}"
                ) from exc
            raise EnrollmentError(f"enrollment refused: {exc.details()}") from exc
    if len(resp.cloud_public_key) != 32:
        raise EnrollmentError("the cloud sent a public key that is not a raw Ed25519 key")
    cred = Credential(resp.node_id, resp.node_secret, bytes(resp.cloud_public_key))
    store.save_credential(cred, cloud=cloud, labels=dict(resp.labels))
    return cred
