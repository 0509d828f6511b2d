"""Float32 linear layers on CPU through oneDNN with weights prepacked once: the CPU engine's matmul.

MKL's sgemm behind F.linear is far from memory bandwidth on the few-row products of decode
(16 rows x 512 x 3072 moves weights at ~8 GB/s on a 2-core EPYC whose memory does ~33 GB/s).
oneDNN's blocked weight layout, packed once at load, runs the same products 2-5x faster and
prefill-sized ones 1.1-1.4x faster; results differ from F.linear only in summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def can_prepack(weight: torch.Tensor) -> bool:
    """True where the packed path exists: a float32 CPU weight and torch built with oneDNN."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
    )


def prepack(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    """The oneDNN-blocked copy of weight [out, in]; batch_hint is the row count to tune for."""
    if not can_prepack(weight):
        raise ValueError(
            f"cannot prepack a {weight.dtype} weight of shape {tuple(weight.shape)} on "
            f"{weight.device} (float32 CPU 2-D weights with oneDNN only)"
        )
    if batch_hint < 1:
        raise ValueError(f"batch_hint must be >= 1, got {batch_hint}")
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)


def packed_linear(
    x: torch.Tensor,  # [..., in] float32
    packed: torch.Tensor,  # from prepack
    bias: torch.Tensor | None = None,  # [out] float32
) -> torch.Tensor:
    """x @ weight.T + bias with a prepacked weight: [..., out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference packed_linear is checked against."""
    return F.linear(x, weight, bias)
