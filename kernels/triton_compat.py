"""`triton` and `triton.language` when installed, else stand-ins, so a CPU-only install (plain
`pip install .`, no gpu extra) imports every kernel module and runs the torch paths.

A kernel defined with the stand-in `triton.jit` refuses to launch with a message naming the
missing extra; its module's torch reference works as ever. Type annotations such as
`tl.constexpr` are never evaluated (the kernel modules use `from __future__ import annotations`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the CPU-only install: see the module docstring
    HAVE_TRITON = False


class TritonMissing(RuntimeError):
    """A Triton kernel was launched where triton is not installed."""


class _UnavailableKernel:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __getitem__(self, grid: object) -> Callable[..., None]:
        raise TritonMissing(
            f"{self.__name__} is a Triton kernel and triton is not installed: "
            "pip install 'fieldline[gpu]', or use the torch backend"
        )


class _TritonStandIn:
    """The parts of the triton module a kernel module touches at import or launch time."""

    @staticmethod
    def jit(fn: Callable[..., Any]) -> _UnavailableKernel:
        return _UnavailableKernel(fn)

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 << max(0, n - 1).bit_length()


if not HAVE_TRITON:
    triton = _TritonStandIn()  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]


def is_jit_kernel(kernel: object) -> bool:
    """True for a compiled Triton kernel (it needs CUDA tensors), False for an interpreted one."""
    if not HAVE_TRITON:
        return False
    return isinstance(kernel, triton.runtime.JITFunction)


__all__ = ["HAVE_TRITON", "TritonMissing", "is_jit_kernel", "tl", "triton"]
