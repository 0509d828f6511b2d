"""`fieldline records`: what the edges synced to the cloud, filtered and paged."""

from __future__ import annotations

from typing import Annotated

import typer

from fieldline.cli.commands.common import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, admin
from fieldline.cli.output import console, print_json, print_table

PAYLOAD_SHOWN = 60  # characters of a payload in the table
DEAD_COLUMNS = [
    ("node_id", "node"),
    ("epoch", "epoch"),
    ("seq", "seq"),
    ("kind", "kind"),
    ("size", "bytes"),
    ("reason", "reason"),
]


def records(
    node: Annotated[str | None, typer.Option(help="Node id.")] = None,
    kind: Annotated[str | None, typer.Option(help="telemetry, verdict or event.")] = None,
    topic: Annotated[str | None, typer.Option(help="Exact topic.")] = None,
    limit: Annotated[int, typer.Option(help="Rows per page (max 1000).")] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page.")] = None,
    dead: Annotated[
        bool, typer.Option("--dead", help="Records the cloud refused (dead letters) and why.")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Records the edges synced to the cloud (readings, verdicts, events); --dead: those it
    refused, each on its own, with the reason."""
    with admin(url, key) as c:
        if dead:
            page = c.records(node=node, limit=limit, cursor=cursor, dead="true")
        else:
            page = c.records(node=node, kind=kind, topic=topic, limit=limit, cursor=cursor)
    if as_json:
        print_json(page)
        return
    if dead:
        print_table(page["dead"], DEAD_COLUMNS, title="dead letters (refused by the cloud)")
        if page.get("next_cursor"):
            console.print(f"more: --dead --cursor {page['next_cursor']}")
        return
    rows = [dict(r, payload=str(r["payload"])[:PAYLOAD_SHOWN]) for r in page["records"]]
    print_table(
        rows,
        [
            ("node_id", "node"),
            ("seq", "seq"),
            ("kind", "kind"),
            ("topic", "topic"),
            ("ts_ms", "ts_ms"),
            ("payload", "payload"),
        ],
        title="records",
    )
    if page.get("next_cursor"):
        console.print(f"more: --cursor {page['next_cursor']}")
