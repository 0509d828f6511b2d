"""W8A16 matmul: int8 weights with per-output-channel scales, float activations; kernel and reference."""

from __future__ import annotations

import torch

from fieldline.kernels import check_devices
from fieldline.kernels.triton_compat import tl, triton


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


@triton.jit
def _w8a16_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32, "tf32" otherwise (ignored for halves)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=(offs_n[None, :] < N) & (offs_k[:, None] < K),
            other=0,
        )  # [BLOCK_K, BLOCK_N] int8, dequantized in registers (the scale is applied once at the end)
        acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


def w8a16_matmul(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launcher for w8a16_matmul_ref's contract; checks shapes and dtypes."""
    if x.dim() != 2 or w_int8.dim() != 2 or x.shape[1] != w_int8.shape[1]:
        raise ValueError(
            f"x [M, K] and w [N, K] must share K, got {tuple(x.shape)} and {tuple(w_int8.shape)}"
        )
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if w_int8.dtype != torch.int8:
        raise ValueError(f"weights must be int8, got {w_int8.dtype}")
    if scales.shape != (w_int8.shape[0],):
        raise ValueError(f"scales must be [N] = [{w_int8.shape[0]}], got {tuple(scales.shape)}")
    if bias is not None and bias.shape != (w_int8.shape[0],):
        raise ValueError(f"bias must be [N] = [{w_int8.shape[0]}], got {tuple(bias.shape)}")
    if not scales.is_floating_point() or (bias is not None and not bias.is_floating_point()):
        raise ValueError("scales and bias must be floating point")
    check_devices(
        _w8a16_kernel, "w8a16_matmul", x, w_int8, scales, *([bias] if bias is not None else [])
    )
    m, k = x.shape
    n = w_int8.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _w8a16_kernel[grid](
        x,
        w_int8,
        scales.float().contiguous(),
        bias.contiguous() if bias is not None else scales,
        y,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        w_int8.stride(0),
        w_int8.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_K=32,
    )
    return y
