"""fieldline.cloud.store."""
