"""Documents that cloud and edge exchange: node info, manifests, desired and observed state.

Each crosses the tunnel as JSON (see proto/tunnel.proto) and is validated on arrival.
"""

from __future__ import annotations

import json
import platform
import re
import socket
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fieldline.shared.clock import utcnow
from fieldline.shared.health import LocalRollback, ModelHealth, NodeHealth

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Names the edge's artifact layout uses itself (edge/control/installer.py, edge/llm/runtime.py):
# a version called "active" would be installed through the active link, one called
# "checkpoint" over an unpacked LLM. NAME_RE already refuses a leading "." (.partial, .tmp).
RESERVED_NAMES = frozenset({"active", "checkpoint"})


def name_problem(value: str) -> str | None:
    """Why `value` cannot name an artifact or a version, or None when it can."""
    if not NAME_RE.match(value):
        return "use letters, digits, '.', '_', '-' (max 128), starting with a letter or digit"
    if value.lower() in RESERVED_NAMES:
        return f"{value!r} is reserved by the edge's artifact layout"
    return None


SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9._-]{0,63}$")
MAX_LABELS = 64


class LabelError(ValueError):
    """A label or selector that does not parse."""


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    """Check label keys and values; return them unchanged or raise LabelError."""
    if len(labels) > MAX_LABELS:
        raise LabelError(f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key):
            raise LabelError(
                f"bad label key {key!r}: use letters, digits, '.', '_', '-', '/' (max 63)"
            )
        if not LABEL_VALUE_RE.match(value):
            raise LabelError(
                f"bad label value {value!r} for {key!r}: use letters, digits, '.', '_', '-' (max 63)"
            )
    return labels


def parse_labels(text: str) -> dict[str, str]:
    """Parse "k=v,k2=v2" (the CLI's and the API's selector form) into a dict."""
    labels: dict[str, str] = {}
    text = text.strip()
    if not text:
        return labels
    for part in text.split(","):
        if "=" not in part:
            raise LabelError(f"bad label {part.strip()!r}: expected key=value")
        key, value = part.split("=", 1)
        key, value = key.strip(), value.strip()
        if key in labels:
            raise LabelError(f"label key {key!r} given twice")
        labels[key] = value
    return validate_labels(labels)


def coerce_labels(value: Any) -> dict[str, str]:
    """Labels or a selector given as "k=v,k2=v2" or as an object of strings, checked; any
    problem is a ValueError (a pydantic field validator turns it into a 422)."""
    try:
        if isinstance(value, str):
            return parse_labels(value)
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return validate_labels(value)
    except LabelError as exc:
        raise ValueError(str(exc)) from exc
    raise ValueError('expected "k=v,..." or an object of strings')


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """True when every key=value of the selector is among the labels (empty matches all)."""
    return all(labels.get(k) == v for k, v in selector.items())


class ArtifactKind(StrEnum):
    onnx = "onnx"
    llm = "llm"
    file = "file"


class NodeInfo(BaseModel):
    """What an edge says about itself at enrollment and on every connect."""

    model_config = ConfigDict(extra="ignore")

    hostname: str = Field(default="", max_length=255)
    platform: str = Field(default="", max_length=255)
    machine: str = Field(default="", max_length=64)
    agent_version: str = Field(default="", max_length=64)
    accelerators: list[str] = Field(default_factory=list, max_length=16)

    @classmethod
    def of_this_host(cls, agent_version: str) -> NodeInfo:
        return cls(
            hostname=socket.gethostname(),
            platform=platform.platform(),
            machine=platform.machine(),
            agent_version=agent_version,
        )


class ArtifactManifest(BaseModel):
    """The signed description of one artifact version; the blob is addressed by sha256."""

    model_config = ConfigDict(extra="ignore")

    name: str
    version: str
    kind: ArtifactKind
    size: int = Field(ge=1)
    sha256: str
    created: datetime
    quantization: str | None = None
    # Free-form facts recorded at push time (quantization sizes, latencies, accuracy).
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name", "version")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = name_problem(v)
        if problem is not None:
            raise ValueError(f"{v!r} is not a valid name or version: {problem}")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not SHA256_RE.match(v):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return v

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def canonical_json(self) -> str:
        """The exact text that is signed: sorted keys, no whitespace."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


class SignedManifest(BaseModel):
    """A manifest as the exact JSON text that was signed, plus the Ed25519 signature.

    The text is kept verbatim (not re-serialized) so that the signature still verifies on an
    edge running a newer or older schema.
    """

    payload: str = Field(max_length=65536)
    signature: str = Field(max_length=256)  # base64 of the 64-byte Ed25519 signature

    @property
    def manifest(self) -> ArtifactManifest:
        return ArtifactManifest.model_validate_json(self.payload)


class DesiredState(BaseModel):
    """What the cloud wants one node to run; generation grows by one on every change."""

    node_id: str
    generation: int = Field(ge=0)
    artifacts: list[SignedManifest] = Field(default_factory=list)
    # The active policy document; typed by the data-plane policy schema where it is used.
    policy: dict[str, Any] | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class ArtifactState(StrEnum):
    downloading = "downloading"
    installed = "installed"
    active = "active"
    failed = "failed"


class ArtifactStatus(BaseModel):
    name: str
    version: str
    sha256: str
    state: ArtifactState
    error: str | None = None


class ObservedState(BaseModel):
    """What a node reports it has: the generation it applied and its artifacts."""

    model_config = ConfigDict(extra="ignore")

    applied_generation: int = Field(default=0, ge=0)
    artifacts: list[ArtifactStatus] = Field(default_factory=list, max_length=1024)
    # name -> version of the artifact each name currently runs
    active: dict[str, str] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list, max_length=256)
    health: NodeHealth = Field(default_factory=NodeHealth)
    reported_at: datetime = Field(default_factory=utcnow)
    # Per active model: loaded, request and error counts, p95 latency over the last window.
    models: dict[str, ModelHealth] = Field(default_factory=dict, max_length=256)
    # Versions this node returned from by itself; it will not activate them again.
    local_rollbacks: list[LocalRollback] = Field(default_factory=list, max_length=256)
