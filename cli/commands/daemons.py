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


DataEnvOpt = Annotated[
    Path,
    typer.Option("--data", envvar="FIELDLINE_DATA_DIR", help="The daemon's data directory."),
]


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
