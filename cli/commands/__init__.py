"""The `fieldline` command groups, one module each."""
