"""Fixtures every test folder may use; folder-specific ones live in that folder's conftest.py."""

import os

# Triton kernels run on CPU tensors through the interpreter in tests. The flag is read when a
# kernel is decorated, so it must be set before any test module imports fieldline.kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
