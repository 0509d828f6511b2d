"""KV-cache write and W8A16 matmul: Triton (interpreted on CPU) against the torch references."""

from __future__ import annotations

import pytest
import torch

from fieldline.kernels.dispatch import get_attention_backend, int8_linear
from fieldline.kernels.kv_cache import write_kv, write_kv_ref
from fieldline.kernels.w8a16 import quantize_per_channel, w8a16_matmul, w8a16_matmul_ref
from tests.kernels.checks import BF16, assert_close


@pytest.mark.parametrize(("kv_heads", "head_dim"), [(1, 64), (2, 128), (3, 80)])
def test_write_kv_matches_reference_and_skips_padding(
    kv_heads: int, head_dim: int, device: torch.device
) -> None:
    g = torch.Generator().manual_seed(kv_heads)
    k = torch.randn(23, kv_heads, head_dim, generator=g).to(device)
    v = torch.randn(23, kv_heads, head_dim, generator=g).to(device)
    slots = torch.randperm(7 * 16, generator=g)[:23].to(device)
    slots[[3, 11]] = -1
    caches = [torch.zeros(7, 16, kv_heads, head_dim, device=device) for _ in range(4)]
    write_kv(k, v, caches[0], caches[1], slots)
    write_kv_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    # Padding tokens left their (zero) slots alone.
    assert caches[0].view(-1, kv_heads, head_dim).abs().sum(dim=(1, 2)).count_nonzero() == 21


@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 64, 64), (37, 181, 183), (5, 781, 129), (64, 96, 257)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_w8a16_irregular_shapes(
    m: int, k: int, n: int, dtype: torch.dtype, device: torch.device
) -> None:
    g = torch.Generator().manual_seed(m * n)
    w = torch.randn(n, k, generator=g)
    w_int8, scales = (t.to(device) for t in quantize_per_channel(w))
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    bias = torch.randn(n, generator=g).to(device)
    out = w8a16_matmul(x, w_int8, scales, bias)
    assert out.dtype == dtype
    assert_close(out, w8a16_matmul_ref(x, w_int8, scales, bias), what=f"w8a16 {m}x{k}x{n} {dtype}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_w8a16_large_irregular(dtype: torch.dtype, device: torch.device) -> None:
    w_int8, scales = (t.to(device) for t in quantize_per_channel(torch.randn(1823, 781)))
    x = torch.randn(37, 781).to(dtype).to(device)
    out = w8a16_matmul(x, w_int8, scales)
    assert_close(out, w8a16_matmul_ref(x, w_int8, scales), what=f"37x781x1823 {dtype}")


def test_quantization_error_is_bounded() -> None:
    w = torch.randn(300, 200)
    w_int8, scales = quantize_per_channel(w)
    # Symmetric rounding: each weight is off by at most half a step of its row.
    assert ((w_int8.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("k", [64, 65, 72])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_linear_cpu_path_matches_reference(dtype: torch.dtype, k: int) -> None:
    # CPU goes through torch._weight_int8pack_mm (not Triton), so bf16 is checked here too;
    # K = 65 and 72 are the shapes whose native bf16 call would segfault (see dispatch.py).
    w_int8, scales = quantize_per_channel(torch.randn(129, k))
    x = torch.randn(3, 7, k).to(dtype)
    bias = torch.randn(129)
    out = int8_linear(x, w_int8, scales, bias)
    assert out.shape == (3, 7, 129) and out.dtype == dtype
    ref = w8a16_matmul_ref(x.reshape(-1, k), w_int8, scales, bias).reshape(3, 7, 129)
    assert_close(out, ref, what=f"int8_linear on cpu {dtype} K={k}")


def test_w8a16_launcher_rejects_bad_inputs() -> None:
    w_int8, scales = quantize_per_channel(torch.randn(8, 16))
    with pytest.raises(ValueError, match="share K"):
        w8a16_matmul(torch.randn(2, 15), w_int8, scales)
    with pytest.raises(ValueError, match="int8"):
        w8a16_matmul(torch.randn(2, 16), w_int8.float(), scales)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        w8a16_matmul(torch.randn(2, 16).double(), w_int8, scales)
    with pytest.raises(ValueError, match="scales must be"):
        w8a16_matmul(torch.randn(2, 16), w_int8, scales[:7])
    with pytest.raises(ValueError, match="bias must be"):
        w8a16_matmul(torch.randn(2, 16), w_int8, scales, torch.zeros(9))
    with pytest.raises(ValueError, match="one device"):
        w8a16_matmul(torch.randn(2, 16), w_int8, scales.to("meta"))


def test_write_kv_launcher_rejects_bad_inputs() -> None:
    k = torch.randn(4, 2, 64)
    cache = torch.zeros(3, 16, 2, 64)
    slots = torch.arange(4)
    with pytest.raises(ValueError, match="key and value"):
        write_kv(k, k[:, :1], cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="cache heads/head_dim"):
        write_kv(k[..., :32], k[..., :32], cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="one slot per token"):
        write_kv(k, k, cache, cache.clone(), slots[:3])
    with pytest.raises(ValueError, match="one slot per token"):
        write_kv(k, k, cache, cache.clone(), slots.float())
    with pytest.raises(ValueError, match="cache dtype"):
        write_kv(k.half(), k.half(), cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="contiguous"):
        write_kv(k, k, cache.transpose(2, 3).contiguous().transpose(2, 3), cache.clone(), slots)
    with pytest.raises(ValueError, match="one device"):
        write_kv(k, k, cache, cache.clone(), slots.to("meta"))


def test_backend_dispatch() -> None:
    cpu = torch.device("cpu")
    assert get_attention_backend(cpu).name == "torch"
    assert get_attention_backend(cpu, "triton").name == "triton"  # tests run the interpreter
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend(cpu, "cuda-magic")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        get_attention_backend(torch.device("cpu"), "triton")
