"""Kernel tests: which device the Triton kernels run on, and making sure they really run that way.

Default: the Triton interpreter on CPU tensors. With a CUDA GPU and TRITON_INTERPRET=0 set
explicitly, the compiled kernels run on the GPU (`TRITON_INTERPRET=0 pytest tests/kernels`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator

import pytest
import torch

# Why this is needed and why it is enough (triton 3.9): `@triton.jit` chooses between a compiled
# JITFunction and an InterpretedFunction when the kernel is *decorated*, i.e. when
# fieldline.kernels.<module> is first imported, by reading TRITON_INTERPRET through
# triton.knobs at that moment. Importing triton itself fixes nothing, so setting the variable
# here is enough when this folder is the first to import the kernels (tests/conftest.py sets it
# too). If another test module in the same pytest process imported them earlier without the
# flag, `kernels_mode` below re-imports (importlib.reload) the kernel modules under the flag:
# reload re-executes them in the same module dict, and the launchers look their kernel up in
# that dict at call time, so launchers imported earlier (`from ... import paged_attention`) run
# the re-decorated kernels. After this folder, the modules are reloaded back as they were.
ON_GPU = os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

KERNEL_MODULES = (
    "fieldline.kernels.kv_cache",
    "fieldline.kernels.paged_attention",
    "fieldline.kernels.w8a16",
)


def kernels_interpreted() -> bool:
    """True when every kernel module's @triton.jit kernels are InterpretedFunctions."""
    from triton.runtime.interpreter import InterpretedFunction

    from fieldline.kernels import kv_cache, paged_attention, w8a16

    kernels = (
        kv_cache._write_kv_kernel,
        paged_attention._paged_attention_kernel,
        w8a16._w8a16_kernel,
    )
    return all(isinstance(k, InterpretedFunction) for k in kernels)


def _reload_kernels(interpret: bool) -> None:
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        for name in KERNEL_MODULES:
            importlib.reload(importlib.import_module(name))
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


@pytest.fixture(scope="package", autouse=True)
def kernels_mode() -> Iterator[None]:
    """Make the kernels interpreted (CPU) or compiled (GPU) as this folder needs, then restore."""
    want_interpreted = not ON_GPU
    was_interpreted = kernels_interpreted()
    if was_interpreted != want_interpreted:
        _reload_kernels(want_interpreted)
    assert kernels_interpreted() == want_interpreted
    try:
        yield
    finally:
        if was_interpreted != want_interpreted:
            _reload_kernels(was_interpreted)


@pytest.fixture(scope="package")
def device() -> torch.device:
    """Where the test tensors live: CUDA for compiled kernels, CPU for the interpreter."""
    return torch.device("cuda" if ON_GPU else "cpu")
