"""`fieldline audit`: the cloud's audit trail of state-changing calls (admin key)."""

from __future__ import annotations

from typing import Annotated

import typer

from fieldline.cli.commands.common import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, admin
from fieldline.cli.output import print_json, print_table

AUDIT_COLUMNS = [
    ("at", "when"),
    ("key_id", "who"),
    ("role", "role"),
    ("method", "method"),
    ("path", "what"),
    ("status", "outcome"),
    ("detail", "detail"),
]


def audit(
    key_id: Annotated[
        str | None, typer.Option("--who", help="Only the calls of this key (or node) id.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Newest entries to show.")] = 100,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show who changed what, when, and the outcome, newest first."""
    with admin(url, key) as c:
        entries = c.audit(key_id=key_id, limit=limit)
    if as_json:
        print_json(entries)
    else:
        print_table(entries, AUDIT_COLUMNS, title="audit trail")
