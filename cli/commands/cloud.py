"""`fieldline cloud`: run the controller, check it, back it up and restore it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fieldline.cli.commands.common import ConfigOpt, DataEnvOpt, split_hostport
from fieldline.cli.output import console, fail
from fieldline.shared.config import CloudSettings, ConfigError, load_settings

cloud_app = typer.Typer(no_args_is_help=True, help="The cloud controller.")


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


@cloud_app.command("healthcheck")
def cloud_healthcheck(
    data: DataEnvOpt = Path("./fieldline-cloud"),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for /healthz.")] = 5.0,
) -> None:
    """Exit 0 when the cloud on this host answers /healthz (container and probe checks)."""
    import json
    import ssl

    import httpx

    try:
        ports = json.loads((data / "ports.json").read_text())
    except (OSError, ValueError) as exc:
        raise fail(f"no running cloud found in {data} ({exc})", 1) from exc
    verify: ssl.SSLContext | bool = True
    scheme = "http"
    if ports.get("tls"):
        scheme, verify = "https", ssl.create_default_context(cafile=str(data / "tls" / "ca.crt"))
    try:
        r = httpx.get(
            f"{scheme}://127.0.0.1:{ports['http']}/healthz", timeout=timeout, verify=verify
        )
    except httpx.HTTPError as exc:
        raise fail(f"cloud health check failed: {exc}", 1) from exc
    if r.status_code != 200:
        raise fail(f"cloud health check failed: HTTP {r.status_code}", 1)
    console.print(r.text)


@cloud_app.command("backup")
def cloud_backup(
    out: Annotated[Path, typer.Argument(help="The archive to write (.tar.gz, mode 0600).")],
    data: DataEnvOpt = Path("./fieldline-cloud"),
) -> None:
    """Back up the cloud data directory while the cloud runs: store, keys, TLS, blobs."""
    from rich.progress import BarColumn, DownloadColumn, Progress

    from fieldline.cloud.backup import BackupError, backup

    size = (
        sum(p.stat().st_size for p in (data / "blobs").rglob("*") if p.is_file())
        if (data / "blobs").exists()
        else 0
    )
    try:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("backup", total=size or None)
            report = backup(data, out, progress=lambda n: progress.advance(task, n))
    except (BackupError, OSError) as exc:
        raise fail(str(exc), 1) from exc
    console.print(f"backed up {report.files} files ({report.bytes} bytes) to {report.path}")


@cloud_app.command("restore")
def cloud_restore(
    archive: Annotated[Path, typer.Argument(help="An archive from `fieldline cloud backup`.")],
    data: Annotated[Path, typer.Option("--data", help="A new, empty data directory.")],
) -> None:
    """Restore a backup into an empty data directory (then start the cloud on it)."""
    from fieldline.cloud.backup import BackupError, restore

    try:
        count = restore(archive, data)
    except BackupError as exc:
        raise fail(str(exc), 1) from exc
    console.print(f"restored {count} files into {data}")
