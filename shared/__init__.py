"""fieldline.shared."""
