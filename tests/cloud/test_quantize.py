"""INT8 quantization of the demo classifier with ONNX Runtime's tools, on real sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fieldline.cli.harness.classifier import INPUT_NAME, TrainedClassifier, train_classifier
from fieldline.cloud.artifacts.quantize import QuantizationError, QuantizationReport, quantize_onnx


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedClassifier:
    return train_classifier(tmp_path_factory.mktemp("demo"), seconds_budget=1.5)


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT_NAME: x})[0]


def _check_latencies(report: QuantizationReport) -> None:
    for lat in (report.fp32_latency_ms, report.int8_latency_ms):
        assert set(lat) == {"1", "8"}
        assert all(v > 0 for v in lat.values())


def test_static_qdq_int8_agrees_with_fp32_on_calibration_inputs(
    trained: TrainedClassifier, tmp_path: Path
) -> None:
    dst = tmp_path / "out" / "int8.onnx"
    report = quantize_onnx(trained.onnx_path, dst, trained.calibration_path)

    assert report.method == "static_qdq_per_channel" and report.per_channel
    assert report.agreement_inputs == "calibration"
    assert report.calibration_samples == report.agreement_samples == 256
    assert report.agreement is not None and report.agreement >= 0.99
    assert report.fp32_bytes == trained.onnx_path.stat().st_size
    assert report.int8_bytes == dst.stat().st_size < report.fp32_bytes
    assert report.size_ratio == pytest.approx(report.int8_bytes / report.fp32_bytes)
    _check_latencies(report)
    # The manifest stores this as JSON metadata.
    assert QuantizationReport.model_validate_json(report.model_dump_json()) == report

    model = onnx.load(str(dst))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    conv_w_scales = [
        inits[n.input[1]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and inits.get(n.input[0]) is not None
        and len(inits[n.input[0]].dims) == 4  # conv weights: [out, in, kh, kw]
    ]
    assert conv_w_scales and all(s.dims[0] > 1 for s in conv_w_scales)  # one scale per channel

    x = np.load(trained.calibration_path)[INPUT_NAME][:32]
    fp32, int8 = _run(trained.onnx_path, x), _run(dst, x)
    assert int8.shape == fp32.shape == (32, 2)
    assert np.mean(fp32.argmax(1) == int8.argmax(1)) >= 0.99


def test_dynamic_quantization_without_calibration(
    trained: TrainedClassifier, tmp_path: Path
) -> None:
    dst = tmp_path / "dyn.onnx"
    report = quantize_onnx(trained.onnx_path, dst, None)
    assert report.method == "dynamic" and report.activation_type is None
    assert report.agreement_inputs == "random" and report.calibration_samples == 0
    assert report.int8_bytes == dst.stat().st_size < report.fp32_bytes
    assert report.agreement is not None
    _check_latencies(report)
    assert "DynamicQuantizeLinear" in _ops(dst)
    x = np.load(trained.calibration_path)[INPUT_NAME][:16]
    assert _run(dst, x).shape == (16, 2)


def test_single_unnamed_calibration_array_is_accepted(
    trained: TrainedClassifier, tmp_path: Path
) -> None:
    x = np.load(trained.calibration_path)[INPUT_NAME][:64]
    calib = tmp_path / "calib.npz"
    np.savez(calib, x)  # stored as "arr_0"
    report = quantize_onnx(trained.onnx_path, tmp_path / "int8.onnx", calib)
    assert report.calibration_samples == 64 and report.agreement is not None


def test_bad_inputs_raise_quantization_error(trained: TrainedClassifier, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, a=np.zeros((4, 1, 64, 64)), b=np.zeros((4, 1, 64, 64)))
    with pytest.raises(QuantizationError, match="needs"):
        quantize_onnx(trained.onnx_path, tmp_path / "a.onnx", wrong)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x01garbage")
    with pytest.raises(QuantizationError, match="cannot load"):
        quantize_onnx(broken, tmp_path / "b.onnx", None)
    notnpz = tmp_path / "calib.npz"
    notnpz.write_bytes(b"nope")
    with pytest.raises(QuantizationError, match="cannot read"):
        quantize_onnx(trained.onnx_path, tmp_path / "c.onnx", notnpz)
    assert not list(tmp_path.glob(".quantize-*")) and not (tmp_path / "a.onnx").exists()


def test_a_yolo_style_upsample_on_a_dynamic_batch_still_quantizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Resize (nn.Upsample) then Concat on a dynamic batch axis is where ORT's symbolic shape
    # inference gives up on YOLO exports; the pre-processing falls back to ONNX's shapes.
    import torch

    from fieldline.cli.harness.classifier import export_onnx

    class Neck(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = torch.nn.Conv2d(3, 8, 3, 2, 1)
            self.up = torch.nn.Upsample(scale_factor=2, mode="nearest")
            self.out = torch.nn.Conv2d(11, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.cat([self.up(torch.relu(self.down(x))), x], 1)).flatten(2)

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # where ORT drops the model it could not finish
    src = tmp_path / "neck.onnx"
    export_onnx(Neck().eval(), src, (16, 16), channels=3)
    calib = tmp_path / "calib.npz"
    x = np.random.default_rng(0).random((8, 3, 16, 16), dtype=np.float32)
    np.savez(calib, **{INPUT_NAME: x})
    report = quantize_onnx(src, tmp_path / "neck.int8.onnx", calib)
    assert report.method == "static_qdq_per_channel"
    assert "QuantizeLinear" in _ops(tmp_path / "neck.int8.onnx")
    assert list(cwd.iterdir()) == []
    np.testing.assert_allclose(
        _run(tmp_path / "neck.int8.onnx", x),
        _run(src, x),
        atol=0.1 + 0.1 * np.abs(_run(src, x)).max(),
    )
