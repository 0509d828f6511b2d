"""HTTP client for the cloud admin API, used by the admin commands of the CLI and by the demo."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

UPLOAD_CHUNK_BYTES = 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0
QUANTIZE_TIMEOUT_S = 600.0
CA_ENV = "FIELDLINE_CACERT"  # the cloud CA for https:// URLs (DATA/tls/ca.crt)


class AdminError(Exception):
    """The API refused a request, or could not be reached; the message is for the user."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip() or resp.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI validation errors
        parts = []
        for err in detail:
            loc = ".".join(str(x) for x in err.get("loc", []) if x not in ("body", "query"))
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return "; ".join(parts)
    return str(detail)


class AdminClient:
    """A thin, typed wrapper over the /v1 routes; raises AdminError with the API's message."""

    def __init__(
        self,
        url: str,
        key: str | None,
        timeout: float = DEFAULT_TIMEOUT_S,
        ca_file: str | None = None,
    ):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        # An https URL is verified against the given CA, else $FIELDLINE_CACERT, else the
        # system's trust store.
        ca = ca_file or os.environ.get(CA_ENV)
        verify: Any = True
        if ca:
            import ssl

            verify = ssl.create_default_context(cafile=ca)
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise AdminError(f"cannot reach the cloud at {self.url}: {exc}") from exc
        if resp.status_code >= 400:
            raise AdminError(f"{resp.status_code}: {_detail(resp)}", status=resp.status_code)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    # tokens and keys
    def create_token(self, labels: dict[str, str], ttl_s: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"labels": labels}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return self._request("POST", "/v1/tokens", json=body)  # type: ignore[no-any-return]

    def list_tokens(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/tokens")  # type: ignore[no-any-return]

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/tokens/{quote(token_id, safe='')}")  # type: ignore[no-any-return]

    def create_key(
        self, role: str, name: str = "", expires_in_s: int | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"role": role, "name": name, "expires_in_s": expires_in_s}
        return self._request("POST", "/v1/keys", json=body)  # type: ignore[no-any-return]

    def list_keys(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/keys")  # type: ignore[no-any-return]

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/keys/{quote(key_id, safe='')}")  # type: ignore[no-any-return]

    def audit(self, *, key_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if key_id:
            params["key_id"] = key_id
        return self._request("GET", "/v1/audit", params=params)  # type: ignore[no-any-return]

    # nodes
    def list_nodes(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/nodes")  # type: ignore[no-any-return]

    def get_node(self, node_id: str) -> dict[str, Any]:
        # Quoted: an id with a "/" must not address another route.
        return self._request("GET", f"/v1/nodes/{quote(node_id, safe='')}")  # type: ignore[no-any-return]

    def set_labels(self, node_id: str, labels: dict[str, str]) -> dict[str, Any]:
        return self._request("PUT", f"/v1/nodes/{node_id}/labels", json={"labels": labels})  # type: ignore[no-any-return]

    # artifacts
    def push_artifact(
        self,
        path: Path,
        *,
        name: str,
        version: str,
        kind: str,
        metadata: dict[str, Any] | None = None,
        quantization: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Stream a file to the blob store; the server signs and returns the manifest."""

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while block := f.read(UPLOAD_CHUNK_BYTES):
                    if on_progress:
                        on_progress(len(block))
                    yield block

        params: dict[str, str] = {"name": name, "version": version, "kind": kind}
        if quantization:
            params["quantization"] = quantization
        headers = {"Content-Type": "application/octet-stream"}
        if metadata:
            headers["X-Fieldline-Metadata"] = json.dumps(metadata, separators=(",", ":"))
        return self._request(  # type: ignore[no-any-return]
            "POST", "/v1/artifacts", params=params, content=chunks(), headers=headers
        )

    def quantize(
        self, name: str, version: str, *, target_version: str, calibration: str | None = None
    ) -> dict[str, Any]:
        """Ask the cloud for the INT8 version of an uploaded fp32 ONNX model (takes seconds)."""
        body = {"method": "int8", "target_version": target_version, "calibration": calibration}
        return self._request(  # type: ignore[no-any-return]
            "POST",
            f"/v1/artifacts/{name}/{version}/quantize",
            json=body,
            timeout=QUANTIZE_TIMEOUT_S,
        )

    def list_artifacts(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/artifacts")  # type: ignore[no-any-return]

    # assignments
    def assign(self, artifact: str, selector: str) -> dict[str, Any]:
        return self._request(  # type: ignore[no-any-return]
            "POST", "/v1/assignments", json={"artifact": artifact, "selector": selector}
        )

    def list_assignments(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/assignments")  # type: ignore[no-any-return]

    # policies and records
    def apply_policy(self, policy: dict[str, Any], selector: str) -> dict[str, Any]:
        return self._request(  # type: ignore[no-any-return]
            "POST", "/v1/policies", json={"policy": policy, "selector": selector}
        )

    def records(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._request("GET", "/v1/records", params=params)  # type: ignore[no-any-return]

    def revoke_node(self, node_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/nodes/{node_id}/revoke")  # type: ignore[no-any-return]

    def healthz(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")  # type: ignore[no-any-return]

    # rollouts
    def create_rollout(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/v1/rollouts", json=spec)  # type: ignore[no-any-return]

    def list_rollouts(self, state: str | None = None) -> list[dict[str, Any]]:
        params = {"state": state} if state else {}
        return self._request("GET", "/v1/rollouts", params=params)  # type: ignore[no-any-return]

    def get_rollout(self, rollout_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/rollouts/{rollout_id}")  # type: ignore[no-any-return]

    def rollout_action(self, rollout_id: str, action: str, reason: str = "") -> dict[str, Any]:
        """action: pause, resume or abort."""
        return self._request(  # type: ignore[no-any-return]
            "POST", f"/v1/rollouts/{rollout_id}/{action}", json={"reason": reason}
        )
