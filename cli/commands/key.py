"""`fieldline key`: admin API keys."""

from __future__ import annotations

from typing import Annotated

import typer

from fieldline.cli.commands.common import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, admin
from fieldline.cli.output import console, print_json

key_app = typer.Typer(no_args_is_help=True, help="Admin API keys.")


@key_app.command("create")
def key_create(
    role: Annotated[str, typer.Option(help="admin, operator or viewer.")] = "viewer",
    name: Annotated[str, typer.Option(help="A name to recognise the key by.")] = "",
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key (shown once)."""
    with admin(url, key) as c:
        created = c.create_key(role, name)
    if as_json:
        print_json(created)
    else:
        console.print(created["key"])
