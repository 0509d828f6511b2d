"""How the CLI shows results: rich tables for people, JSON with --json for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], *, title: str | None = None
) -> None:
    """columns: (key in the row, header)."""
    table = Table(title=title)
    for _, header in columns:
        table.add_column(header)
    for row in rows:
        table.add_row(*[_cell(row.get(key)) for key, _ in columns])
    console.print(table)


def show_rows(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, str]],
    *,
    title: str,
    as_json: bool,
) -> None:
    """A listing: JSON with --json, else a table."""
    if as_json:
        print_json(rows)
    else:
        print_table(rows, columns, title=title)


def show_done(result: Any, message: str, *, as_json: bool) -> None:
    """An action's result: JSON with --json, else one line for a person."""
    if as_json:
        print_json(result)
    else:
        console.print(message)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error for a person and return the Exit to raise."""
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)
