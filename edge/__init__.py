"""fieldline.edge."""
