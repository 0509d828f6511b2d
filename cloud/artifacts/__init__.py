"""Artifacts: content-addressed blobs, ONNX quantization, storing and signing uploads."""
