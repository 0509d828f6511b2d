"""fieldline.cloud.api.routes."""
