"""`fieldline artifact push DIR --kind llm`: check a checkpoint directory, optionally make its
int8 weight-only version with the engine's quantizer, and pack it as one tar (the LLM artifact
format of shared/llm_artifact.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fieldline.shared.llm_artifact import (
    FORMAT,
    LLMArtifactError,
    checkpoint_files,
    pack_checkpoint,
)


@dataclass
class PackedLLM:
    tar: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    quantization: str | None = None


def pack_llm(directory: Path, workdir: Path, *, quantize: str | None) -> PackedLLM:
    """Pack `directory` (quantized to int8 first when asked) into workdir/checkpoint.tar.

    Raises LLMArtifactError (not a checkpoint) or CheckpointError (one the engine cannot load).
    """
    from fieldline.edge.engine.loader import read_config

    checkpoint_files(directory)
    config = read_config(directory)  # a model the engine cannot load is refused here, not on edges
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "model_type": config.model_type,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }
    source = directory
    if quantize is not None:
        if quantize != "int8":
            raise LLMArtifactError(f"--quantize takes int8, not {quantize!r}")
        if config.quantization is not None:
            raise LLMArtifactError(f"{directory} is already quantized ({config.quantization})")
        from fieldline.edge.engine.quantize import quantize_checkpoint

        source = workdir / "int8"
        sizes = quantize_checkpoint(directory, source)
        metadata["quantization"] = {"method": "int8_weight_only", **sizes}
    elif config.quantization is not None:
        metadata["quantization"] = {"method": config.quantization}
    tar = workdir / "checkpoint.tar"
    metadata["files"] = pack_checkpoint(source, tar)
    quantization = "int8" if quantize or config.quantization else None
    return PackedLLM(tar, metadata, quantization)
