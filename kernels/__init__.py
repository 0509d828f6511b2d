"""fieldline.kernels: paged-KV attention, KV-cache write and W8A16 matmul (Triton + torch references).

Also the launchers' shared device check. Depends on torch, and on triton only where it is
installed (kernels/triton_compat.py): `import fieldline.kernels` works on a CPU-only install.
"""

from __future__ import annotations

import torch

from fieldline.kernels.triton_compat import is_jit_kernel


def check_devices(kernel: object, what: str, *tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors share a device the kernel can run on.

    A compiled kernel (triton.JITFunction) needs CUDA tensors; one decorated under
    TRITON_INTERPRET=1 runs on CPU tensors too.
    """
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            f"{what}: all tensors must be on one device, got {sorted(map(str, devices))}"
        )
    (device,) = devices
    if is_jit_kernel(kernel) and device.type != "cuda":
        raise ValueError(
            f"{what}: the compiled Triton kernel needs CUDA tensors, got {device}"
            " (use the *_ref function, or TRITON_INTERPRET=1 in tests)"
        )
