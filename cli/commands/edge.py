"""`fieldline edge`: run the daemon, show what the node has and how it is, check it is alive."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fieldline.cli.commands.common import ConfigOpt, DataEnvOpt, split_hostport
from fieldline.cli.output import console, fail, print_json
from fieldline.shared.config import ConfigError, EdgeSettings, load_settings

edge_app = typer.Typer(no_args_is_help=True, help="The edge daemon.")


@edge_app.command("run")
def edge_run(
    cloud: Annotated[str | None, typer.Option("--cloud", help="Cloud tunnel HOST:PORT.")] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Enrollment token (first start only).")
    ] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Data directory.")] = None,
    config: ConfigOpt = None,
    enroll: Annotated[
        str | None,
        typer.Option("--enroll", help="TLS enrollment HOST:PORT (default: from the token)."),
    ] = None,
) -> None:
    """Run the edge daemon: enroll once, then keep the node in its desired state."""
    from fieldline.edge.agent import run_edge

    split_hostport(cloud, "--cloud")
    split_hostport(enroll, "--enroll")
    try:
        settings = load_settings(
            EdgeSettings, config, cloud=cloud, token=token, data_dir=data, enroll=enroll
        )
    except ConfigError as exc:
        raise fail(str(exc), 2) from exc
    raise typer.Exit(run_edge(settings))


@edge_app.command("status")
def edge_status(
    data: Annotated[Path, typer.Option("--data", help="The edge's data directory.")] = Path(
        "./fieldline-edge"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show what this node has and its health, part by part (works while the daemon runs)."""
    from fieldline.cli.health_view import edge_view
    from fieldline.edge.status import StatusError, read_status

    try:
        status = read_status(data)
    except StatusError as exc:
        raise fail(str(exc), 2) from exc
    if as_json:
        print_json(status.model_dump(mode="json"))
        return
    console.print(edge_view(status))


@edge_app.command("healthcheck")
def edge_healthcheck(
    data: DataEnvOpt = Path("./fieldline-edge"),
    max_age_s: Annotated[
        float, typer.Option(help="Oldest acceptable heartbeat, in seconds.")
    ] = 60.0,
) -> None:
    """Exit 0 when the edge daemon wrote a heartbeat within --max-age-s (container checks)."""
    import time

    from fieldline.edge.store import EdgeStore, StoreError

    try:
        store = EdgeStore(data, read_only=True)
    except StoreError as exc:
        raise fail(str(exc), 1) from exc
    try:
        stamp = store.get_meta("health_at")
    finally:
        store.close()
    if stamp is None:
        raise fail("the edge daemon has not reported health yet", 1)
    age = time.time() - int(stamp) / 1000
    if age > max_age_s:
        raise fail(f"the edge daemon's last heartbeat is {age:.0f}s old", 1)
    console.print(f"ok: heartbeat {age:.1f}s ago")
