"""Loading an ONNX model for inspection: provider choice, bounded threads, input checks, warm-up.

A LoadedModel is immutable; swapping a model version means loading a new one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog

from fieldline.shared.config import InspectionSettings
from fieldline.shared.policy import InspectionRule

log = structlog.get_logger(__name__)

_INPUT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


class ModelLoadError(Exception):
    """An ONNX model that cannot serve as an inspection model."""


@dataclass(frozen=True)
class LoadedModel:
    """One ready ONNX Runtime session and what the worker needs to know about its input."""

    name: str
    version: str
    path: Path
    session: ort.InferenceSession
    input_name: str
    input_dtype: type[np.generic]
    sample_shape: tuple[int | None, ...]  # input shape without the batch axis; None = dynamic
    dynamic_batch: bool
    providers: list[str]
    # The first output's shape without the batch axis (what post-processing reads).
    output_shape: tuple[int | None, ...] = ()


def choose_providers(wanted: Iterable[str]) -> list[str]:
    """The wanted providers this onnxruntime build has, in order; CPU when none is left."""
    available = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in available]
    return chosen or ["CPUExecutionProvider"]


def load_model(
    name: str, version: str, path: Path, settings: InspectionSettings | None = None
) -> LoadedModel:
    """Create a session, check its input is one float tensor with a batch axis, and warm it up."""
    settings = settings or InspectionSettings()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.intra_op_threads
    opts.inter_op_num_threads = 1
    # No busy-waiting between requests: the gateway shares few cores with ingestion and the LLM.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[Any] = []
    for p in choose_providers(settings.providers):
        if p == "TensorrtExecutionProvider":
            # Engines take minutes to build on a Jetson: keep them beside the model.
            cache = str(Path(path).parent / "trt-cache")
            providers.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache}))
        else:
            providers.append(p)
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # ORT raises its own untyped errors for bad files
        raise ModelLoadError(f"cannot load model {name} {version} from {path}: {exc}") from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(f"model {name} has {len(inputs)} inputs; inspection needs exactly 1")
    inp = inputs[0]
    if inp.type not in _INPUT_DTYPES or len(inp.shape) < 1:
        raise ModelLoadError(f"model {name} input {inp.name} is {inp.type} {inp.shape}")
    batch_dim = inp.shape[0]
    dynamic_batch = not isinstance(batch_dim, int) or batch_dim <= 0
    if not dynamic_batch and batch_dim != 1:
        raise ModelLoadError(f"model {name} has a fixed batch of {batch_dim}; need dynamic or 1")
    sample_shape = _dims(inp.shape[1:])
    model = LoadedModel(
        name=name,
        version=version,
        path=Path(path),
        session=session,
        input_name=inp.name,
        input_dtype=_INPUT_DTYPES[inp.type],
        sample_shape=sample_shape,
        dynamic_batch=dynamic_batch,
        providers=session.get_providers(),
        output_shape=_dims(session.get_outputs()[0].shape[1:]),
    )
    if None not in sample_shape:
        try:
            zeros = np.zeros((1, *(d or 1 for d in sample_shape)), model.input_dtype)
            first = session.run(None, {inp.name: zeros})[0]
        except Exception as exc:
            raise ModelLoadError(f"model {name} {version} fails on a zero input: {exc}") from exc
        # Exports often leave output dims symbolic; for a fixed input the run says what they are.
        model = replace(model, output_shape=tuple(int(d) for d in np.shape(first)[1:]))
    if not dynamic_batch:
        log.warning("model has a fixed batch of 1: no micro-batching", model=name)
    log.info("inspection model loaded", model=name, version=version, providers=model.providers)
    return model


def _dims(shape: Iterable[Any]) -> tuple[int | None, ...]:
    """ONNX dims -> ints, None for symbolic or unknown ones."""
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


def check_rule(model: LoadedModel, rule: InspectionRule) -> None:
    """Refuse (ModelLoadError naming both shapes) a rule whose mode cannot read the model's output.

    classify/anomaly read a vector; detect reads [4+classes, anchors] (yolov8), [anchors,
    5+classes] (yolov5) or [N, 6] (end2end); segment reads [classes, H, W]. Dynamic dims pass.
    """
    post = rule.postprocess
    shape = model.output_shape
    shown = tuple("?" if d is None else d for d in shape)
    n = len(post.labels)
    expected = {
        "detect": {"yolov8": f"[{4 + n}, anchors]", "yolov5": f"[anchors, {5 + n}]"}.get(
            post.detect_layout, "[detections, 6]"
        ),
        "segment": f"[{n}, H, W]",
    }.get(post.mode, "a vector of scores")
    if not _fits(shape, post.mode, post.detect_layout, n):
        raise ModelLoadError(
            f"rule {rule.name}: mode {post.mode} reads {expected} per sample, but model "
            f"{model.name} {model.version} outputs {list(shown)} (input "
            f"{list('?' if d is None else d for d in model.sample_shape)})"
        )


def _fits(shape: tuple[int | None, ...], mode: str, layout: str, n_labels: int) -> bool:
    def is_(dim: int | None, want: int) -> bool:
        return dim is None or dim == want

    if mode == "detect":
        if len(shape) != 2:
            return False
        if layout == "yolov8":
            return is_(shape[0], 4 + n_labels)
        return is_(shape[1], 5 + n_labels if layout == "yolov5" else 6)
    if mode == "segment":
        return len(shape) == 3 and is_(shape[0], n_labels)
    # classify/anomaly flatten the output: refuse only outputs that are clearly maps or boxes.
    return sum(1 for d in shape if d is not None and d > 1) <= 1
