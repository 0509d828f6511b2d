"""fieldline.edge.engine."""
