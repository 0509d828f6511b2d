"""The `fieldline` command: one typer app, a module of cli/commands/ per command group.

Heavy modules (torch, grpc servers) are imported inside the commands that need them, so
`fieldline --help` and the admin commands start fast.
"""

from __future__ import annotations

import typer

from fieldline.cli.commands import (
    artifact,
    assign,
    audit,
    cloud,
    edge,
    engine,
    key,
    nodes,
    policy,
    records,
    rollout,
    token,
)

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="fieldline: edge-and-cloud deployment agent for industrial AI.",
)
app.add_typer(cloud.cloud_app, name="cloud")
app.add_typer(edge.edge_app, name="edge")
app.add_typer(token.token_app, name="token")
app.add_typer(key.key_app, name="key")
app.add_typer(artifact.artifact_app, name="artifact")
app.add_typer(nodes.nodes_app, name="nodes")
app.add_typer(policy.policy_app, name="policy")
app.command("assign")(assign.assign)
app.add_typer(engine.engine_app, name="engine")
app.command("records")(records.records)
app.command("audit")(audit.audit)
app.add_typer(rollout.rollout_app, name="rollout")


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
