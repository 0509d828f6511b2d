"""What a rollout is asked to do: the artifact and/or policy, the selector, the waves, the health
gate and what happens on failure. Validated once, at creation, and stored as JSON.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fieldline.shared.policy import Policy
from fieldline.shared.schemas import coerce_labels

MAX_WAVES = 20
DEFAULT_WAVES = "1,10%,50%,100%"
DEFAULT_SOAK_S = 60.0
DEFAULT_MAX_ERROR_RATE = 0.05
# A node offline during its wave is waited for this long, then counts as failed.
DEFAULT_OFFLINE_TIMEOUT_S = 600.0
# A node online during its wave that has not applied the new version by then counts as failed.
DEFAULT_APPLY_TIMEOUT_S = 1800.0


class WaveError(ValueError):
    """A wave list that does not parse."""


def parse_waves(value: str | list[Any]) -> list[str]:
    """Normalize "1,10%,50%,100%" (or a list) to tokens: whole counts or percentages.

    A final "100%" is added when the list does not end with one: a rollout ends with every
    selected node on the new version.
    """
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    tokens: list[str] = []
    for raw in items:
        item = raw.strip()
        if not item:
            raise WaveError(f"empty wave in {value!r}")
        if item.endswith("%"):
            try:
                pct = float(item[:-1])
            except ValueError:
                raise WaveError(f"bad wave {item!r}: a count (5) or a percentage (10%)") from None
            if not 0 < pct <= 100:
                raise WaveError(f"bad wave {item!r}: a percentage must be in (0, 100]")
            tokens.append(f"{pct:g}%")
        else:
            if not item.isdigit() or int(item) < 1:
                raise WaveError(f"bad wave {item!r}: a count (5) or a percentage (10%)")
            tokens.append(str(int(item)))
    if not tokens:
        raise WaveError("at least one wave is needed")
    if tokens[-1] != "100%":
        tokens.append("100%")
    if len(tokens) > MAX_WAVES:
        raise WaveError(f"at most {MAX_WAVES} waves, got {len(tokens)}")
    return tokens


def plan_waves(tokens: list[str], total: int) -> list[int]:
    """Cumulative node counts per wave for `total` nodes; waves that add no node are dropped.

    Counts are nodes so far; a percentage is rounded up, so a non-zero one takes at least one.
    """
    planned: list[int] = []
    done = 0
    for token in tokens:
        if token.endswith("%"):
            target = math.ceil(float(token[:-1]) * total / 100 - 1e-9)
        else:
            target = int(token)
        target = min(target, total)
        if target > done:
            planned.append(target)
            done = target
    if done < total:
        planned.append(total)
    return planned


class OnFailure(StrEnum):
    pause = "pause"  # roll the failing wave back (if auto_rollback) and wait for an operator
    rollback = "rollback"  # roll every node of the rollout back and end it as rolled_back


class HealthGate(BaseModel):
    """What must hold on every node of a wave, over the soak window, before the next wave."""

    model_config = ConfigDict(extra="forbid")

    soak_s: float = Field(default=DEFAULT_SOAK_S, ge=0, le=7 * 24 * 3600)
    max_error_rate: float | None = Field(default=DEFAULT_MAX_ERROR_RATE, ge=0, le=1)
    max_p95_ms: float | None = Field(default=None, gt=0)
    require_loaded: bool = True
    # Requests a node must have served in its health window before its error rate counts
    # (and, when > 0, before its wave may pass).
    min_requests: int = Field(default=0, ge=0, le=1_000_000)


class RolloutSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact: str | None = Field(default=None, description="NAME@VERSION", max_length=300)
    policy: dict[str, Any] | None = None
    selector: dict[str, str] = Field(default_factory=dict)
    waves: list[str] = Field(default_factory=lambda: parse_waves(DEFAULT_WAVES))
    gate: HealthGate = Field(default_factory=HealthGate)
    on_failure: OnFailure = OnFailure.pause
    auto_rollback: bool = True
    offline_timeout_s: float = Field(default=DEFAULT_OFFLINE_TIMEOUT_S, gt=0, le=30 * 24 * 3600)
    apply_timeout_s: float = Field(default=DEFAULT_APPLY_TIMEOUT_S, gt=0, le=30 * 24 * 3600)

    _selector = field_validator("selector", mode="before")(coerce_labels)

    @field_validator("waves", mode="before")
    @classmethod
    def _waves(cls, v: Any) -> list[str]:
        if not isinstance(v, str | list):
            raise ValueError('waves must be "1,10%,50%,100%" or a list')
        return parse_waves(v)

    @field_validator("artifact")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        if v is None:
            return v
        name, sep, version = v.partition("@")
        if not sep or not name or not version:
            raise ValueError("artifact must be NAME@VERSION")
        return v

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        return Policy.model_validate(v).model_dump(mode="json")

    @model_validator(mode="after")
    def _what(self) -> RolloutSpec:
        if self.artifact is None and self.policy is None:
            raise ValueError("a rollout needs an artifact, a policy, or both")
        if self.on_failure == OnFailure.rollback and not self.auto_rollback:
            raise ValueError("on_failure=rollback needs auto_rollback")
        return self

    @property
    def artifact_name(self) -> str | None:
        return self.artifact.partition("@")[0] if self.artifact else None

    @property
    def artifact_version(self) -> str | None:
        return self.artifact.partition("@")[2] if self.artifact else None

    @property
    def policy_name(self) -> str | None:
        return str(self.policy.get("name", "default")) if self.policy else None

    @property
    def what(self) -> str:
        parts = []
        if self.artifact:
            parts.append(self.artifact)
        if self.policy_name:
            parts.append(f"policy {self.policy_name}")
        return " + ".join(parts)
