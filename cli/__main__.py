"""`python -m fieldline.cli` runs the `fieldline` command (how child processes are started)."""

from fieldline.cli.main import main

main()
