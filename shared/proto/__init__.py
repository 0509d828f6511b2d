"""fieldline.shared.proto."""
