"""`fieldline token`: enrollment tokens."""

from __future__ import annotations

from typing import Annotated

import typer

from fieldline.cli.commands.common import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, admin, labels
from fieldline.cli.output import print_json, show_done, show_rows

token_app = typer.Typer(no_args_is_help=True, help="Enrollment tokens.")


@token_app.command("create")
def token_create(
    node_labels: Annotated[
        str, typer.Option("--labels", help="Labels for the node, k=v[,k=v].")
    ] = "",
    ttl: Annotated[int | None, typer.Option(help="Lifetime in seconds.")] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Mint a single-use, expiring enrollment token."""
    with admin(url, key) as c:
        tok = c.create_token(labels(node_labels), ttl)
    if as_json:
        print_json(tok)
    else:
        print(tok["token"])  # plain: rich would wrap a long token at the terminal width


TOKEN_COLUMNS = [
    ("id", "id"),
    ("state", "state"),
    ("labels", "labels"),
    ("expires_at", "expires"),
    ("node_id", "node"),
]


@token_app.command("list")
def token_list(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """List enrollment tokens (never their secrets): active, used, expired, revoked."""
    with admin(url, key) as c:
        tokens = c.list_tokens()
    show_rows(tokens, TOKEN_COLUMNS, title="enrollment tokens", as_json=as_json)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (from `fieldline token list`).")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a token at once so it can no longer enroll a node."""
    with admin(url, key) as c:
        revoked = c.revoke_token(token_id)
    show_done(revoked, f"revoked {revoked['id']}", as_json=as_json)
