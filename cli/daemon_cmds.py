"""Commands that run the daemons: `fieldline cloud serve`, `fieldline edge run|status`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fieldline.cli.output import console, fail, print_json, print_table
from fieldline.shared.config import CloudSettings, ConfigError, EdgeSettings, load_settings

cloud_app = typer.Typer(no_args_is_help=True, help="The cloud controller.")
edge_app = typer.Typer(no_args_is_help=True, help="The edge daemon.")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (FIELDLINE_* env vars override it)."),
]


def split_hostport(value: str | None, flag: str) -> tuple[str | None, int | None]:
    """Parse HOST:PORT (IPv6 as [::1]:PORT); None passes through."""
    if value is None:
        return None, None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise fail(f"{flag} expects HOST:PORT, got {value!r}", 2)
    return host.strip("[]"), int(port)


@cloud_app.command("serve")
def cloud_serve(
    data: Annotated[Path | None, typer.Option("--data", help="Data directory.")] = None,
    http: Annotated[str | None, typer.Option("--http", help="Admin API HOST:PORT.")] = None,
    grpc: Annotated[str | None, typer.Option("--grpc", help="Tunnel server HOST:PORT.")] = None,
    config: ConfigOpt = None,
    tls: Annotated[
        bool | None,
        typer.Option(
            "--tls/--no-tls",
            help="HTTPS admin API, mutual-TLS tunnel, TLS enrollment listener; mints a CA "
            "and a server certificate in DATA/tls on first start unless --tls-cert is given.",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="Server certificate (chain) PEM.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Its private key PEM.")] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option("--tls-ca", help="The CA that signed --tls-cert (edges pin it)."),
    ] = None,
    tls_hostname: Annotated[
        list[str] | None,
        typer.Option("--tls-hostname", help="Extra name for the minted certificate (repeat)."),
    ] = None,
    enroll: Annotated[
        str | None, typer.Option("--enroll", help="TLS enrollment listener HOST:PORT.")
    ] = None,
) -> None:
    """Run the admin API and the tunnel server in one process."""
    from fieldline.cloud.server import serve

    http_host, http_port = split_hostport(http, "--http")
    grpc_host, grpc_port = split_hostport(grpc, "--grpc")
    enroll_host, enroll_port = split_hostport(enroll, "--enroll")
    try:
        settings = load_settings(
            CloudSettings,
            config,
            data_dir=data,
            http_host=http_host,
            http_port=http_port,
            grpc_host=grpc_host,
            grpc_port=grpc_port,
            tls=True if (tls_cert or tls_key or tls_ca) and tls is None else tls,
            tls_cert_file=tls_cert,
            tls_key_file=tls_key,
            tls_ca_file=tls_ca,
            tls_hostnames=tls_hostname or None,
            enroll_host=enroll_host,
            enroll_port=enroll_port,
        )
    except ConfigError as exc:
        raise fail(str(exc), 2) from exc
    raise typer.Exit(serve(settings))


@edge_app.command("run")
def edge_run(
    cloud: Annotated[str | None, typer.Option("--cloud", help="Cloud tunnel HOST:PORT.")] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Enrollment token (first start only).")
    ] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Data directory.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the edge daemon: enroll once, then keep the node in its desired state."""
    from fieldline.edge.agent import run_edge

    split_hostport(cloud, "--cloud")
    try:
        settings = load_settings(EdgeSettings, config, cloud=cloud, token=token, data_dir=data)
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
    """Show what this node has (works while the daemon runs)."""
    from fieldline.edge.status import StatusError, read_status

    try:
        status = read_status(data)
    except StatusError as exc:
        raise fail(str(exc), 2) from exc
    if as_json:
        print_json(status.model_dump(mode="json"))
        return
    info = status.model_dump(mode="json")
    artifacts = info.pop("artifacts", [])
    for key, value in info.items():
        console.print(f"[bold]{key}[/bold]: {value}")
    if artifacts:
        cols = [(k, k) for k in artifacts[0]]
        print_table(artifacts, cols, title="artifacts")
