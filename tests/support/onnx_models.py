"""Tiny ONNX models written with onnx.helper (no torch): real files ONNX Runtime loads and runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_SHAPE = (3, 8, 8)  # one sample, without the batch axis


def tiny_classifier(path: Path, seed: int = 0, classes: int = 2, side: int = 8) -> Path:
    """[N, 3, side, side] float -> Flatten -> Gemm -> [N, classes]; `seed` varies the weights."""
    rng = np.random.default_rng(seed)
    shape = (3, side, side)
    features = int(np.prod(shape))
    w = numpy_helper.from_array(rng.standard_normal((features, classes)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(classes, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def broken_model(path: Path, size: int = 4096, seed: int = 1) -> Path:
    """Bytes that are no ONNX model: a version that fails to load on every edge."""
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def inspection_policy(model: str, *, local_rollback: bool = True, **extra: object) -> dict:
    """A policy whose one inspection rule serves `model` (loaded as soon as it is installed)."""
    return {
        "name": f"inspect-{model}",
        "inspections": [
            {
                "name": f"{model}-rule",
                "topic": "plant1/+/camera/frames",
                "model": model,
                "preprocess": {"decoder": "array"},
                "postprocess": {"labels": ["ok", "defect"], "defect_labels": ["defect"]},
                "result_topic": "plant1/verdicts",
            }
        ],
        "local_rollback": local_rollback,
        **extra,
    }
