"""fieldline.cloud."""
