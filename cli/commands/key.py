"""`fieldline key`: admin API keys."""

from __future__ import annotations

from typing import Annotated

import typer

from fieldline.cli.commands.common import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, admin
from fieldline.cli.output import console, print_json, show_done, show_rows

key_app = typer.Typer(no_args_is_help=True, help="Admin API keys.")


@key_app.command("create")
def key_create(
    role: Annotated[str, typer.Option(help="admin, operator or viewer.")] = "viewer",
    name: Annotated[str, typer.Option(help="A name to recognise the key by.")] = "",
    expires_in: Annotated[
        int | None, typer.Option(help="Seconds until it stops working (default: never).")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key (shown once)."""
    with admin(url, key) as c:
        created = c.create_key(role, name, expires_in)
    if as_json:
        print_json(created)
    else:
        console.print(created["key"])


KEY_COLUMNS = [
    ("id", "id"),
    ("name", "name"),
    ("role", "role"),
    ("state", "state"),
    ("created", "created"),
    ("expires_at", "expires"),
]


@key_app.command("list")
def key_list(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """List API keys (never their secrets), revoked and expired ones too."""
    with admin(url, key) as c:
        keys = c.list_keys()
    show_rows(keys, KEY_COLUMNS, title="API keys", as_json=as_json)


@key_app.command("revoke")
def key_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from `fieldline key list`).")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key at once; the last usable admin key cannot be revoked."""
    with admin(url, key) as c:
        revoked = c.revoke_key(key_id)
    show_done(revoked, f"revoked {revoked['id']} ({revoked['role']})", as_json=as_json)
