"""The `fieldline` command: one typer app with cloud, edge and admin sub-commands."""

import typer

app = typer.Typer(no_args_is_help=True, help="fieldline: edge-and-cloud deployment agent.")


def main() -> None:
    app()
