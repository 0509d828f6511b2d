"""The `fieldline` command: one typer app with cloud, edge, admin and engine sub-commands.

Heavy modules (torch, grpc servers) are imported inside the commands that need them, so
`fieldline --help` and the admin commands start fast.
"""

from __future__ import annotations

import typer

from fieldline.cli.commands import admin as admin_cmds
from fieldline.cli.commands import daemons as daemon_cmds
from fieldline.cli.commands import engine as engine_cmds
from fieldline.cli.commands import rollout as rollout_cmds

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="fieldline: edge-and-cloud deployment agent for industrial AI.",
)
app.add_typer(daemon_cmds.cloud_app, name="cloud")
app.add_typer(daemon_cmds.edge_app, name="edge")
app.add_typer(admin_cmds.token_app, name="token")
app.add_typer(admin_cmds.key_app, name="key")
app.add_typer(admin_cmds.artifact_app, name="artifact")
app.add_typer(admin_cmds.nodes_app, name="nodes")
app.add_typer(admin_cmds.policy_app, name="policy")
app.command("assign")(admin_cmds.assign)
app.add_typer(engine_cmds.engine_app, name="engine")
app.command("records")(admin_cmds.records)
app.add_typer(rollout_cmds.rollout_app, name="rollout")


@app.command("demo")
def demo(
    duration: float = typer.Option(60.0, help="Seconds to run before stopping everything."),
    workdir: str = typer.Option("", help="Keep the demo's files here (default: a temp dir)."),
) -> None:
    """Run a whole local stack: a cloud and two edges, an artifact rolled out by label."""
    from fieldline.cli.demo.run import run_demo

    raise typer.Exit(run_demo(duration=duration, workdir=workdir or None))


def main() -> None:
    app()
