"""`fieldline artifact push --quantize int8` against a real cloud: the INT8 version and its report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx

from fieldline.cli.harness.classifier import train_classifier
from fieldline.cli.harness.processes import ProcessStack, fieldline_cmd, start_cloud


def test_push_quantize_keeps_fp32_and_records_the_report(tmp_path: Path) -> None:
    trained = train_classifier(tmp_path / "model", seconds_budget=1.5)
    with ProcessStack() as stack:
        _, ports = start_cloud(stack, tmp_path / "cloud")
        url = f"http://127.0.0.1:{ports['http']}"
        key = (tmp_path / "cloud" / "admin.key").read_text().strip()
        out = subprocess.run(
            fieldline_cmd(
                "artifact",
                "push",
                str(trained.onnx_path),
                "--name",
                "classifier",
                "--version",
                "1.0",
                "--kind",
                "onnx",
                "--quantize",
                "int8",
                "--calibration",
                str(trained.calibration_path),
                "--url",
                url,
                "--key",
                key,
                "--json",
            ),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        manifest = json.loads(out.stdout)
        assert (manifest["name"], manifest["version"]) == ("classifier", "1.0")
        assert manifest["quantization"] == "int8"
        report = manifest["metadata"]["quantization"]
        assert report["method"] == "static_qdq_per_channel"
        assert report["int8_bytes"] < report["fp32_bytes"]
        assert set(report["fp32_latency_ms"]) >= {"1", "8"}
        assert report["agreement"] >= 0.99
        assert manifest["metadata"]["source"]["ref"] == "classifier@1.0-fp32"
        listed = httpx.get(f"{url}/v1/artifacts", headers={"Authorization": f"Bearer {key}"}).json()
        refs = {f"{a['name']}@{a['version']}" for a in listed}
        assert {"classifier@1.0", "classifier@1.0-fp32", "classifier-calibration@1.0"} <= refs
        # Quantizing something that is not ONNX is refused with a message.
        bad = subprocess.run(
            fieldline_cmd(
                "artifact",
                "push",
                str(trained.calibration_path),
                "--name",
                "notonnx",
                "--version",
                "1",
                "--kind",
                "file",
                "--quantize",
                "int8",
                "--url",
                url,
                "--key",
                key,
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2
        assert "onnx" in bad.stderr
