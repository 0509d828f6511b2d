"""`fieldline records`: what the edges synced to the cloud, filtered and paged."""

from __future__ import annotations

from typing import Annotated

import typer

from fieldline.cli.commands.common import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, admin
from fieldline.cli.output import console, print_json, print_table

PAYLOAD_SHOWN = 60  # characters of a payload in the table


def records(
    node: Annotated[str | None, typer.Option(help="Node id.")] = None,
    kind: Annotated[str | None, typer.Option(help="telemetry, verdict or event.")] = None,
    topic: Annotated[str | None, typer.Option(help="Exact topic.")] = None,
    limit: Annotated[int, typer.Option(help="Rows per page (max 1000).")] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page.")] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Records the edges synced to the cloud (readings, verdicts, events)."""
    with admin(url, key) as c:
        page = c.records(node=node, kind=kind, topic=topic, limit=limit, cursor=cursor)
    if as_json:
        print_json(page)
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
