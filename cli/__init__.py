"""fieldline.cli."""
