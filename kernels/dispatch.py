"""The one seam the model calls for attention and linears: Triton on CUDA, torch elsewhere.

Float32 linears on CPU go through oneDNN with prepacked weights (kernels/cpu_linear.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fieldline.kernels.cpu_linear import can_prepack as can_prepack_linear
from fieldline.kernels.cpu_linear import packed_linear
from fieldline.kernels.cpu_linear import prepack as prepack_linear
from fieldline.kernels.kv_cache import write_kv_ref
from fieldline.kernels.paged_attention_torch import paged_attention_torch
from fieldline.kernels.w8a16 import w8a16_matmul_ref

__all__ = [
    "AttentionBackend",
    "can_prepack_linear",
    "get_attention_backend",
    "int8_linear",
    "packed_linear",
    "prepack_linear",
]

# torch._weight_int8pack_mm on CPU crashes for bfloat16 unless K is a multiple of this.
BF16_CPU_K_MULTIPLE = 16


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    write_kv: Callable[..., None]
    attention: Callable[..., torch.Tensor]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def get_attention_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """ "auto": triton on CUDA, torch elsewhere; "triton" on CPU only under TRITON_INTERPRET=1."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return AttentionBackend("torch", write_kv_ref, paged_attention_torch)
    if name == "triton":
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                "the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1 in tests)"
            )
        from fieldline.kernels.kv_cache import write_kv
        from fieldline.kernels.paged_attention import paged_attention

        return AttentionBackend("triton", write_kv, paged_attention)
    raise ValueError(f"unknown attention backend {name!r}: use auto, torch or triton")


def int8_linear(
    x: torch.Tensor,  # [..., K]
    w_int8: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N] float32
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(w).T + bias, by the fastest path for x's device."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x.device.type == "cuda":
        from fieldline.kernels.w8a16 import w8a16_matmul

        y = w8a16_matmul(x2, w_int8, scales, bias)
    elif x.device.type == "cpu":
        # torch's CPU int8 weight-only kernel wants the scales in the activation dtype. Its
        # bfloat16 path segfaults when K is not a multiple of 16 (torch 2.13, seen for K = 8, 24,
        # 65, 72, 100); those shapes go through float32 and back, which is always safe.
        compute = x.dtype
        if x.dtype == torch.bfloat16 and x.shape[-1] % BF16_CPU_K_MULTIPLE:
            compute = torch.float32
        y = torch._weight_int8pack_mm(
            x2.to(compute).contiguous(), w_int8.contiguous(), scales.to(compute)
        )
        if bias is not None:
            y = y + bias.to(compute)
        y = y.to(x.dtype)
    else:
        y = w8a16_matmul_ref(x2, w_int8, scales, bias)
    return y.reshape(*shape[:-1], w_int8.shape[0])
