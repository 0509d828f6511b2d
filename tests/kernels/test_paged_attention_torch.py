"""The vectorized torch attention (the CPU engine's path) against the reference."""

from __future__ import annotations

import pytest
import torch

from fieldline.kernels.paged_attention import paged_attention_ref
from fieldline.kernels.paged_attention_torch import paged_attention_torch
from tests.kernels.checks import assert_close
from tests.kernels.test_paged_attention import make_batch


@pytest.mark.parametrize(
    ("ctx", "new"),
    [
        ([5, 40, 17, 300, 1], [1, 1, 1, 1, 1]),  # all decode
        ([64, 33, 90, 2], [64, 1, 9, 1]),  # prefill, decode, chunk, decode
        ([3], [1]),  # one sequence
        ([20, 16, 16], [20, 16, 1]),
        ([100, 37, 250], [30, 37, 17]),  # chunks onto cached context, a whole prompt
        ([7, 0, 9], [1, 0, 1]),  # a sequence with nothing new this step
    ],
)
@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_matches_reference(ctx: list[int], new: list[int], ratio: int) -> None:
    args = make_batch(ctx, new, 4, 4 // ratio, 64, torch.float32, seed=len(ctx))
    scale = 64**-0.5
    assert_close(
        paged_attention_torch(*args, scale), paged_attention_ref(*args, scale), what="torch path"
    )
