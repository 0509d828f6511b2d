"""`fieldline nodes`: the fleet's nodes; list them, show one with its health, relabel, revoke."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from pydantic import ValidationError

from fieldline.cli.admin_client import AdminError
from fieldline.cli.commands.common import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, admin, labels
from fieldline.cli.health_view import NodeView, node_view
from fieldline.cli.output import console, fail, print_json, print_table

nodes_app = typer.Typer(no_args_is_help=True, help="Edge nodes.")
NodeArg = Annotated[str, typer.Argument(help="Node id.")]

NODE_COLUMNS = [
    ("id", "node"),
    ("online", "online"),
    ("labels", "labels"),
    ("desired_generation", "desired"),
    ("applied_generation", "applied"),
    ("active", "active"),
    ("sync_backlog", "backlog"),
    ("live_lag", "live lag"),
    ("last_seen", "last seen"),
]


def node_rows(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten the API's node objects for the table."""
    rows = []
    for n in nodes:
        row = dict(n)
        active = n.get("active") or {}
        if isinstance(active, dict):
            row["active"] = ", ".join(f"{k}@{v}" for k, v in active.items())
        lag = n.get("sync_live_lag_ms")
        row["live_lag"] = f"{lag / 1000:.1f} s" if lag is not None else "-"
        rows.append(row)
    return rows


@nodes_app.command("list")
def nodes_list(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """List nodes with their state."""
    with admin(url, key) as c:
        nodes = c.list_nodes()
    if as_json:
        print_json(nodes)
    else:
        print_table(node_rows(nodes), NODE_COLUMNS, title="nodes")


@nodes_app.command("show")
def nodes_show(
    node_id: NodeArg, url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False
) -> None:
    """Show one node: labels, state, generations, artifacts, and its health part by part."""
    with admin(url, key) as c:
        try:
            found = c.get_node(node_id)
        except AdminError as exc:
            if exc.status == 404:
                raise fail(
                    f"no node {node_id!r} in this cloud (see `fieldline nodes list`)"
                ) from exc
            raise
    if as_json:
        print_json(found)
        return
    try:
        node = NodeView.model_validate(found)
    except ValidationError as exc:
        raise fail(f"the cloud's answer for {node_id} does not read as a node: {exc}") from exc
    console.print(node_view(node))


@nodes_app.command("label")
def nodes_label(
    node_id: NodeArg,
    node_labels: Annotated[str, typer.Option("--labels", help="The node's new labels, k=v[,k=v].")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace a node's labels (its desired state follows the assignments that now match)."""
    with admin(url, key) as c:
        node = c.set_labels(node_id, labels(node_labels))
    if as_json:
        print_json(node)
    else:
        print_table(node_rows([node]), NODE_COLUMNS)


@nodes_app.command("revoke")
def nodes_revoke(
    node_id: NodeArg, url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False
) -> None:
    """Revoke a node: its credential and certificate are refused and its tunnel closes now."""
    with admin(url, key) as c:
        node = c.revoke_node(node_id)
    if as_json:
        print_json(node)
    else:
        console.print(f"node {node['id']} revoked at {node['revoked_at']}")
