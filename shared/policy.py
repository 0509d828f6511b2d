"""The policy document: what an edge subscribes to, which inspections it runs, how much it keeps.

Delivered inside DesiredState.policy; read from YAML or JSON by `fieldline policy apply`.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_TOPIC_LEN = 512
MAX_PROMPT_CHARS = 16_384
# What an inspection rule's explain_template may name (filled from the verdict).
EXPLAIN_FIELDS = frozenset({"label", "score", "topic", "rule", "model", "model_version"})


class PolicyError(ValueError):
    """A policy file that does not parse or validate."""


def _check_filter(value: str) -> str:
    """Validate an MQTT topic filter: '+' and '#' only as whole levels, '#' last."""
    if not value or len(value) > MAX_TOPIC_LEN or "\x00" in value:
        raise ValueError(f"bad topic filter {value!r}")
    levels = value.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"bad topic filter {value!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"bad topic filter {value!r}: '+' must be a whole level")
    return value


def _check_topic(value: str) -> str:
    """Validate a topic to publish on: no wildcards."""
    if not value or len(value) > MAX_TOPIC_LEN or any(c in value for c in "+#\x00"):
        raise ValueError(f"bad publish topic {value!r}")
    return value


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching ('+' one level, '#' the rest)."""
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def template_fields(template: str) -> list[str]:
    """The {placeholder} names of a prompt template; ValueError when it does not parse."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"bad prompt template {template[:60]!r}: {exc}") from None
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"bad placeholder {{{name}}} in {template[:60]!r}: use {{name}}")
    return names


def template_prefix(template: str) -> str:
    """The fixed text of a template before its first placeholder, as it appears rendered."""
    parts: list[str] = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(literal)  # already unescaped ("{{" -> "{")
        if name is not None:
            break
    return "".join(parts)


def _check_explain(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"explain_template is longer than {MAX_PROMPT_CHARS} characters")
    unknown = set(template_fields(value)) - EXPLAIN_FIELDS
    if unknown:
        raise ValueError(
            f"explain_template names {sorted(unknown)}; it may use {sorted(EXPLAIN_FIELDS)}"
        )
    return value


def _check_prompts(values: list[str]) -> list[str]:
    for value in values:
        if not value or len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompts must have 1 to {MAX_PROMPT_CHARS} characters")
    return values


def _check_templates(values: list[str]) -> list[str]:
    for value in _check_prompts(values):
        template_fields(value)
    return values


class Subscription(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str
    qos: Literal[0, 1] = 1
    # Records from this subscription are stored under this kind.
    kind: Literal["telemetry", "event"] = "telemetry"

    _topic = field_validator("topic")(_check_filter)


class Preprocess(BaseModel):
    """How a payload becomes the model's input tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "image": PNG/JPEG bytes; "array": a JSON array (or {"values": [...]}) of numbers.
    decoder: Literal["image", "array"] = "image"
    resize: tuple[int, int] | None = None  # (height, width) for images
    # "stretch": resize to `resize` ignoring the aspect ratio; "letterbox": scale to fit
    # keeping it, pad the rest with `pad_value` (centred, as YOLO-family exports expect).
    resize_mode: Literal["stretch", "letterbox"] = "stretch"
    pad_value: int = Field(default=114, ge=0, le=255)
    grayscale: bool = False
    # The order the model wants its colour channels in (mean/std are given in that order).
    channel_order: Literal["RGB", "BGR"] = "RGB"
    scale: float = 1.0 / 255.0  # applied before normalize
    mean: list[float] | None = None
    std: list[float] | None = None
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @model_validator(mode="after")
    def _letterbox_needs_size(self) -> Preprocess:
        if self.resize_mode == "letterbox" and (self.resize is None or self.decoder != "image"):
            raise ValueError("resize_mode letterbox needs decoder image and a resize (h, w)")
        if self.resize is not None and min(self.resize) < 1:
            raise ValueError(f"resize {self.resize} must be positive")
        return self


