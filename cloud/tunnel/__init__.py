"""fieldline.cloud.tunnel."""
