"""The oneDNN-prepacked CPU linear (the CPU engine's matmul) against F.linear."""

from __future__ import annotations

import pytest
import torch

from fieldline.kernels.cpu_linear import can_prepack, linear_ref, packed_linear, prepack
from tests.kernels.checks import assert_close

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"
)


@pytest.mark.parametrize("rows", [1, 7, 16, 33, 271])
@pytest.mark.parametrize(("out_features", "in_features"), [(781, 1823), (3072, 512), (5, 3)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("hint", [1, 16])
def test_matches_reference(
    rows: int, out_features: int, in_features: int, bias: bool, hint: int
) -> None:
    g = torch.Generator().manual_seed(rows * 7 + out_features)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    x = torch.randn(rows, in_features, generator=g)
    packed = prepack(w, hint)
    assert_close(packed_linear(x, packed, b), linear_ref(x, w, b), what="packed linear")


def test_strided_and_batched_inputs() -> None:
    w, b = torch.randn(96, 64), torch.randn(96)
    packed = prepack(w, 16)
    x = torch.randn(10, 128)[:, :64]  # rows with a stride, as a split of a fused output is
    assert_close(packed_linear(x, packed, b), linear_ref(x, w, b), what="strided rows")
    x3 = torch.randn(2, 5, 64)
    assert_close(packed_linear(x3, packed, b), linear_ref(x3, w, b), what="3-d input")


def test_refuses_what_it_cannot_pack() -> None:
    assert not can_prepack(torch.randn(4, 4, dtype=torch.float16))
    assert not can_prepack(torch.randn(4))
    with pytest.raises(ValueError, match="cannot prepack"):
        prepack(torch.zeros(4, 4, dtype=torch.int8), 16)
    with pytest.raises(ValueError, match="batch_hint"):
        prepack(torch.randn(4, 4), 0)