class Postprocess(BaseModel):
    """How the model's output becomes a verdict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "classify": softmax over classes, label map, defect when a defect label wins with
    # probability >= threshold; "anomaly": the first output is a score, defect when >= threshold.
    # "detect": YOLO-family boxes (docs/inspection.md), threshold = box confidence;
    # "segment": per-pixel class scores [classes, H, W], threshold = pixel probability.
    mode: Literal["classify", "anomaly", "detect", "segment"] = "classify"
    softmax: bool = True
    labels: list[str] = Field(default_factory=list)
    defect_labels: list[str] = Field(default_factory=list)
    threshold: float = 0.5
    # detect: the output layout; "yolov8" [4+classes, anchors] (also YOLO11), "yolov5"
    # [anchors, 5+classes] with objectness, "end2end" [detections, 6] (x1 y1 x2 y2 score class,
    # NMS done in the model: YOLOv10, exports with nms=True).
    detect_layout: Literal["yolov8", "yolov5", "end2end"] = "yolov8"
    iou_threshold: float = Field(default=0.45, gt=0, le=1)
    max_detections: int = Field(default=100, ge=1, le=1000)
    # detect: a defect box needs at least this score (per label; default `threshold`), this
    # area in original pixels, and a label needs more boxes than its allowed count (default 0).
    label_thresholds: dict[str, float] = Field(default_factory=dict)
    min_box_area: float = Field(default=0.0, ge=0)
    allowed_count: dict[str, int] = Field(default_factory=dict)
    # segment: a defect label's area counts when it reaches both (original pixels, share of
    # the image); the verdict lists at most max_regions connected regions, largest first.
    min_area_px: float = Field(default=1.0, ge=0)
    min_area_share: float = Field(default=0.0, ge=0, le=1)
    max_regions: int = Field(default=32, ge=0, le=1000)

    @model_validator(mode="after")
    def _labels_for_locating_modes(self) -> Postprocess:
        if self.mode in ("detect", "segment"):
            if not self.labels or not self.defect_labels:
                raise ValueError(f"mode {self.mode} needs labels and defect_labels")
            unknown = set(self.defect_labels) | set(self.label_thresholds)
            unknown |= set(self.allowed_count)
            unknown -= set(self.labels)
            if unknown:
                raise ValueError(f"labels {sorted(unknown)} are not in labels {self.labels}")
        return self


class InspectionRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    topic: str  # filter of the topics whose messages are inspected
    model: str  # artifact name (kind onnx) assigned to the node
    preprocess: Preprocess = Field(default_factory=Preprocess)
    postprocess: Postprocess = Field(default_factory=Postprocess)
    result_topic: str
    max_batch: int = Field(default=8, ge=1, le=256)
    max_wait_ms: float = Field(default=5.0, ge=0, le=10_000)
    # Optional: prompt template (with {label}, {score}, {topic}, {rule}, {model},
    # {model_version}) for an LLM explanation of defect verdicts, published on explain_topic
    # (default: RESULT_TOPIC/explanations).
    explain_template: str | None = None
    explain_topic: str | None = None
    explain_max_tokens: int = Field(default=48, ge=1, le=1024)

    _topic = field_validator("topic")(_check_filter)
    _result = field_validator("result_topic")(_check_topic)
    _explain = field_validator("explain_template")(_check_explain)

    @field_validator("explain_topic")
    @classmethod
    def _explain_topic(cls, value: str | None) -> str | None:
        return None if value is None else _check_topic(value)

    @property
    def explanation_topic(self) -> str:
        return self.explain_topic or f"{self.result_topic}/explanations"


class Retention(BaseModel):
    """Bounds of the edge outbox; telemetry drops oldest beyond them, verdicts and events never."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_rows: int = Field(default=1_000_000, ge=100)
    max_bytes: int = Field(default=512 * 1024 * 1024, ge=64 * 1024)
    # Synced rows are pruned once older than this.
    keep_synced_s: float = Field(default=3600.0, ge=0)


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="default", min_length=1, max_length=128)
    subscriptions: list[Subscription] = Field(default_factory=list, max_length=256)
    inspections: list[InspectionRule] = Field(default_factory=list, max_length=64)
    retention: Retention = Field(default_factory=Retention)
    sync_interval_s: float = Field(default=2.0, gt=0, le=3600)
    # After an outage new records go first (the live lane); the backlog drains behind them at
    # most this fast (records/s; 0: as fast as the link allows).
    sync_backfill_records_per_s: float = Field(default=0.0, ge=0)
    # Prompts the gateway's cache warms, and templates whose KV prefix it keeps warm.
    prefetch_prompts: list[str] = Field(default_factory=list, max_length=256)
    prompt_templates: list[str] = Field(default_factory=list, max_length=64)
    # max_tokens of the warmed prompts (None: the gateway's default for that endpoint).
    prefetch_max_tokens: int | None = Field(default=None, ge=1, le=4096)
    # The LLM artifact the gateway serves; None: the only active artifact of kind llm.
    llm_model: str | None = Field(default=None, max_length=128)
    # The edge may return to the previous model version by itself when one fails.
    local_rollback: bool = True
    # "Keeps failing": at least this many requests in the health window, this share of them errors.
    local_rollback_min_requests: int = Field(default=20, ge=1)
    local_rollback_error_rate: float = Field(default=0.5, gt=0, le=1)

    _prompts = field_validator("prefetch_prompts")(_check_prompts)
    _templates = field_validator("prompt_templates")(_check_templates)


def load_policy(path: Path) -> Policy:
    """Read a policy from a YAML or JSON file (JSON is YAML), with errors that name the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy file {path} is not valid YAML or JSON: {exc}") from exc
    try:
        return Policy.model_validate(data or {})
    except ValidationError as exc:
        raise PolicyError(f"policy file {path} is invalid:\n{exc}") from exc
