"""KV-cache write and W8A16 matmul: Triton (interpreted on CPU) against the torch references."""

from __future__ import annotations

import pytest
import torch

from fieldline.kernels.dispatch import get_attention_backend, int8_linear
from fieldline.kernels.kv_cache import write_kv, write_kv_ref
from fieldline.kernels.w8a16 import quantize_per_channel, w8a16_matmul, w8a16_matmul_ref
from tests.kernels.checks import BF16, assert_close


@pytest.mark.parametrize(("kv_heads", "head_dim"), [(1, 64), (2, 128), (3, 80)])
def test_write_kv_matches_reference_and_skips_padding(kv_heads: int, head_dim: int) -> None:
    g = torch.Generator().manual_seed(kv_heads)
    k = torch.randn(23, kv_heads, head_dim, generator=g)
    v = torch.randn(23, kv_heads, head_dim, generator=g)
    slots = torch.randperm(7 * 16, generator=g)[:23]
    slots[[3, 11]] = -1
    caches = [torch.zeros(7, 16, kv_heads, head_dim) for _ in range(4)]
    write_kv(k, v, caches[0], caches[1], slots)
    write_kv_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    # Padding tokens left their (zero) slots alone.
    assert caches[0].view(-1, kv_heads, head_dim).abs().sum(dim=(1, 2)).count_nonzero() == 21


@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 64, 64), (37, 181, 183), (5, 781, 129), (64, 96, 257)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_w8a16_irregular_shapes(m: int, k: int, n: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(m * n)
    w = torch.randn(n, k, generator=g)
    w_int8, scales = quantize_per_channel(w)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    out = w8a16_matmul(x, w_int8, scales, bias)
    assert out.dtype == dtype
    assert_close(out, w8a16_matmul_ref(x, w_int8, scales, bias), what=f"w8a16 {m}x{k}x{n} {dtype}")


@pytest.mark.slow
def test_w8a16_large_irregular() -> None:
    w = torch.randn(1823, 781)
    w_int8, scales = quantize_per_channel(w)
    x = torch.randn(37, 781)
    assert_close(w8a16_matmul(x, w_int8, scales), w8a16_matmul_ref(x, w_int8, scales), what="big")


def test_quantization_error_is_bounded() -> None:
    w = torch.randn(300, 200)
    w_int8, scales = quantize_per_channel(w)
    # Symmetric rounding: each weight is off by at most half a step of its row.
    assert ((w_int8.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


def test_int8_linear_cpu_path_matches_reference() -> None:
    w_int8, scales = quantize_per_channel(torch.randn(129, 65))
    x = torch.randn(3, 7, 65)
    out = int8_linear(x, w_int8, scales)
    assert out.shape == (3, 7, 129)
    ref = w8a16_matmul_ref(x.reshape(-1, 65), w_int8, scales).reshape(3, 7, 129)
    assert_close(out, ref, what="int8_linear on cpu")


def test_w8a16_launcher_rejects_bad_inputs() -> None:
    w_int8, scales = quantize_per_channel(torch.randn(8, 16))
    with pytest.raises(ValueError, match="share K"):
        w8a16_matmul(torch.randn(2, 15), w_int8, scales)
    with pytest.raises(ValueError, match="int8"):
        w8a16_matmul(torch.randn(2, 16), w_int8.float(), scales)


def test_backend_dispatch() -> None:
    cpu = torch.device("cpu")
    assert get_attention_backend(cpu).name == "torch"
    assert get_attention_backend(cpu, "triton").name == "triton"  # tests run the interpreter
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend(cpu, "cuda-magic")
