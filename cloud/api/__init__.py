"""fieldline.cloud.api."""
