"""fieldline.kernels."""
