"""`fieldline assign`: put an artifact on every node a selector matches."""

from __future__ import annotations

from typing import Annotated

import typer

from fieldline.cli.commands.common import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, admin, labels
from fieldline.cli.output import console, print_json


def assign(
    artifact: Annotated[str, typer.Option(help="NAME@VERSION.")],
    selector: Annotated[str, typer.Option(help="Label selector k=v[,k=v].")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Assign an artifact to every node matching the selector."""
    labels(selector)
    with admin(url, key) as c:
        result = c.assign(artifact, selector)
    if as_json:
        print_json(result)
    else:
        nodes = result.get("nodes", [])
        console.print(f"assigned {artifact} to {len(nodes)} node(s): {', '.join(nodes) or '-'}")
