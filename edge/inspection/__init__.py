"""ONNX inspection: model loading, micro-batching workers, pre/post-processing, per-model health."""
