"""W8A16 matmul: int8 weights with per-output-channel scales, float activations; kernel and reference."""

from __future__ import annotations

import torch


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: w [N, K] -> (w_int8 [N, K], scales [N] float32)."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1).clamp(min=1e-8)  # [N]
    scales = amax / 127.0
    w_int8 = torch.clamp(torch.round(w32 / scales[:, None]), -127, 127).to(torch.int8)
    return w_int8, scales


def w8a16_matmul_ref(
    x: torch.Tensor,  # [M, K] float16 / bfloat16 / float32
    w_int8: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N] float32
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    w = w_int8.float() * scales.float()[:, None]  # [N, K] dequantized
    y = x.float() @ w.t()  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
